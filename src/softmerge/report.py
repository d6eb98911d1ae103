"""Reports on learned gates: gates.json, a gate heatmap, convergence curves and text tables.

Inputs are plain data (lists, dicts, numpy arrays) so reports can be made from a saved run
without torch or a model. Every file goes through ``softmerge.io`` so it appears whole or not at
all.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from softmerge.io import atomic_write, write_json

PathLike = str | os.PathLike[str]

_DECIMALS = 6
_RESERVED_KEYS = ("candidates", "excluded", "units", "summary")
_MAX_LABELLED_UNITS = 60
_DPI = 110


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


# --------------------------------------------------------------------------------------------
# figures


# Figures are built with ``Figure`` rather than pyplot: they never touch the user's backend or
# pyplot's global figure list, so nothing stays open (or leaks) whether saving works or fails.
def _new_figure(figsize: tuple[float, float]) -> Figure:
    return Figure(figsize=figsize, layout="constrained")


def _save_figure(path: PathLike, fig: Figure) -> Path:
    """Write ``fig`` as PNG atomically."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))


def _heatmap_size(snap: GateSnapshot, labelled: bool) -> tuple[float, float]:
    n, u = len(snap.candidates), len(snap.units)
    longest_cand = max((len(c) for c in snap.candidates), default=0) + 11  # " (excluded)"
    # Width: room for candidate names, then cells that widen with U up to a readable cap.
    width = min(2.0 + 0.07 * longest_cand + 0.25 * u, 20.0)
    # Height: one band per candidate plus room for the rotated unit names underneath.
    longest_unit = max((len(s) for s in snap.units), default=0) if labelled else 0
    height = 1.6 + 0.35 * n + 0.065 * min(longest_unit, 60)
    return max(width, 5.0), min(height, 30.0)


