"""Learned merge coefficients over frozen candidates: the engine of learned soup and AdaMerging.

Like soft merging, only a few numbers per candidate learn while every candidate's weights stay
frozen: the merged tensors come from the context's candidate stack (the same one soft merging
uses) and the model runs on them through ``torch.func.functional_call``, trained by the same
:class:`~softmerge.fit.FitLoop`. What differs between the methods is how the learned parameters
become coefficients (softmax per tensor, clamped task-vector scales) and the objective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..batches import cycle_batches, logits_of, split_on
from ..evaluation import set_gate_training_mode
from ..fit import FitLoop, Progress, Recorder, SelectBest
from ..objectives import resolve_objective
from .base import MergeContext, State

CoefficientFn = Callable[[torch.Tensor], torch.Tensor]


class CoefficientMerge:
    """theta_k = offset_k + sum_j c[j, k] * stack_k[j] for every merged tensor k.

    With a base, the stack holds task vectors (theta_j - theta_0) and the offset is theta_0;
    without one, it holds the weights themselves."""

    def __init__(self, ctx: MergeContext, use_base: bool) -> None:
        self.ctx = ctx
        self.model = ctx.require_model("learning merge coefficients")
        self.names = list(ctx.merged_names)
        self.stack = ctx.stack(deltas=use_base)
        self.dtypes = ctx.model_dtypes()
        self.buffers = {k for k, _ in self.model.named_buffers()}

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ctx.pool), len(self.names)

    def merged(self, coefficients: torch.Tensor) -> State:
        """Merged tensors for coefficients of shape (N, T) (one column per merged tensor)."""
        weights = {k: coefficients[:, t] for t, k in enumerate(self.names)}
        return self.stack.mix(weights, dtypes=self.dtypes)

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
        by held-out loss and the best is kept, ties going to the earlier one: early stopping,
        so the result is never worse than the start on held-out loss. (Loss, not accuracy: on
        a few hundred samples accuracy moves in steps of whole samples and picks noise.)
        Without a held-out loader: the last iterate."""
        loader = self.ctx.require_data(desc)
        held_out = self.ctx.held_out_loader if select_every else None
        problem = _CoefficientProblem(self, raw, to_coefficients, objective)
        recorder = Recorder(10)
        callbacks: list[Any] = [recorder, Progress(desc, self.ctx.progress)]
        select = None
        if held_out is not None:

            def score() -> dict[str, float]:
                model = self.ctx.build(self.outcome_state(to_coefficients(raw.detach())))
                return self.ctx.evaluate(model, held_out)

            select = SelectBest(select_every, [raw], score)
            callbacks.append(select)
        loop = FitLoop(problem, torch.optim.Adam([raw], lr=lr), steps, callbacks=callbacks)
        loop.run(cycle_batches(loader))
        self.model.eval()
        history = recorder.history if select is None else select.with_history(recorder.history)
        if select is None or select.best is None:
            return to_coefficients(raw.detach()), {"history": history, "selected_step": steps}
        best = select.best
        record = {"history": history, "selected_step": best.step, "held_out_loss": -best.score}
        return to_coefficients(best.values[0]), record

    def outcome_state(self, coefficients: torch.Tensor) -> State:
        with torch.no_grad():
            return self.ctx.assemble(self.merged(coefficients))


class _CoefficientProblem:
    """One step of a coefficient merge for the FitLoop: merge, run, objective."""

    def __init__(
        self,
        merge: CoefficientMerge,
        raw: nn.Parameter,
        to_coefficients: CoefficientFn,
        objective: str,
    ) -> None:
        self.merge, self.raw, self.to_coefficients = merge, raw, to_coefficients
        ctx = merge.ctx
        self.objective = (
            ctx.objective_fn if objective == "auto" else resolve_objective(objective, merge.model)
        )

    def trainable(self) -> list[nn.Parameter]:
        return [self.raw]

    def loss(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        ctx, merge = self.ctx, self.merge
        set_gate_training_mode(merge.model)
        rest = {
            k: v.to(merge.dtypes.get(k, v.dtype)).clone() if k in merge.buffers else v
            for k, v in ctx.rest_state().items()
        }
        state = {**rest, **merge.merged(self.to_coefficients(self.raw))}
        b = split_on(batch, ctx.device)
        logits = logits_of(functional_call(merge.model, state, b.args, b.kwargs))
        loss = self.objective.loss(logits, b)
        return loss, {"loss": loss.item()}

    @property
    def ctx(self) -> MergeContext:
        return self.merge.ctx

    def after_backward(self, step: int) -> None:
        pass
