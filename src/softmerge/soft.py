"""Soft merging: learn hard concrete gates over frozen candidates, export one model.

:class:`SoftMerger` is a thin facade over the pieces that do the work::

    MergeContext (candidates, plan, base, rest, ranking)
      -> CandidateStack (the merged tensors, stacked once)
      -> MergeGates (log_alpha at two levels)
      -> FitLoop over a GateStep (one step's loss; + Recorder, Validator, Progress,
         Checkpointer callbacks)
      -> FinalMerge (the test-time gates' state dict: BatchNorm statistics, REPAIR; the report)
      -> export

One training step (the candidates' weights never change)::

    log_alpha --sample--> z (N, U) --normalise--> w (N, U)
    stack[name] (N, *shape) --contract with w over N--> theta[name]
    functional_call(model, theta, x) --> task loss + lambda * expected L0 --> SGD on log_alpha

``docs/method.md`` explains the choices that are ours (initialisation, the penalty, the
all-closed fallback).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call

from . import distributed
from . import gates as hc
from .batches import Batch, cycle_batches, first_batches, logits_of, split_on, untouched_order
from .candidates import Candidate
from .checkpoint import Checkpointer, fingerprint, remove_checkpoint, restore
from .context import MergeContext
from .errors import CandidateError, ConfigError, PlanError
from .evaluation import has_batchnorm, model_with_state, recalibrate_batchnorm
from .evaluation import set_gate_training_mode as set_gate_training_mode
from .fit import (
    Callback,
    FitConfig,
    FitLoop,
    FitResult,
    Progress,
    Recorder,
    SelectBest,
    Validator,
    default_optimizer,
)
from .fused import fused_merge
from .objectives import LossFn, Totals
from .plan import GateLayout, MergePlan, Slot
from .results import FinalMerge
from .step import GateStep

if TYPE_CHECKING:
    from .path import LambdaPath

log = logging.getLogger("softmerge")

__all__ = ["FitConfig", "FitResult", "SoftMerger", "recalibrate_batchnorm"]


class SoftMerger:
    """Soft merging of candidates that share ``model``'s architecture.

    >>> merger = SoftMerger(model, ["a.safetensors", "b.pt"], MergePlan(granularity="tensor"))
    >>> merger.fit(merge_loader)
    >>> state = merger.merged_state_dict()      # an ordinary state dict for `model`

    ``device`` (default: the model's) is where the stack, the gates and every step live;
    ``storage_dtype`` (default: the candidates' own floating dtype) is the stack's dtype; a
    bf16/fp16 stack accumulates the merge in float32. The merger keeps no copy of the model's
    weights: only a weightless template of it.

    Inside an initialised process group (torchrun), ``fit`` trains data-parallel: every process
    gives it the same loader and takes its share of each batch (``softmerge.distributed``);
    ``shard_stack=True`` also splits the stack across the processes (``softmerge.sharded``)."""

    def __init__(
        self,
        model: nn.Module | None,
        candidates: Sequence[Any] = (),
        plan: MergePlan | None = None,
        *,
        names: Sequence[str] | None = None,
        base: Any = None,
        device: str | torch.device | None = None,
        storage_dtype: str | torch.dtype | None = None,
        shard_stack: bool = False,
        context: MergeContext | None = None,
    ) -> None:
        self.ctx = context or MergeContext(
            model,
            candidates,
            names=names,
            plan=plan or MergePlan(),
            base=base,
            device=device,
            storage_dtype=storage_dtype,
            shard_stack=shard_stack,
        )
        ctx = self.ctx
        self.plan = ctx.plan
        self.model = ctx.require_model("soft merging")
        if len(ctx.pool) < 2:
            raise CandidateError(f"need at least 2 candidates to merge, got {len(ctx.pool)}")
        self._report_excluded()
        self.layout: GateLayout = ctx.layout
        self.delta = self.plan.combine == "delta"
        self.stack = ctx.stack(deltas=self.delta)
        self._check_unit_granularity()
        self.gates = hc.MergeGates(
            len(ctx.pool),
            len(self.layout.units),
            candidate_level=self.plan.candidate_gate,
            active=torch.tensor(ctx.active),
            device=ctx.device,
            learn_scale=self.delta and self.plan.learn_scale,
            # Ours: task vectors of one unit share their gate noise (docs/method.md).
            shared_noise=self.delta,
        )
        self._dtypes = ctx.model_dtypes()
        self._buffer_names = {k for k, _ in self.model.named_buffers()}
        self._step: GateStep | None = None  # the fit loop's problem (set by make_loop)
        self.result: FitResult | None = None
        self.path: LambdaPath | None = None  # set by fit_path (and fit with l0_lambda "auto")
        self.final = FinalMerge(self)  # the merge at the test-time gates, and its report

    def _check_unit_granularity(self) -> None:
        """Granularity unit mixes entry by entry in this process: not over a sharded stack
        (whose merge is collective), nor for LoRA factors (an entry of B @ A is not stored)."""
        if self.plan.granularity != "unit":
            return
        if self._sharded or self.stack.lowrank:
            what = "a sharded stack (fit.shard_stack)" if self._sharded else "LoRA adapters"
            raise PlanError(f"granularity 'unit' cannot merge {what}: use 'channel'")

    def _report_excluded(self) -> None:
        for cand, ok in zip(self.ctx.pool, self.ctx.active, strict=True):
            if not ok:
                worst = ", ".join(f"{k} ({n} non-finite)" for k, n in cand.nonfinite.items())
                log.warning(
                    "excluding candidate %s (%s): %s; its gates are fixed at 0",
                    cand.name,
                    cand.source,
                    worst,
                )
        _ = self.ctx.reference  # raises when every candidate is non-finite

    # -- views -------------------------------------------------------------------------------

    @property
    def candidates(self) -> list[Candidate]:
        return self.ctx.pool

    @property
    def names(self) -> list[str]:
        return self.ctx.candidate_names

    @property
    def base(self) -> Candidate | None:
        return self.ctx.base_candidate if self.delta else None

    @property
    def active(self) -> torch.Tensor:
        return self.gates.active.cpu()

    @property
    def reference(self) -> int:
        return self.ctx.reference

    @property
    def log_alpha(self) -> nn.Parameter:
        return self.gates.log_alpha

    @property
    def log_alpha_candidate(self) -> nn.Parameter | None:
        return self.gates.log_alpha_candidate

    @property
    def gate_parameters(self) -> list[nn.Parameter]:
        """The only trainable tensors of a merge."""
        return list(self.gates.parameters())

    @property
    def stacked(self) -> dict[str, torch.Tensor]:
        return self.stack.buffers

    # -- the merge itself --------------------------------------------------------------------

    def sample_gates(self, generator: torch.Generator | None) -> torch.Tensor:
        return self.gates.sample(generator)

    def deterministic_gates(self) -> torch.Tensor:
        return self.gates.deterministic()

    def mixing_weights(self, z: torch.Tensor) -> torch.Tensor:
        w = self.gates.mixing_weights(z, convex=not self.delta, fallback=self.ctx.reference)
        if not self.delta:
            return w
        # delta: theta_0 + delta_scale * sum_j z_j tau_j (task arithmetic's lambda), the scale
        # fixed or learned per unit (plan.delta_scale: learn)
        learned = self.gates.scale()
        if learned is not None:
            return w * learned
        return w * self.plan.delta_scale if self.plan.delta_scale != 1.0 else w

    def merged_parameters(self, z: torch.Tensor, *, reuse: bool = False) -> dict[str, torch.Tensor]:
        """The merged tensors for gates ``z`` (N, U), in the model's dtypes (``reuse``: into
        the stack's step buffers, overwritten by the next call)."""
        weights, axes = self.slot_weights(z)
        return self.stack.mix(weights, axes, self._dtypes, reuse=reuse)

    def merged_leaves(self, z: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
        """:meth:`merged_parameters` for a training step, each merged tensor a leaf whose
        gradient is turned into ``dL/dw`` as soon as it exists (``CandidateStack.mix_leaves``);
        call the returned object's ``backward()`` after the loss's. None instead of it when
        the stack cannot (a sharded stack's merge is collective): plain autograd then."""
        weights, axes = self.slot_weights(z)
        if self._sharded:
            return self.stack.mix(weights, axes, self._dtypes, reuse=True), None
        return self.stack.mix_leaves(weights, axes, self._dtypes)

    def slot_weights(
        self, z: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, int | None]]:
        """Each merged tensor's candidate weights for gates ``z``: (N,) per tensor, (N, C) per
        output channel, and the dimension the channels are in; or, where hidden units index
        more than one dimension (granularity unit), (N, *shape) per entry with dimension None."""
        w = self.mixing_weights(z)
        weights, axes = {}, {}
        for slot in self.layout.slots:
            cols = w[:, slot.start : slot.start + slot.count]
            if slot.inputs:
                weights[slot.name] = self._entry_weights(w, cols, slot)
                axes[slot.name] = None
                continue
            weights[slot.name] = cols if slot.per_channel else cols[:, 0]
            axes[slot.name] = slot.axis
        return weights, axes

    def _entry_weights(self, w: torch.Tensor, cols: torch.Tensor, slot: Slot) -> torch.Tensor:
        """(N, *shape): each entry mixes by the product of its units' weights, renormalised
        over the candidates, so a unit taken from candidate j brings j's incoming and outgoing
        weights alike. Where no candidate is open in all of an entry's units, the mean of the
        units' weights (still convex)."""
        shape = self.ctx.mergeable[slot.name]

        def along(weights: torch.Tensor, axis: int) -> torch.Tensor:
            view = [weights.shape[0]] + [1] * len(shape)
            view[axis + 1] = weights.shape[1]
            return weights.reshape(view)

        product = mean = along(cols, slot.axis or 0)
        for axis, start, units, block in slot.inputs:
            unit = w[:, start : start + units]
            unit = along(unit.repeat_interleave(block, dim=1) if block > 1 else unit, axis)
            product, mean = product * unit, mean + unit
        mean = mean / (len(slot.inputs) + 1)
        total = product.sum(0, keepdim=True)
        mixed = torch.where(total > 0, product / total.clamp_min(1e-12), mean)
        return mixed.expand(w.shape[0], *shape)

    def l0_penalty(self) -> torch.Tensor:
        return self.gates.penalty(convex=not self.delta)

    def expected_l0(self) -> float:
        return self.gates.expected_l0()

    def functional_state(
        self, merged: Mapping[str, torch.Tensor], fresh_buffers: bool = False
    ) -> dict[str, torch.Tensor]:
        """The full state ``functional_call`` needs. ``fresh_buffers``: buffers are copies,
        because BatchNorm in training mode updates its running statistics in place, and those
        tensors belong to a candidate (and a resumed run must not depend on earlier updates)."""
        rest = self.ctx.rest_state()
        state = {}
        for k, v in rest.items():
            t = v.to(self._dtypes.get(k, v.dtype))
            fresh = fresh_buffers and k in self._buffer_names and t.data_ptr() == v.data_ptr()
            state[k] = t.clone() if fresh else t
        state.update(merged)
        return state

    def forward(
        self, state: Mapping[str, torch.Tensor], batch: Batch, model: nn.Module | None = None
    ):
        """The logits of ``model`` (default: the template) run on ``state`` and ``batch``, and
        the batch split into arguments and labels."""
        b = split_on(batch, self.ctx.device)
        module = self.model if model is None else model
        return logits_of(functional_call(module, dict(state), b.args, b.kwargs)), b

    # -- training ----------------------------------------------------------------------------

    def rank_candidates(
        self,
        loader: Iterable[Batch] | None = None,
        objective: str | LossFn | None = None,
        batches: int | None = None,
    ) -> dict[str, float]:
        """Loss of each candidate alone on the first ``batches`` merge batches (sets the
        reference); without arguments, on the context's merge data and objective."""
        ctx = self.ctx
        if loader is not None:
            ctx.use_data(loader, objective or ctx.objective_fn, batches or ctx.rank_batches)
        return ctx.solo_losses()

    def fit(
        self,
        loader: Iterable[Batch],
        val_loader: Iterable[Batch] | None = None,
        config: FitConfig | None = None,
        loss_fn: LossFn | None = None,
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        resume: bool = False,
        keep_checkpoint: bool = False,
        run_key: str = "",
        held_out: Iterable[Batch] | None = None,
    ) -> FitResult:
        """Learn the gates on ``loader`` (the merge set); candidates' weights stay frozen.

        ``held_out``: data the gates never train on. With ``config.select_every`` the
        deterministic merge is scored on it every that many steps (the start and the end
        included) and the gates of the step with the lowest loss are kept: early stopping.

        ``loss_fn(logits, labels)`` (or ``config.objective``) replaces the objective the model
        implies. ``checkpoint``: a file where the training state is saved (atomically) every
        ``config.checkpoint_every`` steps; it is deleted when training ends, unless
        ``keep_checkpoint`` (then a last one is saved at the final step). ``resume=True``
        continues from it: with ``loader`` (and ``val_loader``) rebuilt as in the interrupted
        run (same data, batch size and shuffle seed), the result is bit-identical to an
        uninterrupted run. A checkpoint saved by a different merge (candidates, plan, fit
        settings, seed, ``run_key`` or data) is refused with a ConfigError."""
        cfg = config or FitConfig()
        if cfg.l0_lambda == "auto":
            return self._fit_auto(loader, cfg, loss_fn, checkpoint is not None or resume)
        ckpt = None if checkpoint is None else Path(checkpoint)
        if resume and ckpt is None:
            raise PlanError("resume=True needs checkpoint=<path of the checkpoint file>")
        saved = distributed.load_checkpoint_shared(ckpt) if resume and ckpt is not None else None
        start = time.perf_counter()
        loop = self.make_loop(loader, cfg, val_loader, loss_fn)
        select = self._add_selection(loop, cfg, held_out)
        losses = dict(self.ctx.solo_losses())
        if ckpt is not None:
            self._add_checkpointer(loop, cfg, ckpt, saved, losses, run_key, keep_checkpoint)
        self.gate_training_mode()
        try:
            loop.run(cycle_batches(loader))
        finally:
            self.stack.release_outputs()
        chosen = None if select is None else select.restore()
        self.model.eval()
        self.final.forget()
        if cfg.recalibrate_bn and has_batchnorm(self.model):
            self.final.recalibrate(loader)
        if ckpt is not None and not keep_checkpoint and distributed.is_writer():
            remove_checkpoint(ckpt)
        recorder = loop.callback(Recorder)
        history = recorder.history if select is None else select.with_history(recorder.history)
        self.result = FitResult(
            steps=loop.total_steps,
            seconds=loop.seconds_before + time.perf_counter() - start,
            history=history,
            gate_trajectory=recorder.trajectory,
            candidate_losses=losses,
            reference=self.names[self.ctx.reference],
            selected_step=None if chosen is None else chosen.step,
            held_out_loss=None if chosen is None else -chosen.score,
        )
        return self.result

    def _add_selection(
        self, loop: FitLoop, cfg: FitConfig, held_out: Iterable[Batch] | None
    ) -> SelectBest | None:
        """``select_every``: a SelectBest over the gate parameters, scored on ``held_out``
        (added before a checkpointer, so its state is saved and restored with the loop's)."""
        if not cfg.select_every:
            return None
        if held_out is None:
            raise PlanError(
                "fit.select_every keeps the gates of the step with the best held-out loss, but "
                "there is no held-out data: set data.held_out (a fraction of the merge set) in "
                "the YAML, pass held_out= to SoftMerger.fit, or set fit.select_every to 0"
            )
        select = SelectBest(cfg.select_every, self.gate_parameters, lambda: self._score(held_out))
        loop.callbacks.append(select)
        return select

    def fit_path(
        self,
        loader: Iterable[Batch],
        lambdas: Sequence[float] | None = None,
        *,
        config: FitConfig | None = None,
        held_out: Iterable[Batch] | None = None,
        loss_fn: LossFn | None = None,
        stage_steps: int | None = None,
        max_steps: int | None = None,
    ) -> LambdaPath:
        """The L0 path (:mod:`softmerge.path`): the gates trained over a λ grid (``lambdas``,
        or found from "nothing closes" to "one candidate per unit"), each λ warm-started from
        the previous one; per λ the open gates and the scores on ``loader`` and ``held_out``;
        candidate importance; the merger is left at the sparsest λ within
        ``config.l0_tolerance`` of the best held-out loss (with ``config.l0_confidence``)."""
        from .path import fit_path

        return fit_path(
            self,
            loader,
            lambdas,
            config=config,
            held_out=held_out,
            loss_fn=loss_fn,
            stage_steps=stage_steps,
            max_steps=max_steps,
        )

    def _fit_auto(
        self, loader: Iterable[Batch], cfg: FitConfig, loss_fn: LossFn | None, checkpointed: bool
    ) -> FitResult:
        """``l0_lambda: auto`` through ``fit``: a seeded part of ``loader`` is held out."""
        from .path import split_held_out

        if checkpointed:
            raise PlanError("l0_lambda 'auto' runs the L0 path, which is not checkpointed")
        learn, held = split_held_out(loader, seed=cfg.seed)
        self.fit_path(learn, config=cfg, held_out=held, loss_fn=loss_fn)
        assert self.result is not None
        return self.result

    def continue_loop(
        self, steps: int, l0_lambda: float, optimizer: torch.optim.Optimizer, cfg: FitConfig
    ) -> FitLoop:
        """A loop that continues the current gates (no re-initialisation, no warm-up) with
        ``optimizer`` and the noise generator of the last ``make_loop``, ``steps`` steps at
        ``l0_lambda``: a warm start (one stage of an L0 path)."""
        if self._step is None:
            raise PlanError("continue_loop needs a first loop: call make_loop (or fit) first")
        self._step = step = self._step.continued(l0_lambda)
        recorder = Recorder(cfg.record_every, self._record_extra, self.deterministic_gates)
        progress = Progress(f"gates λ={l0_lambda:.3g}", cfg.progress and distributed.is_writer())
        return FitLoop(
            step,
            optimizer,
            steps,
            generator=step.generator,
            grad_clip=cfg.grad_clip,
            callbacks=[recorder, progress],
            reduce_gradients=step.reduce_gradients if step.distributed_run else None,
        )

    def gate_training_mode(self) -> None:
        """The models in the mode gate steps run in (BatchNorm on batch statistics, dropout
        off), as ``fit`` sets them; call after ``make_loop``."""
        set_gate_training_mode(self.model)
        if self._step is not None:
            set_gate_training_mode(self._step.model)

    def use_gates(
        self, state: Mapping[str, torch.Tensor], loader: Iterable[Batch] | None = None
    ) -> None:
        """Load gate parameters (``self.gates.state_dict()`` of another moment, e.g. a point of
        an L0 path); with ``loader``, BatchNorm statistics are re-estimated for them."""
        self.gates.load_state_dict(dict(state))
        self.final.forget()
        if loader is not None and has_batchnorm(self.model):
            self.model.eval()
            self.final.recalibrate(loader)

    def score(
        self,
        loader: Iterable[Batch],
        samples: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> dict[str, float]:
        """Loss and metric of the current deterministic merge on ``loader`` (BatchNorm on batch
        statistics, as during training). ``samples``: a list that gets, per batch this rank
        scores, the per-sample summed losses and weights (``Objective.sample_totals``)."""
        return self._score(loader, samples)

    def make_loop(
        self,
        loader: Iterable[Batch],
        cfg: FitConfig,
        val_loader: Iterable[Batch] | None = None,
        loss_fn: LossFn | None = None,
    ) -> FitLoop:
        """The fit loop of ``cfg`` on ``loader``, ready to run: candidates ranked, gates
        initialised, optimiser and callbacks (record, validate, progress) in place. ``fit``
        runs it; a benchmark can time ``loop.train_step(batch)`` on its own."""
        if cfg.l0_lambda == "auto":
            raise PlanError("a fit loop trains at one λ; l0_lambda 'auto' runs the L0 path (fit)")
        ctx = self.ctx
        ctx.use_data(loader, loss_fn or cfg.objective, cfg.rank_batches)
        dist = distributed.is_distributed()
        if dist:
            first = untouched_order(loader, lambda: first_batches(loader, 1))[0]
            distributed.check_same_batches(first)
        losses = ctx.solo_losses()
        total = cfg.total_steps(loader)
        self._step = step = GateStep(
            self,
            torch.Generator().manual_seed(cfg.seed),
            cfg.l0_lambda,
            warmup=int(cfg.warmup * total) if self.gates.two_level else 0,
            model=distributed.with_global_batchnorm(self.model) if dist else self.model,
            distributed_run=dist,
        )
        if hasattr(self.stack, "fused"):  # a sharded stack's passes are its own
            self.stack.fused = fused_merge(
                cfg.compile_merge, self.stack.nbytes, total, self.stack.device
            )
        self._initialise_gates(cfg, losses)
        optimizer = default_optimizer(self.gate_parameters, cfg.optimizer, cfg.lr)
        recorder = Recorder(cfg.record_every, self._record_extra, self.deterministic_gates)
        progress = Progress("gates", cfg.progress and distributed.is_writer())
        callbacks: list[Callback] = [recorder, progress]
        if val_loader is not None and cfg.eval_every:
            callbacks.insert(1, Validator(cfg.eval_every, lambda: self._score(val_loader)))
        return FitLoop(
            step,
            optimizer,
            total,
            generator=step.generator,
            grad_clip=cfg.grad_clip,
            callbacks=callbacks,
            reduce_gradients=step.reduce_gradients if dist else None,
        )

    def _add_checkpointer(
        self,
        loop: FitLoop,
        cfg: FitConfig,
        ckpt: Path,
        saved: Mapping[str, Any] | None,
        losses: dict[str, float],
        run_key: str,
        keep: bool,
    ) -> None:
        """Save every ``cfg.checkpoint_every`` steps; with ``saved``, resume from it first."""
        key = self._fingerprint(cfg, loop.total_steps, run_key)
        notes = {"candidate_losses": losses, "reference": self.ctx.reference}
        loop.callbacks.append(
            Checkpointer(
                ckpt,
                cfg.checkpoint_every,
                key,
                self.gates,
                notes,
                keep_last=keep,
                save=distributed.is_writer(),
            )
        )
        if saved is None:
            return
        notes = restore(saved, ckpt, key, loop, self.gates, losses)
        try:
            self.ctx.set_reference(int(notes["reference"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{ckpt}: malformed checkpoint ({exc})") from exc
        log.info(
            "resuming gate training at step %d of %d from %s", loop.step, loop.total_steps, ckpt
        )

    def _initialise_gates(self, cfg: FitConfig, losses: Mapping[str, float]) -> None:
        """Every gate at ``init_gate``, minus a prior from each candidate's solo loss
        (:func:`softmerge.gates.solo_loss_prior`)."""
        prior = hc.solo_loss_prior([losses[n] for n in self.names], cfg.solo_prior)
        self.gates.initialise(cfg.init_gate, prior)
        if self.gates.log_scale is not None:
            # Ours: the learned scale starts where the deterministic merge is the gates'
            # weighted average of the fine-tunes (the uniform soup when the priors are equal).
            total = self.gates.deterministic().sum(0)
            self.gates.initialise_scale(1.0 / total.clamp_min(1e-3))

    def _fingerprint(self, cfg: FitConfig, total_steps: int, run_key: str) -> str:
        """What defines this run: a checkpoint saved under another fingerprint is refused."""
        settings = cfg.model_dump(exclude={"progress", "checkpoint_every", "device", "objective"})
        objective = self.ctx.objective_fn.name
        description = {
            "plan": self.plan.model_dump(),
            "fit": settings,
            "objective": objective,
            "total_steps": total_steps,
            "candidates": self.names,
            "units": list(self.layout.units),
            "run": run_key,
        }
        # The stack and every candidate's unmerged tensors: not the rest the best-ranked
        # candidate gives, so other data is reported as such (its losses), not as another merge.
        pool = [*self.candidates, *([self.base] if self.base is not None else [])]
        rest = ((f"{c.name}/{k}", c.tensor(k)) for c in pool for k in self.ctx.rest_keys())
        factors = (
            (f"{name}/{part}", getattr(f, part))
            for name, f in self.stack.lowrank.items()
            for part in ("a", "b")
        )
        stacked = itertools.chain(self.stack.buffers.items(), factors)
        key = fingerprint(description, itertools.chain(stacked, rest))
        # A sharded stack: each rank hashed its own rows; the run is all of them, in rank order.
        return distributed.combined_digest(key) if self._sharded else key

    @property
    def _sharded(self) -> bool:
        return bool(getattr(self.stack, "sharded", False))

    def _record_extra(self) -> dict[str, Any]:
        gates = self.deterministic_gates()
        extra = {"l0": self.expected_l0(), "mean_gate": gates.mean(1).tolist()}
        scale = self.gates.scale()
        if scale is not None:
            extra["mean_delta_scale"] = float(scale.detach().mean())
        return extra

    @torch.no_grad()
    def _score(
        self,
        loader: Iterable[Batch],
        samples: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> dict[str, float]:
        """Loss and metric of the deterministic merge (BatchNorm on batch statistics). In a
        distributed run each rank scores its whole batches and the totals are summed."""
        state = self.functional_state(
            self.merged_parameters(self.deterministic_gates()), fresh_buffers=True
        )
        set_gate_training_mode(self.model)
        totals = Totals()
        for batch in distributed.my_batches(loader):
            logits, b = self.forward(state, batch)
            totals.add(self.ctx.objective_fn.totals(logits, b))
            if samples is not None:
                samples.append(self.ctx.objective_fn.sample_totals(logits, b))
        summed = distributed.sum_across([totals.loss, totals.weight, totals.correct])
        return self.ctx.objective_fn.metrics(Totals(*summed))

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The merged weights at the deterministic (test-time) gates: a plain state dict, in
        the candidates' dtypes, on the CPU."""
        return self.final.state()

    def merged_model(self) -> nn.Module:
        """A fresh copy of the model holding the merged weights, in eval mode."""
        return model_with_state(self.model, self.merged_state_dict(), self.ctx.device)

    def gate_snapshot(self):
        """Per unit and candidate: unit log_alpha, effective deterministic gate, P(non-zero)."""
        return self.final.snapshot()

    def candidate_gates(self) -> dict[str, dict[str, float]] | None:
        """The candidate-level gates (two-level gating), or None at model granularity."""
        return self.final.candidate_gates()

    def export(
        self, out_dir: str | Path, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Path]:
        """Write merged weights, gates.json, plots and history into ``out_dir``, atomically."""
        from .export import export_soft_merge

        return export_soft_merge(self, Path(out_dir), extra=extra)

    def describe(self) -> dict[str, Any]:
        """The merge's settings and what was done to it (alignment, REPAIR, learned scale)."""
        return self.final.describe()
