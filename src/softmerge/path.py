"""The L0 path: soft merges over a grid of λ, each warm-started from the previous one.

The L0 term's weight λ trades the merge's loss against the number of open gates. Like the
LASSO path, sweeping λ from "nothing closes" to "one candidate per unit" shows how many
candidates a merge really needs, in which order they drop out (their *importance*), and what
each one buys. :func:`fit_path` (``SoftMerger.fit_path``) runs it::

    dense fit at λ = 0 (``steps`` steps, as one default merge)
      -> coarse stages, λ = 1e-3, 1e-2, ... (x10), each warm-started, until a gate closes
         (going down from 1e-3 when it closes there already)
      -> back to the last λ where nothing closed (the lower end), then the fine grid
         λ_lo · 10^(k/4), each warm-started from the one before, until every unit keeps at
         most one open gate (the upper end)

A stage is ``stage_steps`` steps (default ``steps / 6``) that continue the gates, optimiser and
noise of the previous stage, with no warm-up. The path stops when its steps reach
``max_steps`` (default 2.5 x ``steps``), so it costs at most ~3 default merges including the
scoring (measured in ``docs/performance.md``).

Open gates: a candidate's effective deterministic gate in a unit is > 0. One candidate per unit:
no unit has more than one open gate (a unit with none falls back to the reference candidate,
which is one candidate too; a delta merge with none is the base). Each point of the path is
scored, with its deterministic gates, on the learning data and on held-out data.

Importance: a candidate's *closing λ* is the first λ of the path from which on its gates are
0 in every unit; candidates ranked by closing λ (the ones that never close first), then by
their share of the open gates summed over the path. ``l0_lambda: auto`` picks the sparsest
point whose held-out loss is within ``l0_tolerance`` (relative) of the path's best, with
``l0_confidence``: the gap plus its standard error (sample by sample) times the one-sided
normal quantile must be within the tolerance.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from . import distributed
from .batches import Batch, cycle_batches, untouched_order
from .errors import DataError, PlanError
from .fit import FitConfig, FitLoop, FitResult, Recorder

if TYPE_CHECKING:
    from .soft import SoftMerger

START = 1e-3  # first λ of the coarse search (FitConfig's default λ)
COARSE = 10.0  # ratio of the coarse search
FINE = 10.0**0.125  # ratio of the path's grid: eight λ per decade
DOWN_TRIES = 2  # how many decades below START the search looks for "nothing closes"
STAGE_FRACTION = 0.1  # steps of a warm stage, as a fraction of the dense fit's
BUDGET = 2.5  # all steps of the path, as a multiple of the dense fit's
HELD_OUT_FRACTION = 0.2  # held out of the merge data when no held-out loader is given


# ---------------------------------------------------------------------------------------------
# Inputs


def check_grid(lambdas: Iterable[Any]) -> list[float]:
    """A user's λ grid: finite numbers >= 0, strictly increasing; else one PlanError."""
    values = list(lambdas)
    if not values:
        raise PlanError("lambdas: the λ grid is empty; give at least one λ >= 0")
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PlanError(f"lambdas[{i}]: expected a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise PlanError(f"lambdas[{i}]: λ must be a finite number >= 0, got {value!r}")
        if out and value <= out[-1]:
            raise PlanError(
                f"lambdas[{i}]: the grid must be strictly increasing (each λ warm-starts from "
                f"the one before), got {value!r} after {out[-1]!r}"
            )
        out.append(float(value))
    return out


def split_held_out(
    loader: Iterable[Batch], fraction: float = HELD_OUT_FRACTION, seed: int = 0
) -> tuple[Iterable[Batch], Iterable[Batch]]:
    """(learn, held out) when no held-out data is given: a seeded ``fraction`` of the samples
    for a DataLoader over a data set (the learning part keeps the loader's batch size and
    shuffling, reseeded with ``seed``); otherwise every fifth batch of one pass."""
    if isinstance(loader, DataLoader) and loader.batch_size is not None:
        from .compare import split_held_out as split_dataset

        learn, held = split_dataset(loader.dataset, fraction, seed)
        if held is None or len(learn) == 0:  # type: ignore[arg-type]
            raise DataError("the merge set is too small to hold part of it out")
        size = loader.batch_size
        shuffle = isinstance(loader.sampler, RandomSampler)
        learn_loader = DataLoader(
            learn,
            batch_size=size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
            drop_last=loader.drop_last and len(learn) > size,  # type: ignore[arg-type]
            collate_fn=loader.collate_fn,
        )
        held_loader = DataLoader(held, batch_size=size, collate_fn=loader.collate_fn)
        return learn_loader, held_loader
    batches = list(loader)
    if len(batches) < 2:
        raise DataError(
            "choosing λ on held-out data needs at least 2 merge batches, or a held-out loader "
            "(YAML: data.held_out)"
        )
    every = max(2, round(1 / fraction))
    chosen = {i for i in range(len(batches)) if i % every == every - 1} or {len(batches) - 1}
    held = [b for i, b in enumerate(batches) if i in chosen]
    learn = [b for i, b in enumerate(batches) if i not in chosen]
    return learn, held


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class PathPoint:
    """One λ of the path: the deterministic gates at the end of its stage, and their scores."""

    lam: float
    steps: int  # steps of this point's stage
    total_steps: int  # steps of the path up to the end of this stage (search included)
    open_per_unit: float  # mean over units of the candidates whose gate is > 0
    open_max: int  # the most open gates in one unit
    used_per_unit: float  # candidates a unit's merge uses: a convex unit with none open uses 1
    open_units: dict[str, int]  # per candidate: units where its gate is > 0
    zero_fraction: float  # deterministic gates exactly 0 (finite candidates)
    one_fraction: float  # deterministic gates exactly 1 (finite candidates)
    expected_l0: float  # expected open gates per unit (sum of P(gate != 0))
    gates: dict[str, torch.Tensor] = field(repr=False)  # MergeGates state: use_gates() loads it
    learn: dict[str, float] = field(default_factory=dict)  # loss + metric on the learning data
    held_out: dict[str, float] | None = None  # the same on held-out data
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. test metrics added by a caller
    # Per split ("learn", "held_out"): this rank's per-sample summed losses and weights, in
    # one order for every point, so two points compare sample by sample (choose()).
    samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "lambda": self.lam,
            "steps": self.steps,
            "total_steps": self.total_steps,
            "open_per_unit": self.open_per_unit,
            "open_max": self.open_max,
            "used_per_unit": self.used_per_unit,
            "open_units": dict(self.open_units),
            "zero_fraction": self.zero_fraction,
            "one_fraction": self.one_fraction,
            "expected_l0": self.expected_l0,
            "learn": dict(self.learn),
            "held_out": None if self.held_out is None else dict(self.held_out),
        }
        out.update(self.extra)
        return out


