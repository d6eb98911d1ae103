"""Activation matching (Git Re-Basin, Sec. 3.1): match units whose activations correlate.

Both models run on the same batches; at every observation point of a group (the output of a
module that carries the group: a Linear / Conv output, a ReLU, a BatchNorm...) the Pearson
correlation between reference unit ``i`` and other unit ``j`` is accumulated over samples (and
over spatial positions for feature maps). The correlations of all the group's points are summed
and one ``linear_sum_assignment`` per group picks the permutation. Groups are independent, so
there is no coordinate descent; the only randomness is the loader's order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from softmerge.align.spec import ActivationPoint, PermutationSpec
from softmerge.errors import DataError, PlanError
from softmerge.evaluation import model_with_state

__all__ = ["activation_matching", "batch_inputs", "unit_columns"]


def batch_inputs(batch: Any) -> tuple[tuple, dict]:
    """(args, kwargs) of the model for one batch: ``(x, y)`` pairs, bare tensors or dicts."""
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k != "labels"}
    if isinstance(batch, list | tuple):
        return (batch[0],), {}
    return (batch,), {}


def unit_columns(output: torch.Tensor, point: ActivationPoint, size: int) -> torch.Tensor:
    """(samples, size) float64 matrix of one point's activations; spatial positions and the
    entries of a block count as extra samples of the same unit."""
    x = output.movedim(point.dim, -1)  # (..., size * block)
    x = x.reshape(-1, size, point.block).transpose(1, 2)
    return x.reshape(-1, size).double()


class _Moments:
    """Running sums for the cross-correlation of two (samples, n) activation matrices."""

    def __init__(self, size: int) -> None:
        self.count = 0
        self.sum_a = torch.zeros(size, dtype=torch.float64)
        self.sum_b = torch.zeros(size, dtype=torch.float64)
        self.sq_a = torch.zeros(size, dtype=torch.float64)
        self.sq_b = torch.zeros(size, dtype=torch.float64)
        self.cross = torch.zeros(size, size, dtype=torch.float64)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.count += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sq_a += (a * a).sum(0)
        self.sq_b += (b * b).sum(0)
        self.cross += a.T @ b

    def correlation(self, eps: float = 1e-8) -> torch.Tensor:
        n = max(self.count, 1)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        std_a = (self.sq_a / n - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.sq_b / n - mean_b**2).clamp_min(0).sqrt()
        cov = self.cross / n - mean_a[:, None] * mean_b[None, :]
        return cov / (std_a[:, None] * std_b[None, :] + eps)


def _capture(model: nn.Module, points: list[ActivationPoint], store: dict) -> ExitStack:
    stack = ExitStack()
    modules = dict(model.named_modules())
    for point in {p.module for p in points}:
        if point not in modules:
            raise PlanError(f"activation point {point!r} is not a module of the model")

        def hook(_module: nn.Module, _inputs: Any, output: Any, name: str = point) -> None:
            store[name] = output.detach()

        stack.enter_context(modules[point].register_forward_hook(hook))
    return stack


@torch.no_grad()
def activation_matching(
    model: nn.Module,
    spec: PermutationSpec,
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    loader: Iterable[Any],
    *,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Permutations (group -> index tensor, as :func:`weight_matching` returns) that match
    ``other``'s units to ``reference``'s by the correlation of their activations on ``loader``.

    Needs a derived spec (its ``points``); the models run in eval mode on copies of ``model``
    (a weightless template will do)."""
    spec.check(reference, "reference")
    spec.check(other, "candidate")
    missing = [g for g in spec.groups if not spec.points.get(g)]
    if missing:
        raise PlanError(
            f"activation matching needs observation points for group {missing[0]!r}; "
            "derive the spec with permutation_spec(model, ...) or use weight matching"
        )
    models = [model_with_state(model, state) for state in (reference, other)]
    points = [p for g in spec.groups for p in spec.points[g]]
    moments = {(g, p): _Moments(spec.groups[g].size) for g in spec.groups for p in spec.points[g]}
    seen = 0
    for batch in itertools.islice(loader, max_batches):
        args, kwargs = batch_inputs(batch)
        acts = [{}, {}]
        for net, store in zip(models, acts, strict=True):
            with _capture(net, points, store):
                net(*args, **kwargs)
        for (group, point), moment in moments.items():
            size = spec.groups[group].size
            moment.add(
                unit_columns(acts[0][point.module], point, size),
                unit_columns(acts[1][point.module], point, size),
            )
        seen += 1
    if not seen:
        raise DataError("activation matching got an empty data loader")
    perms = {}
    for group in spec.groups:
        corr = sum(moments[(group, p)].correlation() for p in spec.points[group])
        _, cols = linear_sum_assignment(corr.numpy(), maximize=True)
        perms[group] = torch.as_tensor(cols, dtype=torch.long)
    return perms
