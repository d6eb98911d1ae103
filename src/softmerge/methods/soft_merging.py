"""Soft merging (this library's method, arXiv:2309.12259) behind the same interface as the
others: hard concrete gates learned on the merge set; the plan's granularity decides the gate
units. Parameters are the fields of :class:`~softmerge.soft.FitConfig` (the YAML ``fit``
section); ``seed`` defaults to the context's seed."""

from __future__ import annotations

from pydantic import create_model

from ..schema import FitSection
from ..soft import FitConfig, SoftMerger
from .base import MergeContext, MergeMethod, MergeOutcome, register

SoftParams = create_model(
    "SoftParams",
    __base__=FitSection,
    seed=(int | None, None),  # None: the context's seed
    progress=(bool | None, None),  # None: the context's setting
)


@register
class SoftMerging(MergeMethod):
    name = "soft"
    Params = SoftParams  # type: ignore[assignment]
    needs_data = True
    summary = "hard concrete (L0) gates learned on the merge set; gates can be exactly 0 or 1"

    def fit_config(self, ctx: MergeContext) -> FitConfig:
        values = self.params.model_dump()
        values["seed"] = ctx.seed if values["seed"] is None else values["seed"]
        values["progress"] = ctx.progress if values["progress"] is None else values["progress"]
        return FitConfig(**values)

    def run(self, ctx: MergeContext) -> MergeOutcome:
        base = ctx.base_candidate if ctx.plan.combine == "delta" else None
        merger = SoftMerger(ctx.model, ctx.pool, ctx.plan, base=base)
        merger.fit(ctx.require_data(self.name), config=self.fit_config(ctx))
        state = merger.merged_state_dict()
        info = {"merger": merger, "fit": merger.result}
        return MergeOutcome(merger.merged_model(), state, info)