@dataclass
class LambdaPath:
    """The path of one merge: points (λ ascending; the first one a cold fit), the grid's ends,
    the probes of the search that are not on the path, importance, the choice and the cost."""

    candidates: list[str]
    units: int
    convex: bool
    points: list[PathPoint]
    grid: dict[str, Any]
    search: list[dict[str, Any]]
    importance: list[dict[str, Any]]
    choice: dict[str, Any]
    cost: dict[str, Any]

    @property
    def chosen(self) -> PathPoint:
        return self.points[self.choice["index"]]

    def summary(self) -> dict[str, Any]:
        """What gates.json and summaries carry: the grid, the importance order, the choice."""
        return {
            "lambdas": [p.lam for p in self.points],
            "grid": dict(self.grid),
            "importance": [dict(r) for r in self.importance],
            "choice": dict(self.choice),
            "cost": dict(self.cost),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidates": list(self.candidates),
            "units": self.units,
            "combine": "convex" if self.convex else "delta",
            "grid": dict(self.grid),
            "points": [p.to_dict() for p in self.points],
            "search": [dict(s) for s in self.search],
            "importance": [dict(r) for r in self.importance],
            "choice": dict(self.choice),
            "cost": dict(self.cost),
        }


# ---------------------------------------------------------------------------------------------
# Running stages


@dataclass
class _Stage:
    lam: float
    steps: int
    total_steps: int
    gates: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    open: torch.Tensor  # (N, U) bool: deterministic gate > 0
    history: list[dict[str, Any]]
    trajectory: list[torch.Tensor]


