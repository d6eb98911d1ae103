"""DARE (Yu et al., ICML 2024): drop each task-vector entry with probability 1 - density and
rescale the rest by 1 / density, then add linearly (``dare_linear``) or with TIES' sign
election (``dare_ties``). mergekit's methods of those names; the masks come from a generator
seeded with the context's seed, so the same seed gives the same merge."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from .base import MergeContext, MethodParams, TensorwiseMethod, Weights, register


class DareParams(MethodParams):
    weight: Weights = None
    density: float | list[float] = 1.0  # probability of keeping an entry
    normalize: bool = False
    rescale: bool = True
    lambda_: float = Field(1.0, alias="lambda")


class _Dare(TensorwiseMethod):
    Params = DareParams
    needs_base = True

    def tensor_kwargs(self, ctx: MergeContext) -> dict[str, Any]:
        kwargs = super().tensor_kwargs(ctx)
        # One generator for the whole merge: every tensor's mask is drawn from it in order.
        kwargs["generator"] = torch.Generator().manual_seed(ctx.seed)
        return kwargs


@register
class DareLinear(_Dare):
    name = "dare_linear"
    function = "dare_linear"
    summary = "random drop + rescale of task vectors, then a weighted sum"


@register
class DareTies(_Dare):
    name = "dare_ties"
    function = "dare_ties"
    summary = "random drop + rescale of task vectors, then TIES sign election"
