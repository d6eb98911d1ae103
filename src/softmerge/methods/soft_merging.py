"""Soft merging (this library's method, arXiv:2309.12259) behind the same interface as the
others: hard concrete gates learned on the merge set; the plan's granularity decides the gate
units. Parameters are the fields of :class:`~softmerge.fit.FitConfig` (the YAML ``fit``
section); ``seed`` and ``progress`` default to the context's."""

from __future__ import annotations

from typing import Any

from pydantic import create_model

from ..errors import PlanError
from ..fit import FitConfig
from ..soft import SoftMerger
from .base import MergeContext, MergeMethod, MergeOutcome, MethodParams, register


def _params_model() -> type[MethodParams]:
    """The FitConfig fields as method parameters; seed and progress may be left to the run."""
    fields: dict[str, Any] = {
        name: (info.annotation, info) for name, info in FitConfig.model_fields.items()
    }
    fields["seed"] = (int | None, None)  # None: the context's seed
    fields["progress"] = (bool | None, None)  # None: the context's setting
    return create_model("SoftParams", __base__=MethodParams, **fields)


SoftParams = _params_model()


@register
class SoftMerging(MergeMethod):
    name = "soft"
    Params = SoftParams
    needs_data = True
    summary = "hard concrete (L0) gates learned on the merge set; gates can be exactly 0 or 1"

    def fit_config(self, ctx: MergeContext) -> FitConfig:
        values = self.params.model_dump()
        values["seed"] = ctx.seed if values["seed"] is None else values["seed"]
        values["progress"] = ctx.progress if values["progress"] is None else values["progress"]
        return FitConfig(**values)

    def run(self, ctx: MergeContext) -> MergeOutcome:
        cfg = self.fit_config(ctx)
        ctx.configure(cfg.device, cfg.storage_dtype, shard_stack=cfg.shard_stack)
        spec = ctx.checkpoint
        if cfg.l0_lambda == "auto":
            return self._run_path(ctx, cfg)
        merger = SoftMerger(None, context=ctx)
        merger.fit(
            ctx.require_data(self.name),
            val_loader=ctx.val_loader,
            config=cfg,
            checkpoint=None if spec is None else spec.path,
            resume=bool(spec and spec.resume),
            keep_checkpoint=bool(spec and spec.keep),
            run_key="" if spec is None else spec.run_key,
            held_out=ctx.held_out_loader,  # scored only with fit.select_every
        )
        state = merger.merged_state_dict()
        info = {"merger": merger, "fit": merger.result}
        if merger.result is not None and merger.result.selected_step is not None:
            info["selected_step"] = merger.result.selected_step  # fit.select_every
            info["held_out_loss"] = merger.result.held_out_loss
        repair = merger.final.repair_note()  # plan.repair: done on the merger's own state
        if repair is not None:
            info["repair"] = repair
        return MergeOutcome(state, merger.merged_model, info)

    def _run_path(self, ctx: MergeContext, cfg: FitConfig) -> MergeOutcome:
        """``l0_lambda: auto``: the L0 path; the merge is its chosen point (softmerge.path)."""
        from ..path import merge_path

        if ctx.checkpoint is not None:
            raise PlanError(
                "fit.l0_lambda 'auto' runs the L0 path, which is not checkpointed: drop "
                "fit.checkpoint_every / --resume, or give l0_lambda a number"
            )
        merger, path = merge_path(ctx, cfg)
        info = {
            "merger": merger,
            "fit": merger.result,
            "path": path,
            "l0_choice": dict(path.choice),
            "importance": [dict(r) for r in path.importance],
        }
        return MergeOutcome(merger.merged_state_dict(), merger.merged_model, info)
