"""REPAIR (Jordan, Sedghi, Saukh, Entezari, Neyshabur, "REPAIR: REnormalizing Permuted
Activations for Interpolation Repair", ICLR 2023).

Averaging aligned networks still shrinks their hidden activations: the mean of two unit
vectors that are not identical is shorter than either, so the merged network's pre-activations
have a smaller spread than the candidates' and the error compounds layer after layer ("variance
collapse"). REPAIR measures, on data, each hidden channel's mean and standard deviation in
every candidate and in the merged network, and rescales the merged channel so that its
statistics are the interpolation of the candidates': ``mean = sum_j w_j mean_j`` and
``std = sum_j w_j std_j``.

Here the correction is folded into the layer that produces the channel (a Linear or
convolution): ``W' = s * W``, ``b' = s * (b - mean_merged) + mean_target`` with
``s = std_target / std_merged``, so the result is an ordinary state dict of the same
architecture. Layers are corrected one at a time in execution order, each measured after the
correction of the layers before it. A channel normalised by a BatchNorm needs no correction:
there, resetting the BatchNorm statistics on data is the repair (as in the paper), and it is
done before and after the corrections.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from softmerge.align.activation_matching import batch_inputs
from softmerge.align.spec import PermutationSpec, permutation_spec
from softmerge.errors import DataError, PlanError
from softmerge.evaluation import model_with_state, recalibrate_batchnorm

__all__ = ["repair", "repair_layers"]

State = Mapping[str, torch.Tensor]


class _Stop(Exception):
    """Raised by a hook once the layer of interest has run: the rest of the forward is waste."""


def _channel_dim(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return -1
    return -(len(module.kernel_size) + 1)


def repair_layers(model: nn.Module, spec: PermutationSpec) -> list[str]:
    """Linear / conv modules whose outputs are hidden units (in a permutation group) not
    normalised by a BatchNorm: the layers REPAIR corrects (unordered)."""
    modules = dict(model.named_modules())
    norms = {name for name, m in modules.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    layers = []
    for group in spec.groups.values():
        owners = {ref.key.rsplit(".", 1)[0] for ref in group.axes}
        if owners & norms:
            continue
        for ref in group.axes:
            owner = ref.key.rsplit(".", 1)[0]
            module = modules.get(owner)
            producing = ref.axis == 0 and ref.key.endswith(".weight")
            if producing and isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
                layers.append(owner)
    return sorted(set(layers))


def _execution_order(model: nn.Module, names: Sequence[str], batch: Any) -> list[str]:
    order: list[str] = []
    modules = dict(model.named_modules())

    def note(name: str) -> None:
        if name not in order:
            order.append(name)

    handles = [modules[n].register_forward_hook(lambda *_, n=n: note(n)) for n in names]
    try:
        args, kwargs = batch_inputs(batch)
        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return order


class _Stats:
    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | float = 0.0
        self.squares: torch.Tensor | float = 0.0

    def add(self, output: torch.Tensor, dim: int) -> None:
        x = output.detach().movedim(dim, -1)
        x = x.reshape(-1, x.shape[-1]).double()
        self.count += x.shape[0]
        self.total = self.total + x.sum(0)
        self.squares = self.squares + (x * x).sum(0)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        var = (self.squares / self.count - mean**2).clamp_min(0)
        return mean, var.sqrt()


def _measure(
    model: nn.Module,
    layers: Sequence[str],
    loader: Iterable[Any],
    max_batches: int | None,
    stop_after: str | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, std) of each layer's output on the data, model in eval mode."""
    modules = dict(model.named_modules())
    stats = {name: _Stats() for name in layers}
    handles = []
    for name in layers:

        def hook(module: nn.Module, _inp: Any, out: torch.Tensor, name: str = name) -> None:
            stats[name].add(out, _channel_dim(module))
            if name == stop_after:
                raise _Stop

        handles.append(modules[name].register_forward_hook(hook))
    model.eval()
    try:
        for batch in itertools.islice(loader, max_batches):
            args, kwargs = batch_inputs(batch)
            with contextlib.suppress(_Stop):
                model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if any(s.count == 0 for s in stats.values()):
        raise DataError("REPAIR got an empty data loader")
    return {name: s.mean_std() for name, s in stats.items()}


def _normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise PlanError(f"REPAIR got {len(values)} weights for {count} candidates")
    if any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
        raise PlanError(f"REPAIR weights must be >= 0 with a positive sum, got {values}")
    total = sum(values)
    return [w / total for w in values]