class _Stages:
    """Runs the stages of a path on one merger: a cold first fit, then warm continuations; any
    stage can be returned to (its gates and optimiser state are kept)."""

    def __init__(self, merger: SoftMerger, loader: Iterable[Batch], cfg: FitConfig, loss_fn):
        self.merger, self.loader, self.cfg, self.loss_fn = merger, loader, cfg, loss_fn
        self.batches = cycle_batches(loader)  # the data order continues from stage to stage
        self.steps = 0
        self.optimizer: torch.optim.Optimizer | None = None

    def cold(self, lam: float, steps: int) -> _Stage:
        """Gates initialised as in a plain fit (warm-up included), ``steps`` steps at ``lam``."""
        cfg = self.cfg.replace(l0_lambda=lam, steps=steps, epochs=None)
        loop = self.merger.make_loop(self.loader, cfg, None, self.loss_fn)  # type: ignore[arg-type]
        self.merger.gate_training_mode()
        self.optimizer = loop.optimizer
        return self._run(loop, lam)

    def warm(self, lam: float, steps: int, start: _Stage) -> _Stage:
        """``steps`` more steps at ``lam`` from ``start``'s gates and optimiser state."""
        assert self.optimizer is not None
        self.merger.gates.load_state_dict(start.gates)
        self.optimizer.load_state_dict(copy.deepcopy(start.optimizer))
        loop = self.merger.continue_loop(steps, lam, self.optimizer, self.cfg)
        return self._run(loop, lam)

    def _run(self, loop: FitLoop, lam: float) -> _Stage:
        loop.run(self.batches)
        self.steps += loop.total_steps
        recorder = loop.callback(Recorder)
        offset = self.steps - loop.total_steps
        history = [{**r, "step": r["step"] + offset, "lambda": lam} for r in recorder.history]
        with torch.no_grad():
            open_ = self.merger.deterministic_gates().cpu() > 0
        return _Stage(
            lam,
            loop.total_steps,
            self.steps,
            {k: v.detach().clone() for k, v in self.merger.gates.state_dict().items()},
            copy.deepcopy(loop.optimizer.state_dict()),
            open_,
            history,
            list(recorder.trajectory),
        )


def _nothing_closed(stage: _Stage, dense: _Stage) -> bool:
    """Every gate open at the dense fit is still open."""
    return bool((stage.open | ~dense.open).all())


def _one_per_unit(stage: _Stage) -> bool:
    return int(stage.open.sum(0).max()) <= 1


# ---------------------------------------------------------------------------------------------
# The path


def fit_path(
    merger: SoftMerger,
    loader: Iterable[Batch],
    lambdas: Sequence[float] | None = None,
    *,
    config: FitConfig | None = None,
    held_out: Iterable[Batch] | None = None,
    loss_fn: Any = None,
    stage_steps: int | None = None,
    max_steps: int | None = None,
) -> LambdaPath:
    """Train ``merger``'s gates along a λ path on ``loader``; leave them at the chosen point.

    ``lambdas``: the grid (numbers >= 0, strictly increasing; the first λ gets a cold fit of
    ``config.steps``, each next one ``stage_steps`` warm steps); None: the grid is found as the
    module docstring says, within ``max_steps`` steps in all. ``held_out``: data the choice is
    made on (without it, the learning data: that favours dense merges). The merger ends with
    the chosen point's gates (BatchNorm statistics re-estimated), ``merger.result`` the path's
    training history and ``merger.path`` the returned :class:`LambdaPath`."""
    cfg = config or FitConfig()
    if cfg.select_every:
        raise PlanError(
            "select_every picks a step of one fit, but the L0 path already picks a point on "
            "held-out data: set select_every to 0"
        )
    grid = None if lambdas is None else check_grid(lambdas)
    total = cfg.total_steps(loader)
    stage = stage_steps if stage_steps is not None else max(1, round(total * STAGE_FRACTION))
    if stage < 1:
        raise PlanError(f"stage_steps must be a positive integer, got {stage}")
    budget = max_steps if max_steps is not None else round(BUDGET * total)
    start = time.perf_counter()
    stages = _Stages(merger, loader, cfg, loss_fn)
    try:
        if grid is None:
            chain, search, ends = _search_grid(stages, total, stage, budget)
        else:
            chain, search, ends = _given_grid(stages, grid, total, stage)
    finally:
        merger.stack.release_outputs()
    train_seconds = time.perf_counter() - start
    kept = [s for s, on_path in chain if on_path]
    points = [_point(merger, s) for s in kept]
    _score_points(merger, points, loader, held_out)
    on = "held_out" if held_out is not None else "learn"
    choice = choose(points, cfg.l0_tolerance, on, cfg.l0_confidence)
    path = LambdaPath(
        candidates=list(merger.names),
        units=len(merger.layout.units),
        convex=not merger.delta,
        points=points,
        grid=ends,
        search=search,
        importance=importance(points, list(merger.names)),
        choice=choice,
        cost={
            "steps": stages.steps,
            "dense_steps": total,
            "stage_steps": stage,
            "max_steps": budget if grid is None else None,
            "steps_ratio": stages.steps / total,
            "train_seconds": round(train_seconds, 3),
            "seconds": round(time.perf_counter() - start, 3),
        },
    )
    _finish(merger, path, chain, loader, cfg, start)
    return path


