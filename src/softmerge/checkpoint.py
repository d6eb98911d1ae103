"""Checkpoints of gate training: save every K steps, resume after a crash with the same result.

A checkpoint holds everything the rest of a run depends on: both levels of ``log_alpha``, the
optimiser's state, the gate-noise generator's state, the step, the history, trajectory and
loss window so far, and the candidates' solo losses. The merge data's order is not stored: the
loader is rebuilt from its seed and fast-forwarded past the batches already used, so a resumed
run sees the same batches in the same order and ends with bit-identical gates.

A checkpoint also records a *fingerprint* of the merge (candidates' bytes, plan, fit settings,
seed, step count and the caller's description of the data); resuming with anything else is
refused. Files are written atomically (a crash mid-write leaves the previous checkpoint) and
read with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .candidates import _load_error_detail
from .errors import ConfigError
from .io import atomic_write

FORMAT = "softmerge-fit-checkpoint"
VERSION = 1


def checkpoint_path(out_dir: str | os.PathLike[str]) -> Path:
    """Where ``softmerge merge`` keeps the checkpoint of a run writing into ``out_dir``: a hidden
    file beside it (outside the staging folder, which only exists once training is done)."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.checkpoint.pt"


def fingerprint(description: Mapping[str, Any], tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of a JSON description and of the bytes, dtypes and shapes of ``tensors``."""
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    for name, t in tensors:
        digest.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Write ``state`` (plain containers, numbers, strings and tensors) atomically."""
    payload = {"format": FORMAT, "version": VERSION, **state}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; ConfigError if there is none or it is
    not one (truncated, corrupt, another program's file, another softmerge version)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"{p}: no checkpoint to resume from (one is written every fit.checkpoint_every "
            "steps of a run that has it set)"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types on a truncated or foreign file
        detail = _load_error_detail(str(exc)) or type(exc).__name__
        raise ConfigError(
            f"{p}: cannot read the checkpoint (truncated or corrupt?): {detail}; "
            "delete it to start over"
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ConfigError(f"{p}: not a softmerge gate-training checkpoint")
    if obj.get("version") != VERSION:
        raise ConfigError(
            f"{p}: checkpoint format version {obj.get('version')!r}, this softmerge reads "
            f"version {VERSION}; delete it to start over"
        )
    return obj


def remove_checkpoint(path: str | os.PathLike[str]) -> None:
    """Delete a checkpoint and any temporary file a killed write left beside it."""
    p = Path(path)
    with contextlib.suppress(FileNotFoundError):
        p.unlink()
    if p.parent.is_dir():
        for stale in p.parent.glob(f".{p.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
