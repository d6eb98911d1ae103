"""What every merge method shares: the context it merges in, its result, and the registry.

A method is a small class with a pydantic ``Params`` model and a ``run(ctx)``::

    @register
    class Ties(TensorwiseMethod):
        name = "ties"
        Params = TiesParams
        ...

and users reach it by name, from the API or from ``method:`` in a YAML config::

    ctx = MergeContext(model, ["a.safetensors", "b.safetensors"], merge_loader=loader)
    outcome = get_method("ties", density=0.5).merge(ctx)
    outcome.model          # an nn.Module holding the merge, ready to evaluate

Every method sees the same :class:`MergeContext`: the loaded candidates, the plan (which
tensors merge; where the rest come from), the base for task vectors, the merge data, the seed.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn
from torch.func import functional_call

from ..candidates import Candidate, check_fits_model, load_candidates, split_base
from ..errors import CandidateError, ConfigError, DataError, PlanError
from ..plan import MergePlan, build_layout
from ..profiling import measure
from ..soft import has_batchnorm, logits_of, recalibrate_batchnorm, split_batch, task_loss

State = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Context and outcome


@dataclass
class MergeContext:
    """The candidates, plan, base and data that every method merges with.

    ``candidates`` are paths, state dicts, modules or :class:`Candidate` objects (loaded and
    validated once, here). ``base`` (or ``plan.base``) is theta_0 of task-vector methods: a
    candidate's name (it then leaves the merged pool) or anything a candidate can be.
    ``merge_loader`` is the small merge set that learning methods train on (labelled for
    cross-entropy, or unlabeled for entropy objectives); ``held_out_loader`` is the split
    greedy soup scores on (default: the merge set, which the candidates never trained on).
    """

    model: nn.Module
    candidates: Sequence[Any]
    names: Sequence[str] | None = None
    plan: MergePlan = field(default_factory=MergePlan)
    base: Any = None
    merge_loader: Iterable[Any] | None = None
    held_out_loader: Iterable[Any] | None = None
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        pool = load_candidates(self.candidates, self.names, min_count=1)
        wanted = self.base if self.base is not None else self.plan.base
        self.base_candidate, pool = (None, pool) if wanted is None else split_base(pool, wanted)
        need = 1 if self.base_candidate is not None else 2  # base + 1: slerp, task arithmetic
        if len(pool) < need:
            with_base = " besides the base" if need == 1 else ""
            raise CandidateError(f"need at least {need} candidates{with_base}, got {len(pool)}")
        check_fits_model(pool[0], self.model)
        self.pool: list[Candidate] = pool
        shapes = {n: p.shape for n, p in self.model.named_parameters()}
        self.merged_names: list[str] = build_layout(self.plan, shapes).merged_names
        self._solo_losses: dict[str, float] | None = None

    # -- views of the pool ----------------------------------------------------------------------

    @property
    def states(self) -> list[State]:
        return [c.state for c in self.pool]

    @property
    def candidate_names(self) -> list[str]:
        return [c.name for c in self.pool]

    def require_base(self, method: str) -> Candidate:
        if self.base_candidate is None:
            raise PlanError(
                f"method {method!r} merges task vectors (theta_j - theta_0) and needs a base: "
                "pass base=... or set plan.base to a candidate name or a checkpoint path"
            )
        return self.base_candidate

    def require_data(self, method: str) -> Iterable[Any]:
        if self.merge_loader is None:
            raise DataError(f"method {method!r} learns on data: pass merge_loader=...")
        return self.merge_loader

    # -- building the merged model ----------------------------------------------------------------

    def solo_losses(self) -> dict[str, float]:
        """Each candidate's loss on the first merge batches (ranks candidates for rest_from)."""
        if self._solo_losses is None:
            loader = self.require_data("rest_from: best")
            batches = list(itertools.islice(loader, 4))
            if not batches:
                raise DataError("the merge data loader yields no batch (empty data set)")
            self._solo_losses = {
                c.name: mean_loss(self.model, c.state, batches) if c.is_finite else math.inf
                for c in self.pool
            }
        return self._solo_losses

    def rest_state(self) -> State:
        """Values of everything outside the plan: from plan.rest_from, in the model's order."""
        choice = self.plan.rest_from
        finite = [c for c in self.pool if c.is_finite] or self.pool
        if choice == "best":
            if self.merge_loader is None:
                source = finite[0].state  # nothing to rank on: the first finite candidate
            else:
                losses = self.solo_losses()
                source = min(finite, key=lambda c: losses[c.name]).state
            return dict(source)
        if choice == "average":
            from .soups import uniform_soup  # soups imports nothing from here; no cycle

            return uniform_soup([c.state for c in finite])
        pool = {c.name: c for c in self.pool}
        if self.base_candidate is not None:
            pool.setdefault(self.base_candidate.name, self.base_candidate)
            pool.setdefault("base", self.base_candidate)
        if choice not in pool:
            raise PlanError(
                f"plan.rest_from {choice!r} is not 'best', 'average' or a candidate name "
                f"({', '.join(pool)})"
            )
        return dict(pool[choice].state)

    def assemble(self, merged: Mapping[str, torch.Tensor]) -> State:
        """A full state dict: the merged tensors over the rest, each in the candidates' dtype."""
        state = {**self.rest_state(), **merged}
        ref = self.pool[0].state
        return {
            k: state[k].detach().to(ref[k].dtype).contiguous() for k in self.model.state_dict()
        }

    def build_plain(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """A fresh model holding ``state`` as it is (a candidate, with its own statistics)."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(dict(state), strict=True)
        return model.eval()

    def build(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """A fresh model holding ``state``; BatchNorm statistics re-estimated on the merge set,
        because averaged running statistics do not describe averaged weights."""
        model = self.build_plain(state)
        if self.merge_loader is not None and has_batchnorm(model):
            recalibrate_batchnorm(model, self.merge_loader)
        return model.eval()


@dataclass
class MergeOutcome:
    """What a method returns. ``state`` is None only for output ensembles (N models)."""

    model: nn.Module
    state: State | None
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    peak_mb: float = 0.0


# ---------------------------------------------------------------------------------------------
# Small helpers shared by the learning methods


@torch.no_grad()
def mean_loss(
    model: nn.Module, state: Mapping[str, torch.Tensor], batches: Sequence[Any]
) -> float:
    """Loss of ``model`` with ``state`` on ``batches``: cross-entropy when labelled, else the
    prediction entropy."""
    was = model.training
    model.eval()
    total = 0.0
    for batch in batches:
        args, kwargs, labels = split_batch(batch)
        logits = logits_of(functional_call(model, dict(state), args, kwargs))
        total += float(task_loss("entropy" if labels is None else "cross_entropy", logits, labels))
    model.train(was)
    return total / max(1, len(batches))


# ---------------------------------------------------------------------------------------------
# Methods and the registry


class MethodParams(BaseModel):
    """Parameters of a method; unknown keys are an error (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)


class MergeMethod:
    """Base class: subclasses set ``name``, ``Params``, ``summary`` and implement ``run``."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    summary: ClassVar[str] = ""
    needs_base: ClassVar[bool] = False  # merges task vectors theta_j - theta_0
    needs_data: ClassVar[bool] = False  # learns or scores on the merge set
    single_model: ClassVar[bool] = True  # False: keeps N models (output ensemble)

    def __init__(self, params: MethodParams | None = None) -> None:
        self.params = params if params is not None else self.Params()

    def run(self, ctx: MergeContext) -> MergeOutcome:
        raise NotImplementedError

    def merge(self, ctx: MergeContext) -> MergeOutcome:
        """Run the method, timing it and measuring its peak memory."""
        with measure() as m:
            outcome = self.run(ctx)
        outcome.seconds, outcome.peak_mb = m.seconds, m.peak_mb
        return outcome

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump(by_alias=True).items())
        return f"{type(self).__name__}({args})"


REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in REGISTRY:
        raise ValueError(f"merge method {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[MergeMethod]:
    if name not in REGISTRY:
        close = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"unknown merge method {name!r}{hint} (available: {', '.join(sorted(REGISTRY))})"
        )
    return REGISTRY[name]


def get_method(name: str, **params: Any) -> MergeMethod:
    """The method registered as ``name`` with validated parameters."""
    cls = method_class(name)
    try:
        return cls(cls.Params(**params))
    except ValidationError as exc:
        raise ConfigError(f"method {name!r}: {describe_param_error(exc, cls.Params)}") from exc


def describe_param_error(exc: ValidationError, params: type[BaseModel]) -> str:
    err = exc.errors(include_url=False)[0]
    key = str(err["loc"][0]) if err["loc"] else "(params)"  # later parts name union members
    if err["type"] == "extra_forbidden":
        allowed = [f.alias or n for n, f in params.model_fields.items()]
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed) or '-'}"
        return f"unknown parameter '{key}'; {hint}"
    got = repr(err.get("input"))
    msg = str(err["msg"])
    return f"{key}: {msg[:1].lower()}{msg[1:]}, got {got[:60]}"


# ---------------------------------------------------------------------------------------------
# Per-tensor methods: one pure function from `tensorwise` applied to every merged tensor.


Weights = float | list[float] | None


class TensorwiseMethod(MergeMethod):
    """Applies ``tensorwise.METHODS[function]`` to each tensor the plan merges."""

    function: ClassVar[str]

    def tensor_kwargs(self, ctx: MergeContext) -> dict[str, Any]:
        return self.params.model_dump(by_alias=True, exclude_none=True)

    def base_state(self, ctx: MergeContext) -> State | None:
        return ctx.require_base(self.name).state if self.needs_base else None

    def run(self, ctx: MergeContext) -> MergeOutcome:
        from .tensorwise import METHODS  # the pure functions checked against mergekit

        fn = METHODS[self.function]
        base = self.base_state(ctx)
        kwargs = self.tensor_kwargs(ctx)
        merged = {}
        for key in ctx.merged_names:
            try:
                merged[key] = fn(
                    [s[key] for s in ctx.states], None if base is None else base[key], **kwargs
                )
            except (ValueError, TypeError) as exc:  # e.g. 3 weights for 5 candidates
                raise PlanError(f"method {self.name!r} on tensor '{key}': {exc}") from exc
        state = ctx.assemble(merged)
        return MergeOutcome(ctx.build(state), state, {"merged_tensors": len(merged)})
