"""Tests for softmerge.data: IDX reading, MNIST / MNIST-1D / digits splits."""

from __future__ import annotations

import gzip
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from softmerge.data import (
    Splits,
    digits_splits,
    find_mnist_files,
    load_splits,
    mnist1d_splits,
    mnist_splits,
    read_idx,
)
from softmerge.data import mnist1d as mnist1d_module
from softmerge.errors import DataError


def _write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    path.write_bytes(header + payload)
    return path


def _check_split(part: torch.utils.data.TensorDataset, n: int, shape: tuple[int, ...]) -> None:
    x, y = part.tensors
    assert x.shape == (n, *shape)
    assert x.dtype == torch.float32
    assert y.shape == (n,)
    assert y.dtype == torch.int64
    assert int(y.min()) >= 0
    assert int(y.max()) <= 9


# --- IDX ------------------------------------------------------------------------------------


def test_read_idx_real_mnist_images_and_labels(mnist_dir: Path) -> None:
    files = find_mnist_files(mnist_dir)
    images = read_idx(files["train_images"])
    assert images.shape == (60000, 28, 28)
    assert images.dtype == np.uint8
    labels = read_idx(files["test_labels"], magic=2049)
    assert labels.shape == (10000,)
    counts = np.bincount(labels, minlength=10)
    assert len(counts) == 10
    assert counts.sum() == 10000
    assert counts.min() > 800  # every digit is well represented


def test_read_idx_raw_equals_gz(mnist_dir: Path, tmp_path: Path) -> None:
    gz = find_mnist_files(mnist_dir)["train_labels"]
    if gz.suffix != ".gz":
        pytest.skip(f"{gz} is not gzip-compressed")
    raw = tmp_path / "train-labels.idx1-ubyte"
    with gzip.open(gz, "rb") as src, raw.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    np.testing.assert_array_equal(read_idx(raw), read_idx(gz))


def test_read_idx_big_endian_types(tmp_path: Path) -> None:
    values = np.arange(6, dtype=">i4").reshape(2, 3)
    path = _write_idx(tmp_path / "ints.idx", 0x0C02, (2, 3), values.tobytes())
    out = read_idx(path)
    np.testing.assert_array_equal(out, values)
    assert out.dtype.isnative


def test_read_idx_wrong_magic(tmp_path: Path) -> None:
    path = _write_idx(tmp_path / "bad.idx1-ubyte", 0x12345678, (3,), bytes(3))
    with pytest.raises(DataError, match=r"bad.idx1-ubyte.*magic"):
        read_idx(path)


def test_read_idx_unexpected_magic(tmp_path: Path) -> None:
    path = _write_idx(tmp_path / "labels.idx1-ubyte", 2049, (3,), bytes(3))
    with pytest.raises(DataError, match=r"labels.idx1-ubyte.*2051"):
        read_idx(path, magic=2051)


def test_read_idx_truncated(tmp_path: Path) -> None:
    path = _write_idx(tmp_path / "short.idx3-ubyte", 2051, (2, 28, 28), bytes(28 * 28 + 5))
    with pytest.raises(DataError, match=r"short.idx3-ubyte.*truncated"):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    blob = gzip.compress((2049).to_bytes(4, "big") + (1000).to_bytes(4, "big") + bytes(1000))
    path = tmp_path / "cut.idx1-ubyte.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"cut.idx1-ubyte.gz"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothere.idx1-ubyte.*not found"):
        read_idx(tmp_path / "nothere.idx1-ubyte")


# --- MNIST ----------------------------------------------------------------------------------


def test_mnist_splits_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope"):
        mnist_splits(tmp_path / "nope")


def test_mnist_splits_missing_files_lists_names(tmp_path: Path) -> None:
    _write_idx(tmp_path / "train-labels-idx1-ubyte", 2049, (1,), bytes(1))
    with pytest.raises(DataError, match=r"train-images.idx3-ubyte") as info:
        mnist_splits(tmp_path)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte.gz" in message
    assert "train-labels" not in message  # found under its dash spelling


def _tiny_mnist(folder: Path, n_train: int, n_test: int) -> None:
    """Write a fake MNIST (dash spelling, raw) with pixel value = label * 20."""
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = np.repeat(labels * 20, 28 * 28).astype(np.uint8)
        _write_idx(folder / f"{stem}-images-idx3-ubyte", 2051, (n, 28, 28), images.tobytes())
        _write_idx(folder / f"{stem}-labels-idx1-ubyte", 2049, (n,), labels.tobytes())


