"""Figures of a merge: the gate heatmap and the convergence curves (PNG, written atomically).

Figures are built with ``Figure`` rather than pyplot: they never touch the user's backend or
pyplot's global figure list, so nothing stays open (or leaks) whether saving works or fails.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..io import atomic_write
from .gates import GateSnapshot, PathLike

if TYPE_CHECKING:  # matplotlib is imported when a figure is made, not with softmerge (~30 MB)
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_MAX_LABELLED_UNITS = 60
_DPI = 110


# --------------------------------------------------------------------------------------------
# figures


# Figures are built with ``Figure`` rather than pyplot: they never touch the user's backend or
# pyplot's global figure list, so nothing stays open (or leaks) whether saving works or fails.
def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _new_figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure

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
    for key in ("loss", "task_loss", "val_loss", "held_out_loss"):
        xs, ys = _series(history, key)
        if xs:
            dashed = key in ("val_loss", "held_out_loss")
            _line(ax, xs, ys, label=key, linestyle="--" if dashed else "-")
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
    selected_step: int | None = None,
) -> Path:
    """Three panels against step: losses, expected L0, mean gate per candidate (+ val_acc);
    ``selected_step`` (early stopping: the step whose gates were kept) is marked on each."""
    fig = _new_figure((16, 4.5))
    axes = fig.subplots(1, 3)
    for ax in axes:
        ax.xaxis.set_major_locator(_integer_ticks())  # steps are whole numbers
    _plot_losses(axes[0], history)
    if selected_step is not None:
        for ax in axes:
            ax.axvline(selected_step, color="grey", linestyle=":", linewidth=1)
        axes[0].annotate(
            f"kept: step {selected_step}",
            (selected_step, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize="small",
            color="grey",
        )
    _plot_l0(axes[1], history)
    _plot_gates(axes[2], history, candidates)
    if title is not None:
        fig.suptitle(title)
    return _save_figure(path, fig)


def _path_metric(points: Sequence[dict[str, Any]]) -> str:
    keys = {k for p in points for k in (p.get("learn") or {})}
    return next((m for m in ("accuracy", "perplexity") if m in keys), "loss")


def plot_path(
    path: PathLike,
    points: Sequence[dict[str, Any]],
    candidates: Sequence[str],
    chosen: int | None = None,
    title: str | None = None,
) -> Path:
    """The L0 path (points as in path.json): accuracy (perplexity, or loss) of every scored
    split against the open gates per unit, one marker per λ; and each candidate's open units
    against λ (symlog: λ = 0 included), which shows the order candidates close in."""
    metric = _path_metric(points)
    fig = _new_figure((12, 4.5))
    left, right = fig.subplots(1, 2)
    xs = [float(p["open_per_unit"]) for p in points]
    splits = [("learn", "learning data"), ("held_out", "held-out data")]
    drawn = False
    for key, label in splits:
        ys = [(p.get(key) or {}).get(metric) for p in points]
        if any(y is not None for y in ys):
            _line(left, xs, [math.nan if y is None else float(y) for y in ys], label=label)
            drawn = True
    evals = [p.get(f"eval_{metric}") for p in points]
    if any(v is not None for v in evals):
        _line(left, xs, [math.nan if v is None else float(v) for v in evals], label="eval data")
        drawn = True
    if drawn:
        first = next(k for k, _ in splits if any(p.get(k) for p in points))
        for p, x in zip(points, xs, strict=True):
            y = (p.get(first) or {}).get(metric)
            if y is not None:
                left.annotate(
                    f"{p['lambda']:.2g}",
                    (x, y),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
        if chosen is not None and (points[chosen].get(first) or {}).get(metric) is not None:
            left.plot(
                [xs[chosen]],
                [points[chosen][first][metric]],
                "o",
                ms=10,
                mfc="none",
                mec="red",
                label="chosen λ",
            )
        left.legend(fontsize="small")
    else:
        _mark_empty(left)
    left.set_xlabel("open gates per unit (mean)")
    left.set_ylabel(metric)
    left.set_title(f"{metric} along the L0 path (labels: λ)")
    lams = [float(p["lambda"]) for p in points]
    positive = [v for v in lams if v > 0]
    styles = ("-", "--", ":", "-.")  # candidates that close together draw on one another
    for i, name in enumerate(candidates):
        ys = [float(p["open_units"].get(name, 0)) for p in points]
        _line(right, lams, ys, label=name, linestyle=styles[i % len(styles)])
    if positive:
        right.set_xscale("symlog", linthresh=min(positive))
    right.set_xlabel("λ")
    right.set_ylabel("open units")
    right.set_title("open units per candidate")
    right.yaxis.set_major_locator(_integer_ticks())
    if candidates:
        right.legend(fontsize="small", ncol=1 + len(candidates) // 8)
    if title is not None:
        fig.suptitle(title)
    return _save_figure(path, fig)
