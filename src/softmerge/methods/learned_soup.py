"""Learned soup (Wortsman et al., ICML 2022, appendix): per merged tensor, softmax mixing
weights over the candidates, learned by gradient descent on the labelled merge set.

Starts at the uniform soup (all logits 0). With a held-out split in the context the iterate with
the lowest held-out loss is kept (the start included), so it never ends worse than the uniform
soup on held-out loss. Unlike soft merging's hard concrete gates, a softmax weight is never
exactly 0: a candidate can be turned down but never switched off."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .base import MergeContext, MergeMethod, MergeOutcome, MethodParams, register
from .coefficients import CoefficientMerge


class LearnedSoupParams(MethodParams):
    steps: int = Field(200, ge=1)
    lr: float = Field(0.05, gt=0)  # Adam
    # auto: the merge's objective (classification, causal_lm...)
    objective: Literal["auto", "cross_entropy", "classification", "causal_lm", "entropy"] = "auto"
    select_every: int = Field(25, ge=0)  # score on held-out data every K steps (0: keep last)


@register
class LearnedSoup(MergeMethod):
    name = "learned_soup"
    Params = LearnedSoupParams
    needs_data = True
    summary = "softmax mixing weights per tensor, learned on the merge set"

    def run(self, ctx: MergeContext) -> MergeOutcome:
        p: LearnedSoupParams = self.params  # type: ignore[assignment]
        engine = CoefficientMerge(ctx, use_base=False)
        logits = nn.Parameter(torch.zeros(engine.shape, device=ctx.device))  # the uniform soup
        weights, record = engine.train(
            logits,
            lambda raw: torch.softmax(raw, dim=0),
            steps=p.steps,
            lr=p.lr,
            objective=p.objective,
            select_every=p.select_every,
            desc=self.name,
        )
        state = engine.outcome_state(weights)
        info = {
            **record,
            "mean_weight": dict(zip(ctx.candidate_names, weights.mean(1).tolist(), strict=True)),
        }
        return MergeOutcome(state, lambda: ctx.build(state), info)
