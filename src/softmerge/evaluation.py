"""Models from states, and how well they do: the one evaluation path of every command.

- :func:`skeleton`: a weightless (meta-device) copy of a model, the template every merge uses;
- :func:`model_with_state`: a fresh model holding a state dict, built on the skeleton without a
  second copy of the weights (``load_state_dict(assign=True)``);
- :func:`evaluate`: the objective's loss and metric (accuracy or perplexity) over a loader;
- :func:`recalibrate_batchnorm`: BatchNorm statistics re-estimated for merged weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .batches import Batch, logits_of, split_on
from .objectives import Objective, Totals, resolve_objective


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (CPU when it has none, or only meta tensors)."""
    for t in [*model.parameters(), *model.buffers()]:
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def state_keys(model: nn.Module) -> set[str]:
    return set(model.state_dict(keep_vars=True))


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose state-dict tensors are on the meta device (no memory).

    Tied tensors stay tied; non-persistent buffers (rotary frequencies, masks), which no
    checkpoint carries, are copied for real so the skeleton can still run."""
    persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in persistent and id(t) not in memo:
            meta = t.detach().to("meta")
            is_param = isinstance(t, nn.Parameter)
            memo[id(t)] = nn.Parameter(meta, t.requires_grad) if is_param else meta
    return copy.deepcopy(model, memo)


def model_with_state(
    template: nn.Module,
    state: Mapping[str, torch.Tensor],
    device: torch.device | str | None = None,
) -> nn.Module:
    """A fresh model like ``template`` holding ``state`` (cast to the template's dtypes), in
    eval mode. Tensors already in the right dtype and device are used as they are, not copied."""
    model = skeleton(template)
    dtypes = {k: v.dtype for k, v in template.state_dict(keep_vars=True).items()}
    target = torch.device(device) if device is not None else None
    ready = {}
    for key, value in state.items():
        t = value.detach().to(device=target, dtype=dtypes.get(key, value.dtype))
        # A parameter must not alias a candidate's tensor: training this model later would
        # write into the candidate. Copies are made only when nothing else made one.
        ready[key] = t.clone() if t is value or t.data_ptr() == value.data_ptr() else t
    model.load_state_dict(ready, strict=True, assign=True)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):  # Hugging Face models re-tie their embeddings after assignment
        tie()
    return model.eval()


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def set_gate_training_mode(model: nn.Module) -> None:
    """Eval mode (no dropout), except BatchNorm, which uses batch statistics while merging:
    the candidates' running statistics do not describe the merged weights."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Iterable[Batch]) -> bool:
    """Re-estimate BatchNorm running statistics on ``loader`` (cumulative average, one pass)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    set_gate_training_mode(model)
    device = model_device(model)
    for batch in loader:
        b = split_on(batch, device)
        model(*b.args, **b.kwargs)
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    model.eval()
    return True


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    objective: Objective | str | None = None,
) -> dict[str, float]:
    """The objective's mean loss and metric of ``model`` over ``loader``: ``{"loss",
    "accuracy"}`` for classification, ``{"loss", "perplexity"}`` for language models.

    ``objective`` defaults to the one the model's class implies (see ``objectives``)."""
    obj = resolve_objective(objective if objective is not None else "auto", model)
    was_training = model.training
    model.eval()
    device = model_device(model)
    totals = Totals()
    try:
        for batch in loader:
            b = split_on(batch, device)
            totals.add(obj.totals(logits_of(model(*b.args, **b.kwargs)), b))
    finally:
        model.train(was_training)
    return obj.metrics(totals)


def score(metrics: Mapping[str, float]) -> float:
    """One number where higher is better: accuracy, else minus perplexity, else minus loss."""
    if "accuracy" in metrics:
        return metrics["accuracy"]
    if "perplexity" in metrics:
        return -metrics["perplexity"]
    return -metrics["loss"]
