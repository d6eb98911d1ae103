"""Checkpoints of a fit: save every K steps, resume after a crash with the same result.

A checkpoint holds what the rest of a run depends on and nothing else: the trained module's
``state_dict`` (the gates), the optimiser's state, the noise generator's state, the step, each
callback's ``state_dict`` (history, trajectory...) and the run's own notes (the candidates' solo
losses, the reference candidate). The merge data's order is not stored: the loader is rebuilt
from its seed and fast-forwarded past the batches already used, so a resumed run sees the same
batches in the same order and ends with bit-identical gates.

A checkpoint also records a *fingerprint* of the merge (the stacked candidates' bytes, plan,
fit settings, seed, step count and the caller's description of the data); resuming with anything
else is refused. Files are written atomically (a crash mid-write leaves the previous checkpoint)
and read with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .candidates import load_error_detail
from .errors import ConfigError
from .fit import Callback, FitLoop, StepInfo
from .io import atomic_write

FORMAT = "softmerge-fit-checkpoint"
VERSION = 2


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
        flat = t.detach().contiguous().reshape(-1)
        for start in range(0, flat.numel(), 1 << 24):  # 16M elements at a time off the device
            part = flat[start : start + (1 << 24)].cpu()
            digest.update(part.view(torch.uint8).numpy().data)
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
        detail = load_error_detail(str(exc)) or type(exc).__name__
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


def same_loss(a: float, b: float) -> bool:
    """Equal up to float noise (another thread count sums in another order); inf == inf."""
    if math.isfinite(a) and math.isfinite(b):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
    return (math.isnan(a) and math.isnan(b)) or a == b


class Checkpointer(Callback):
    """Saves the run every ``every`` steps (and at the last step with ``keep_last``).

    ``module`` is what trains (its ``state_dict``); ``notes`` are the run's own facts a resumed
    run must find again (solo losses, reference candidate). ``save`` is False on every process
    of a distributed run but the first: one writer."""

    name = "checkpointer"

    def __init__(
        self,
        path: Path,
        every: int,
        key: str,
        module: nn.Module,
        notes: Mapping[str, Any],
        *,
        keep_last: bool = False,
        save: bool = True,
    ) -> None:
        self.path, self.every, self.key = path, every, key
        self.module, self.notes = module, dict(notes)
        self.keep_last, self.save = keep_last, save

    def on_step(self, loop: FitLoop, info: StepInfo) -> None:
        if not self.every:
            return
        due = info.step % self.every == 0 and info.step < info.total
        if due or (info.step == info.total and self.keep_last):
            self.write(loop)

    def write(self, loop: FitLoop) -> None:
        if not self.save:
            return
        params = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        save_checkpoint(
            self.path,
            {
                "fingerprint": self.key,
                "step": loop.step,
                "total_steps": loop.total_steps,
                "module": params,
                "optimizer": loop.optimizer.state_dict(),
                "generator": None if loop.generator is None else loop.generator.get_state(),
                "callbacks": {cb.name: cb.state_dict() for cb in loop.callbacks},
                "notes": self.notes,
                "seconds": loop.seconds,
            },
        )


def restore(
    saved: Mapping[str, Any],
    path: Path,
    key: str,
    loop: FitLoop,
    module: nn.Module,
    losses: Mapping[str, float],
) -> dict[str, Any]:
    """Put the module, optimiser, generator, callbacks and step where the checkpoint left them;
    returns the saved notes. Refuses (ConfigError naming ``path``) a checkpoint of another merge."""
    if saved.get("fingerprint") != key:
        raise ConfigError(
            f"{path}: refusing to resume: the checkpoint was saved by a different merge "
            "(candidates, plan, fit settings, seed or data differ); delete it to start over"
        )
    notes = saved.get("notes")
    old = notes.get("candidate_losses") if isinstance(notes, dict) else None
    if (
        not isinstance(old, dict)
        or set(old) != set(losses)
        or not all(same_loss(losses[n], old[n]) for n in losses)
    ):
        raise ConfigError(
            f"{path}: refusing to resume: the candidates' losses on the merge data differ "
            "from the checkpoint's (other data or another data order); delete it to start over"
        )
    try:
        step = int(saved["step"])
        if not 0 <= step <= loop.total_steps:
            raise ValueError(f"step {step} outside 0..{loop.total_steps}")
        own = module.state_dict()
        for name, value in saved["module"].items():
            if name not in own or tuple(value.shape) != tuple(own[name].shape):
                raise ValueError(f"{name} has shape {tuple(value.shape)}")
        module.load_state_dict(saved["module"], strict=True)
        loop.optimizer.load_state_dict(saved["optimizer"])
        if loop.generator is not None:
            loop.generator.set_state(saved["generator"])
        for cb in loop.callbacks:
            cb.load_state_dict(saved["callbacks"].get(cb.name, {}))
        loop.step = step
        loop.seconds_before = float(saved["seconds"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:
        raise ConfigError(
            f"{path}: malformed checkpoint ({type(exc).__name__}: {exc}); delete it to start over"
        ) from exc
    return dict(notes)
