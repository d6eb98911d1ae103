"""Learned merge coefficients over frozen candidates: the engine of learned soup and AdaMerging.

Like soft merging, only a few numbers per candidate learn while every candidate's weights stay
frozen: the merged tensors are built from a stack made once, and the model runs on them through
``torch.func.functional_call``. What differs between the methods is how the learned parameters
become coefficients (softmax per tensor, clamped task-vector scales) and the objective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..soft import (  # the batch helpers of gate training, so both read batches alike
    cycle_batches,
    logits_of,
    set_gate_training_mode,
    split_batch,
    task_loss,
)
from ..zoo import evaluate
from .base import MergeContext, State

CoefficientFn = Callable[[torch.Tensor], torch.Tensor]


class CoefficientMerge:
    """theta_k = offset_k + sum_j c[j, k] * stack_k[j] for every merged tensor k.

    With a base, ``stack`` holds task vectors (theta_j - theta_0) and ``offset`` is theta_0;
    without one, ``stack`` holds the weights themselves and ``offset`` is zero."""

    def __init__(self, ctx: MergeContext, use_base: bool) -> None:
        self.ctx = ctx
        self.names = list(ctx.merged_names)
        base = ctx.base_candidate.state if use_base and ctx.base_candidate else None
        self.offset = {k: base[k].float() for k in self.names} if base is not None else {}
        self.stack = {
            k: torch.stack([s[k].float() for s in ctx.states]) - self.offset.get(k, 0.0)
            for k in self.names
        }
        self.rest = ctx.rest_state()

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ctx.pool), len(self.names)

    def merged(self, coefficients: torch.Tensor) -> State:
        """Merged tensors for coefficients of shape (N, T) (one column per merged tensor)."""
        out = {}
        for t, k in enumerate(self.names):
            theta = torch.tensordot(coefficients[:, t], self.stack[k], dims=1)
            out[k] = theta + self.offset[k] if k in self.offset else theta
        return out

    def forward(self, coefficients: torch.Tensor, batch: Any):
        args, kwargs, labels = split_batch(batch)
        state = {**self.rest, **self.merged(coefficients)}
        return logits_of(functional_call(self.ctx.model, state, args, kwargs)), labels

    def train(
        self,
        raw: nn.Parameter,
        to_coefficients: CoefficientFn,
        *,
        steps: int,
        lr: float,
        objective: str,
        select_every: int,
        desc: str,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Adam on ``raw`` for ``steps`` batches of the merge set.

        Returns the chosen coefficients and a record of the run. With a held-out loader in the
        context, the coefficients every ``select_every`` steps (the start included) are scored
        by held-out cross-entropy and the best is kept, ties going to the earlier one: early
        stopping, so the result is never worse than the start on held-out loss. (Loss, not
        accuracy: on a few hundred samples accuracy moves in steps of whole samples and picks
        noise.) Without a held-out loader: the last iterate."""
        loader = self.ctx.require_data(desc)
        held_out = self.ctx.held_out_loader if select_every else None
        optimizer = torch.optim.Adam([raw], lr=lr)
        history: list[dict[str, float]] = []
        best: tuple[float, int, torch.Tensor] | None = None
        batches = cycle_batches(loader)
        bar = tqdm(range(steps + 1), desc=desc, disable=not self.ctx.progress, leave=False)
        for step in bar:
            if held_out is not None and (step % select_every == 0 or step == steps):
                acc, nll = self.held_out_scores(to_coefficients(raw.detach()), held_out)
                score = -nll
                history.append({"step": step, "held_out_accuracy": acc, "held_out_loss": nll})
                if best is None or score > best[0]:
                    best = (score, step, raw.detach().clone())
            if step == steps:
                break
            set_gate_training_mode(self.ctx.model)
            logits, labels = self.forward(to_coefficients(raw), next(batches))
            loss = task_loss(objective, logits, labels)
            if not torch.isfinite(loss):
                continue  # an extreme candidate can overflow one batch; do not poison Adam
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if (step + 1) % 10 == 0:
                history.append({"step": step + 1, "loss": loss.item()})
        self.ctx.model.eval()
        chosen = raw.detach() if best is None else best[2]
        record = {"history": history, "selected_step": steps if best is None else best[1]}
        if best is not None:
            record["held_out_loss"] = -best[0]
        return to_coefficients(chosen), record

    @torch.no_grad()
    def held_out_scores(
        self, coefficients: torch.Tensor, loader: Iterable[Any]
    ) -> tuple[float, float]:
        """(accuracy %, mean cross-entropy) of the merge on held-out data."""
        return evaluate(self.ctx.build(self.outcome_state(coefficients)), loader)

    def outcome_state(self, coefficients: torch.Tensor) -> State:
        with torch.no_grad():
            return self.ctx.assemble(self.merged(coefficients))