def test_mnist_splits_on_fake_files(tmp_path: Path) -> None:
    _tiny_mnist(tmp_path, n_train=50, n_test=20)
    splits = mnist_splits(tmp_path, num_train=30, num_merge=10, seed=1)
    _check_split(splits.train, 30, (1, 28, 28))
    _check_split(splits.merge, 10, (1, 28, 28))
    _check_split(splits.test, 20, (1, 28, 28))
    x, y = splits.train.tensors
    # Pixels follow labels, so normalisation can be checked sample by sample.
    expected = (y.float() * 20 / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(x[:, 0, 0, 0], expected)
    flat = mnist_splits(tmp_path, num_merge=10, seed=1, flatten=True)
    _check_split(flat.train, 40, (784,))
    assert flat.input_shape == (784,)
    with pytest.raises(DataError, match=r"train-images"):
        mnist_splits(tmp_path, num_train=45, num_merge=10)


def test_mnist_splits_real(mnist_dir: Path) -> None:
    splits = mnist_splits(mnist_dir, num_merge=5000, seed=0, flatten=True)
    assert splits.sizes() == {"train": 55000, "merge": 5000, "test": 10000}
    assert splits.input_shape == (784,)
    assert splits.num_classes == 10
    x = splits.train.tensors[0]
    assert x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.01
    assert abs(float(x.std()) - 1.0) < 0.02


# --- MNIST-1D -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_mnist1d() -> Splits:
    return mnist1d_splits(num_train=1000, num_merge=200, num_test=300, seed=3)


def test_mnist1d_shapes(small_mnist1d: Splits) -> None:
    assert small_mnist1d.name == "mnist1d"
    assert small_mnist1d.num_classes == 10
    assert small_mnist1d.input_shape == (40,)
    _check_split(small_mnist1d.train, 1000, (40,))
    _check_split(small_mnist1d.merge, 200, (40,))
    _check_split(small_mnist1d.test, 300, (40,))
    assert set(small_mnist1d.train.tensors[1].tolist()) == set(range(10))


def test_mnist1d_deterministic_and_leaves_global_rngs(small_mnist1d: Splits) -> None:
    mnist1d_module._generate.cache_clear()  # really regenerate, not just hit the cache
    random.seed(7)
    np.random.seed(7)
    again = mnist1d_splits(num_train=1000, num_merge=200, num_test=300, seed=3)
    assert random.random() == random.Random(7).random()
    assert np.random.rand() == np.random.RandomState(7).rand()
    for part in ("train", "merge", "test"):
        for a, b in zip(
            getattr(small_mnist1d, part).tensors, getattr(again, part).tensors, strict=True
        ):
            assert torch.equal(a, b)


def test_mnist1d_parts_disjoint(small_mnist1d: Splits) -> None:
    rows = [
        tuple(r)
        for part in ("train", "merge", "test")
        for r in getattr(small_mnist1d, part).tensors[0].numpy().round(5).tolist()
    ]
    assert len(set(rows)) == len(rows)


def test_mnist1d_size_not_multiple_of_ten() -> None:
    splits = mnist1d_splits(num_train=33, num_merge=4, num_test=7, seed=0)
    assert splits.sizes() == {"train": 33, "merge": 4, "test": 7}


# --- digits and the registry ----------------------------------------------------------------


def test_digits_splits() -> None:
    splits = digits_splits(num_merge=300, num_test=400, seed=0)
    _check_split(splits.train, 1797 - 700, (64,))
    _check_split(splits.merge, 300, (64,))
    _check_split(splits.test, 400, (64,))
    assert float(splits.train.tensors[0].max()) == 1.0
    assert splits.input_shape == (64,)
    other = digits_splits(seed=1)
    assert not torch.equal(other.test.tensors[0], splits.test.tensors[0])


def test_load_splits_dispatch_and_unknown() -> None:
    assert load_splits("digits", num_merge=10, num_test=10).name == "digits"
    with pytest.raises(DataError, match=r"digits.*mnist.*mnist1d"):
        load_splits("cifar10")
