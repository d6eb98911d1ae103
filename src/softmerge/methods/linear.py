"""Model soups: the uniform soup and the weighted linear merge (Wortsman et al., ICML 2022).

The uniform soup averages every merged tensor; ``linear`` takes one weight per candidate
(mergekit's ``linear``; ``normalize`` divides by the weights' sum).
"""

from __future__ import annotations

from typing import Any

from .base import MergeContext, MethodParams, TensorwiseMethod, Weights, register


class LinearParams(MethodParams):
    weight: Weights = None  # one per candidate, or one for all; default 1 each
    normalize: bool = True


@register
class Linear(TensorwiseMethod):
    name = "linear"
    function = "linear"
    Params = LinearParams
    summary = "weighted average of the candidates (a model soup with chosen weights)"


@register
class UniformSoup(TensorwiseMethod):
    name = "uniform_soup"
    function = "linear"
    summary = "plain average of every merged tensor"

    def tensor_kwargs(self, ctx: MergeContext) -> dict[str, Any]:
        return {"weight": 1.0, "normalize": True}
