"""Greedy soup (Wortsman et al., ICML 2022): rank the candidates by held-out accuracy, then add
them one at a time, keeping one only if the soup's held-out accuracy rises.

The first ingredient is the best single candidate and a candidate is kept only when it helps,
so on its held-out split the soup is never below the best single model. The held-out split is
``ctx.held_out_loader`` (default: the merge set, which the candidates never trained on). Every
soup tried is an average over the context's candidate stack: no candidate is copied."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..evaluation import score as higher_is_better
from .base import MergeContext, MergeMethod, MergeOutcome, register
from .soups import greedy_selection


@register
class GreedySoup(MergeMethod):
    name = "greedy_soup"
    needs_data = True
    summary = "add candidates by held-out accuracy; keep one only if the soup improves"

    def run(self, ctx: MergeContext) -> MergeOutcome:
        held_out = ctx.held_out_loader or ctx.require_data(self.name)
        stack = ctx.stack(deltas=False)
        dtypes = ctx.model_dtypes()

        def soup(indices: Sequence[int]) -> dict[str, torch.Tensor]:
            w = torch.zeros(len(ctx.pool), device=ctx.device)
            w[list(indices)] = 1.0 / len(indices)
            with torch.no_grad():
                merged = stack.mix(dict.fromkeys(ctx.merged_names, w), dtypes=dtypes)
            return ctx.assemble(merged)

        def score(indices: Sequence[int]) -> float:
            return higher_is_better(ctx.evaluate(ctx.build(soup(indices)), held_out))

        kept, _ = greedy_selection(len(ctx.pool), score)
        state = soup(kept)
        model = ctx.build(state)
        held = ctx.evaluate(model, held_out)
        info = {"kept": [ctx.candidate_names[i] for i in kept]}
        info.update({f"held_out_{k}": v for k, v in held.items()})
        return MergeOutcome.of_model(model, state, info=info)