def _search_grid(
    stages: _Stages, total: int, stage: int, budget: int
) -> tuple[list[tuple[_Stage, bool]], list[dict[str, Any]], dict[str, Any]]:
    """Dense fit, coarse search for the lower end, fine grid up to the upper end."""
    dense = stages.cold(0.0, total)
    chain: list[tuple[_Stage, bool]] = [(dense, True)]  # (stage, is a point of the path)
    search: list[dict[str, Any]] = []
    ends: dict[str, Any] = {"found": "auto", "lower": None, "upper": None, "ratio": FINE}

    def fits(n: int = 1) -> bool:
        return stages.steps + n * stage <= budget

    if _one_per_unit(dense):
        ends.update(
            upper=0.0,
            upper_reached=True,
            note="the dense fit keeps at most one open gate per unit already: no λ grid is needed",
        )
        return chain, search, ends
    # Coarse search: continue upwards by x10 while nothing closes; start lower if 1e-3 closes.
    lower, lam, below = dense, START, 0
    while fits():
        probe = stages.warm(lam, stage, lower)
        closed = not _nothing_closed(probe, dense)
        search.append({"lambda": lam, "open_per_unit": _open_mean(probe), "closed": closed})
        if not closed:
            chain.append((probe, False))
            lower, lam = probe, lam * COARSE
        elif lower is dense and below < DOWN_TRIES:
            lam, below = lam / COARSE, below + 1  # closes already: look a decade lower
        else:
            break
    if lower is not dense:
        chain[-1] = (lower, True)  # the lower end: the largest λ at which nothing closed
        ends["lower"] = lower.lam
        lam = lower.lam * FINE
    else:
        ends["lower"] = 0.0  # gates close at every λ tried: the dense fit is the lower end
        ends["note"] = f"gates close already at λ = {lam:g}"
    # The fine grid, each λ warm-started from the previous one, to one candidate per unit.
    current, reached = lower, False
    while fits():
        current = stages.warm(lam, stage, current)
        chain.append((current, True))
        if _one_per_unit(current):
            reached = True
            break
        lam *= FINE
    ends.update(upper=current.lam, upper_reached=reached)
    if not reached:
        ends["note"] = (
            f"the step budget ({budget} steps) ended before one candidate per unit; raise "
            "max_steps or give lambdas"
        )
    return chain, search, ends


def _given_grid(
    stages: _Stages, grid: list[float], total: int, stage: int
) -> tuple[list[tuple[_Stage, bool]], list[dict[str, Any]], dict[str, Any]]:
    current = stages.cold(grid[0], total)
    chain = [(current, True)]
    for lam in grid[1:]:
        current = stages.warm(lam, stage, current)
        chain.append((current, True))
    ends = {
        "found": "given",
        "lower": grid[0],
        "upper": grid[-1],
        "upper_reached": _one_per_unit(current),
    }
    return chain, [], ends


def _open_mean(stage: _Stage) -> float:
    return float(stage.open.sum(0).float().mean())


