"""SLERP: spherical interpolation between exactly two models (Shoemake 1985; mergekit's
``slerp``). With a base, the base is the t = 0 end and the single candidate the t = 1 end."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ..errors import PlanError
from .base import MergeContext, MethodParams, TensorwiseMethod, register


class SlerpParams(MethodParams):
    t: float = Field(0.5, ge=0.0, le=1.0)  # 0: the first model, 1: the second


@register
class Slerp(TensorwiseMethod):
    name = "slerp"
    function = "slerp"
    Params = SlerpParams
    summary = "spherical interpolation of exactly two models, per tensor"

    def base_of(self, ctx: MergeContext) -> Any:
        return ctx.base_candidate

    def check(self, ctx: MergeContext) -> None:
        super().check(ctx)
        count = len(ctx.pool) + (ctx.base_candidate is not None)
        if count != 2:
            raise PlanError(
                f"method 'slerp' interpolates exactly 2 models (a base counts as one), "
                f"got {count}: {', '.join(ctx.candidate_names)}"
            )
