"""Merge methods behind one registry: soft merging and the methods users compare it against.

>>> from softmerge.methods import MergeContext, get_method
>>> ctx = MergeContext(model, ["a.safetensors", "b.safetensors"], merge_loader=loader)
>>> get_method("ties", density=0.5, base=...)  # doctest: +SKIP
>>> outcome = get_method("uniform_soup").merge(ctx)

One small module per method; ``METHOD_NAMES`` lists them in the order tables show them.
"""

from . import (  # noqa: F401  (each module registers its methods on import)
    adamerging,
    dare,
    ensemble,
    greedy_soup,
    learned_soup,
    linear,
    model_stock,
    peft_combination,
    slerp,
    soft_merging,
    task_arithmetic,
    ties,
)
from .base import (
    REGISTRY,
    MergeContext,
    MergeMethod,
    MergeOutcome,
    MethodParams,
    get_method,
    method_class,
    register,
)

METHOD_NAMES: tuple[str, ...] = (
    "uniform_soup",
    "linear",
    "greedy_soup",
    "learned_soup",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "model_stock",
    "task_wise_adamerging",
    "layer_wise_adamerging",
    "ensemble",
    "peft",
    "soft",
)
assert set(METHOD_NAMES) == set(REGISTRY), "METHOD_NAMES must list every registered method"

__all__ = [
    "METHOD_NAMES",
    "REGISTRY",
    "MergeContext",
    "MergeMethod",
    "MergeOutcome",
    "MethodParams",
    "get_method",
    "method_class",
    "register",
]
