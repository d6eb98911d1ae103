"""One gate-training step of a soft merge: what the fit loop optimises.

:class:`GateStep` is the fit loop's *problem* (``softmerge.fit.Problem``) for a
:class:`~softmerge.soft.SoftMerger`::

    sample z from the gates (the loop's generator) -> merged tensors (the stack's step buffers)
      -> functional_call(model, merged + rest, batch) -> task loss + λ · expected L0

In a distributed run (torchrun) each process takes its share of the batch and backpropagates
``weight · mean loss`` of that share; :meth:`GateStep.reduce_gradients` sums the gradients over
the processes and divides by the global weight, so every process steps with the gradient of
the global batch's mean loss. During the warm-up of two-level gates only the candidate-level
gates learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import distributed
from .batches import Batch

if TYPE_CHECKING:
    from .soft import SoftMerger
    from .stack import PendingWeightGrads


class GateStep:
    """The loss of one step at ``l0_lambda`` with noise from ``generator``; ``model`` is the
    module the step runs (a distributed run's copy with global BatchNorm statistics)."""

    def __init__(
        self,
        merger: SoftMerger,
        generator: torch.Generator,
        l0_lambda: float,
        *,
        warmup: int = 0,
        model: nn.Module | None = None,
        distributed_run: bool = False,
    ) -> None:
        self.merger = merger
        self.generator = generator
        self.l0_lambda = l0_lambda
        self.warmup = warmup
        self.model = merger.model if model is None else model
        self.distributed_run = distributed_run
        # This rank's weight, logs and penalty of the current step (distributed runs).
        self._share: tuple[float, dict[str, float], float] = (0.0, {}, 0.0)
        # The merge's dL/dw, gathered during the loss's backward, sent on in after_backward.
        self._pending: PendingWeightGrads | None = None

    def continued(self, l0_lambda: float) -> GateStep:
        """The same step at another λ, continuing this one's noise, with no warm-up."""
        return GateStep(
            self.merger,
            self.generator,
            l0_lambda,
            model=self.model,
            distributed_run=self.distributed_run,
        )

    def trainable(self) -> list[nn.Parameter]:
        return self.merger.gate_parameters

    def loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        merger = self.merger
        z = merger.gates.sample(self.generator)
        merged, self._pending = merger.merged_leaves(z)
        state = merger.functional_state(merged, fresh_buffers=True)
        penalty = self.l0_lambda * merger.l0_penalty()
        if self.distributed_run:
            return self._share_loss(state, batch, penalty)
        logits, b = merger.forward(state, batch)
        task = merger.ctx.objective_fn.loss(logits, b)
        total = task + penalty
        return total, {"loss": total.item(), "task_loss": task.item()}

    def _share_loss(
        self, state: dict[str, torch.Tensor], batch: Batch, penalty: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This rank's share of the batch; what is backpropagated is ``weight * mean loss`` of
        the share (weight: samples, or tokens)."""
        objective = self.merger.ctx.objective_fn
        logits, b = self.merger.forward(state, distributed.shard_batch(batch), self.model)
        weight = objective.weight(logits, b)
        # A share with nothing to predict (all padding) still runs backward with the others.
        task = objective.loss(logits, b) if weight > 0 else logits.sum() * 0.0
        total = task + penalty
        logs = {"loss": total.item(), "task_loss": task.item()}
        self._share = (weight, logs, float(penalty.detach()))
        return total * weight, logs

    def reduce_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Gradients and logged losses of the global batch, the same on every rank."""
        weight, logs, penalty = self._share
        total, (task_sum,) = distributed.reduce_gradients(
            params, weight, [weight * logs["task_loss"]]
        )
        task = task_sum / total
        logs.update(loss=task + penalty, task_loss=task)

    def after_backward(self, step: int) -> None:
        if self._pending is not None:
            self._pending.backward()
            self._pending = None
        if step <= self.warmup:
            # Warm-up: only whole candidates are judged, on the evidence of every unit at once.
            self.merger.gates.log_alpha.grad = None
