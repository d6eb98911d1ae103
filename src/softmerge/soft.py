"""The soft-merging engine: learn hard concrete gates over frozen candidates, export one model.

Data flow of one training step (weights of the N candidates never change)::

    log_alpha (N, U) --sample--> z (N, U) --normalise--> w (N, U)
    stacked[name] (N, *shape) --contract with w over N--> theta[name]
    functional_call(model, theta, x) --> loss = task_loss + lambda * L0 penalty --> SGD on log_alpha

The candidates are stacked once, at construction; every step builds the merged parameters
from that stack, so no per-step copy of N models exists. ``docs/method.md`` explains the
choices that are ours (initialisation, the penalty, the all-closed fallback).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from . import gates as hc
from .candidates import Candidate, check_fits_model, load_candidates, split_base
from .checkpoint import (
    RunState,
    load_checkpoint,
    remove_checkpoint,
    restore_run,
    run_fingerprint,
    save_run,
)
from .errors import CandidateError, DataError, PlanError
from .plan import GateLayout, MergePlan, build_layout

log = logging.getLogger("softmerge")

Batch = Any
LossFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


MAX_LR = 1e6  # a larger gate learning rate is a typo (and overflows float32 in the optimiser)
# Integer fields of FitConfig and their smallest allowed value.
_INT_FIELDS = {
    "steps": 1,
    "seed": 0,
    "eval_every": 0,
    "record_every": 1,
    "rank_batches": 1,
    "checkpoint_every": 0,
}


@dataclass
class FitConfig:
    """How the gates are learned. Defaults are the ones `docs/method.md` argues for."""

    steps: int | None = 300  # gate-training steps (ignored when `epochs` is set)
    epochs: float | None = None  # passes over the merge loader instead of a step count
    lr: float = 0.1  # learning rate of the gate optimiser
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adam": see docs/method.md for why SGD
    l0_lambda: float = 1e-3  # weight of the expected-L0 penalty (mean over gate units)
    init_gate: float = 0.5  # every gate starts here: deterministic start = uniform soup
    seed: int = 0  # drives the gate noise (the loader's order is the loader's own seed)
    objective: str = "cross_entropy"  # or "entropy" (unlabeled, as in AdaMerging)
    eval_every: int = 50  # validate the deterministic merge every K steps (0 = never)
    record_every: int = 10  # append to the history / gate trajectory every K steps
    rank_batches: int = 4  # batches used to rank candidates before training
    recalibrate_bn: bool = True  # re-estimate BatchNorm statistics after merging
    progress: bool = True  # tqdm progress bar
    grad_clip: float | None = 1.0  # clip the gate gradient's norm (see docs/method.md)
    warmup: float = 0.3  # fraction of steps that train only the candidate-level gates
    solo_prior: float = 1.0  # start a candidate's gate lower by this x log(its solo loss / best)
    checkpoint_every: int = 0  # save the training state every K steps (0 = never): see fit()

    def __post_init__(self) -> None:
        # Each message starts with the field's name: the YAML config reports it as fit.<name>.
        for name in ("lr", "l0_lambda", "init_gate", "warmup", "solo_prior", "epochs", "grad_clip"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise PlanError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise PlanError(f"{name} must be a finite number, got {value}")
        for name, low in _INT_FIELDS.items():
            value = getattr(self, name)
            if value is None and name == "steps":
                continue
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise PlanError(f"{name} must be an integer, got {value!r}")
            if value < low:
                raise PlanError(f"{name} must be >= {low}, got {value}")
        if self.seed >= 2**64:  # the range torch.Generator.manual_seed accepts
            raise PlanError(f"seed must be < 2**64, got {self.seed}")
        if self.epochs is not None and self.epochs <= 0:
            raise PlanError(f"epochs must be > 0, got {self.epochs}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise PlanError(f"grad_clip must be >= 0 (or null: no clipping), got {self.grad_clip}")
        if self.l0_lambda < 0:
            raise PlanError(f"l0_lambda must be >= 0, got {self.l0_lambda}")
        if not 0.0 < self.init_gate < 1.0:
            raise PlanError(f"init_gate must lie strictly between 0 and 1, got {self.init_gate}")
        if self.lr <= 0:
            raise PlanError(f"lr must be > 0, got {self.lr}")
        if self.lr > MAX_LR:  # gate parameters live in about [-10, 10]; torch's Adam overflows
            raise PlanError(f"lr must be <= {MAX_LR:g}, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise PlanError(f"warmup must lie in [0, 1), got {self.warmup}")
        if self.optimizer not in ("sgd", "adam"):
            raise PlanError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.objective not in ("cross_entropy", "entropy"):
            raise PlanError(
                f"objective must be 'cross_entropy' or 'entropy', got {self.objective!r}"
            )


@dataclass
class FitResult:
    steps: int
    seconds: float
    history: list[dict[str, Any]]
    gate_trajectory: list[torch.Tensor]  # deterministic gates (N, U) at each recorded step
    candidate_losses: dict[str, float]  # each candidate alone, on the ranking batches
    reference: str  # best-ranked candidate: fallback and default source of the rest


# ---------------------------------------------------------------------------------------------
# Batches, objectives and BatchNorm: small helpers shared by fit, evaluate and recalibration.


def split_batch(batch: Batch) -> tuple[tuple, dict, torch.Tensor | None]:
    """(args, kwargs, labels) of a batch: ``(x, y)`` tuples, bare tensors or HF-style dicts."""
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        return (), kwargs, batch.get("labels")
    if isinstance(batch, (list, tuple)):
        return (batch[0],), {}, batch[1] if len(batch) > 1 else None
    return (batch,), {}, None


def logits_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (list, tuple)):
        return output[0]
    raise DataError(f"cannot find logits in a model output of type {type(output).__name__}")


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def task_loss(objective: str | LossFn, logits: torch.Tensor, labels: torch.Tensor | None):
    if callable(objective):
        return objective(logits, labels)
    if objective == "entropy":
        return prediction_entropy(logits)
    if labels is None:
        raise DataError(
            "objective 'cross_entropy' needs labels but the batch has none; "
            "use objective 'entropy' to merge without labels"
        )
    num_classes = logits.shape[-1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
        raise DataError(
            f"label {bad} is outside the model's {num_classes} outputs (0..{num_classes - 1})"
        )
    return F.cross_entropy(logits, labels)


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
    for batch in loader:
        args, kwargs, _ = split_batch(batch)
        model(*args, **kwargs)
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    model.eval()
    return True


def cycle_batches(loader: Iterable[Batch]) -> Iterator[Batch]:
    """The loader's batches, pass after pass; an empty loader is a DataError."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("the merge data loader yields no batch (empty data set)")


