"""The merge context: the one place candidates are loaded and checked, the base and the rest of
the model resolved, and candidates ranked. Every merge method, soft merging included, merges
inside one.

::

    ctx = MergeContext(model, ["a.safetensors", "b.safetensors"], plan=MergePlan(),
                       merge_loader=loader)
    ctx.pool            # the candidates (headers read, tensors not yet)
    ctx.reference       # index of the best-ranked candidate (lowest solo loss on merge data)
    ctx.rest_state()    # values of everything outside the plan, from plan.rest_from
    ctx.stack(deltas)   # the candidates' merged tensors, stacked once (learning methods)
    ctx.build(state)    # a model holding a state (BatchNorm statistics re-estimated)

``model`` is only a template: the context keeps a weightless (meta) copy of it and never holds
its weights. ``model=None`` is allowed for methods that need no model (static merges without
evaluation): then every floating tensor of the candidates is mergeable.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from . import distributed
from .batches import first_batches, logits_of, split_on, untouched_order
from .candidates import (
    Candidate,
    TensorInfo,
    check_fits_model,
    load_candidates,
    model_infos,
    split_base,
)
from .errors import CandidateError, DataError, PlanError
from .evaluation import (
    evaluate,
    has_batchnorm,
    model_device,
    model_with_state,
    recalibrate_batchnorm,
    skeleton,
)
from .hf import missing_aliases, tied_names
from .memory import release_memory
from .objectives import Objective, resolve_objective
from .plan import GateLayout, MergePlan, UnitAxes, build_layout
from .stack import CandidateStack, parse_device, parse_dtype

log = logging.getLogger("softmerge")
State = dict[str, torch.Tensor]


def channel_axes(model: nn.Module | None) -> dict[str, int]:
    """Modules whose weight keeps output channels in a dimension other than 0: GPT-2's
    ``Conv1D`` (transformers) stores its weight as (in, out)."""
    if model is None:
        return {}
    return {
        name: 1
        for name, module in model.named_modules()
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf")
    }


@dataclass
class CheckpointSpec:
    """Where a learning method checkpoints its fit, and whether it resumes from there."""

    path: Path
    resume: bool = False
    keep: bool = False  # keep the last checkpoint until the caller has written its outputs
    run_key: str = ""  # what else defines the run (model and data settings)


@dataclass
class MergeContext:
    """The candidates, plan, base, objective and data that every method merges with.

    ``candidates`` are paths, state dicts, modules or :class:`Candidate` objects. ``base`` (or
    ``plan.base``) is theta_0 of task-vector methods: a candidate's name (it then leaves the
    merged pool) or anything a candidate can be. ``merge_loader`` is the small merge set that
    learning methods train on and candidates are ranked on; ``held_out_loader`` is the split
    greedy soup scores on and learned soups stop early on (default: the merge set)."""

    model: nn.Module | None
    candidates: Sequence[Any]
    names: Sequence[str] | None = None
    plan: MergePlan = field(default_factory=MergePlan)
    base: Any = None
    merge_loader: Iterable[Any] | None = None
    held_out_loader: Iterable[Any] | None = None
    seed: int = 0
    progress: bool = False
    objective: Any = "auto"
    device: Any = None
    storage_dtype: Any = None
    shard_stack: bool = False  # in a distributed run, each process holds 1/K of the stack
    rank_batches: int = 4
    val_loader: Iterable[Any] | None = None  # scored during a fit (history), never trained on
    checkpoint: CheckpointSpec | None = None
    adapter_base: Any = None  # the base model of LoRA adapter candidates (default: plan.base)
    # plan.align / plan.repair / granularity unit: the permutation groups (a
    # softmerge.align.PermutationSpec or its dict form); None: traced from the model by torch.fx.
    align_spec: Any = None

    def __post_init__(self) -> None:
        wanted = self.base if self.base is not None else self.plan.base
        pool = load_candidates(
            self.candidates, self.names, min_count=1, adapter_base=self._adapter_base(wanted)
        )
        self.base_candidate, pool = (None, pool) if wanted is None else split_base(pool, wanted)
        need = 1 if self.base_candidate is not None else 2  # base + 1: slerp, task arithmetic
        if len(pool) < need:
            with_base = " besides the base" if need == 1 else ""
            raise CandidateError(f"need at least {need} candidates{with_base}, got {len(pool)}")
        self.pool: list[Candidate] = pool
        self.device = parse_device(self.device) or (
            model_device(self.model) if self.model is not None else torch.device("cpu")
        )
        self.storage_dtype = parse_dtype(self.storage_dtype)
        self.template: nn.Module | None = None
        self.tied: dict[str, str] = tied_names(self.model)  # {tied name: name it is tied to}
        if self.tied:  # checkpoints that stored a tied weight once answer to both names
            pool = [c.with_aliases(missing_aliases(c.keys(), self.tied)) for c in pool]
            self.pool = pool
            if self.base_candidate is not None:
                keys = self.base_candidate.keys()
                self.base_candidate = self.base_candidate.with_aliases(
                    missing_aliases(keys, self.tied)
                )
        if self.model is not None:
            expected = model_infos(self.model)
            check_fits_model(pool[0], expected)
            self.template = skeleton(self.model)
            self.model = None  # the context keeps no reference to the caller's weights
        self.objective_fn: Objective = resolve_objective(self.objective, self.template)
        self.mergeable = self._mergeable_shapes()
        self.layout: GateLayout = self.layout_for(self.plan.granularity)
        self.merged_names: list[str] = self.layout.merged_names
        self._check_rest_from_name()
        self._solo: dict[str, float] | None = None
        self._reference: int | None = None
        self._rest: State | None = None
        self._stack: tuple[bool, CandidateStack] | None = None
        self.alignment: Any = None  # softmerge.align.AlignmentReport when plan.align is set
        if self.plan.align != "none":
            self._align()

    def _align(self) -> None:
        """Permute every candidate's hidden units to match the reference candidate's, before
        any method runs: the pool then holds the aligned copies (softmerge.align.pool)."""
        from .align.pool import align_context

        self.alignment = align_context(self)
        self._rest, self._stack = None, None

    def _adapter_base(self, wanted: Any) -> Path | None:
        """Where LoRA adapter candidates find their base model: ``adapter_base``, else the
        base (plan.base) when it is a path."""
        if self.adapter_base is not None:
            return Path(self.adapter_base)
        if isinstance(wanted, (str, os.PathLike)) and Path(wanted).exists():
            return Path(wanted)
        return None

    # -- what merges -------------------------------------------------------------------------

    def _mergeable_shapes(self) -> dict[str, tuple[int, ...]]:
        """The model's parameters (buffers come from rest_from), or without a model every
        floating tensor of the candidates."""
        if self.template is not None:
            shapes = {n: tuple(p.shape) for n, p in self.template.named_parameters()}
        else:
            infos: Mapping[str, TensorInfo] = self.pool[0].infos
            shapes = {k: i.shape for k, i in infos.items() if i.dtype.is_floating_point}
        if all(c.is_adapter for c in self.pool):  # adapters change only what they target
            targets = {t for c in self.pool for t in c.targets}
            shapes = {k: v for k, v in shapes.items() if k in targets}
        return shapes

    def layout_for(self, granularity: str) -> GateLayout:
        """The gate units of this plan at a granularity (learned soups: per tensor)."""
        plan = self.plan.replace(granularity=granularity)
        units = self._unit_axes() if granularity == "unit" else None
        return build_layout(plan, self.mergeable, channel_axes(self.template), units)

    def _unit_axes(self) -> UnitAxes | None:
        """Granularity unit: the axes of each tensor that the model's hidden units index, from
        its permutation groups (``align_spec``, else traced on the merge data)."""
        if self.template is None:
            return None  # build_layout says what is missing
        from .align.pool import context_spec

        out: dict[str, dict[int, tuple[str, int, int]]] = {}
        for group in context_spec(self).groups.values():
            for ref in group.axes:
                out.setdefault(ref.key, {})[ref.axis] = (group.name, group.size, ref.block)
        return out

    @property
    def states(self) -> list[Mapping[str, torch.Tensor]]:
        return [c.state for c in self.pool]

    @property
    def candidate_names(self) -> list[str]:
        return [c.name for c in self.pool]

    @property
    def active(self) -> list[bool]:
        """Which candidates are finite (one streaming scan per candidate, the first time)."""
        scanned = all(c.scanned for c in self.pool)
        flags = [c.is_finite for c in self.pool]
        if not scanned:
            release_memory()
        return flags

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

    def require_model(self, what: str) -> nn.Module:
        if self.template is None:
            raise PlanError(f"{what} needs the model: give a model (YAML: the model section)")
        return self.template

    # -- ranking -----------------------------------------------------------------------------

    def use_data(self, loader: Iterable[Any], objective: Any, rank_batches: int) -> None:
        """A fit's own merge data, objective and ranking batches; the ranking (and the rest,
        which follows the best-ranked candidate) is recomputed when any of them changes."""
        resolved = resolve_objective(objective, self.template)
        same = (
            loader is self.merge_loader
            and rank_batches == self.rank_batches
            and type(resolved) is type(self.objective_fn)
            and resolved.name == self.objective_fn.name
        )
        self.merge_loader, self.rank_batches = loader, rank_batches
        if not same:
            self.objective_fn = resolved
            self._solo, self._reference, self._rest = None, None, None

    def solo_losses(self) -> dict[str, float]:
        """Each candidate's loss alone (the merge's objective) on the first merge batches;
        non-finite candidates get inf. Computed once."""
        if self._solo is None:
            model = self.require_model("ranking candidates")
            loader = self.require_data("rest_from: best")
            batches = untouched_order(loader, lambda: first_batches(loader, self.rank_batches))
            # Distributed: each process sums the losses of its own batches; the sums are added
            # up across processes, so every process ranks the candidates alike.
            mine = list(distributed.my_batches(batches))
            sums = [self._summed_loss(model, c, mine) if c.is_finite else 0.0 for c in self.pool]
            totals = distributed.sum_across(sums)
            self._solo = {
                c.name: total / len(batches) if c.is_finite else math.inf
                for c, total in zip(self.pool, totals, strict=True)
            }
            release_memory()  # each candidate was read whole once: give that memory back
        return self._solo

    @torch.no_grad()
    def _summed_loss(self, model: nn.Module, cand: Candidate, batches: list[Any]) -> float:
        """The sum over ``batches`` of each batch's mean loss of ``cand`` alone."""
        if not batches:
            return 0.0
        state = self.model_state(cand.state)
        model.eval()
        total = 0.0
        for batch in batches:
            b = split_on(batch, self.device)
            logits = logits_of(functional_call(model, state, b.args, b.kwargs))
            total += float(self.objective_fn.loss(logits, b))
        cand.close()
        return total

    @property
    def reference(self) -> int:
        """Index of the best-ranked finite candidate (lowest solo loss; without merge data, the
        first finite one): the fallback of an all-closed gate unit and the default rest."""
        if self._reference is None:
            finite = [i for i, ok in enumerate(self.active) if ok]
            if not finite:
                raise CandidateError(self._all_nonfinite_message())
            if self.merge_loader is not None and self.template is not None:
                losses = self.solo_losses()
                ranked = [i for i in finite if math.isfinite(losses[self.pool[i].name])]
                finite = sorted(ranked, key=lambda i: losses[self.pool[i].name]) or finite
            self._reference = finite[0]
        return self._reference

    def set_reference(self, index: int) -> None:
        """A resumed run restores the reference its checkpoint was trained with."""
        if not 0 <= index < len(self.pool) or not self.pool[index].is_finite:
            raise ValueError(f"reference candidate {index} is not an active candidate")
        self._reference, self._rest = index, None

    def _all_nonfinite_message(self) -> str:
        shown = "; ".join(
            f"{c.source}: '{k}' ({n} NaN/Inf)"
            for c in self.pool[:4]
            for k, n in list(c.nonfinite.items())[:1]
        )
        more = f"; and {len(self.pool) - 4} more" if len(self.pool) > 4 else ""
        return f"every candidate has non-finite values, nothing is left to merge: {shown}{more}"

    # -- the rest of the state dict ----------------------------------------------------------

    def _rest_pool(self) -> dict[str, Candidate]:
        pool = {c.name: c for c in self.pool}
        if self.base_candidate is not None:
            pool.setdefault(self.base_candidate.name, self.base_candidate)
            pool.setdefault("base", self.base_candidate)
        return pool

    def _check_rest_from_name(self) -> None:
        choice = self.plan.rest_from
        pool = self._rest_pool()
        if choice not in ("best", "average") and choice not in pool:
            raise PlanError(
                f"plan.rest_from {choice!r} is not 'best', 'average' or a candidate name "
                f"({', '.join(pool)})"
            )

    def rest_keys(self) -> list[str]:
        """Names outside the plan (tied copies excluded: they follow the name they are tied
        to)."""
        merged = set(self.merged_names)
        return [k for k in self.pool[0].infos if k not in merged and k not in self.tied]

    def output_keys(self) -> list[str]:
        """The names a merged checkpoint holds: every name but tied copies (as Hugging Face's
        ``save_pretrained`` writes them; loading re-ties them)."""
        return [k for k in self.pool[0].infos if k not in self.tied]

    def rest_state(self) -> State:
        """Values of everything outside the plan (unmerged parameters and buffers), from
        plan.rest_from, on the merge's device. Resolved once."""
        if self._rest is None:
            keys, choice = self.rest_keys(), self.plan.rest_from
            if not keys:  # everything merges: nothing to rank or scan for
                self._rest = {}
                return self._rest
            if choice == "best":
                source = self.pool[self.reference]
                rest = {k: source.tensor(k) for k in keys}
            elif choice == "average":
                rest = self._average([c for c in self.pool if c.is_finite], keys)
            else:
                cand = self._rest_pool()[choice]
                if not cand.is_finite:
                    raise PlanError(
                        f"plan.rest_from {choice!r} names a candidate with non-finite values"
                    )
                rest = {k: cand.tensor(k) for k in keys}
            self._rest = {k: v.to(self.device) for k, v in rest.items()}
        return self._rest

    def _average(self, cands: list[Candidate], keys: list[str]) -> State:
        """Mean of floating tensors (accumulated in float32); others from the reference."""
        ref = self.pool[self.reference]
        out = {}
        for k in keys:
            first = ref.tensor(k)
            if not first.is_floating_point():
                out[k] = first
                continue
            total = torch.zeros(first.shape, dtype=torch.float32, device=self.device)
            for c in cands:
                total += c.tensor(k).to(self.device, torch.float32)
            out[k] = (total / len(cands)).to(first.dtype)
        return out

    # -- states and models -------------------------------------------------------------------

    def stack(self, deltas: bool) -> CandidateStack:
        """The merged tensors of the pool stacked once (``deltas``: theta_j - theta_0); one stack
        is kept at a time, so two kinds never hold memory together."""
        if self._stack is None or self._stack[0] != deltas:
            self._stack = None  # free the old buffers before filling new ones
            base = self.require_base("task vectors") if deltas else None
            kind = CandidateStack
            # LoRA adapters stack their small factors, never sharded (their rows are not rows
            # of the merged weight).
            adapters = all(c.is_adapter for c in self.pool)
            if self.shard_stack and distributed.is_distributed() and not adapters:
                from .sharded import ShardedStack as kind  # type: ignore[assignment]
            stack = kind(
                self.pool,
                self.merged_names,
                active=self.active,
                base=base,
                storage_dtype=self.storage_dtype,
                device=self.device,
                progress=self.progress,
            )
            self._stack = (deltas, stack)
        return self._stack[1]

    def release_stack(self) -> None:
        self._stack = None

    def configure(
        self, device: Any = None, storage_dtype: Any = None, shard_stack: bool | None = None
    ) -> None:
        """Move the merge to another device or stack dtype, or shard its stack across the
        processes (a method's own settings); a stack already built for other settings is
        dropped."""
        device, dtype = parse_device(device), parse_dtype(storage_dtype)
        if (device is not None and device != self.device) or (
            dtype is not None and dtype != self.storage_dtype
        ):
            self.device = device or self.device
            self.storage_dtype = dtype or self.storage_dtype
            self._stack, self._rest = None, None
        if shard_stack is not None and shard_stack != self.shard_stack:
            self.shard_stack, self._stack = shard_stack, None

    def model_dtypes(self) -> dict[str, torch.dtype]:
        model = self.require_model("a model state")
        return {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}

    def model_state(self, state: Mapping[str, torch.Tensor]) -> State:
        """``state`` on the merge's device and in the model's dtypes (for functional_call)."""
        dtypes = self.model_dtypes()
        return {
            k: v.to(self.device, dtypes.get(k, v.dtype))
            for k, v in state.items()
            if k not in self.tied  # functional_call ties them from the name they follow
        }

    def assemble(self, merged: Mapping[str, torch.Tensor]) -> State:
        """A full state dict: the merged tensors over the rest, in the model's key order (the
        candidates' without a model) and the candidates' dtypes, on the CPU (what is written)."""
        rest = self.rest_state()
        infos = self.pool[0].infos
        order = self.template.state_dict(keep_vars=True) if self.template is not None else infos
        out = {}
        for k in order:
            if k in self.tied:
                continue
            value = merged[k] if k in merged else rest[k]
            out[k] = value.detach().to("cpu", infos[k].dtype).contiguous()
        for alias, name in self.tied.items():  # the same tensor under both names
            if alias in order:
                out[alias] = out[name]
        if self.tied:
            out = {k: out[k] for k in order}
        return out

    def build_plain(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """A fresh model holding ``state`` as it is (a candidate, with its own statistics)."""
        full = dict(state.items())
        for alias, name in self.tied.items():  # tied copies a merged checkpoint leaves out
            if alias not in full and name in full:
                full[alias] = full[name]
        return model_with_state(self.require_model("building a model"), full, self.device)

    def build(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """A fresh model holding ``state``; BatchNorm statistics re-estimated on the merge set,
        because averaged running statistics do not describe averaged weights."""
        model = self.build_plain(state)
        if self.merge_loader is not None and has_batchnorm(model):
            recalibrate_batchnorm(model, self.merge_loader)
        return model.eval()

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        """The merge objective's loss and metric of ``model`` on ``loader``."""
        return evaluate(model, loader, self.objective_fn)
