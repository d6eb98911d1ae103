"""Pydantic schemas generated from the library's dataclasses (shared by config and methods).

The ``plan`` and ``fit`` sections of a YAML config, and the parameters of the ``soft`` merge
method, are generated from :class:`MergePlan` and :class:`FitConfig`, so their keys and
defaults cannot drift from the library's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model

from .plan import MergePlan
from .soft import FitConfig

# Strict: YAML already gives typed values, so "300" (a quoted string) for steps is a mistake,
# not something to coerce.
STRICT = ConfigDict(strict=True, extra="forbid")


def section_from_dataclass(name: str, cls: type, overrides: Mapping[str, Any]) -> type[BaseModel]:
    """A strict pydantic model with the dataclass's fields and defaults (types from overrides)."""
    hints = get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        default = (
            Field(default_factory=f.default_factory)
            if f.default_factory is not dataclasses.MISSING
            else f.default
        )
        fields[f.name] = (overrides.get(f.name, hints[f.name]), default)
    return create_model(name, __config__=STRICT, **fields)


PlanSection = section_from_dataclass("PlanSection", MergePlan, {})
FitSection = section_from_dataclass(
    "FitSection",
    FitConfig,
    {
        "steps": Annotated[int | None, Field(ge=1)],
        "epochs": Annotated[float | None, Field(gt=0)],
        "lr": Annotated[float, Field(gt=0)],
        "l0_lambda": Annotated[float, Field(ge=0)],
        "init_gate": Annotated[float, Field(gt=0, lt=1)],
        "objective": Literal["cross_entropy", "entropy"],
        "eval_every": Annotated[int, Field(ge=0)],
        "record_every": Annotated[int, Field(ge=1)],
        "rank_batches": Annotated[int, Field(ge=1)],
        "grad_clip": Annotated[float | None, Field(gt=0)],
    },
)


