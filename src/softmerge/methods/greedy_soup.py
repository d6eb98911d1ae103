"""Greedy soup (Wortsman et al., ICML 2022): rank the candidates by held-out accuracy, then add
them one at a time, keeping one only if the soup's held-out accuracy rises.

The first ingredient is the best single candidate and a candidate is kept only when it helps,
so on its held-out split the soup is never below the best single model. The held-out split is
``ctx.held_out_loader`` (default: the merge set, which the candidates never trained on)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..zoo import evaluate
from .base import MergeContext, MergeMethod, MergeOutcome, register
from .soups import greedy_soup


@register
class GreedySoup(MergeMethod):
    name = "greedy_soup"
    needs_data = True
    summary = "add candidates by held-out accuracy; keep one only if the soup improves"

    def run(self, ctx: MergeContext) -> MergeOutcome:
        held_out = ctx.held_out_loader or ctx.require_data(self.name)
        parts = [{k: s[k] for k in ctx.merged_names} for s in ctx.states]

        def score(soup: Mapping[str, torch.Tensor]) -> float:
            return evaluate(ctx.build(ctx.assemble(soup)), held_out)[0]

        soup, kept = greedy_soup(parts, score)
        state = ctx.assemble(soup)
        model = ctx.build(state)
        info = {
            "kept": [ctx.candidate_names[i] for i in kept],
            "held_out_accuracy": score(soup),
        }
        return MergeOutcome(model, state, info)