def _point(merger: SoftMerger, stage: _Stage) -> PathPoint:
    merger.gates.load_state_dict(stage.gates)
    with torch.no_grad():
        gates = merger.deterministic_gates().cpu()
        expected = merger.expected_l0()
    active = merger.active.bool()
    live = gates[active]
    counts = stage.open.sum(0)
    # A convex unit whose gates are all closed is its reference candidate's: one candidate.
    used = counts.clamp_min(1) if not merger.delta else counts
    return PathPoint(
        lam=stage.lam,
        steps=stage.steps,
        total_steps=stage.total_steps,
        open_per_unit=float(counts.float().mean()),
        open_max=int(counts.max()),
        used_per_unit=float(used.float().mean()),
        open_units={n: int(stage.open[i].sum()) for i, n in enumerate(merger.names)},
        zero_fraction=float((live == 0).float().mean()) if live.numel() else 0.0,
        one_fraction=float((live == 1).float().mean()) if live.numel() else 0.0,
        expected_l0=expected,
        gates=stage.gates,
    )


def _score_points(
    merger: SoftMerger,
    points: list[PathPoint],
    loader: Iterable[Batch],
    held_out: Iterable[Batch] | None,
) -> None:
    """Loss and metric of every point's deterministic merge (BatchNorm on batch statistics, as
    during training) on the learning data and on the held-out data."""
    for p in points:
        merger.gates.load_state_dict(p.gates)
        learn: list[tuple[torch.Tensor, torch.Tensor]] = []
        p.learn = untouched_order(loader, lambda: merger.score(loader, learn))  # noqa: B023
        p.samples["learn"] = _concat(learn)
        if held_out is not None:
            held: list[tuple[torch.Tensor, torch.Tensor]] = []
            p.held_out = merger.score(held_out, held)
            p.samples["held_out"] = _concat(held)


def _concat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    empty = torch.zeros(0, dtype=torch.float64)
    return (
        torch.cat([p[0] for p in parts]) if parts else empty,
        torch.cat([p[1] for p in parts]) if parts else empty,
    )


def _finish(
    merger: SoftMerger,
    path: LambdaPath,
    chain: list[tuple[_Stage, bool]],
    loader: Iterable[Batch],
    cfg: FitConfig,
    start: float,
) -> None:
    """Leave the merger at the chosen point, with the path's history as its FitResult."""
    merger.use_gates(path.chosen.gates, loader if cfg.recalibrate_bn else None)
    history = [r for s, _ in chain for r in s.history]
    trajectory = [t for s, _ in chain for t in s.trajectory]
    merger.result = FitResult(
        steps=path.cost["steps"],
        seconds=time.perf_counter() - start,
        history=history,
        gate_trajectory=trajectory,
        candidate_losses=dict(merger.ctx.solo_losses()),
        reference=merger.names[merger.ctx.reference],
    )
    merger.path = path


# ---------------------------------------------------------------------------------------------
# Importance and the choice of λ


def importance(points: Sequence[PathPoint], names: Sequence[str]) -> list[dict[str, Any]]:
    """Each candidate's closing λ (the first λ from which on its gates are all 0; None if it is
    open at the last point) and its share of the open gates summed over the path, ranked:
    the candidates that close last (or never) first, ties by share. ``loss_change`` is the
    change of the selection loss between the point before it closed and the point it closed
    at (None when it never closes or is closed from the start; shared by candidates that close
    at the same λ)."""
    total = sum(sum(p.open_units.values()) for p in points) or 1
    rows = []
    for name in names:
        open_at = [p.open_units.get(name, 0) > 0 for p in points]
        close = next((k for k in range(len(points)) if not any(open_at[k:])), None)
        share = sum(p.open_units.get(name, 0) for p in points) / total
        before = points[close - 1] if close else None
        change = None
        if close and before is not None:
            change = _selection_loss(points[close]) - _selection_loss(before)
        rows.append(
            {
                "candidate": name,
                "close_lambda": None if close is None else points[close].lam,
                "share": share,
                "open_at_end": open_at[-1] if points else False,
                "loss_change": None if change is None or not math.isfinite(change) else change,
            }
        )
    rows.sort(
        key=lambda r: (
            -math.inf if r["close_lambda"] is None else -r["close_lambda"],
            -r["share"],
        )
    )
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows


def _selection_loss(p: PathPoint) -> float:
    scores = p.held_out if p.held_out is not None else p.learn
    return float(scores.get("loss", math.nan))