def _load(model: nn.Module, state: State) -> nn.Module:
    """A fresh model holding ``state`` (``model`` may be a weightless template)."""
    return model_with_state(model, state)


@torch.no_grad()
def _correct(module: nn.Module, merged, target, eps: float) -> None:
    """Fold ``y -> (y - mean_m) * std_t / std_m + mean_t`` into the layer's weight and bias
    (output channels are axis 0 of a Linear's or a convolution's weight).

    Without a bias only the scale can be corrected."""
    (mean_m, std_m), (mean_t, std_t) = merged, target
    scale = std_t / std_m.clamp_min(eps)
    weight = module.weight
    shape = [1] * weight.dim()
    shape[0] = -1
    weight.mul_(scale.to(weight.dtype).view(shape))
    if module.bias is not None:
        shift = (mean_t - mean_m * scale).to(module.bias.dtype)
        module.bias.mul_(scale.to(module.bias.dtype)).add_(shift)


Weights = Sequence[float] | Mapping[str, Sequence[float]] | None


def _layer_weights(weights: Weights, layers: Sequence[str], count: int) -> dict[str, list[float]]:
    """Normalised candidate weights per repaired layer (one list for all, or one per layer)."""
    if isinstance(weights, Mapping):
        missing = [name for name in layers if name not in weights]
        if missing:
            raise PlanError(f"REPAIR weights given per layer but none for layer {missing[0]!r}")
        return {name: _normalised_weights(weights[name], count) for name in layers}
    shared = _normalised_weights(weights, count)
    return {name: shared for name in layers}


@torch.no_grad()
def repair(
    model: nn.Module,
    merged_state: State,
    candidate_states: Sequence[State],
    weights: Weights,
    loader: Iterable[Any],
    spec: PermutationSpec | None = None,
    *,
    max_batches: int | None = None,
    eps: float = 1e-5,
) -> dict[str, torch.Tensor]:
    """A repaired copy of ``merged_state`` (``merged_state`` and ``model`` are not modified).

    ``candidate_states`` are the (aligned) candidates that were merged and ``weights`` their
    interpolation weights: one list for every layer, a mapping ``{layer name: list}`` (e.g. the
    gates of each layer's weight), or None for uniform; each list is normalised to sum 1. The
    target statistics of a hidden channel are ``sum_j w_j mean_j`` and ``sum_j w_j std_j``.
    ``loader`` yields the batches the statistics are measured on (the first ``max_batches``).
    ``spec`` is derived from the model (the loader's first batch as example) when not given."""
    if not candidate_states:
        raise PlanError("REPAIR needs the candidate states that were merged")
    if not isinstance(weights, Mapping):
        _normalised_weights(weights, len(candidate_states))  # bad weights fail before any work
    first = next(iter(loader), None)
    if first is None:
        raise DataError("REPAIR got an empty data loader")
    if spec is None:
        spec = permutation_spec(model, batch_inputs(first)[0] or None)
    net = _load(model, merged_state)
    has_bn = recalibrate_batchnorm(net, itertools.islice(loader, max_batches))
    layers = _execution_order(net, repair_layers(model, spec), first)
    if layers:
        w = _layer_weights(weights, layers, len(candidate_states))
        target = _target_stats(model, candidate_states, w, layers, loader, max_batches)
        modules = dict(net.named_modules())
        for name in layers:
            merged = _measure(net, [name], loader, max_batches, stop_after=name)[name]
            _correct(modules[name], merged, target[name], eps)
    if has_bn:
        recalibrate_batchnorm(net, itertools.islice(loader, max_batches))
    return {
        k: v.detach().to(merged_state[k].dtype).clone() if k in merged_state else v.clone()
        for k, v in net.state_dict().items()
    }


def _target_stats(
    model: nn.Module,
    candidates: Sequence[State],
    weights: Mapping[str, Sequence[float]],
    layers: Sequence[str],
    loader: Iterable[Any],
    max_batches: int | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: the weighted mean of the candidates' channel means and of their stds."""
    target: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for j, state in enumerate(candidates):
        used = [name for name in layers if weights[name][j] > 0]
        if not used:
            continue
        stats = _measure(_load(model, state), used, loader, max_batches)
        for name, (mean, std) in stats.items():
            w = weights[name][j]
            m, s = target.get(name, (0.0, 0.0))
            target[name] = (m + w * mean, s + w * std)
    return target
