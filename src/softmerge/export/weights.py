"""Merged weights to disk as safetensors, tensor by tensor, in shards of a chosen size.

A merge knows the names, shapes and dtypes of everything it will write before it computes any
of it (they are the candidates'), so each shard's header is written first and every tensor's
bytes go to disk as soon as the tensor exists: a static merge never holds more than the tensor
it is working on. The files follow the safetensors format (an 8-byte header length, a JSON
header padded to 8 bytes, then the data in header order; ``safetensors`` reads them, and the
tests check that it does). The ``safetensors`` library only writes whole dicts at once, which is
why the header is written here.

One shard is ``{stem}.safetensors``; several are ``{stem}-00001-of-0000N.safetensors`` with a
``{stem}.safetensors.index.json`` weight map, as Hugging Face writes them. Each file is written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import OutputError, PlanError
from ..io import atomic_path, os_reason, write_text

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
DEFAULT_SHARD_SIZE = "5GB"  # Hugging Face's default max_shard_size
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def parse_size(value: str | int) -> int:
    """``"5GB"``, ``"500MiB"`` or a number of bytes -> bytes (a PlanError names a bad value)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = found.group(2).upper() if found else None
        if found is None or unit not in _UNITS:
            raise PlanError(
                f"shard_size must be a number of bytes or a size like '5GB' or '500MiB', "
                f"got {value!r}"
            )
        size = int(float(found.group(1)) * _UNITS[unit])
    if size <= 0:
        raise PlanError(f"shard_size must be positive, got {value!r}")
    return size


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to be written: its name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def layout_of(state: Mapping[str, torch.Tensor]) -> list[TensorEntry]:
    return [TensorEntry(k, tuple(v.shape), v.dtype) for k, v in state.items()]


def plan_shards(layout: Sequence[TensorEntry], limit: int) -> list[list[TensorEntry]]:
    """Consecutive groups of at most ``limit`` bytes (a larger tensor is a shard of its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in layout:
        if shards[-1] and size + entry.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def write_bytes(file: BinaryIO, data: memoryview) -> None:
    """One tensor's bytes into an open shard (a seam the fault tests patch)."""
    file.write(data)


def _header(entries: Sequence[TensorEntry], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for e in entries:
        if e.dtype not in _DTYPE_NAMES:
            raise PlanError(f"tensor '{e.name}' has dtype {e.dtype}, which safetensors cannot hold")
        header[e.name] = {
            "dtype": _DTYPE_NAMES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # the data starts 8-byte aligned


class ShardedWriter:
    """Write tensors, one at a time and in ``layout`` order, into safetensors shards."""

    def __init__(
        self,
        folder: Path,
        layout: Sequence[TensorEntry],
        stem: str = "merged",
        shard_size: str | int = DEFAULT_SHARD_SIZE,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.stem = stem
        self.metadata = {"format": "pt", **dict(metadata or {})}
        self.shards = plan_shards(list(layout), parse_size(shard_size))
        self.names = [self._name(i) for i in range(len(self.shards))]
        self._queue = [(i, e) for i, shard in enumerate(self.shards) for e in shard]
        self._next = 0
        self._stack = contextlib.ExitStack()
        self._file: BinaryIO | None = None
        self._open_shard = -1

    def _name(self, index: int) -> str:
        count = len(self.shards)
        if count == 1:
            return f"{self.stem}.safetensors"
        return f"{self.stem}-{index + 1:05d}-of-{count:05d}.safetensors"

    def _start_shard(self, index: int) -> None:
        self._finish_shard()
        tmp = self._stack.enter_context(atomic_path(self.folder / self.names[index]))
        self._file = self._stack.enter_context(open(tmp, "wb"))  # noqa: SIM115 (closed by the stack)
        header = _header(self.shards[index], self.metadata)
        self._file.write(struct.pack("<Q", len(header)))
        self._file.write(header)
        self._open_shard = index

    def _finish_shard(self) -> None:
        """Close the open shard: its file is renamed into place."""
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self._file = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._queue):
            raise PlanError(f"tensor '{name}' is not among the tensors to write")
        index, entry = self._queue[self._next]
        t = tensor.detach().to("cpu").contiguous()
        if name != entry.name or tuple(t.shape) != entry.shape or t.dtype != entry.dtype:
            raise PlanError(
                f"expected tensor '{entry.name}' {entry.shape} {entry.dtype} next, got "
                f"'{name}' {tuple(t.shape)} {t.dtype}"
            )
        if index != self._open_shard:
            self._start_shard(index)
        assert self._file is not None
        if t.numel():
            try:
                write_bytes(self._file, memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            except OSError as exc:
                raise OutputError(
                    f"{self.folder / self.names[index]}: cannot write: {os_reason(exc)}"
                ) from exc
        self._next += 1

    def close(self) -> list[Path]:
        """Finish the last shard (and write the index when there are several); the files."""
        if self._next != len(self._queue):
            missing = self._queue[self._next][1].name
            self.abort()
            raise PlanError(f"the merge ended before tensor '{missing}' was written")
        if self._open_shard < 0:  # nothing to write at all: an empty file is still one shard
            self._start_shard(0)
        self._finish_shard()
        files = [self.folder / n for n in self.names]
        if len(files) == 1:
            return files
        weight_map = {e.name: self.names[i] for i, s in enumerate(self.shards) for e in s}
        total = sum(e.nbytes for s in self.shards for e in s)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        index_path = self.folder / f"{self.stem}.safetensors.index.json"
        write_text(index_path, json.dumps(index, indent=2) + "\n")
        return [*files, index_path]

    def abort(self) -> None:
        """Drop the shard being written (its temporary file is removed)."""
        with contextlib.suppress(BaseException):
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


def write_state(
    folder: Path,
    items: Iterable[tuple[str, torch.Tensor]],
    layout: Sequence[TensorEntry],
    *,
    stem: str = "merged",
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Stream ``(name, tensor)`` pairs (in ``layout`` order) into safetensors shards; returns the
    files written. On any error nothing of the unfinished shard is left behind."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(folder, layout, stem, shard_size, metadata)
    try:
        for name, tensor in items:
            writer.add(name, tensor)
            del tensor  # written: not kept alive while the next one is computed
    except BaseException:
        writer.abort()
        raise
    return writer.close()
