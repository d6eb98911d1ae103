"""Task arithmetic (Ilharco et al., ICLR 2023): theta_0 + lambda * sum_j w_j (theta_j - theta_0).

mergekit's ``task_arithmetic``: weights default to 1 each (the plain sum of task vectors);
FusionBench's usual setting is ``lambda: 0.3``."""

from __future__ import annotations

from pydantic import Field

from .base import MethodParams, TensorwiseMethod, Weights, register


class TaskArithmeticParams(MethodParams):
    weight: Weights = None
    normalize: bool = False
    lambda_: float = Field(1.0, alias="lambda")  # scales the summed task vectors


@register
class TaskArithmetic(TensorwiseMethod):
    name = "task_arithmetic"
    function = "task_arithmetic"
    Params = TaskArithmeticParams
    needs_base = True
    summary = "add the (weighted) task vectors to the base"
