"""Output ensemble: average the candidates' predicted probabilities.

Not a merge: it keeps all N models and costs N forward passes. It is the reference a single
merged model tries to reach. The ensemble module returns log-probabilities, so cross-entropy on
its output is the ensemble's negative log-likelihood."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..batches import logits_of
from .base import MergeContext, MergeMethod, MergeOutcome, register


class OutputEnsemble(nn.Module):
    """``log(mean_j softmax(f_j(x)))`` over the member models."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        logp = torch.stack(
            [torch.log_softmax(logits_of(m(*args, **kwargs)).float(), dim=-1) for m in self.members]
        )
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))


@register
class Ensemble(MergeMethod):
    name = "ensemble"
    single_model = False
    summary = "average of the candidates' output probabilities (N models at inference)"

    def run(self, ctx: MergeContext) -> MergeOutcome:
        members = [ctx.build_plain(cand.state) for cand in ctx.pool]
        ensemble = OutputEnsemble(members).eval()
        return MergeOutcome.of_model(ensemble, None, info={"members": len(members)})
