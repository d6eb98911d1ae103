"""PEFT's own combinations of LoRA adapters (``LoraModel.add_weighted_adapter``: linear, cat,
svd, ties, dare_linear, ...), behind the same interface as every other method, so ``compare``
puts them in one table with soft merging of the same adapters.

Needs LoRA adapter candidates and the model (a Hugging Face one). The adapters are loaded onto
the base model with PEFT, combined into one adapter, and merged into the weights
(``merge_and_unload``): the result is an ordinary state dict of the base architecture.
Weights default to 1/N each (the adapters' average)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..candidates import LazyState
from ..errors import PlanError
from .base import MergeContext, MergeMethod, MergeOutcome, MethodParams, Weights, register

Combination = Literal[
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]


class PeftParams(MethodParams):
    combination_type: Combination = "linear"
    weight: Weights = None  # one per adapter, or one for all; default 1/N
    density: float | None = Field(None, gt=0, le=1)  # ties / dare / magnitude_prune
    svd_rank: int | None = Field(None, ge=1)


@register
class PeftCombination(MergeMethod):
    name = "peft"
    Params = PeftParams
    needs_adapters = True
    summary = "PEFT's add_weighted_adapter over LoRA adapters (linear, cat, svd, ties, dare...)"

    def run(self, ctx: MergeContext) -> MergeOutcome:
        import torch
        from peft import PeftModel

        p: PeftParams = self.params  # type: ignore[assignment]
        if not all(c.is_adapter for c in ctx.pool):
            raise PlanError("method 'peft' combines LoRA adapters: every candidate must be one")
        count = len(ctx.pool)
        weights = p.weight if isinstance(p.weight, list) else [p.weight or 1.0 / count] * count
        if len(weights) != count:
            raise PlanError(f"method 'peft': weight needs one value per adapter: {count}")
        base_reader = ctx.pool[0]._inner_reader().base  # type: ignore[attr-defined]
        model = ctx.build_plain(LazyState(base_reader))
        names = [f"c{j}" for j in range(count)]
        peft_model = PeftModel.from_pretrained(model, ctx.pool[0].source, adapter_name=names[0])
        for name, cand in zip(names[1:], ctx.pool[1:], strict=True):
            peft_model.load_adapter(cand.source, adapter_name=name)
        extra = {"density": p.density} if p.density is not None else {}
        if p.svd_rank is not None:
            extra["svd_rank"] = p.svd_rank
        try:
            with torch.no_grad():
                peft_model.add_weighted_adapter(
                    names, weights, "merged", combination_type=p.combination_type, **extra
                )
        except ValueError as exc:  # e.g. linear needs every adapter at the same rank
            raise PlanError(f"method 'peft' ({p.combination_type}): {exc}") from exc
        peft_model.set_adapter("merged")
        merged = peft_model.merge_and_unload()
        state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
        state = {k: state[k] for k in ctx.output_keys() if k in state}
        info = {"combination_type": p.combination_type, "weights": weights}
        return MergeOutcome(state, lambda: ctx.build_plain(state), info)
