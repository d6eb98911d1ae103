"""Merge plan: which parameters are merged, and which of them share a gate.

A *gate unit* is one gate per candidate. Granularity decides the units:

- ``model``: one unit for every merged parameter;
- ``module``: one unit per module (parameters that share a name prefix, e.g. ``fc1``);
- ``tensor``: one unit per parameter tensor;
- ``channel``: one unit per output channel; the weight and bias of one module share their
  channel gates, so output neuron ``i`` is merged as one piece. The output channel is dim 0,
  except where the layout says otherwise (``channel_axes``: GPT-2's ``Conv1D`` stores its weight
  as (in, out), so its output channel is dim 1).
- ``unit``: one unit per hidden unit of the model's permutation groups (``softmerge.align``:
  the same units alignment permutes), covering every axis that indexes it: a hidden unit's
  incoming row, bias, norm entries *and* outgoing column mix by its gates, so choosing
  candidate j for a unit takes that unit whole from j. An entry between two hidden units (a
  weight of a middle layer) mixes the candidates by the product of both units' weights,
  renormalised; where no candidate is open in both, by the mean of the two. Output channels
  outside any group (a classifier's classes) get their own units, as ``channel`` does. Meant
  for aligned pools (``plan.align``); convex merges only.

Parameters outside the plan are not gated: they come unchanged from ``rest_from`` (a named
candidate, ``average`` or ``best``), which is what makes merging *specific parts* of a network
a one-line change.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .errors import PlanError
from .schema import Settings

Granularity = Literal["model", "module", "tensor", "channel", "unit"]
Combine = Literal["convex", "delta"]
Align = Literal["none", "weight_matching", "activation_matching", "merge_many", "ste"]
GRANULARITIES: tuple[str, ...] = ("model", "module", "tensor", "channel", "unit")
# granularity "unit": tensor name -> axis -> (permutation group, its size, block), where block
# consecutive entries of the axis belong to one unit (a Linear reading a flattened feature map)
UnitAxes = Mapping[str, Mapping[int, tuple[str, int, int]]]
COMBINES: tuple[str, ...] = ("convex", "delta")
LEARN = "learn"  # plan.delta_scale: learned with the gates instead of fixed


class MergePlan(Settings):
    """What to merge and how (the user's request; resolved against a model by `build_layout`)."""

    include: list[str] = Field(default_factory=lambda: ["*"])  # glob patterns of names
    exclude: list[str] = Field(default_factory=list)
    granularity: Granularity = "tensor"
    combine: Combine = "convex"
    base: str | None = None  # delta: name of the candidate (or path) that is theta_0
    rest_from: str = "best"  # "best", "average" or a candidate name
    candidate_gate: bool = True  # add one gate per candidate above the unit gates
    # delta: theta_0 + delta_scale * sum_j z_j tau_j. 1 is the plain formula; task arithmetic's
    # lambda (about 0.3) keeps a sample with several gates at exactly 1 from overshooting.
    # "learn": one positive scale per gate unit, learned with the gates (docs/method.md).
    delta_scale: float | Literal["learn"] = 1.0
    # Before any method runs: permute every candidate's hidden units to match the reference
    # candidate (softmerge.align; docs/alignment.md). "none" merges the candidates as they are.
    align: Align = "none"
    # align 'ste': steps of the straight-through search (each one weight matching per candidate)
    align_steps: int = Field(default=1000, ge=0)
    # After a single-model merge: REPAIR the hidden units' statistics on the merge data.
    repair: bool = False

    @field_validator("delta_scale", mode="before")
    @classmethod
    def _positive_scale(cls, value: Any) -> Any:
        if value == LEARN:
            return value
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and 0 < value < math.inf):
            raise ValueError(f"must be a positive number or 'learn', got {value!r}")
        return float(value)

    @model_validator(mode="after")
    def _delta_needs_a_base(self) -> MergePlan:
        if self.combine == "delta" and not self.base:
            raise ValueError("combine 'delta' needs a base model: set plan.base")
        if self.delta_scale == LEARN and self.combine != "delta":
            raise ValueError("delta_scale 'learn' scales task vectors: it needs combine 'delta'")
        if self.granularity == "unit" and self.combine != "convex":
            raise ValueError(
                "granularity 'unit' mixes an entry by the product of its units' convex weights: "
                "it needs combine 'convex'"
            )
        return self

    @property
    def learn_scale(self) -> bool:
        return self.delta_scale == LEARN


