"""gates.json: the learned gates of every (candidate, unit) pair, and a summary per candidate.

Inputs are plain data (lists, numpy arrays) so reports can be made from a saved run without torch
or a model. Every file goes through ``softmerge.io`` so it appears whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io import write_json

PathLike = str | os.PathLike[str]

_DECIMALS = 6
_RESERVED_KEYS = ("candidates", "excluded", "units", "summary")


@dataclass
class GateSnapshot:
    """The gates of every (candidate, unit) pair at one moment of training."""

    candidates: list[str]
    units: list[str]
    log_alpha: np.ndarray
    gate: np.ndarray
    p_nonzero: np.ndarray
    excluded: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.candidates = [str(c) for c in self.candidates]
        self.units = [str(u) for u in self.units]
        self.excluded = [str(c) for c in self.excluded]
        shape = (len(self.candidates), len(self.units))
        for name in ("log_alpha", "gate", "p_nonzero"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"{name} has shape {arr.shape}, expected {shape} (N, U)")
            setattr(self, name, arr)
        # Candidate names are dict keys in gates.json, so duplicates would silently overwrite.
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidate names are not unique: {self.candidates}")
        unknown = [c for c in self.excluded if c not in self.candidates]
        if unknown:
            raise ValueError(f"excluded candidates {unknown} are not among {self.candidates}")


# --------------------------------------------------------------------------------------------
# gates.json


def _json_float(x: float, keep_ends_exact: bool = False) -> float | None:
    """A plain float rounded for reading; None for NaN/inf so the file stays strict JSON.

    With ``keep_ends_exact`` a value that is not exactly 0 or 1 keeps full precision when rounding
    would turn it into 0.0 or 1.0: readers may trust that 0.0 means "exactly off".
    """
    x = float(x)
    if not math.isfinite(x):
        return None
    r = round(x, _DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0
    if keep_ends_exact and r in (0.0, 1.0) and x not in (0.0, 1.0):
        return x
    return r


def _summary_row(gates: np.ndarray) -> dict[str, float | None]:
    if gates.size == 0:
        return dict.fromkeys(("mean_gate", "max_gate", "min_gate", "fraction_zero", "fraction_one"))
    return {
        "mean_gate": _json_float(np.mean(gates)),
        "max_gate": _json_float(np.max(gates)),
        "min_gate": _json_float(np.min(gates)),
        "fraction_zero": _json_float(np.mean(gates == 0.0)),
        "fraction_one": _json_float(np.mean(gates == 1.0)),
    }


def gates_to_dict(snap: GateSnapshot, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The gates.json content: per-unit gates of every candidate plus a per-candidate summary."""
    extra = dict(extra or {})
    clash = [k for k in extra if k in _RESERVED_KEYS]
    if clash:
        raise ValueError(f"extra keys {clash} clash with gates.json fields {_RESERVED_KEYS}")
    units = []
    for j, name in enumerate(snap.units):
        gates = {
            cand: {
                "log_alpha": _json_float(snap.log_alpha[i, j]),
                "gate": _json_float(snap.gate[i, j], keep_ends_exact=True),
                "p_nonzero": _json_float(snap.p_nonzero[i, j], keep_ends_exact=True),
            }
            for i, cand in enumerate(snap.candidates)
        }
        units.append({"name": name, "gates": gates})
    summary = {cand: _summary_row(snap.gate[i]) for i, cand in enumerate(snap.candidates)}
    return {
        "candidates": list(snap.candidates),
        "excluded": list(snap.excluded),
        "units": units,
        "summary": summary,
        **extra,
    }


def write_gates_json(
    path: PathLike, snap: GateSnapshot, extra: dict[str, Any] | None = None
) -> Path:
    return write_json(path, gates_to_dict(snap, extra))


def _from_json_float(x: Any) -> float:
    return math.nan if x is None else float(x)


def read_gates_json(path: PathLike) -> GateSnapshot:
    """Invert ``write_gates_json``; values written as null (non-finite) come back as NaN."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    try:
        candidates = list(data["candidates"])
        units = [u["name"] for u in data["units"]]
        arrays = {
            k: np.full((len(candidates), len(units)), np.nan)
            for k in ("log_alpha", "gate", "p_nonzero")
        }
        for j, unit in enumerate(data["units"]):
            for i, cand in enumerate(candidates):
                cell = unit["gates"][cand]
                for key, arr in arrays.items():
                    arr[i, j] = _from_json_float(cell[key])
        excluded = list(data.get("excluded", []))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a gates.json file: missing or malformed {exc}") from exc
    return GateSnapshot(candidates, units, excluded=excluded, **arrays)