def _within(losses: Sequence[float], among: Sequence[int], tolerance: float) -> tuple[int, float]:
    """The index of the lowest loss among ``among`` and the limit ``tolerance`` above it."""
    best = min(among, key=lambda k: losses[k])
    return best, losses[best] + tolerance * abs(losses[best])


def choose(
    points: Sequence[PathPoint], tolerance: float, on: str, confidence: float = 0.95
) -> dict[str, Any]:
    """The λ of ``l0_lambda: auto``: the sparsest point (fewest candidates used per unit; ties
    go to the smaller λ, the less penalised merge) whose ``on`` loss ("held_out" or "learn") is
    within ``tolerance`` (relative) of the best, with ``confidence``: the gap to the best, plus
    its standard error (sample by sample, on the same data) times the one-sided normal
    quantile, stays within the tolerance. A few hundred held-out samples cannot resolve 1 %
    on their own: a sparser point is taken only where the data show it is within the
    tolerance (``confidence`` 0.5: the gap alone). With held-out data, only points whose
    learning loss is within ``tolerance`` of the path's best learning loss compete: the
    penalty's pull on gates that stay open can lower the held-out loss by chance while the
    merge gets worse (docs/method.md)."""
    learn = [p.learn.get("loss", math.nan) for p in points]
    losses = [_selection_loss(p) for p in points] if on == "held_out" else learn
    finite = [k for k in range(len(points)) if math.isfinite(losses[k])]
    finite = [k for k in finite if math.isfinite(learn[k])] or finite
    if not finite:
        return {
            "index": 0,
            "lambda": points[0].lam,
            "open_per_unit": points[0].open_per_unit,
            "used_per_unit": points[0].used_per_unit,
            "selected_on": on,
            "tolerance": tolerance,
            "note": "no point has a finite loss: the first point is kept",
        }
    extra: dict[str, Any] = {}
    eligible = finite
    if on == "held_out":
        learn_best, learn_limit = _within(learn, finite, tolerance)
        eligible = [k for k in finite if learn[k] <= learn_limit]
        extra = {"learn_best_loss": learn[learn_best], "learn_limit": learn_limit}
    best, limit = _within(losses, eligible, tolerance)
    z = NormalDist().inv_cdf(confidence) if confidence > 0.5 else 0.0
    within = [k for k in eligible if losses[k] <= limit]
    errors = {k: _gap_error(points[best], points[k], on) for k in within}
    allowed = [k for k in within if losses[k] + z * (errors[k] or 0.0) <= limit]
    index = min(allowed, key=lambda k: (points[k].used_per_unit, points[k].lam))
    return {
        "index": index,
        "lambda": points[index].lam,
        "open_per_unit": points[index].open_per_unit,
        "used_per_unit": points[index].used_per_unit,
        "loss": losses[index],
        "best_index": best,
        "best_lambda": points[best].lam,
        "best_loss": losses[best],
        "best_open_per_unit": points[best].open_per_unit,
        "limit": limit,
        **extra,
        "eligible": len(eligible),
        "tolerance": tolerance,
        "confidence": confidence,
        "gap_se": errors[index],
        # Sparser points within the tolerance on their mean gap, not with the confidence.
        "held_back": sum(
            points[k].used_per_unit < points[index].used_per_unit
            for k in within
            if k not in allowed
        ),
        "selected_on": on,
    }


def _gap_error(best: PathPoint, other: PathPoint, on: str) -> float | None:
    """The standard error of ``other``'s mean loss minus ``best``'s on the ``on`` split, from
    their per-sample losses (a paired ratio estimate, summed over the ranks of a distributed
    run); None without per-sample losses for both, or with fewer than two samples."""
    split = "held_out" if on == "held_out" else "learn"
    if split not in best.samples or split not in other.samples:
        return None
    (la, wa), (lb, wb) = best.samples[split], other.samples[split]
    if la.shape != lb.shape or not torch.equal(wa, wb):
        return None
    d = lb - la
    sums = distributed.sum_across(
        [d.sum(), (d * d).sum(), (d * wa).sum(), (wa * wa).sum(), wa.sum(), d.numel()]
    )
    sd, sdd, sdw, sww, sw, n = sums
    if n < 2 or sw <= 0:
        return None
    gap = sd / sw
    spread = max(sdd - 2 * gap * sdw + gap * gap * sww, 0.0)
    return math.sqrt(spread * n / (n - 1)) / sw


