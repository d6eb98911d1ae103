"""The training loop of every learned merge, with callbacks; and the settings of soft merging.

:class:`FitLoop` trains the few parameters of a merge (gates, or mixing coefficients) while the
candidates stay frozen: ``problem.loss(batch, step)``, backward, ``problem.after_backward``
(soft merging's warm-up freezes the unit gates there), optional gradient all-reduce across
processes, clipping, an optimiser step. A step whose loss is not finite is skipped (an extreme
candidate can overflow one batch) but its batch counts as used. Everything else is a callback:

- :class:`Progress`: a tqdm bar;
- :class:`Recorder`: a history record every ``record_every`` steps, plus a snapshot (e.g. the
  deterministic gates) for the gate trajectory;
- :class:`Validator`: scores the current merge on held-out data every ``eval_every`` steps;
- :class:`~softmerge.checkpoint.Checkpointer`: saves the parameters, optimiser, generator and
  the callbacks' states every ``checkpoint_every`` steps.

A callback's ``state_dict`` is what a resumed run needs from it; the loop reaches into nothing
else.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

import torch
from pydantic import BeforeValidator, Field, field_validator, model_validator
from torch import nn
from tqdm.auto import tqdm

from .batches import Batch
from .errors import PlanError
from .objectives import NAMES as OBJECTIVE_NAMES
from .schema import Settings
from .stack import parse_device, parse_dtype

MAX_LR = 1e6  # a larger gate learning rate is a typo (and overflows float32 in the optimiser)


def _lambda_or_auto(value: Any) -> Any:
    """A number >= 0 or the word "auto" (checked here, so the message names no union branch)."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"expected a number >= 0 or 'auto', got {value!r}")
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"must be >= 0, got {value!r}")
        return float(value)
    raise ValueError(f"expected a number >= 0 or 'auto', got {value!r}")


# Annotated: the check travels with the type (soft merging's method parameters copy it).
Lambda = Annotated[float | Literal["auto"], BeforeValidator(_lambda_or_auto)]


def _bool_or_auto(value: Any) -> Any:
    if isinstance(value, bool) or value == "auto":
        return value
    raise ValueError(f"expected true, false or 'auto', got {value!r}")


BoolOrAuto = Annotated[bool | Literal["auto"], BeforeValidator(_bool_or_auto)]


