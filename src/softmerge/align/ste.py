"""Straight-through estimator (STE) matching: permutations learned against the merge's loss.

Git Re-Basin (Ainsworth, Hayase, Srinivasa, ICLR 2023, Sec. 3.3) learns the permutation of a
model B from data: a free copy ``W`` of B's weights is projected onto B's permutation orbit by
weight matching (``pi = weight_matching(W, B)``, the permuted B closest to ``W``); the forward
pass uses the projection, the backward pass treats the projection as the identity, and ``W``
follows the gradient of the loss of the merged model. Weight matching only makes the weights
close; STE makes the *average* score well on the merge data.

Here every non-reference candidate gets a free copy, and the loss is that of the uniform soup
of all candidates (the reference included, as it is), so the permutations are chosen jointly
for the N-way merge. The free copies start at the weight-matching alignment. Every
``select_every`` steps the soup of the current projections is scored on fixed selection batches;
the permutations with the lowest score are returned, and the starting ones count, so the result
never scores worse on those batches than weight matching alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from softmerge.align.spec import PermutationSpec
from softmerge.align.weight_matching import (
    apply_permutation,
    identity_permutation,
    weight_matched_to,
    weight_matching,
)
from softmerge.batches import cycle_batches, first_batches, logits_of, split_on
from softmerge.errors import PlanError
from softmerge.evaluation import set_gate_training_mode
from softmerge.objectives import Objective

__all__ = ["SELECT_BATCHES", "SteResult", "functional_loss", "ste_matching"]

State = Mapping[str, torch.Tensor]
Perms = dict[str, torch.Tensor]
LossOf = Callable[[dict[str, torch.Tensor], Any], torch.Tensor]  # (state, batch) -> loss

STEPS = 1000  # S2 (docs/alignment.md): the soups kept were found at steps 700-1000
LR = 1e-2  # Adam, on the free copies (weights of order 0.01-0.1 move by whole units)
SELECT_EVERY = 50
SELECT_BATCHES = 16  # the loader's first batches of one pass, on which the soups are scored
MATCH_ITER = 20  # coordinate-descent sweeps per projection (it starts from the last one)


@dataclass
class SteResult:
    """Permutations per model (the reference's the identity) and how the soup scored."""

    perms: list[Perms]
    loss_start: float  # soup of the initial (weight-matching) alignment, on the selection batches
    loss_end: float  # soup of the returned alignment
    chosen_step: int  # the step whose projections were kept (0: the initial ones)
    steps: int
    lr: float

    def note(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "lr": self.lr,
            "chosen_step": self.chosen_step,
            "soup_loss_start": self.loss_start,
            "soup_loss_end": self.loss_end,
        }


@contextmanager
def batch_statistics(model: nn.Module):
    """The model as a gate step runs it (``set_gate_training_mode``: eval, BatchNorm on the
    batch's statistics, since a soup's running statistics average unrelated estimates); the
    modules' own modes come back afterwards."""
    modes = {m: m.training for m in model.modules()}
    set_gate_training_mode(model)
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.train(mode)


def functional_loss(
    model: nn.Module,
    objective: Objective,
    device: torch.device | str | None = None,
    prepare: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> LossOf:
    """``(state, batch) -> loss`` of ``model`` run with ``state`` (``torch.func``), under
    ``objective``; ``prepare`` maps the state first (e.g. to the model's dtypes and device)."""

    def loss_of(state: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        b = split_on(batch, device)
        weights = prepare(state) if prepare is not None else state
        with batch_statistics(model):
            logits = logits_of(functional_call(model, weights, b.args, b.kwargs))
        return objective.loss(logits, b)

    return loss_of


def _soup(
    reference: State, projected: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Uniform average of the reference and the projected candidates (float keys); integer
    buffers (BatchNorm's ``num_batches_tracked``) are copies of the reference's: a forward pass
    with batch statistics counts batches in place, and the candidates must stay untouched."""
    count = 1 + len(projected)
    out = {}
    for key, value in reference.items():
        if value.is_floating_point():
            out[key] = (value.float() + sum(p[key].float() for p in projected)) / count
        else:
            out[key] = value.clone()
    return out


def _project(
    spec: PermutationSpec,
    state: State,
    free: Mapping[str, torch.Tensor],
    start: State,
    perm: Perms,
    seed: int,
) -> tuple[Perms, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The permutation of ``state`` closest to its free copy (weight matching from ``perm``),
    the permuted state, and its straight-through form: the value is the permuted state, the
    gradient reaches the free copy. ``start`` fills the keys the free copy lacks (buffers)."""
    target = {**start, **{k: v.detach() for k, v in free.items()}}
    perm = weight_matching(spec, target, state, max_iter=MATCH_ITER, seed=seed, init=perm)
    hard = apply_permutation(spec, perm, state)
    through = {
        k: (free[k] + (v.float() - free[k]).detach()) if k in free else v for k, v in hard.items()
    }
    return perm, hard, through


def ste_matching(
    spec: PermutationSpec,
    states: Sequence[State],
    loss_of: LossOf,
    loader: Iterable[Any],
    *,
    reference: int = 0,
    init: Sequence[Mapping[str, torch.Tensor]] | None = None,
    steps: int = STEPS,
    lr: float = LR,
    select_every: int = SELECT_EVERY,
    select_batches: int = SELECT_BATCHES,
    seed: int = 0,
) -> SteResult:
    """Permutations of every model that make the uniform soup score well under ``loss_of``.

    The soups are scored on the first ``select_batches`` batches of one pass of ``loader``;
    the search then takes one batch per step, pass after pass. ``init`` (one permutation per
    model) is where the search starts; by default weight matching to ``states[reference]``.
    The reference keeps its unit order. Deterministic given ``seed`` and the loader's order."""
    if len(states) < 2:
        raise PlanError(f"STE matching needs at least 2 models, got {len(states)}")
    if steps < 0 or select_every < 1 or not lr > 0:
        raise PlanError(
            f"STE matching needs steps >= 0, select_every >= 1 and lr > 0; got steps={steps}, "
            f"select_every={select_every}, lr={lr}"
        )
    if select_batches < 1:
        raise PlanError(f"STE matching needs select_batches >= 1, got {select_batches}")
    ref = states[reference]
    others = [i for i in range(len(states)) if i != reference]
    if init is None:
        init = weight_matched_to(spec, states, reference, seed=seed)
    current = {i: {g: torch.as_tensor(p).clone() for g, p in init[i].items()} for i in others}
    matched = set(spec.permuted_keys()) - set(spec.buffers)
    if not matched:
        raise PlanError("STE matching: the permutation spec permutes no weight")
    start = {i: apply_permutation(spec, current[i], states[i]) for i in others}
    free = {
        i: {k: start[i][k].detach().float().clone().requires_grad_(True) for k in matched}
        for i in others
    }
    optimizer = torch.optim.Adam([p for d in free.values() for p in d.values()], lr=lr)
    selection = first_batches(loader, select_batches)
    train_batches = cycle_batches(loader)

    def score(projected: Mapping[int, State]) -> float:
        soup = _soup(ref, [projected[i] for i in others])
        with torch.no_grad():
            return sum(float(loss_of(soup, b)) for b in selection) / len(selection)

    best = (score(start), 0, {i: dict(current[i]) for i in others})
    loss_start = best[0]
    for step in range(1, steps + 1):
        projected, hards = {}, {}
        for i in others:
            current[i], hards[i], projected[i] = _project(
                spec, states[i], free[i], start[i], current[i], seed
            )
        loss = loss_of(_soup(ref, [projected[i] for i in others]), next(train_batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % select_every == 0 or step == steps:
            value = score(hards)  # the permutations this step's forward pass used
            if value < best[0]:
                best = (value, step, {i: dict(current[i]) for i in others})
    loss_end, chosen, kept = best
    perms = [identity_permutation(spec) if i == reference else kept[i] for i in range(len(states))]
    return SteResult(perms, loss_start, loss_end, chosen, steps, lr)