def plot_gate_heatmap(path: PathLike, snap: GateSnapshot, title: str | None = None) -> Path:
    """Heatmap of the deterministic gate: rows are candidates, columns are gate units."""
    n, u = len(snap.candidates), len(snap.units)
    labelled = u <= _MAX_LABELLED_UNITS
    fig = _new_figure(_heatmap_size(snap, labelled))
    ax = fig.subplots()
    # Nearest keeps cells crisp; past a few hundred columns cells are sub-pixel and antialiasing
    # shows the average instead of whichever column happens to land on a pixel.
    interp = "nearest" if u <= 600 else "antialiased"
    image = ax.imshow(
        snap.gate, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation=interp
    )
    fig.colorbar(image, ax=ax, label="gate", fraction=0.05 if u > 3 else 0.15)
    excluded = set(snap.excluded)
    ax.set_yticks(range(n), [c + (" (excluded)" if c in excluded else "") for c in snap.candidates])
    for tick, cand in zip(ax.get_yticklabels(), snap.candidates, strict=True):
        if cand in excluded:
            tick.set_color("grey")
    if labelled:
        ax.set_xticks(range(u), snap.units, rotation=90, fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"gate unit ({u} units)")
    ax.set_title(title if title is not None else f"gates ({n} candidates × {u} units)")
    return _save_figure(path, fig)


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that carry ``key``; a missing or None value is skipped."""
    pairs = [(r["step"], r[key]) for r in history if r.get(key) is not None]
    return [float(s) for s, _ in pairs], [float(v) for _, v in pairs]


def _line(ax: Axes, xs: list[float], ys: list[float], **kwargs: Any) -> None:
    # A lone point draws no line, so short histories get markers to stay visible.
    marker = "o" if len(xs) <= 50 else None
    ax.plot(xs, ys, marker=marker, markersize=3, **kwargs)


def _mark_empty(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


def _plot_losses(ax: Axes, history: Sequence[dict[str, Any]]) -> None:
    drawn = False
    for key in ("loss", "task_loss", "val_loss"):
        xs, ys = _series(history, key)
        if xs:
            _line(ax, xs, ys, label=key, linestyle="--" if key == "val_loss" else "-")
            drawn = True
    if drawn:
        ax.legend(fontsize="small")
    else:
        _mark_empty(ax)
    ax.set_title("loss")
    ax.set_xlabel("step")


def _plot_l0(ax: Axes, history: Sequence[dict[str, Any]]) -> None:
    xs, ys = _series(history, "l0")
    if xs:
        _line(ax, xs, ys, color="tab:purple")
    else:
        _mark_empty(ax)
    ax.set_title("expected L0")
    ax.set_xlabel("step")


def _mean_gate_matrix(
    history: Sequence[dict[str, Any]], candidates: list[str] | None
) -> tuple[list[float], np.ndarray, list[str]]:
    """Steps, a (steps, N) matrix of mean gates, and N candidate names."""
    records = [r for r in history if r.get("mean_gate") is not None]
    if not records:
        return [], np.zeros((0, 0)), []
    n = len(records[0]["mean_gate"])
    names = list(candidates) if candidates is not None else [f"candidate {i}" for i in range(n)]
    for r in records:
        if len(r["mean_gate"]) != len(names):
            raise ValueError(
                f"step {r['step']}: mean_gate has {len(r['mean_gate'])} values "
                f"for {len(names)} candidates"
            )
    steps = [float(r["step"]) for r in records]
    return steps, np.asarray([r["mean_gate"] for r in records], dtype=np.float64), names


def _plot_gates(ax: Axes, history: Sequence[dict[str, Any]], candidates: list[str] | None) -> None:
    steps, means, names = _mean_gate_matrix(history, candidates)
    for i, name in enumerate(names):
        _line(ax, steps, list(means[:, i]), label=name)
    handles, labels = ax.get_legend_handles_labels()
    top = ax  # the legend goes on the topmost axes, or the twin's line would cross it
    acc_steps, acc = _series(history, "val_acc")
    if acc_steps:
        # Accuracy lives on its own scale; a twin axis keeps the gates readable on [0, 1].
        twin = ax.twinx()
        _line(twin, acc_steps, acc, color="black", linestyle=":", label="val_acc")
        twin.set_ylabel("val_acc")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
        top = twin
    if handles:
        top.legend(handles, labels, fontsize="small", ncol=1 + len(labels) // 8)
    else:
        _mark_empty(ax)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("mean gate per candidate")
    ax.set_xlabel("step")
    ax.set_ylabel("mean gate")


def plot_convergence(
    path: PathLike,
    history: list[dict[str, Any]],
    candidates: list[str] | None = None,
    title: str | None = None,
) -> Path:
    """Three panels against step: losses, expected L0, mean gate per candidate (+ val_acc)."""
    fig = _new_figure((16, 4.5))
    axes = fig.subplots(1, 3)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    _plot_losses(axes[0], history)
    _plot_l0(axes[1], history)
    _plot_gates(axes[2], history, candidates)
    if title is not None:
        fig.suptitle(title)
    return _save_figure(path, fig)


# --------------------------------------------------------------------------------------------
# tables


def _is_number(v: Any) -> bool:
    # bool is an int subclass but reads as a word, so it is aligned like text.
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_)
    )


def _cell(v: Any, floatfmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, (float, np.floating)):
        return format(float(v), floatfmt)
    # Line breaks would tear a row apart in either table format.
    return str(v).replace("\r", " ").replace("\n", " ")


def _prepare(
    rows: list[dict[str, Any]], columns: list[str] | None, floatfmt: str
) -> tuple[list[str], list[list[str]], list[bool]]:
    """Columns, formatted cells, and per column whether it is numeric (right-aligned)."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c), floatfmt) for c in columns] for row in rows]
    numeric = []
    for c in columns:
        present = [row[c] for row in rows if row.get(c) is not None]
        numeric.append(bool(present) and all(_is_number(v) for v in present))
    return [str(c) for c in columns], cells, numeric


def _pad(text: str, width: int, right: bool) -> str:
    return text.rjust(width) if right else text.ljust(width)


def format_table(
    rows: list[dict[str, Any]], columns: list[str] | None = None, floatfmt: str = ".2f"
) -> str:
    """An aligned plain-text table: header, dashed separator, one line per row."""
    header, cells, numeric = _prepare(rows, columns, floatfmt)
    if not header:
        return ""
    widths = [max(len(s) for s in [h, *(r[j] for r in cells)]) for j, h in enumerate(header)]

    def line(values: list[str]) -> str:
        padded = (_pad(v, w, r) for v, w, r in zip(values, widths, numeric, strict=True))
        return "  ".join(padded).rstrip()

    separator = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), separator, *(line(r) for r in cells)])


def format_markdown_table(
    rows: list[dict[str, Any]], columns: list[str] | None = None, floatfmt: str = ".2f"
) -> str:
    """A GitHub markdown table with the same content; numeric columns are right-aligned."""
    header, cells, numeric = _prepare(rows, columns, floatfmt)
    if not header:
        return ""
    header = [h.replace("|", "\\|") for h in header]
    cells = [[v.replace("|", "\\|") for v in r] for r in cells]
    widths = [max(3, *(len(s) for s in [h, *(r[j] for r in cells)])) for j, h in enumerate(header)]

    def line(values: list[str]) -> str:
        padded = (_pad(v, w, r) for v, w, r in zip(values, widths, numeric, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if r else "-" * w for w, r in zip(widths, numeric, strict=True)]
    return "\n".join([line(header), "| " + " | ".join(rule) + " |", *(line(r) for r in cells)])
