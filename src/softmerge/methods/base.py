"""What every merge method shares: its result, the registry, and per-tensor (static) methods.

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

Every method sees the same :class:`~softmerge.context.MergeContext`: the loaded candidates, the
plan (which tensors merge; where the rest come from), the base for task vectors, the merge data,
the objective, the seed.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from ..context import MergeContext
from ..errors import ConfigError, PlanError
from ..memory import release_memory
from ..profiling import measure

State = dict[str, torch.Tensor]
__all__ = [
    "REGISTRY",
    "MergeContext",
    "MergeMethod",
    "MergeOutcome",
    "MergedState",
    "MethodParams",
    "TensorwiseMethod",
    "get_method",
    "method_class",
    "register",
]


class MergedState(Mapping[str, torch.Tensor]):
    """A merged state dict computed tensor by tensor, in key order, by ``compute_pass()``.

    ``stream()`` yields the tensors one at a time without keeping them (a merge written straight
    to disk never holds the whole model); any lookup computes and keeps them all. Every pass
    starts afresh (DARE's generator included), so both ways give the same tensors."""

    def __init__(
        self, keys: Sequence[str], compute_pass: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    ) -> None:
        self._keys = list(keys)
        self._compute_pass = compute_pass
        self._state: State | None = None

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._state is not None:
            yield from self._state.items()
        else:
            yield from self._compute_pass()

    def materialize(self) -> State:
        if self._state is None:
            self._state = dict(self._compute_pass())
        return self._state

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.materialize()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class MergeOutcome:
    """What a method returns: the merged state (None only for output ensembles, which keep N
    models), a model holding it (built on first use), and what the method wants to report."""

    state: Mapping[str, torch.Tensor] | None
    build: Callable[[], nn.Module] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    peak_mb: float = 0.0
    _model: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            if self.build is None:
                raise PlanError("this merge has no model to build (no model was given)")
            self._model = self.build()
        return self._model

    @classmethod
    def of_model(cls, model: nn.Module, state: Mapping[str, torch.Tensor] | None, **kw: Any):
        return cls(state, None, _model=model, **kw)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The merged tensors in order, streamed when the merge can stream them."""
        if self.state is None:
            raise PlanError("an output ensemble keeps N models: it has no merged state dict")
        if isinstance(self.state, MergedState):
            return self.state.stream()
        return iter(self.state.items())


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
    needs_adapters: ClassVar[bool] = False  # only merges LoRA adapter candidates

    def __init__(self, params: MethodParams | None = None) -> None:
        self.params = params if params is not None else self.Params()

    def run(self, ctx: MergeContext) -> MergeOutcome:
        raise NotImplementedError

    def merge(self, ctx: MergeContext) -> MergeOutcome:
        """Run the method, timing it and measuring its peak memory."""
        with measure() as m:
            outcome = self.run(ctx)
            if ctx.plan.repair and outcome.state is not None and "repair" not in outcome.info:
                outcome = repaired(ctx, outcome)
        outcome.seconds, outcome.peak_mb = m.seconds, m.peak_mb
        return outcome

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump(by_alias=True).items())
        return f"{type(self).__name__}({args})"


def repaired(ctx: MergeContext, outcome: MergeOutcome) -> MergeOutcome:
    """plan.repair: the outcome with its state REPAIRed (softmerge.align.pool). Its model holds
    that state as it is (no second BatchNorm estimate), so what is evaluated is what is written."""
    from ..align.pool import outcome_weights, repair_merged

    state, note = repair_merged(ctx, dict(outcome.items()), outcome_weights(ctx, outcome.info))
    info = {**outcome.info, "repair": note}
    return MergeOutcome(state, lambda: ctx.build_plain(state), info)


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
    except (ValidationError, PlanError) as exc:
        text = describe_param_error(exc, cls.Params) if isinstance(exc, ValidationError) else exc
        raise ConfigError(f"method {name!r}: {text}") from exc


def describe_param_error(exc: ValidationError, params: type[BaseModel]) -> str:
    err = exc.errors(include_url=False)[0]
    key = str(err["loc"][0]) if err["loc"] else "(params)"  # later parts name union members
    if err["type"] == "extra_forbidden":
        allowed = [f.alias or n for n, f in params.model_fields.items()]
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed) or '-'}"
        return f"unknown parameter '{key}'; {hint}"
    if err["type"] == "value_error":  # a validator's own message already names the value
        return f"{key}: {(err.get('ctx') or {}).get('error', err['msg'])}"
    got = repr(err.get("input"))
    msg = str(err["msg"])
    return f"{key}: {msg[:1].lower()}{msg[1:]}, got {got[:60]}"


# ---------------------------------------------------------------------------------------------
# Per-tensor methods: one pure function from `tensorwise` applied to every merged tensor.


Weights = float | list[float] | None


class TensorwiseMethod(MergeMethod):
    """Applies ``tensorwise.METHODS[function]`` to each tensor the plan merges, one tensor at a
    time: read that tensor of every candidate (and the base), merge, hand it on. Nothing but the
    tensors of one name is ever in memory at once, unless the caller keeps the result."""

    function: ClassVar[str]

    def tensor_kwargs(self, ctx: MergeContext) -> dict[str, Any]:
        """Keyword arguments of the tensor function for one pass over the tensors."""
        return self.params.model_dump(by_alias=True, exclude_none=True)

    def base_of(self, ctx: MergeContext) -> Any:
        return ctx.require_base(self.name) if self.needs_base else None

    def check(self, ctx: MergeContext) -> None:
        """Refuse a context the method cannot merge, before any tensor is read."""
        count = len(ctx.pool)
        for key in ("weight", "density"):
            value = getattr(self.params, key, None)
            if isinstance(value, list) and len(value) != count:
                raise PlanError(
                    f"method {self.name!r}: {key} needs one value per candidate: "
                    f"{count}, got {len(value)}"
                )

    def run(self, ctx: MergeContext) -> MergeOutcome:
        from .tensorwise import METHODS  # the pure functions checked against mergekit

        self.check(ctx)
        fn = METHODS[self.function]
        base = self.base_of(ctx)
        merged = set(ctx.merged_names)
        keys = ctx.output_keys()

        def one_pass() -> Iterator[tuple[str, torch.Tensor]]:
            kwargs = self.tensor_kwargs(ctx)  # afresh: DARE's generator restarts every pass
            rest = ctx.rest_state()
            for key in keys:
                if key not in merged:
                    yield key, rest[key].detach().to("cpu", ctx.pool[0].infos[key].dtype)
                    continue
                tensors = [c.tensor(key).to(ctx.device) for c in ctx.pool]
                theta0 = None if base is None else base.tensor(key).to(ctx.device)
                try:
                    value = fn(tensors, theta0, **kwargs)
                except (ValueError, TypeError) as exc:  # e.g. 3 weights for 5 candidates
                    raise PlanError(f"method {self.name!r} on tensor '{key}': {exc}") from exc
                yield key, value.detach().to("cpu", ctx.pool[0].infos[key].dtype)
                del tensors, theta0, value
                release_memory(collect=False)  # per-tensor temporaries: keep the heap flat
            for c in [*ctx.pool, *([base] if base is not None else [])]:
                c.close()

        state = MergedState(keys, one_pass)
        build = (lambda: ctx.build(state)) if ctx.template is not None else None
        return MergeOutcome(state, build, {"merged_tensors": len(merged)})
