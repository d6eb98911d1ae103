"""Where MNIST comes from: :func:`resolve_mnist` decides, always in the same order.

1. An explicit folder (``mnist_splits(path)``, ``data.path`` in YAML, ``benchmarks/run.py
   --mnist``). A folder the user names must hold the files: no fallback hides a typo.
2. ``$SOFTMERGE_DATA/mnist`` (the variable names a folder holding ``mnist/``).
3. The user cache, ``$XDG_CACHE_HOME/softmerge/mnist`` (else ``~/.cache/softmerge/mnist``).
4. A download of the four gzip IDX files into that cache, from the first of :data:`MIRRORS`
   that serves each one, checked against its published MD5 (:data:`CHECKSUMS`).

When every step fails, one :class:`DataError` lists each place looked at and how to provide the
files. A download goes into a temporary file beside its final name and is renamed only once its
checksum matches, so the cache never holds a partial or corrupt file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from softmerge.errors import DataError

log = logging.getLogger("softmerge")

ENV_VAR = "SOFTMERGE_DATA"
# Mirrors in the order they are tried; each serves the four files under their usual names.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# Published MD5 of each gzip file as the mirrors serve it (the values torchvision checks).
CHECKSUMS: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
TIMEOUT = 30.0  # seconds without an answer before a mirror counts as unreachable
_CHUNK = 1 << 16

# The four files: key -> (stem, IDX kind). Both spellings are accepted when reading.
_FILES = {
    "train_images": ("train-images", "idx3-ubyte"),
    "train_labels": ("train-labels", "idx1-ubyte"),
    "test_images": ("t10k-images", "idx3-ubyte"),
    "test_labels": ("t10k-labels", "idx1-ubyte"),
}


def _spellings(folder: Path, stem: str, kind: str) -> list[Path]:
    """Accepted names: ``train-images.idx3-ubyte`` and ``train-images-idx3-ubyte``, ±.gz."""
    names = [f"{stem}.{kind}", f"{stem}-{kind}"]
    return [folder / (n + ext) for n in names for ext in (".gz", "")]


def find_mnist_files(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """The four MNIST files in ``folder`` by key; DataError lists every name looked for."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: MNIST folder not found")
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, (stem, kind) in _FILES.items():
        paths = _spellings(folder, stem, kind)
        hit = next((p for p in paths if p.is_file()), None)
        if hit is None:
            missing.append(" or ".join(p.name for p in paths))
        else:
            found[key] = hit
    if missing:
        raise DataError(f"{folder}: missing MNIST files; looked for: {'; '.join(missing)}")
    return found


def cache_dir() -> Path:
    """softmerge's user cache: ``$XDG_CACHE_HOME/softmerge``, else ``~/.cache/softmerge``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "softmerge"


def _how_to_provide(cache: Path) -> str:
    names = ", ".join(CHECKSUMS)
    return (
        f"to provide MNIST, put its four IDX files ({names}) in a folder and pass it "
        f"(data.path in YAML, --mnist for the benchmark, path= in Python), or set {ENV_VAR} to "
        f"a folder holding mnist/, or copy them into {cache / 'mnist'}, or run once with "
        "network access to download them there"
    )


def resolve_mnist(
    path: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    progress: bool = True,
    mirrors: Sequence[str] | None = None,
    checksums: Mapping[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> Path:
    """The folder MNIST is read from (see the module docstring for the order).

    ``path``, when given, is the only place looked at. ``download=False`` stops after the
    cache. ``mirrors``/``checksums`` default to :data:`MIRRORS`/:data:`CHECKSUMS`.
    """
    if path is not None:
        find_mnist_files(path)  # a folder the user names must hold the files
        return Path(path)
    looked: list[str] = []
    env = os.environ.get(ENV_VAR)
    if env:
        folder = Path(env) / "mnist"
        try:
            find_mnist_files(folder)
            return folder
        except DataError as err:
            looked.append(f"{ENV_VAR}={env}: {err}")
            log.warning("%s=%s holds no MNIST (%s); trying the cache", ENV_VAR, env, err)
    else:
        looked.append(f"{ENV_VAR} is not set")
    cache = cache_dir()
    folder = cache / "mnist"
    try:
        find_mnist_files(folder)
        return folder
    except DataError as err:
        looked.append(f"cache {err}")
    if not download:
        looked.append("no download tried (download=False)")
    else:
        try:
            download_mnist(
                folder, mirrors=mirrors, checksums=checksums, timeout=timeout, progress=progress
            )
            find_mnist_files(folder)
            return folder
        except DataError as err:
            looked.append(f"download: {err}")
    raise DataError(f"MNIST not found; looked at: {'; '.join(looked)}; {_how_to_provide(cache)}")


def download_mnist(
    folder: str | os.PathLike[str],
    *,
    mirrors: Sequence[str] | None = None,
    checksums: Mapping[str, str] | None = None,
    timeout: float = TIMEOUT,
    progress: bool = True,
) -> Path:
    """Download every file of ``checksums`` that ``folder`` lacks, each from the first mirror
    that serves it with the right MD5. Raises DataError naming each mirror's failure; files
    already verified stay, and folders this call created are removed again if left empty."""
    folder = Path(folder)
    mirrors = MIRRORS if mirrors is None else tuple(mirrors)
    checksums = CHECKSUMS if checksums is None else checksums
    if not mirrors:
        raise DataError("no mirror to download MNIST from")
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{folder}: cannot create the cache folder ({err})") from err
    try:
        for name, md5 in checksums.items():
            if not (folder / name).is_file():
                _fetch_one(name, md5, folder, mirrors, timeout, progress)
    except DataError:
        for path in created:  # deepest first: a failed first download leaves no trace
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise
    return folder


def _fetch_one(
    name: str, md5: str, folder: Path, mirrors: Sequence[str], timeout: float, progress: bool
) -> None:
    """``folder/name`` from the first mirror whose copy has MD5 ``md5``."""
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        try:
            _download_verified(url, folder / name, md5, timeout, progress)
            log.info("downloaded %s from %s", name, url)
            return
        except _MirrorFailure as err:
            failures.append(f"{url}: {err}")
    raise DataError(f"{name} could not be downloaded: {'; '.join(failures)}")


class _MirrorFailure(Exception):
    """One mirror could not deliver one file; the next mirror is tried."""


def _open_url(url: str, timeout: float) -> IO[bytes]:
    """The response to a GET of ``url`` (tests replace this to keep off the internet)."""
    request = urllib.request.Request(url, headers={"User-Agent": "softmerge"})
    return urllib.request.urlopen(request, timeout=timeout)


def _download_verified(url: str, target: Path, md5: str, timeout: float, progress: bool) -> None:
    """Stream ``url`` into a temporary file beside ``target``; rename it onto ``target`` only
    when its MD5 is ``md5``. Whatever fails, the temporary file is removed."""
    tmp = target.with_name(f".{target.name}.part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with _open_url(url, timeout) as response, tmp.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=target.name,
                disable=not progress,
                leave=False,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise _MirrorFailure(f"checksum mismatch (MD5 {digest.hexdigest()}, expected {md5})")
        os.replace(tmp, target)
    except urllib.error.HTTPError as err:
        raise _MirrorFailure(f"HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise _MirrorFailure(f"unreachable ({err.reason})") from err
    except (OSError, ValueError) as err:  # timeouts, resets, a bad URL, a full disk
        raise _MirrorFailure(f"{type(err).__name__}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
