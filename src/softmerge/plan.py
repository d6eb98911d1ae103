"""Merge plan: which parameters are merged, and which of them share a gate.

A *gate unit* is one gate per candidate. Granularity decides the units:

- ``model``: one unit for every merged parameter;
- ``module``: one unit per module (parameters that share a name prefix, e.g. ``fc1``);
- ``tensor``: one unit per parameter tensor;
- ``channel``: one unit per output row (index along dim 0); the weight and bias of one module
  share their row gates, so output neuron ``i`` is merged as one piece.

Parameters outside the plan are not gated: they come unchanged from ``rest_from`` (a named
candidate, ``average`` or ``best``), which is what makes merging *specific parts* of a network
a one-line change.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .errors import PlanError

Granularity = Literal["model", "module", "tensor", "channel"]
Combine = Literal["convex", "delta"]
GRANULARITIES: tuple[str, ...] = ("model", "module", "tensor", "channel")
COMBINES: tuple[str, ...] = ("convex", "delta")


@dataclass
class MergePlan:
    """What to merge and how (the user's request; resolved against a model by `layout`)."""

    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    granularity: Granularity = "tensor"
    combine: Combine = "convex"
    base: str | None = None  # delta: name of the candidate (or path) that is theta_0
    rest_from: str = "best"  # "best", "average" or a candidate name
    candidate_gate: bool = True  # add one gate per candidate above the unit gates
    # delta: theta_0 + delta_scale * sum_j z_j tau_j. 1 is the plain formula; task arithmetic's
    # lambda (about 0.3) keeps a sample with several gates at exactly 1 from overshooting.
    delta_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise PlanError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.combine not in COMBINES:
            raise PlanError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        if self.combine == "delta" and not self.base:
            raise PlanError("combine 'delta' needs a base model: set plan.base")
        scale = self.delta_scale
        number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
        if not (number and 0 < scale < math.inf):
            raise PlanError(f"delta_scale must be a positive number, got {scale!r}")
        if isinstance(self.include, str) or isinstance(self.exclude, str):
            raise PlanError("include and exclude are lists of glob patterns, not strings")


@dataclass(frozen=True)
class Slot:
    """One merged tensor and the gate units it reads: ``units[start : start + count]``."""

    name: str
    start: int
    count: int
    per_channel: bool  # True: unit k gates row k of the tensor (dim 0)


@dataclass(frozen=True)
class GateLayout:
    units: tuple[str, ...]  # names of the gate units, in column order of log_alpha
    slots: tuple[Slot, ...]  # merged tensors
    rest: tuple[str, ...]  # parameters outside the plan (taken from plan.rest_from)

    @property
    def merged_names(self) -> list[str]:
        return [s.name for s in self.slots]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_parameters(plan: MergePlan, names: Sequence[str]) -> list[str]:
    """Parameters the plan merges; every pattern must match something (a typo is an error)."""
    for kind, patterns in (("include", plan.include), ("exclude", plan.exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                sample = ", ".join(list(names)[:6])
                raise PlanError(
                    f"plan.{kind} pattern {pattern!r} matches no parameter "
                    f"(parameters look like: {sample}, ...)"
                )
    chosen = [n for n in names if _matches(n, plan.include) and not _matches(n, plan.exclude)]
    if not chosen:
        raise PlanError("the plan selects no parameter to merge: check include/exclude")
    return chosen


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else "(root)"


def build_layout(plan: MergePlan, shapes: Mapping[str, Sequence[int]]) -> GateLayout:
    """Resolve ``plan`` against the model's parameter shapes (in the model's order)."""
    names = list(shapes)
    merged = select_parameters(plan, names)
    units: list[str] = []
    slots: list[Slot] = []
    blocks: dict[object, tuple[int, int]] = {}  # key -> (start, count) of units already made

    def block(key: object, labels: list[str]) -> tuple[int, int]:
        if key not in blocks:
            blocks[key] = (len(units), len(labels))
            units.extend(labels)
        return blocks[key]

    for name in merged:
        shape = tuple(shapes[name])
        per_channel = plan.granularity == "channel" and len(shape) >= 1
        if plan.granularity == "model":
            start, count = block("model", ["model"])
        elif plan.granularity == "module":
            start, count = block(("module", module_of(name)), [module_of(name)])
        elif per_channel:
            mod, rows = module_of(name), shape[0]
            start, count = block(("channel", mod, rows), [f"{mod}[{i}]" for i in range(rows)])
        else:
            start, count = block(("tensor", name), [name])
        slots.append(Slot(name, start, count, per_channel))
    rest = tuple(n for n in names if n not in set(merged))
    return GateLayout(tuple(units), tuple(slots), rest)