class FitConfig(Settings):
    """How the gates are learned. Defaults are the ones `docs/method.md` argues for."""

    steps: int | None = Field(300, ge=1)  # gate-training steps (ignored when `epochs` is set)
    epochs: float | None = Field(None, gt=0, allow_inf_nan=False)  # passes over the merge set
    lr: float = Field(0.1, gt=0, le=MAX_LR, allow_inf_nan=False)  # learning rate of the gates
    optimizer: Literal["sgd", "adam"] = "sgd"  # SGD has momentum 0.9; see docs/method.md
    # Weight of the expected L0 term, or "auto": chosen along the L0 path (softmerge.path) as
    # the sparsest merge whose held-out loss is within l0_tolerance (relative) of the best.
    l0_lambda: Lambda = 1e-3
    l0_tolerance: float = Field(0.01, ge=0, allow_inf_nan=False)
    # How sure "within l0_tolerance" must be: a sparser point's loss gap plus its standard
    # error times this one-sided normal quantile (0.95: 1.64) must be within it; 0.5: the gap.
    l0_confidence: float = Field(0.95, ge=0.5, lt=1, allow_inf_nan=False)
    init_gate: float = Field(0.5, gt=0, lt=1)  # every gate starts here: uniform-soup start
    seed: int = Field(0, ge=0, lt=2**64)  # the gate noise (the loader's order is its own)
    # "auto" (follows the model), "classification" ("cross_entropy"), "causal_lm",
    # "entropy" (unlabeled, as in AdaMerging), "module:function", or a callable.
    objective: str | Callable[..., Any] = "auto"
    eval_every: int = Field(50, ge=0)  # validate the deterministic merge every K steps (0: never)
    # Early stopping: score the deterministic merge on held-out data (YAML data.held_out) every
    # K steps and keep the gates of the step with the lowest held-out loss (0: the last step).
    select_every: int = Field(0, ge=0)
    record_every: int = Field(10, ge=1)  # history and gate trajectory every K steps
    rank_batches: int = Field(4, ge=1)  # batches used to rank candidates before training
    recalibrate_bn: bool = True  # re-estimate BatchNorm statistics after merging
    progress: bool = True  # tqdm progress bars
    grad_clip: float | None = Field(1.0, ge=0, allow_inf_nan=False)  # gate gradient norm clip
    warmup: float = Field(0.3, ge=0, lt=1)  # fraction of steps that train only candidate gates
    solo_prior: float = Field(1.0, allow_inf_nan=False)  # see docs/method.md
    checkpoint_every: int = Field(0, ge=0)  # save the training state every K steps (0: never)
    device: str | None = None  # where the stack and gates live (default: the model's device)
    storage_dtype: str | None = None  # dtype of the stack (default: the candidates' own)
    # Under torchrun: each process holds 1/K of the stack and only merged tensors travel
    # (docs/scaling.md); without a process group it changes nothing.
    shard_stack: bool = False
    # The merge's two passes per step as torch.compile kernels (softmerge.fused): true, false,
    # or "auto" (on CPU when the stack's bytes times the steps repay the compile time).
    compile_merge: BoolOrAuto = "auto"

    @field_validator("objective", mode="before")
    @classmethod
    def _known_objective(cls, value: Any) -> Any:
        if callable(value) or not isinstance(value, str):
            return value
        if value not in OBJECTIVE_NAMES and ":" not in value:
            choices = ", ".join(OBJECTIVE_NAMES)
            raise ValueError(f"expected one of {choices} or 'module:function', got {value!r}")
        return value

    @field_validator("device", mode="after")
    @classmethod
    def _device_exists(cls, value: str | None) -> str | None:
        try:
            parse_device(value)
        except PlanError as exc:
            raise ValueError(str(exc).removeprefix("device ")) from None
        return value

    @field_validator("storage_dtype", mode="after")
    @classmethod
    def _floating_dtype(cls, value: str | None) -> str | None:
        try:
            parse_dtype(value)
        except PlanError as exc:
            raise ValueError(str(exc).removeprefix("storage_dtype ")) from None
        return value

    @model_validator(mode="after")
    def _one_selection(self) -> FitConfig:
        if self.select_every and self.l0_lambda == "auto":
            raise ValueError(
                "select_every picks a step of one fit, but l0_lambda 'auto' already picks a "
                "point of the L0 path on held-out data: set select_every to 0 or give "
                "l0_lambda a number"
            )
        return self

    def total_steps(self, loader: Any) -> int:
        """``steps``, or ``epochs`` passes over a loader that has a length."""
        if self.epochs is not None:
            try:
                per_epoch = len(loader)
            except TypeError as exc:
                from .errors import DataError

                raise DataError("epochs needs a loader with a length; set steps instead") from exc
            return max(1, math.ceil(self.epochs * per_epoch))
        if not self.steps:
            raise PlanError("steps must be a positive integer (or set epochs)")
        return int(self.steps)


@dataclass
class FitResult:
    steps: int
    seconds: float
    history: list[dict[str, Any]]
    gate_trajectory: list[torch.Tensor]  # deterministic gates (N, U) at each recorded step
    candidate_losses: dict[str, float]  # each candidate alone, on the ranking batches
    reference: str  # best-ranked candidate: fallback and default source of the rest
    # fit.select_every: the step whose gates were kept, and their held-out loss
    selected_step: int | None = None
    held_out_loss: float | None = None


# ---------------------------------------------------------------------------------------------
# The loop


class Problem(Protocol):
    """What a :class:`FitLoop` trains."""

    def trainable(self) -> list[nn.Parameter]: ...

    def loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]: ...

    def after_backward(self, step: int) -> None: ...


@dataclass
class StepInfo:
    """What one step did, passed to every callback in order (a callback may add to it)."""

    step: int
    total: int
    logs: dict[str, float] | None  # None: the step was skipped (non-finite loss)
    record: dict[str, Any] | None = None  # set by the Recorder on recorded steps


