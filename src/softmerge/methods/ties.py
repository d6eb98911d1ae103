"""TIES merging (Yadav et al., NeurIPS 2023): trim each task vector to its largest ``density``
fraction, elect a sign per entry by summed mass, average the entries that agree with it.
mergekit's ``ties`` (density 1.0 by default; FusionBench uses density 0.2, lambda 0.3)."""

from __future__ import annotations

from pydantic import Field

from .base import MethodParams, TensorwiseMethod, Weights, register


class TiesParams(MethodParams):
    weight: Weights = None
    density: float | list[float] = 1.0  # fraction of each task vector kept (by magnitude)
    normalize: bool = True
    rescale: bool = False
    lambda_: float = Field(1.0, alias="lambda")


@register
class Ties(TensorwiseMethod):
    name = "ties"
    function = "ties"
    Params = TiesParams
    needs_base = True
    summary = "trim task vectors, elect signs, average what agrees"