# ---------------------------------------------------------------------------------------------
# Outputs: path.json, path.png, path.md, and text


def metric_name(points: Sequence[Mapping[str, Any]]) -> str:
    """The metric the points carry: accuracy, perplexity, else loss."""
    keys = {k for p in points for k in (p.get("learn") or {})}
    return next((m for m in ("accuracy", "perplexity") if m in keys), "loss")


def table_rows(path: LambdaPath | Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per point: λ, open gates (per unit and per candidate), scores; * marks the
    choice."""
    data = path.to_dict() if isinstance(path, LambdaPath) else dict(path)
    points = data["points"]
    metric = metric_name(points)
    chosen = data["choice"].get("index")
    fallback = any(p["used_per_unit"] != p["open_per_unit"] for p in points)
    rows = []
    for k, p in enumerate(points):
        row: dict[str, Any] = {
            "λ": f"{p['lambda']:.3g}" + (" *" if k == chosen else ""),
            "open/unit": p["open_per_unit"],
        }
        if fallback:
            row["used/unit"] = p["used_per_unit"]
        row.update({name: p["open_units"].get(name, 0) for name in data["candidates"]})
        row["learn loss"] = p["learn"].get("loss")
        if metric != "loss":
            row[f"learn {metric}"] = p["learn"].get(metric)
        if p.get("held_out"):
            row["held-out loss"] = p["held_out"].get("loss")
            if metric != "loss":
                row[f"held-out {metric}"] = p["held_out"].get(metric)
        for key in ("eval_loss", f"eval_{metric}"):
            if key in p:
                row[key.replace("_", " ")] = p[key]
        rows.append(row)
    return rows


def importance_text(path: LambdaPath | Mapping[str, Any]) -> str:
    """The importance order as aligned text (most important first)."""
    from .report import format_table

    data = path.to_dict() if isinstance(path, LambdaPath) else dict(path)
    rows = [
        {
            "rank": r["rank"],
            "candidate": r["candidate"],
            "closes at λ": "never" if r["close_lambda"] is None else f"{r['close_lambda']:.3g}",
            "share of open gates": r["share"],
            "loss change when it closes": r["loss_change"],
        }
        for r in data["importance"]
    ]
    return format_table(rows, floatfmt=".3f")


def choice_text(choice: Mapping[str, Any]) -> str:
    if "best_lambda" not in choice:
        return f"λ = {choice['lambda']:g} ({choice.get('note', '')})"
    split = "held-out" if choice["selected_on"] == "held_out" else "learning"
    used = choice.get("used_per_unit", choice["open_per_unit"])
    fallback = f" ({used:.2f} candidates used)" if used != choice["open_per_unit"] else ""
    return (
        f"chosen λ = {choice['lambda']:.3g}: {choice['open_per_unit']:.2f} open gates per unit"
        f"{fallback}, "
        f"{split} loss {choice['loss']:.4f}; the path's best is λ = {choice['best_lambda']:.3g} "
        f"({choice['best_open_per_unit']:.2f} per unit, loss {choice['best_loss']:.4f}); "
        f"tolerance {100 * choice['tolerance']:g} % (loss <= {choice['limit']:.4f})"
        f"{_confidence_text(choice)}"
    )


def _confidence_text(choice: Mapping[str, Any]) -> str:
    """The confidence clause: how many sparser points it held back (paths written before it
    existed have none)."""
    if "confidence" not in choice or choice["confidence"] <= 0.5:
        return ""
    held = choice.get("held_back", 0)
    which = f"; {held} sparser point(s) within it held back" if held else ""
    return f" with {100 * choice['confidence']:g} % confidence{which}"


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def path_markdown(path: LambdaPath) -> str:
    from .report import format_markdown_table

    data = path.to_dict()
    grid = data["grid"]
    lines = [
        "# softmerge path",
        "",
        f"- candidates: {', '.join(data['candidates'])}; {data['units']} gate units; "
        f"combine {data['combine']}",
        f"- grid: {grid['found']}, lower end λ = {_g(grid.get('lower'))}, upper end λ = "
        f"{_g(grid.get('upper'))} (one candidate per unit reached: "
        f"{'yes' if grid.get('upper_reached') else 'no'})"
        + (f"; {grid['note']}" if grid.get("note") else ""),
        f"- cost: {data['cost']['steps']} gate steps = {data['cost']['steps_ratio']:.2f} x one "
        f"fit of {data['cost']['dense_steps']} steps; {data['cost']['seconds']:.1f} s",
        f"- {choice_text(data['choice'])}",
        "",
        "Open gates: per unit (mean over units) and per candidate (units where its gate is "
        "> 0); * marks the chosen λ.",
        "",
        format_markdown_table(table_rows(data), floatfmt=".4g"),
        "",
        "## Candidate importance",
        "",
        "Closing λ: the first λ from which on all the candidate's gates are 0. Share: its "
        "fraction of the open gates summed over the path.",
        "",
        format_markdown_table(
            [
                {
                    "rank": r["rank"],
                    "candidate": r["candidate"],
                    "closes at λ": "never"
                    if r["close_lambda"] is None
                    else f"{r['close_lambda']:.3g}",
                    "share of open gates": r["share"],
                    "loss change when it closes": r["loss_change"],
                }
                for r in data["importance"]
            ],
            floatfmt=".3f",
        ),
        "",
    ]
    if data["search"]:
        probes = ", ".join(
            f"λ={s['lambda']:.3g} ({'closed' if s['closed'] else 'nothing closed'})"
            for s in data["search"]
        )
        lines += [f"Coarse search (warm-started probes): {probes}.", ""]
    return "\n".join(lines)


def write_path_outputs(folder: Path, path: LambdaPath) -> dict[str, Path]:
    """path.json, path.png and path.md in ``folder`` (each written atomically)."""
    from .io import write_json, write_text
    from .report import plot_path

    data = path.to_dict()
    return {
        "path_json": write_json(folder / "path.json", data),
        "path_plot": plot_path(
            folder / "path.png",
            data["points"],
            data["candidates"],
            chosen=data["choice"].get("index"),
        ),
        "path_table": write_text(folder / "path.md", path_markdown(path)),
    }


def evaluate_points(
    merger: SoftMerger,
    path: LambdaPath,
    loader: Iterable[Batch],
    recalibrate_on: Iterable[Batch] | None = None,
    prefix: str = "eval",
) -> None:
    """Score every point's merged model on ``loader`` (BatchNorm statistics re-estimated on
    ``recalibrate_on``), into ``point.extra`` as ``{prefix}_loss`` etc.; the merger is left at
    the chosen point again."""
    for p in path.points:
        merger.use_gates(p.gates, recalibrate_on)
        metrics = merger.ctx.evaluate(merger.merged_model(), loader)
        p.extra.update({f"{prefix}_{k}": v for k, v in metrics.items()})
    merger.use_gates(path.chosen.gates, recalibrate_on)


# ---------------------------------------------------------------------------------------------
# On a merge context: what `l0_lambda: auto` and `softmerge path` run


def merge_path(
    ctx: Any,
    cfg: FitConfig,
    *,
    eval_loader: Iterable[Batch] | None = None,
) -> tuple[SoftMerger, LambdaPath]:
    """The L0 path of a soft merge in ``ctx`` (a MergeContext): gates learned on its merge
    data and chosen on its held-out loader; without one, on a seeded fifth of the merge data
    (:func:`split_held_out`). With ``eval_loader`` every point is also scored there (reported,
    never used to choose)."""
    from .soft import SoftMerger

    ctx.configure(cfg.device, cfg.storage_dtype)
    merger = SoftMerger(None, context=ctx)
    data = ctx.require_data("soft")
    if ctx.held_out_loader is not None:
        learn, held, how = data, ctx.held_out_loader, "given"
    else:
        learn, held = split_held_out(data, seed=ctx.seed)
        how = f"split: {100 * HELD_OUT_FRACTION:g} % of the merge data (seed {ctx.seed})"
    path = merger.fit_path(learn, config=cfg, held_out=held)
    # The fit made the learning part the context's merge data; other methods sharing the
    # context (softmerge compare) get the whole merge data again. The ranking, made on the
    # learning part, stays: the merge's fallback and rest depend on it.
    ctx.merge_loader = data
    path.choice["held_out"] = how
    if eval_loader is not None:
        evaluate_points(merger, path, eval_loader, learn if cfg.recalibrate_bn else None)
    return merger, path