# ---------------------------------------------------------------------------------------------


class SoftMerger:
    """Soft merging of candidates that share ``model``'s architecture.

    >>> merger = SoftMerger(model, ["a.safetensors", "b.pt"], MergePlan(granularity="tensor"))
    >>> merger.fit(merge_loader)
    >>> state = merger.merged_state_dict()      # an ordinary state dict for `model`
    """

    def __init__(
        self,
        model: nn.Module,
        candidates: Sequence[Any],
        plan: MergePlan | None = None,
        *,
        names: Sequence[str] | None = None,
        base: Any = None,
    ) -> None:
        self.model = model
        self.plan = plan or MergePlan()
        cands = load_candidates(candidates, names, min_count=1)
        self.base, cands = self._split_base(cands, base)
        if len(cands) < 2:
            raise CandidateError(f"need at least 2 candidates to merge, got {len(cands)}")
        self.candidates = cands
        self.names = [c.name for c in cands]
        params = dict(model.named_parameters())
        check_fits_model(cands[0], model)
        # Candidates may be stored in another precision (fp16, bf16): the model runs on its own.
        self._dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        self._buffer_names = {k for k, _ in model.named_buffers()}
        self.layout: GateLayout = build_layout(self.plan, {n: p.shape for n, p in params.items()})
        self.active = torch.tensor([c.is_finite for c in cands])
        self._all_active = bool(self.active.all())
        self._active_column = self.active.float().unsqueeze(1)
        self._report_excluded()
        self.reference = int(torch.nonzero(self.active)[0])
        self.stacked = self._stack_merged_tensors()
        n, u = len(cands), len(self.layout.units)
        self.log_alpha = nn.Parameter(torch.zeros(n, u))  # one gate per candidate and unit
        # A second level, one gate per candidate, multiplies every unit gate of that candidate:
        # the evidence against a bad candidate from all units adds up in one gate that can
        # switch it off everywhere at once. Redundant (and skipped) at model granularity.
        two_level = self.plan.candidate_gate and u > 1
        self.log_alpha_candidate = nn.Parameter(torch.zeros(n)) if two_level else None
        self._rest = self._rest_source()  # checks plan.rest_from before any work
        self._bn_buffers: dict[str, torch.Tensor] | None = None
        self.result: FitResult | None = None

    # -- construction ------------------------------------------------------------------------

    def _split_base(self, cands: list[Candidate], base: Any) -> tuple[Candidate | None, list]:
        """Delta merging: theta_0 is a named candidate (removed from the gated set) or a path."""
        if self.plan.combine != "delta":
            return None, cands
        wanted = base if base is not None else self.plan.base
        if wanted is None:
            raise PlanError("combine 'delta' needs a base: pass base=... or set plan.base")
        return split_base(cands, wanted)

    def _report_excluded(self) -> None:
        for cand, ok in zip(self.candidates, self.active.tolist(), strict=True):
            if not ok:
                worst = ", ".join(f"{k} ({n} non-finite)" for k, n in cand.nonfinite.items())
                log.warning(
                    "excluding candidate %s (%s): %s; its gates are fixed at 0",
                    cand.name,
                    cand.source,
                    worst,
                )
        if not bool(self.active.any()):
            shown = "; ".join(
                f"{c.source}: '{k}' ({n} NaN/Inf)"
                for c in self.candidates[:4]
                for k, n in list(c.nonfinite.items())[:1]
            )
            more = f"; and {len(self.candidates) - 4} more" if len(self.candidates) > 4 else ""
            raise CandidateError(
                f"every candidate has non-finite values, nothing is left to merge: {shown}{more}"
            )

    def _stack_merged_tensors(self) -> dict[str, torch.Tensor]:
        """Stack each merged tensor once as (N, *shape) float32 (delta: theta_j - theta_0).

        Excluded candidates are stacked as zeros: their gate is always 0, but 0 * NaN is NaN."""
        stacked = {}
        for slot in self.layout.slots:
            rows = [
                c.state[slot.name].float() if ok else torch.zeros_like(c.state[slot.name].float())
                for c, ok in zip(self.candidates, self.active.tolist(), strict=True)
            ]
            stack = torch.stack(rows)
            if self.base is not None:
                stack = stack - self.base.state[slot.name].float() * self.active.view(
                    -1, *([1] * (stack.dim() - 1))
                )
                if self.plan.delta_scale != 1.0:  # an open gate adds delta_scale x tau_j
                    stack = stack * self.plan.delta_scale
            stacked[slot.name] = stack
        return stacked

    # -- the merge itself ---------------------------------------------------------------------

    def mixing_weights(self, z: torch.Tensor) -> torch.Tensor:
        """Per-unit weights of the candidates for gates ``z`` (N, U).

        convex: z_j / sum_j z_j. A unit whose gates are all 0 falls back to the reference
        (best-ranked) candidate alone: a valid tensor, never a division by zero.
        delta: the gates themselves (theta_0 + sum_j z_j * tau_j)."""
        z = self._without_excluded(z)
        if self.plan.combine == "delta":
            return z
        total = z.sum(0, keepdim=True)
        return torch.where(total > 0, z / total.clamp_min(1e-12), self._fallback(z.shape))

    def _fallback(self, shape: torch.Size) -> torch.Tensor:
        """Weights of a unit whose gates are all 0: the reference candidate alone (cached,
        since it is needed every step and changes only when the reference does)."""
        key = (self.reference, tuple(shape))
        if getattr(self, "_fallback_key", None) != key:
            weights = torch.zeros(shape)
            weights[self.reference] = 1.0
            self._fallback_key, self._fallback_weights = key, weights
        return self._fallback_weights

    def _without_excluded(self, z: torch.Tensor) -> torch.Tensor:
        """Gates of candidates excluded for non-finite values forced to 0 (a no-op, skipped,
        when every candidate is finite: the step's small operations add up)."""
        return z if self._all_active else z * self._active_column

    def merged_parameters(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        w = self.mixing_weights(z)
        merged = {}
        for slot in self.layout.slots:
            stack = self.stacked[slot.name]
            wu = w[:, slot.start : slot.start + slot.count]
            if slot.per_channel:  # row c of every candidate times its own weight; sum over N
                theta = (stack * wu.view(*wu.shape, *[1] * (stack.dim() - 2))).sum(0)
            else:  # (P, N) @ (N,): its backward is stack @ grad, a fast row-wise product
                rows = stack.view(stack.shape[0], -1)
                theta = torch.mv(rows.t(), wu[:, 0]).view(stack.shape[1:])
            if self.base is not None:
                theta = theta + self.base.state[slot.name].float()
            merged[slot.name] = theta
        return merged

    def l0_penalty(self) -> torch.Tensor:
        """Expected number of open gates per unit, averaged over units.

        convex: the most likely gate of each unit is not charged: a convex merge needs at least
        one candidate, and charging it only pushes every gate of a unit to 0 together."""
        p = self._prob_nonzero()
        per_unit = p.sum(0)
        if self.plan.combine == "convex":
            per_unit = per_unit - p.max(0).values
        return per_unit.mean()

    def expected_l0(self) -> float:
        with torch.no_grad():
            return float(self._prob_nonzero().sum(0).mean())

    @property
    def gate_parameters(self) -> list[nn.Parameter]:
        """The only trainable tensors of a merge."""
        extra = [self.log_alpha_candidate] if self.log_alpha_candidate is not None else []
        return [self.log_alpha, *extra]

    def _combine_levels(self, unit: torch.Tensor, cand: Callable[[torch.Tensor], torch.Tensor]):
        out = (
            unit
            if self.log_alpha_candidate is None
            else (cand(self.log_alpha_candidate).unsqueeze(1) * unit)
        )
        return self._without_excluded(out)

    def sample_gates(self, generator: torch.Generator) -> torch.Tensor:
        """Train-time effective gates (N, U): candidate gate x unit gate, both sampled."""
        unit = hc.sample_gates(self.log_alpha, generator)
        return self._combine_levels(unit, lambda la: hc.sample_gates(la, generator))

    def _prob_nonzero(self) -> torch.Tensor:
        """P(effective gate != 0): the two levels are independent, so probabilities multiply."""
        return self._combine_levels(hc.prob_nonzero(self.log_alpha), hc.prob_nonzero)

    def deterministic_gates(self) -> torch.Tensor:
        """Test-time effective gates (N, U), exactly 0 where either level is closed."""
        with torch.no_grad():
            return self._combine_levels(
                hc.deterministic_gates(self.log_alpha), hc.deterministic_gates
            )

    # -- the rest of the state dict ------------------------------------------------------------

    def _rest_source(self) -> dict[str, torch.Tensor]:
        """Values for everything the gates do not produce: unmerged parameters and buffers."""
        state_keys = list(self.candidates[0].state)
        rest = [k for k in state_keys if k not in set(self.layout.merged_names)]
        choice = self.plan.rest_from
        ok = [c for c, a in zip(self.candidates, self.active.tolist(), strict=True) if a]
        if choice == "best":
            source = {k: self.candidates[self.reference].state[k] for k in rest}
        elif choice == "average":
            ref = self.candidates[self.reference].state
            source = {
                k: torch.stack([c.state[k].float() for c in ok]).mean(0).to(ref[k].dtype)
                if ref[k].is_floating_point()
                else ref[k]
                for k in rest
            }
        else:
            pool = {c.name: c for c in self.candidates}
            if self.base is not None:
                pool["base"] = pool.get(self.base.name, self.base)
                pool[self.base.name] = self.base
            if choice not in pool:
                raise PlanError(
                    f"plan.rest_from {choice!r} is not 'best', 'average' or a candidate name "
                    f"({', '.join(pool)})"
                )
            if not pool[choice].is_finite:
                raise PlanError(
                    f"plan.rest_from {choice!r} names a candidate with non-finite values"
                )
            source = {k: pool[choice].state[k] for k in rest}
        return source

    def _functional_state(
        self, merged: Mapping[str, torch.Tensor], fresh_buffers: bool = False
    ) -> dict[str, torch.Tensor]:
        return self._as_model_state({**self._rest, **merged}, fresh_buffers)

    def _as_model_state(
        self, state: Mapping[str, torch.Tensor], fresh_buffers: bool = False
    ) -> dict[str, torch.Tensor]:
        """``state`` in the model's dtypes. ``fresh_buffers``: buffers are copies, because
        BatchNorm in training mode updates its running statistics in place, and those tensors
        belong to a candidate (and a resumed run must not depend on earlier updates)."""
        out = {}
        for k, v in state.items():
            t = v.to(self._dtypes[k]) if k in self._dtypes else v
            out[k] = t.clone() if fresh_buffers and t is v and k in self._buffer_names else t
        return out

    # -- training -----------------------------------------------------------------------------

    def _forward(self, state: Mapping[str, torch.Tensor], batch: Batch):
        args, kwargs, labels = split_batch(batch)
        logits = logits_of(functional_call(self.model, dict(state), args, kwargs))
        return logits, labels

    @torch.no_grad()
    def rank_candidates(self, loader: Iterable[Batch], objective: str | LossFn, batches: int):
        """Loss of each candidate alone on the first ``batches`` batches; sets the reference."""
        self.model.eval()
        losses: dict[str, float] = {}
        batch_list = list(itertools.islice(loader, batches))
        if not batch_list:
            raise DataError("the merge data loader yields no batch (empty data set)")
        for cand, ok in zip(self.candidates, self.active.tolist(), strict=True):
            if not ok:
                losses[cand.name] = math.inf
                continue
            state = self._as_model_state(cand.state)
            total = sum(float(task_loss(objective, *self._forward(state, b))) for b in batch_list)
            losses[cand.name] = total / len(batch_list)
        finite = [i for i, c in enumerate(self.candidates) if math.isfinite(losses[c.name])]
        if finite:
            self.reference = min(finite, key=lambda i: losses[self.candidates[i].name])
        return losses

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
    ) -> FitResult:
        """Learn the gates on ``loader`` (the merge set); candidates' weights stay frozen.

        ``checkpoint``: a file where the training state is saved (atomically) every
        ``config.checkpoint_every`` steps; it is deleted when training ends, unless
        ``keep_checkpoint`` (then a last one is saved at the final step). ``resume=True``
        continues from it: with ``loader`` (and ``val_loader``) rebuilt as in the interrupted
        run (same data, batch size and shuffle seed), the result is bit-identical to an
        uninterrupted run. A checkpoint saved by a different merge (candidates, plan, fit
        settings, seed, ``run_key`` or data) is refused with a ConfigError.
        """
        cfg = config or FitConfig()
        objective: str | LossFn = loss_fn or cfg.objective
        ckpt = None if checkpoint is None else Path(checkpoint)
        if resume and ckpt is None:
            raise PlanError("resume=True needs checkpoint=<path of the checkpoint file>")
        saved = load_checkpoint(ckpt) if resume and ckpt is not None else None
        start = time.perf_counter()
        losses = self.rank_candidates(loader, objective, cfg.rank_batches)
        self._rest = self._rest_source()
        total_steps = self._total_steps(cfg, loader)
        self._initialise_gates(cfg, losses)
        optimizer = (
            torch.optim.Adam(self.gate_parameters, lr=cfg.lr)
            if cfg.optimizer == "adam"
            else torch.optim.SGD(self.gate_parameters, lr=cfg.lr, momentum=0.9)
        )
        gen = torch.Generator().manual_seed(cfg.seed)
        key = "" if ckpt is None else run_fingerprint(self, cfg, objective, total_steps, run_key)
        run = RunState(losses=losses)
        if saved is not None:
            assert ckpt is not None
            run = restore_run(self, saved, ckpt, key, losses, optimizer, gen, total_steps)
            self._rest = self._rest_source()  # from the checkpoint's reference candidate
            log.info("resuming gate training at step %d of %d from %s", run.step, total_steps, ckpt)
        two_level = self.log_alpha_candidate is not None
        warmup = int(cfg.warmup * total_steps) if two_level else 0  # steps with unit gates frozen
        history, trajectory, window = run.history, run.trajectory, run.window
        set_gate_training_mode(self.model)
        batches = cycle_batches(loader)
        for _ in range(run.step):  # the batches the interrupted run used: same data order
            next(batches)
        bar = tqdm(
            range(run.step + 1, total_steps + 1),
            initial=run.step,
            total=total_steps,
            desc="gates",
            disable=not cfg.progress,
            leave=False,
        )
        for step in bar:
            losses_now = self._gate_step(
                gen, next(batches), objective, cfg, optimizer, step, units_frozen=step <= warmup
            )
            if losses_now is None:
                # A sample that mixed in an extreme candidate can overflow the loss; the step is
                # skipped rather than poison the optimiser. The batch counts as used (resume).
                log.debug("step %d: non-finite loss skipped", step)
            else:
                window.append(losses_now)
                if step % cfg.record_every == 0 or step == total_steps:
                    validate = (
                        val_loader is not None
                        and cfg.eval_every > 0
                        and (step % cfg.eval_every == 0 or step == total_steps)
                    )
                    record = self._record(step, window, trajectory)
                    if validate:
                        record.update(self._validate(val_loader, objective))
                        set_gate_training_mode(self.model)
                    history.append(record)
                    shown = ("loss", "l0", "val_acc")
                    bar.set_postfix({k: round(v, 4) for k, v in record.items() if k in shown})
                    window.clear()
            every = cfg.checkpoint_every
            due = every and (step % every == 0 and step < total_steps)
            if ckpt is not None and (due or (every and step == total_steps and keep_checkpoint)):
                run.step, run.seconds_after = step, run.seconds_before + time.perf_counter() - start
                save_run(self, ckpt, key, run, total_steps, optimizer, gen)
        self.model.eval()
        self._bn_buffers = None
        if cfg.recalibrate_bn and has_batchnorm(self.model):
            self._bn_buffers = self._recalibrated_buffers(loader)
        if ckpt is not None and not keep_checkpoint:
            remove_checkpoint(ckpt)
        self.result = FitResult(
            steps=total_steps,
            seconds=run.seconds_before + time.perf_counter() - start,
            history=history,
            gate_trajectory=trajectory,
            candidate_losses=run.losses,
            reference=self.names[self.reference],
        )
        return self.result

    def _gate_step(
        self,
        gen: torch.Generator,
        batch: Batch,
        objective: str | LossFn,
        cfg: FitConfig,
        optimizer: torch.optim.Optimizer,
        step: int,
        *,
        units_frozen: bool,
    ) -> tuple[float, float] | None:
        """One step on the gates: sample z, merge, run, task loss + lambda * expected L0,
        backward, update. Returns (loss, task loss), or None when the loss is not finite."""
        z = self.sample_gates(gen)
        state = self._functional_state(self.merged_parameters(z), fresh_buffers=True)
        logits, labels = self._forward(state, batch)
        task = task_loss(objective, logits, labels)
        loss = task + cfg.l0_lambda * self.l0_penalty()
        if not torch.isfinite(loss):
            return None
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if units_frozen:
            # Warm-up: only whole candidates are judged, on the evidence of every unit at once.
            self.log_alpha.grad = None
        if cfg.grad_clip:
            # A sample that opens an extreme candidate gives gradients 1e5x the usual; clipped,
            # one such step cannot throw every gate far off.
            torch.nn.utils.clip_grad_norm_(self.gate_parameters, cfg.grad_clip)
        optimizer.step()
        if any(bool(torch.isnan(p).any()) for p in self.gate_parameters):
            # Only an absurd learning rate gets here (a step overflows float32): stop rather
            # than return a merge of NaNs.
            raise PlanError(
                f"gate training diverged at step {step}: the gate parameters became NaN; "
                f"lower the learning rate (fit.lr, now {cfg.lr:g})"
            )
        return loss.item(), task.item()

    def _initialise_gates(self, cfg: FitConfig, losses: Mapping[str, float]) -> None:
        """Every gate at ``init_gate``, minus a prior from each candidate's solo loss.

        A candidate with extreme values has a solo loss orders of magnitude above the best one
        (x100 weights: ~1e7 vs ~0.5): it starts closed, where its gate never samples open and
        the L0 term keeps it shut. Near-equal candidates start near-equal. Without the prior,
        a mix dominated by an extreme candidate sits on a loss plateau whose gradients barely
        move its gate (see docs/method.md)."""
        start = hc.log_alpha_for_gate(cfg.init_gate)
        finite = [v for v in losses.values() if math.isfinite(v) and v > 0]
        best = min(finite) if finite else 1.0
        prior = torch.tensor(
            [
                cfg.solo_prior * math.log(max(losses[n], best) / best)
                if math.isfinite(losses[n])
                else 0.0
                for n in self.names
            ]
        )
        with torch.no_grad():
            self.log_alpha.fill_(start)
            if self.log_alpha_candidate is not None:
                self.log_alpha_candidate.copy_(start - prior)
            else:
                self.log_alpha.sub_(prior.unsqueeze(1))

    @staticmethod
    def _total_steps(cfg: FitConfig, loader: Iterable[Batch]) -> int:
        if cfg.epochs is not None:
            try:
                per_epoch = len(loader)  # type: ignore[arg-type]
            except TypeError as exc:
                raise DataError("epochs needs a loader with a length; set steps instead") from exc
            return max(1, math.ceil(cfg.epochs * per_epoch))
        if not cfg.steps or cfg.steps < 1:
            raise PlanError(f"steps must be a positive integer, got {cfg.steps}")
        return int(cfg.steps)

    def _record(self, step: int, window, trajectory: list[torch.Tensor]) -> dict[str, Any]:
        gates = self.deterministic_gates()
        trajectory.append(gates.clone())
        n = max(1, len(window))
        return {
            "step": step,
            "loss": sum(w[0] for w in window) / n,
            "task_loss": sum(w[1] for w in window) / n,
            "l0": self.expected_l0(),
            "mean_gate": gates.mean(1).tolist(),
        }

    @torch.no_grad()
    def _validate(self, loader: Iterable[Batch], objective: str | LossFn) -> dict[str, float]:
        """Loss and accuracy of the deterministic merge (BatchNorm on batch statistics)."""
        state = self._functional_state(
            self.merged_parameters(self.deterministic_gates()), fresh_buffers=True
        )
        set_gate_training_mode(self.model)
        total, correct, count, labelled = 0.0, 0, 0, True
        for batch in loader:
            logits, labels = self._forward(state, batch)
            total += float(task_loss(objective, logits, labels)) * logits.shape[0]
            count += logits.shape[0]
            if labels is None:
                labelled = False
            else:
                correct += int((logits.argmax(-1) == labels).sum())
        out = {"val_loss": total / max(count, 1)}
        if labelled and count:
            out["val_acc"] = 100.0 * correct / count
        return out

    def _recalibrated_buffers(self, loader: Iterable[Batch]) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(self.model)
        model.load_state_dict(self._merged_state(recalibrated=False), strict=True)
        recalibrate_batchnorm(model, loader)
        return {k: v.detach().clone() for k, v in model.named_buffers()}

    # -- results ------------------------------------------------------------------------------

    def _merged_state(self, recalibrated: bool = True) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            merged = self.merged_parameters(self.deterministic_gates())
        state = self._functional_state(merged)
        if recalibrated and self._bn_buffers is not None:
            state.update(self._bn_buffers)
        ref = self.candidates[self.reference].state
        # The model's key order, each tensor in the candidates' dtype.
        return {k: state[k].detach().to(ref[k].dtype).contiguous() for k in self.model.state_dict()}

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The merged weights at the deterministic (test-time) gates: a plain state dict."""
        return self._merged_state()

    def merged_model(self) -> nn.Module:
        """A fresh copy of the model holding the merged weights, in eval mode."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.merged_state_dict(), strict=True)
        return model.eval()

    def gate_snapshot(self):
        """Per unit and candidate: unit log_alpha, effective deterministic gate, P(non-zero)."""
        from .report import GateSnapshot

        with torch.no_grad():
            return GateSnapshot(
                candidates=list(self.names),
                units=list(self.layout.units),
                log_alpha=self.log_alpha.detach().numpy().copy(),
                gate=self.deterministic_gates().numpy(),
                p_nonzero=self._prob_nonzero().numpy(),
                excluded=[
                    c.name
                    for c, ok in zip(self.candidates, self.active.tolist(), strict=True)
                    if not ok
                ],
            )

    def candidate_gates(self) -> dict[str, dict[str, float]] | None:
        """The candidate-level gates (two-level gating), or None at model granularity."""
        if self.log_alpha_candidate is None:
            return None
        la = self.log_alpha_candidate.detach()
        with torch.no_grad():
            gate, pnz = hc.deterministic_gates(la), hc.prob_nonzero(la)
        return {
            name: {
                "log_alpha": float(la[i]),
                "gate": float(gate[i]) * bool(self.active[i]),
                "p_nonzero": float(pnz[i]) * bool(self.active[i]),
            }
            for i, name in enumerate(self.names)
        }

    def export(
        self, out_dir: str | Path, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Path]:
        """Write merged weights, gates.json, plots and history into ``out_dir``, atomically."""
        from .export import export_merge

        return export_merge(self, Path(out_dir), extra=extra)

    def describe(self) -> dict[str, Any]:
        return {
            "plan": asdict(self.plan),
            "candidates": {c.name: c.source for c in self.candidates},
            "base": None if self.base is None else self.base.source,
            "units": len(self.layout.units),
            "merged_tensors": len(self.layout.slots),
            "reference": self.names[self.reference],
        }
