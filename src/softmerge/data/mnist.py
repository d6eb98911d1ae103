"""MNIST from its original IDX files (gzip-compressed or raw).

The folder comes from :func:`softmerge.data.locate.resolve_mnist`: the one the user names, else
``$SOFTMERGE_DATA/mnist``, else the user cache, else a verified download into that cache.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from softmerge.data.locate import find_mnist_files, resolve_mnist
from softmerge.data.splits import Splits, check_sizes, permutation, tensor_dataset
from softmerge.errors import DataError

MEAN, STD = 0.1307, 0.3081  # the usual MNIST normalisation constants
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049

# IDX type byte -> big-endian numpy dtype (the format stores multi-byte values big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped if it ends in ``.gz``."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as err:  # truncated or corrupt gzip stream
        raise DataError(f"{path}: cannot read ({err})") from err


def _parse_header(path: Path, raw: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """Return (dtype, dims, header length) from an IDX header, or raise DataError."""
    if len(raw) < 4:
        raise DataError(f"{path}: only {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    type_code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: bad IDX magic number {magic} (0x{magic:08x})")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} of {header_len} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return _IDX_DTYPES[type_code], dims, header_len


def read_idx(path: str | os.PathLike[str], magic: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into an array in native byte order.

    ``magic``, if given, is the magic number the file must have (2051 images, 2049 labels).
    Raises DataError naming the file when it is missing, has a bad or unexpected magic number,
    or holds more or fewer bytes than its header announces.
    """
    path = Path(path)
    raw = _read_bytes(path)
    dtype, dims, header_len = _parse_header(path, raw)
    found = int.from_bytes(raw[:4], "big")
    if magic is not None and found != magic:
        raise DataError(f"{path}: IDX magic number is {found}, expected {magic}")
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        shape = "x".join(map(str, dims))
        raise DataError(
            f"{path}: header announces {shape} values ({expected} bytes) but the file holds "
            f"{actual} bytes after the header (truncated or corrupt)"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    # astype copies: the result is writable, native-endian and does not pin ``raw``.
    return data.astype(dtype.newbyteorder("="))


def _load_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, magic=IMAGES_MAGIC)
    labels = read_idx(labels_path, magic=LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    return images, labels


def _normalise(images: np.ndarray, flatten: bool) -> np.ndarray:
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    return x.reshape(len(x), -1) if flatten else x[:, None]


def mnist_splits(
    path: str | os.PathLike[str] | None = None,
    num_train: int | None = None,
    num_merge: int = 5_000,
    seed: int = 0,
    flatten: bool = False,
    download: bool = True,
    progress: bool = True,
) -> Splits:
    """MNIST from the IDX files in folder ``path``, or wherever :func:`resolve_mnist` finds them
    when ``path`` is None (``download=False``: never download; ``progress``: its progress bar).

    The merge split is drawn from the 60k training images with a permutation from ``seed``; train
    is the next ``num_train`` of that permutation (all the rest if None); test is the 10k test set.
    x is normalised with mean 0.1307 / std 0.3081, shape (N, 1, 28, 28) or (N, 784) if flatten.
    """
    check_sizes(None, num_train=num_train, num_merge=num_merge)
    files = find_mnist_files(resolve_mnist(path, download=download, progress=progress))
    train_x, train_y = _load_pair(files["train_images"], files["train_labels"])
    test_x, test_y = _load_pair(files["test_images"], files["test_labels"])
    try:
        check_sizes(len(train_y), num_train=num_train, num_merge=num_merge)
    except ValueError as err:
        raise DataError(f"{files['train_images']}: {err}") from err
    order = permutation(len(train_y), seed)
    merge_idx = order[:num_merge]
    stop = None if num_train is None else num_merge + num_train
    train_idx = order[num_merge:stop]
    return Splits(
        name="mnist",
        train=tensor_dataset(_normalise(train_x[train_idx], flatten), train_y[train_idx]),
        merge=tensor_dataset(_normalise(train_x[merge_idx], flatten), train_y[merge_idx]),
        test=tensor_dataset(_normalise(test_x, flatten), test_y),
        num_classes=10,
        input_shape=(784,) if flatten else (1, 28, 28),
    )
