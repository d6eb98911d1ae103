"""Merged weights to disk as safetensors, tensor by tensor, in shards of a chosen size.

:class:`ShardedWriter` takes tensors one at a time and writes a shard whenever the next tensor
would make it larger than ``shard_size`` (one tensor larger than that is a shard of its own), so
a merge that produces its tensors one by one (a static method) never holds more than one shard in
memory. One shard is ``{stem}.safetensors``; several are ``{stem}-00001-of-0000N.safetensors``
with a ``{stem}.safetensors.index.json`` weight map, as Hugging Face writes them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import PlanError
from ..io import atomic_write, write_text

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
DEFAULT_SHARD_SIZE = "5GB"  # Hugging Face's default max_shard_size


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


class ShardedWriter:
    """Write tensors into ``folder`` as ``{stem}`` safetensors shards of at most ``shard_size``."""

    def __init__(
        self,
        folder: Path,
        stem: str = "merged",
        shard_size: str | int = DEFAULT_SHARD_SIZE,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.stem = stem
        self.limit = parse_size(shard_size)
        self.metadata = {"format": "pt", **dict(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []  # temporary path, keys
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + size > self.limit:
            self._flush()
        # A tensor that shares storage with another (a view, a tied weight) must be cloned:
        # safetensors refuses shared storage.
        shared = any(
            p.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
            for p in self._pending.values()
        )
        self._pending[name] = t.clone() if shared else t
        self._pending_bytes += size
        self.total_bytes += size

    def add_all(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in items:
            self.add(name, tensor)

    def _flush(self) -> None:
        # The first shard gets the single-file name: most merges have one, and an error while
        # writing it then names the file the user will look for.
        index = len(self._shards) + 1
        name = f"{self.stem}.safetensors" if index == 1 else f"{self.stem}-{index:05d}.safetensors"
        path = self.folder / name
        tensors = self._pending
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=self.metadata))
        self._shards.append((path, list(tensors)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is left and give the shards their final names; returns the files."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            return [self._shards[0][0]]
        files, weight_map = [], {}
        for i, (tmp, keys) in enumerate(self._shards, start=1):
            final = self.folder / f"{self.stem}-{i:05d}-of-{count:05d}.safetensors"
            tmp.replace(final)
            files.append(final)
            weight_map.update(dict.fromkeys(keys, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        index_path = self.folder / f"{self.stem}.safetensors.index.json"
        write_text(index_path, json.dumps(index, indent=2) + "\n")
        return [*files, index_path]


def write_state(
    folder: Path,
    items: Iterable[tuple[str, torch.Tensor]],
    *,
    stem: str = "merged",
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Stream ``(name, tensor)`` pairs into safetensors shards; returns the files written."""
    writer = ShardedWriter(folder, stem, shard_size, metadata)
    writer.add_all(items)
    return writer.close()