class Callback:
    name = "callback"

    def on_start(self, loop: FitLoop) -> None:
        """Called once before the first step (after a resume has restored the state)."""

    def on_step(self, loop: FitLoop, info: StepInfo) -> None:
        """Called after every step."""

    def on_end(self, loop: FitLoop) -> None:
        """Called once after the last step (not when training is interrupted)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


GradientHook = Callable[[Sequence[nn.Parameter]], None]


class FitLoop:
    """Optimise ``problem.trainable()`` for ``total_steps`` batches, calling the callbacks."""

    def __init__(
        self,
        problem: Problem,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        *,
        generator: torch.Generator | None = None,
        grad_clip: float | None = None,
        callbacks: Sequence[Callback] = (),
        reduce_gradients: GradientHook | None = None,
    ) -> None:
        self.problem = problem
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.generator = generator
        self.grad_clip = grad_clip
        self.callbacks = list(callbacks)
        self.reduce_gradients = reduce_gradients
        self.step = 0
        self.seconds_before = 0.0  # training time of earlier (interrupted) processes
        self._started = 0.0

    @property
    def seconds(self) -> float:
        return self.seconds_before + (time.perf_counter() - self._started if self._started else 0)

    def callback(self, kind: type) -> Any:
        return next((c for c in self.callbacks if isinstance(c, kind)), None)

    def run(self, batches: Iterator[Batch]) -> None:
        """Train from ``self.step`` (0, or where a resumed run left off) to ``total_steps``.

        ``batches`` must yield the same batches as the interrupted run: the ones it already
        used are skipped here, so the data order continues where it stopped."""
        self._started = time.perf_counter()
        for _ in range(self.step):
            next(batches)
        for cb in self.callbacks:
            cb.on_start(self)
        while self.step < self.total_steps:
            self.step += 1
            logs = self.train_step(next(batches))
            info = StepInfo(self.step, self.total_steps, logs)
            for cb in self.callbacks:
                cb.on_step(self, info)
        for cb in self.callbacks:
            cb.on_end(self)

    def train_step(self, batch: Batch) -> dict[str, float] | None:
        """One optimisation step on ``batch`` (at ``self.step``); its logs, or None when the
        loss was not finite and the step was skipped."""
        params = self.problem.trainable()
        loss, logs = self.problem.loss(batch, self.step)
        finite = torch.isfinite(loss.detach())
        if self.reduce_gradients is not None:
            # Every process must take the same decision: a step is skipped if any skips it.
            finite = _all_true(finite)
        if not bool(finite):
            return None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.problem.after_backward(self.step)
        if self.reduce_gradients is not None:
            self.reduce_gradients(params)
        if self.grad_clip:
            # A sample that opens an extreme candidate gives gradients 1e5x the usual; clipped,
            # one such step cannot throw every gate far off.
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        if any(bool(torch.isnan(p).any()) for p in params):
            # Only an absurd learning rate gets here (a step overflows float32): stop rather
            # than return a merge of NaNs.
            lr = self.optimizer.param_groups[0]["lr"]
            raise PlanError(
                f"gate training diverged at step {self.step}: the trained parameters became "
                f"NaN; lower the learning rate (fit.lr, now {lr:g})"
            )
        return logs


def _all_true(flag: torch.Tensor) -> torch.Tensor:
    from .distributed import all_true

    return all_true(flag)


# ---------------------------------------------------------------------------------------------
# Callbacks


class Progress(Callback):
    name = "progress"
    shown = ("loss", "l0", "val_acc", "val_ppl", "val_loss")

    def __init__(self, desc: str = "gates", enabled: bool = True) -> None:
        self.desc, self.enabled = desc, enabled
        self.bar: Any = None

    def on_start(self, loop: FitLoop) -> None:
        self.bar = tqdm(
            total=loop.total_steps,
            initial=loop.step,
            desc=self.desc,
            disable=not self.enabled,
            leave=False,
        )

    def on_step(self, loop: FitLoop, info: StepInfo) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if info.record:
            shown = {k: round(v, 4) for k, v in info.record.items() if k in self.shown}
            self.bar.set_postfix(shown)

    def on_end(self, loop: FitLoop) -> None:
        if self.bar is not None:
            self.bar.close()


class Recorder(Callback):
    """A history record every ``every`` steps (and at the last): the mean of each logged value
    since the previous record, plus ``extra()`` (e.g. expected L0, mean gate per candidate);
    and ``snapshot()`` (e.g. the deterministic gates) appended to ``trajectory``."""

    name = "recorder"

    def __init__(
        self,
        every: int,
        extra: Callable[[], dict[str, Any]] | None = None,
        snapshot: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self.every = every
        self.extra = extra
        self.snapshot = snapshot
        self.history: list[dict[str, Any]] = []
        self.trajectory: list[torch.Tensor] = []
        self.window: list[dict[str, float]] = []

    def on_step(self, loop: FitLoop, info: StepInfo) -> None:
        if info.logs is None:
            return  # a skipped step is not recorded (its batch still counts as used)
        self.window.append(info.logs)
        if info.step % self.every and info.step != info.total:
            return
        record: dict[str, Any] = {"step": info.step}
        for key in self.window[0]:
            record[key] = sum(w[key] for w in self.window) / len(self.window)
        if self.extra is not None:
            record.update(self.extra())
        if self.snapshot is not None:
            self.trajectory.append(self.snapshot().detach().cpu().clone())
        self.history.append(record)
        self.window = []
        info.record = record

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "trajectory": self.trajectory, "window": self.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        self.trajectory = list(state["trajectory"])
        self.window = [dict(w) for w in state["window"]]


class Validator(Callback):
    """Adds ``score()``'s numbers (prefixed ``val_``) to the record of every ``every``-th step
    and of the last one; ``score`` is only called on recorded steps."""

    name = "validator"

    def __init__(self, every: int, score: Callable[[], dict[str, float]]) -> None:
        self.every = every
        self.score = score

    def on_step(self, loop: FitLoop, info: StepInfo) -> None:
        if info.record is None or not self.every:
            return
        if info.step % self.every == 0 or info.step == info.total:
            metrics = self.score()
            short = {"accuracy": "acc", "perplexity": "ppl"}
            info.record.update({f"val_{short.get(k, k)}": v for k, v in metrics.items()})


@dataclass
class Selection:
    """The best score seen by :class:`SelectBest`, the step it was seen at and the trained
    parameters' values then."""

    score: float
    step: int
    values: list[torch.Tensor]