@dataclass(frozen=True)
class Slot:
    """One merged tensor and the gate units it reads: ``units[start : start + count]``.

    ``axis`` is the tensor dimension that unit k gates (channel granularity), or None when one
    unit gates the whole tensor. ``inputs`` (unit granularity): the tensor's other dimensions
    indexed by hidden units, as ``(axis, start, count, block)``; an entry's weights are then the
    product of its units' weights, renormalised (``softmerge.soft``)."""

    name: str
    start: int
    count: int
    axis: int | None = None
    inputs: tuple[tuple[int, int, int, int], ...] = ()

    @property
    def per_channel(self) -> bool:
        return self.axis is not None


@dataclass(frozen=True)
class GateLayout:
    units: tuple[str, ...]  # names of the gate units, in column order of log_alpha
    slots: tuple[Slot, ...]  # merged tensors
    rest: tuple[str, ...]  # parameters outside the plan (taken from plan.rest_from)

    @property
    def merged_names(self) -> list[str]:
        return [s.name for s in self.slots]


def _unit_axes_of(
    name: str, shape: tuple[int, ...], unit_axes: UnitAxes | None
) -> dict[int, tuple[str, int, int]]:
    """Axis -> (group, size, block) of the hidden units indexing ``name`` (granularity unit)."""
    if unit_axes is None:
        raise PlanError(
            "granularity 'unit' needs the model's permutation groups (softmerge.align): give "
            "the merge a model (and merge data to trace it on)"
        )
    out = {}
    for axis, (group, size, block) in unit_axes.get(name, {}).items():
        axis %= len(shape)
        if shape[axis] != size * block:
            raise PlanError(
                f"granularity 'unit': {name} has {shape[axis]} entries on dim {axis}, "
                f"group {group} has {size} units of {block}"
            )
        out[axis] = (group, size, block)
    return out


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


def build_layout(
    plan: MergePlan,
    shapes: Mapping[str, Sequence[int]],
    channel_axes: Mapping[str, int] | None = None,
    unit_axes: UnitAxes | None = None,
) -> GateLayout:
    """Resolve ``plan`` against the mergeable tensors' shapes (in the model's order).

    ``channel_axes`` gives, per module, the weight dimension that holds output channels when it
    is not 0 (see :func:`softmerge.modelinfo.channel_axes`). ``unit_axes`` (granularity
    ``unit`` only, which needs it) gives the axes of each tensor that hidden units index."""
    names = list(shapes)
    merged = select_parameters(plan, names)
    axes = dict(channel_axes or {})
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
        axis: int | None = None
        inputs: list[tuple[int, int, int, int]] = []  # granularity unit: other unit axes
        if plan.granularity == "model":
            start, count = block("model", ["model"])
        elif plan.granularity == "module":
            start, count = block(("module", module_of(name)), [module_of(name)])
        elif plan.granularity in ("channel", "unit") and len(shape) >= 1:
            mod = module_of(name)
            # A bias is 1-D: its channels are dim 0 whatever the layout of its weight.
            axis = axes.get(mod, 0) if len(shape) > 1 else 0
            groups = _unit_axes_of(name, shape, unit_axes) if plan.granularity == "unit" else {}
            if axis in groups:
                group, size, per = groups.pop(axis)
                if per != 1:
                    raise PlanError(f"granularity 'unit': {name}'s output units come in blocks")
                start, count = block(("group", group), [f"{group}[{i}]" for i in range(size)])
            else:  # output channels outside any group (a classifier's classes): their own
                rows = shape[axis]
                start, count = block(("channel", mod, rows), [f"{mod}[{i}]" for i in range(rows)])
            for other, (group, size, per) in sorted(groups.items()):
                first, n = block(("group", group), [f"{group}[{i}]" for i in range(size)])
                inputs.append((other, first, n, per))
        else:
            start, count = block(("tensor", name), [name])
        slots.append(Slot(name, start, count, axis, tuple(inputs)))
    chosen = set(merged)
    rest = tuple(n for n in names if n not in chosen)
    return GateLayout(tuple(units), tuple(slots), rest)
