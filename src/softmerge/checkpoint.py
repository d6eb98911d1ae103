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
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # soft.py imports this module; these names are for annotations only
    from .soft import FitConfig, LossFn, SoftMerger

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


# ------------------------------------------------------------------ a SoftMerger run


@dataclass
class RunState:
    """What a checkpoint carries from one process to the next, besides gates and optimiser."""

    losses: dict[str, float]
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    trajectory: list[torch.Tensor] = field(default_factory=list)
    window: list[tuple[float, float]] = field(default_factory=list)  # (loss, task) since a record
    seconds_before: float = 0.0  # training time of the earlier processes
    seconds_after: float = 0.0  # ... up to the step being saved


GATE_KEYS = ("log_alpha", "log_alpha_candidate")  # checkpoint keys, in gate_parameters order


def same_loss(a: float, b: float) -> bool:
    """Equal up to float noise (another thread count sums in another order); inf == inf."""
    if math.isfinite(a) and math.isfinite(b):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
    return (math.isnan(a) and math.isnan(b)) or a == b


def run_fingerprint(
    merger: SoftMerger, cfg: FitConfig, objective: str | LossFn, total_steps: int, run_key: str
) -> str:
    """What defines this run: a checkpoint saved under another fingerprint is refused."""
    settings = {
        k: v for k, v in asdict(cfg).items() if k not in ("progress", "checkpoint_every")
    }
    loss = objective if isinstance(objective, str) else getattr(objective, "__qualname__", "")
    description = {
        "plan": asdict(merger.plan),
        "fit": settings,
        "objective": loss,
        "total_steps": total_steps,
        "candidates": merger.names,
        "units": list(merger.layout.units),
        "run": run_key,
    }
    pool = [*merger.candidates, *([] if merger.base is None else [merger.base])]
    return fingerprint(
        description, ((f"{c.name}/{k}", t) for c in pool for k, t in c.state.items())
    )

def save_run(
    merger: SoftMerger,
    path: Path,
    key: str,
    run: RunState,
    total_steps: int,
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
) -> None:
    cand = merger.log_alpha_candidate
    save_checkpoint(
        path,
        {
            "fingerprint": key,
            "step": run.step,
            "total_steps": total_steps,
            "log_alpha": merger.log_alpha.detach().clone(),
            "log_alpha_candidate": None if cand is None else cand.detach().clone(),
            "optimizer": optimizer.state_dict(),
            "generator": gen.get_state(),
            "history": run.history,
            "trajectory": run.trajectory,
            "window": [list(w) for w in run.window],
            "candidate_losses": dict(run.losses),
            "reference": merger.reference,
            "seconds": run.seconds_after,
        },
    )

def restore_run(
    merger: SoftMerger,
    saved: Mapping[str, Any],
    path: Path,
    key: str,
    losses: Mapping[str, float],
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
    total_steps: int,
) -> RunState:
    """Put the gates, optimiser and noise generator where the checkpoint left them."""
    if saved.get("fingerprint") != key:
        raise ConfigError(
            f"{path}: refusing to resume: the checkpoint was saved by a different merge "
            "(candidates, plan, fit settings, seed or data differ); delete it to start over"
        )
    old = saved.get("candidate_losses")
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
        if not 0 <= step <= total_steps:
            raise ValueError(f"step {step} outside 0..{total_steps}")
        with torch.no_grad():
            for param, name in zip(merger.gate_parameters, GATE_KEYS, strict=False):
                value = saved[name]
                if tuple(value.shape) != tuple(param.shape):  # copy_ would broadcast
                    raise ValueError(f"{name} has shape {tuple(value.shape)}")
                param.copy_(value)
        optimizer.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        reference = int(saved["reference"])
        if not 0 <= reference < len(merger.names) or not bool(merger.active[reference]):
            raise ValueError(f"reference candidate {reference} is not an active candidate")
        merger.reference = reference
        run = RunState(
            losses=dict(old),
            step=step,
            history=list(saved["history"]),
            trajectory=list(saved["trajectory"]),
            window=[(float(a), float(b)) for a, b in saved["window"]],
            seconds_before=float(saved["seconds"]),
        )
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise ConfigError(
            f"{path}: malformed checkpoint ({type(exc).__name__}: {exc}); "
            "delete it to start over"
        ) from exc
    return run
