"""Where MNIST comes from (softmerge.data.locate): the resolution order, the verified download
(against a local HTTP server on 127.0.0.1, never the internet) and the error that lists every
place looked at."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from softmerge.config import load_config
from softmerge.data import cache_dir, find_mnist_files, locate, mnist_splits, resolve_mnist
from softmerge.errors import DataError
from softmerge.objectives import resolve_objective
from softmerge.pipeline import load_data

NAMES = list(locate.CHECKSUMS)  # the four file names the mirrors serve


def _idx(magic: int, array: np.ndarray) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _fake_mnist_gz(n_train: int = 30, n_test: int = 10) -> dict[str, bytes]:
    """The four gzip files of a tiny fake MNIST (pixel value = label * 20), by mirror name."""
    files = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.repeat(labels * 20, 28 * 28).reshape(n, 28, 28)
        files[f"{stem}-images-idx3-ubyte.gz"] = gzip.compress(_idx(2051, images), mtime=0)
        files[f"{stem}-labels-idx1-ubyte.gz"] = gzip.compress(_idx(2049, labels), mtime=0)
    return files


FAKE = _fake_mnist_gz()
SUMS = {name: hashlib.md5(blob).hexdigest() for name, blob in FAKE.items()}


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return folder


class _Server:
    """A static file server on 127.0.0.1 over ``root``; ``requests`` records every path asked
    and ``codes`` the HTTP status of each answer."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        self.codes: list[int] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                server.requests.append(self.path)  # called once per answer, 404s included
                server.codes.append(int(code))

            def log_message(self, *args: object) -> None:  # keep the test output clean
                pass

        handler = functools.partial(Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def mirror(self, name: str) -> str:
        return f"{self.url}/{name}/"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    srv = _Server(tmp_path / "www")
    srv.root.mkdir()
    thread = threading.Thread(target=srv.httpd.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    thread.join()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty user cache of our own (conftest already keeps every test off the real one)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "softmerge" / "mnist"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- download ------------------------------------------------------------------------------


def test_download_good_files_fill_the_cache(
    server: _Server, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(server.root / "m1", FAKE)
    folder = resolve_mnist(mirrors=[server.mirror("m1")], checksums=SUMS, progress=True)
    assert folder == cache == cache_dir() / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(NAMES)  # no temporary file left
    for name, blob in FAKE.items():
        assert (folder / name).read_bytes() == blob
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err  # the progress bar
    # Now in the cache: found without any download, and read like any MNIST folder.
    assert resolve_mnist(download=False) == cache
    splits = mnist_splits(num_train=20, num_merge=10, download=False)
    assert splits.sizes() == {"train": 20, "merge": 10, "test": 10}
    assert len(server.requests) == 4  # one request per file, none on the second resolve


def test_download_fetches_only_the_missing_files(server: _Server, cache: Path) -> None:
    _write(server.root / "m1", FAKE)
    _write(cache, {NAMES[0]: FAKE[NAMES[0]]})
    resolve_mnist(mirrors=[server.mirror("m1")], checksums=SUMS, progress=False)
    assert sorted(server.requests) == sorted(f"/m1/{n}" for n in NAMES[1:])


def test_corrupt_download_is_refused_and_leaves_nothing(server: _Server, cache: Path) -> None:
    bad = dict(FAKE)
    bad["train-labels-idx1-ubyte.gz"] = FAKE["train-labels-idx1-ubyte.gz"][:-4] + b"\0\0\0\0"
    _write(server.root / "m1", bad)
    with pytest.raises(DataError) as info:
        resolve_mnist(mirrors=[server.mirror("m1")], checksums=SUMS, progress=False)
    message = str(info.value)
    assert "train-labels-idx1-ubyte.gz: checksum mismatch" in message
    assert SUMS["train-labels-idx1-ubyte.gz"] in message
    assert "\n" not in message
    # The file before it was good and stays; the corrupt one is gone, with its temporary file.
    assert sorted(p.name for p in cache.iterdir()) == ["train-images-idx3-ubyte.gz"]


def test_404_tries_the_next_mirror(server: _Server, cache: Path) -> None:
    (server.root / "empty").mkdir()
    _write(server.root / "m2", FAKE)
    mirrors = [server.mirror("empty"), server.mirror("m2")]
    assert resolve_mnist(mirrors=mirrors, checksums=SUMS, progress=False) == cache
    assert server.requests[:2] == [f"/empty/{NAMES[0]}", f"/m2/{NAMES[0]}"]
    assert server.codes[:2] == [404, 200]
    assert find_mnist_files(cache)["train_images"].name == NAMES[0]


def test_corrupt_copy_on_one_mirror_falls_back_to_the_next(server: _Server, cache: Path) -> None:
    _write(server.root / "bad", {name: b"not gzip" for name in NAMES})
    _write(server.root / "good", FAKE)
    mirrors = [server.mirror("bad"), server.mirror("good")]
    resolve_mnist(mirrors=mirrors, checksums=SUMS, progress=False)
    for name, blob in FAKE.items():
        assert (cache / name).read_bytes() == blob


def test_no_server_gives_one_clear_error(cache: Path) -> None:
    mirror = f"http://127.0.0.1:{_closed_port()}/mnist/"
    with pytest.raises(DataError) as info:
        resolve_mnist(mirrors=[mirror], checksums=SUMS, progress=False, timeout=5)
    message = str(info.value)
    assert message.startswith("MNIST not found; looked at: SOFTMERGE_DATA is not set; ")
    assert f"cache {cache}: MNIST folder not found" in message
    assert f"{mirror}{NAMES[0]}: unreachable" in message
    assert "to provide MNIST" in message and "SOFTMERGE_DATA" in message
    assert "\n" not in message
    assert not cache.parent.parent.exists()  # the cache folders it made are gone again


def test_real_mirrors_are_never_reached_from_tests(cache: Path) -> None:
    """conftest's guard: the default mirrors fail at once, as they would offline."""
    with pytest.raises(DataError, match=r"tests stay off the internet") as info:
        resolve_mnist(progress=False)
    assert locate.MIRRORS[0] in str(info.value)
    assert len(locate.MIRRORS) >= 2 and set(locate.CHECKSUMS) == set(NAMES)


# --- resolution order ----------------------------------------------------------------------


def test_explicit_path_wins_and_has_no_fallback(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = _write(tmp_path / "mine", FAKE)
    _write(tmp_path / "env" / "mnist", FAKE)
    monkeypatch.setenv("SOFTMERGE_DATA", str(tmp_path / "env"))
    assert resolve_mnist(mine) == mine
    with pytest.raises(DataError, match=r"typo: MNIST folder not found"):
        resolve_mnist(tmp_path / "typo")  # a folder the user names is not silently replaced


def test_environment_variable_before_the_cache(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "data" / "mnist", FAKE)
    _write(cache, FAKE)
    monkeypatch.setenv("SOFTMERGE_DATA", str(tmp_path / "data"))
    assert resolve_mnist(download=False) == tmp_path / "data" / "mnist"
    monkeypatch.setenv("SOFTMERGE_DATA", str(tmp_path / "nothing-here"))
    assert resolve_mnist(download=False) == cache  # a wrong variable falls through (warned)


def test_nothing_found_without_download_lists_every_place(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOFTMERGE_DATA", str(tmp_path / "data"))
    with pytest.raises(DataError) as info:
        mnist_splits(download=False)
    message = str(info.value)
    assert f"SOFTMERGE_DATA={tmp_path / 'data'}: {tmp_path / 'data' / 'mnist'}: MNIST folder" in (
        message
    )
    assert f"cache {cache}: MNIST folder not found" in message
    assert "no download tried (download=False)" in message
    assert f"copy them into {cache}" in message


def test_default_cache_without_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "softmerge"


def test_yaml_mnist_without_path_resolves(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "data" / "mnist", FAKE)
    monkeypatch.setenv("SOFTMERGE_DATA", str(tmp_path / "data"))
    for name in ("a", "b"):
        (tmp_path / f"{name}.safetensors").touch()
    config = {
        "model": {"factory": "softmerge.zoo:MLP", "kwargs": {"in_features": 784, "hidden": [8]}},
        "candidates": ["a.safetensors", "b.safetensors"],
        "data": {"dataset": "mnist", "kwargs": {"num_merge": 12, "flatten": True}},
        "output": {"dir": "out"},
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    assert cfg.data.path is None
    data = load_data(cfg, resolve_objective("classification"))
    assert len(data.merge) == 12 and data.merge.tensors[0].shape == (12, 784)
