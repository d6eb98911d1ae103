"""Shared test setup: MNIST from the user's own setup, and no test on the internet.

Real MNIST is looked for once, at collection, the way users provide it (``SOFTMERGE_DATA`` or
the user cache; never a download). Tests that need it take the ``mnist_dir`` fixture, which
skips with a reason saying how to provide it. Every test then runs with ``SOFTMERGE_DATA``
unset, an empty user cache, and downloads allowed only from 127.0.0.1 (the local test server),
so no test depends on the machine's data or reaches a real mirror.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
from pathlib import Path
from typing import IO

import pytest

from softmerge.data import locate
from softmerge.errors import DataError


def _find_real_mnist() -> tuple[Path | None, str]:
    try:
        return locate.resolve_mnist(download=False), ""
    except DataError:
        return None, (
            f"MNIST not found: set {locate.ENV_VAR} to a folder holding mnist/ (the four IDX "
            f"files), or run softmerge once with network access to fill {locate.cache_dir()}"
        )


REAL_MNIST, MNIST_MISSING = _find_real_mnist()
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_real_open_url = locate._open_url


def _loopback_only(url: str, timeout: float) -> IO[bytes]:
    host = urllib.parse.urlsplit(url).hostname
    if host not in _LOOPBACK:
        raise urllib.error.URLError(f"tests stay off the internet ({host})")
    return _real_open_url(url, timeout)


@pytest.fixture(autouse=True)
def _no_user_data_no_internet(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    monkeypatch.delenv(locate.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    monkeypatch.setattr(locate, "_open_url", _loopback_only)


@pytest.fixture
def real_mnist() -> tuple[Path | None, str]:
    """(the folder holding real MNIST, "") or (None, why not and how to provide it): for tests
    that can do without MNIST."""
    return REAL_MNIST, MNIST_MISSING


@pytest.fixture
def mnist_dir() -> Path:
    """The folder holding real MNIST, or a skip that says how to provide it."""
    if REAL_MNIST is None:
        pytest.skip(MNIST_MISSING)
    return REAL_MNIST
