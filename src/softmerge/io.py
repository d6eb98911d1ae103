"""Atomic file output: every file softmerge writes appears whole or not at all.

Each writer stages into a temporary file in the destination folder (same file system, so the
final ``os.replace`` is atomic) and removes the stage if anything fails, so an interrupted or
failed write never leaves a partial file and never touches an existing one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import ConfigError, OutputError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def os_reason(exc: BaseException) -> str:
    """The short reason of an OS-level failure: "No space left on device", not a repr."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    found = re.search(r'message: "([^"]+)"', text)  # safetensors wraps Rust's io::Error
    return found.group(1) if found else next(iter(text.splitlines()), type(exc).__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path`` atomically.

    An OS error (no permission, disk full...) becomes one :class:`OutputError` naming ``path``;
    the temporary file is removed whatever happens."""
    dest = Path(path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"{dest}: cannot write: {os_reason(exc)}") from exc
    try:
        yield Path(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, (OSError, SafetensorError)):
            raise OutputError(f"{dest}: cannot write: {os_reason(exc)}") from exc
        raise


def writable_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why no file can be created in ``folder`` (or where it would be created), else None.

    Probes with a real temporary file: permission bits alone miss read-only file systems and
    ACLs, and do not apply to root."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".softmerge-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return f"cannot create files in {probe}: {os_reason(exc)}"
    return None


def atomic_write(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save tensors as safetensors; tensors are made contiguous and un-shared first."""
    clean = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=dict(metadata or {})))


# ---------------------------------------------------------------------------------------------
# Output folders: refuse to overwrite inputs; publish all files at once.


def check_output_dir(out: Path, inputs: list[tuple[str, Path]], label: str) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{label}: {out} exists and is not a folder")
    target = out.resolve()
    for key, path in inputs:
        src = path.resolve()
        if src == target or target in src.parents:
            how = "is" if src == target else "contains"
            raise ConfigError(
                f"{label}: the output folder {out} {how} the input {key} ({path}); "
                "writing there could overwrite it: choose another folder"
            )


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder; on success move its content into ``out``.

    A failed write (disk full, permissions) is one :class:`OutputError` naming the file the
    user will look for in ``out``, not the staging copy; ``out`` is left as it was."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the outputs: {os_reason(exc)}") from exc
    try:
        yield stage
        if not out.exists():
            os.replace(stage, out)  # one atomic rename
            return
        for item in sorted(stage.iterdir()):  # keep unrelated files the folder already has
            dest = out / item.name
            if item.is_dir() and dest.is_dir():
                shutil.rmtree(dest)
            os.replace(item, dest)
    except OutputError as exc:
        raise OutputError(str(exc).replace(str(stage), str(out))) from exc
    except OSError as exc:  # moving the staged files into place
        raise OutputError(f"{out}: cannot write the outputs: {os_reason(exc)}") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