class SelectBest(Callback):
    """Early stopping: every ``every`` steps (and at the start and the end) ``score()`` rates
    the current ``params`` (its ``loss``: lower is better) and the best values are kept, ties
    going to the earlier step; :meth:`restore` puts them back. Its state is checkpointed, so a
    resumed run selects as an uninterrupted one would."""

    name = "select_best"

    def __init__(
        self, every: int, params: Sequence[nn.Parameter], score: Callable[[], dict[str, float]]
    ) -> None:
        self.every = every
        self.params = list(params)
        self.score = score
        self.best: Selection | None = None
        self.history: list[dict[str, float]] = []

    def _consider(self, step: int) -> None:
        metrics = self.score()
        self.history.append({"step": step, **{f"held_out_{k}": v for k, v in metrics.items()}})
        value = -metrics["loss"]  # loss, not accuracy: a few hundred samples move accuracy
        if self.best is None or value > self.best.score:  # in steps of whole samples
            values = [p.detach().clone() for p in self.params]
            self.best = Selection(value, step, values)

    def on_start(self, loop: FitLoop) -> None:
        if loop.step == 0:
            self._consider(0)

    def on_step(self, loop: FitLoop, info: StepInfo) -> None:
        if info.step % self.every == 0 or info.step == info.total:
            self._consider(info.step)

    def with_history(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``history`` (a Recorder's) and this callback's held-out records, in step order."""
        return sorted([*history, *self.history], key=lambda r: r["step"])

    def restore(self) -> Selection | None:
        """Copy the best values into the parameters; the selection (None: nothing scored)."""
        if self.best is not None:
            with torch.no_grad():
                for param, value in zip(self.params, self.best.values, strict=True):
                    param.copy_(value)
        return self.best

    def state_dict(self) -> dict[str, Any]:
        best = self.best
        saved = None if best is None else {"score": best.score, "step": best.step}
        return {
            "best": saved,
            "values": [] if best is None else best.values,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        best = state.get("best")
        self.best = None
        if best is not None:
            self.best = Selection(float(best["score"]), int(best["step"]), list(state["values"]))


def default_optimizer(
    params: Sequence[nn.Parameter], name: str, lr: float
) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def field_names() -> list[str]:
    return list(FitConfig.model_fields)
