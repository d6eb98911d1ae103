"""``plan.align`` and ``plan.repair`` inside a merge: what they do to a merge context.

:func:`align_context` runs once, when a :class:`~softmerge.context.MergeContext` has opened and
checked its candidates and knows the reference (the best-ranked candidate). Every other
candidate (and the base of task-vector merges) is read, permuted to match the reference, and
replaced in the pool by an in-memory candidate holding the permuted tensors; the original's
reader is closed, so one copy of each candidate is in memory. The reference keeps its reader:
its permutation is the identity. Every method, soft merging and the registry's, then merges
the aligned pool.

:func:`repair_merged` is REPAIR (:func:`softmerge.align.repair`) with the context's model,
candidates, spec and merge data. :func:`outcome_weights` and :func:`soft_layer_weights` give the
interpolation weights a method's result implies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from softmerge.align.activation_matching import activation_matching, batch_inputs
from softmerge.align.repair import repair, repair_layers
from softmerge.align.report import AlignmentReport, CandidateAlignment
from softmerge.align.spec import PermutationSpec, permutation_spec
from softmerge.align.ste import SteResult, functional_loss, ste_matching
from softmerge.align.weight_matching import (
    apply_permutation,
    identity_permutation,
    matching_cost,
    merge_many,
    weight_matched_to,
    weight_matching,
)
from softmerge.batches import untouched_order
from softmerge.candidates import Candidate
from softmerge.errors import PlanError

if TYPE_CHECKING:
    from softmerge.context import MergeContext
    from softmerge.plan import GateLayout

__all__ = [
    "align_context",
    "context_spec",
    "example_input",
    "outcome_weights",
    "repair_merged",
    "soft_layer_weights",
]

log = logging.getLogger("softmerge")
State = dict[str, torch.Tensor]
Weights = list[float] | dict[str, list[float]] | None
EXAMPLE_SAMPLES = 2  # samples of the first merge batch the tracer runs (shapes are all it needs)


# ---------------------------------------------------------------------------------------------
# The permutation spec of a context


def example_input(loader: Iterable[Any] | None) -> tuple[Any, ...] | None:
    """The model's positional inputs for the first samples of ``loader``'s first batch (the
    loader's shuffle order is left untouched), or None without data."""
    if loader is None:
        return None
    first = untouched_order(loader, lambda: next(iter(loader), None))
    if first is None:
        return None
    args, _ = batch_inputs(first)
    sliced = tuple(a[:EXAMPLE_SAMPLES] if isinstance(a, torch.Tensor) else a for a in args)
    return sliced or None


def context_spec(ctx: MergeContext) -> PermutationSpec:
    """The context's permutation groups: ``ctx.align_spec`` as given (a
    :class:`PermutationSpec` or its dict form), else derived by tracing the model on the merge
    loader's first batch. Derived once; kept in ``ctx.align_spec``."""
    given = ctx.align_spec
    if isinstance(given, PermutationSpec):
        return given
    if isinstance(given, Mapping):
        ctx.align_spec = PermutationSpec.from_dict(given)
        return ctx.align_spec
    if given is not None:
        raise PlanError(
            f"align_spec must be a PermutationSpec or its dict form, got {type(given).__name__}"
        )
    model = ctx.require_model("permutation alignment")
    try:
        ctx.align_spec = permutation_spec(model, example_input(ctx.merge_loader))
    except PlanError as exc:
        raise PlanError(
            f"plan.align / plan.repair / granularity unit: {exc} "
            "(from Python: MergeContext(..., align_spec=spec))"
        ) from None
    return ctx.align_spec


# ---------------------------------------------------------------------------------------------
# Alignment of a context's pool


def _read(cand: Candidate) -> State:
    state = {k: cand.tensor(k) for k in cand.infos}
    cand.close()
    return state


def _entry(
    index: int, name: str, perm: Mapping[str, torch.Tensor], before: float, after: float
) -> CandidateAlignment:
    moved = sum(int((p != torch.arange(len(p))).sum()) for p in perm.values())
    return CandidateAlignment(
        index=index,
        name=name,
        permutation={g: [int(v) for v in p] for g, p in perm.items()},
        cost_before=before,
        cost_after=after,
        moved_units=moved,
    )


def _permutation(
    ctx: MergeContext, spec: PermutationSpec, reference: State, state: State
) -> dict[str, torch.Tensor]:
    """One candidate's permutation; the base of an STE merge is weight-matched (it is not
    part of the soup STE scores)."""
    if ctx.plan.align in ("weight_matching", "ste", "merge_many"):
        return weight_matching(spec, reference, state, seed=ctx.seed)
    loader = ctx.require_data("plan.align 'activation_matching'")
    model = ctx.require_model("plan.align 'activation_matching'")
    return untouched_order(
        loader, lambda: activation_matching(model, spec, reference, state, loader)
    )


def _aligned(cand: Candidate, state: State) -> Candidate:
    return Candidate(cand.name, state, source=cand.source, hf_folder=cand.hf_folder)


def align_context(ctx: MergeContext) -> AlignmentReport:
    """Permute every finite candidate of ``ctx.pool`` (and ``ctx.base_candidate``) to match the
    reference candidate, in place; returns the report (permutations, cost before / after).

    Non-finite candidates are left as they are (they never merge) and reported as skipped."""
    start = time.perf_counter()
    method = ctx.plan.align
    adapters = [c.name for c in ctx.pool if getattr(c, "is_adapter", False)]
    if adapters:
        raise PlanError(
            f"plan.align {method!r}: candidate {adapters[0]!r} is a LoRA adapter; adapters of "
            "one base share its hidden units, so there is nothing to align (set plan.align: none)"
        )
    spec = context_spec(ctx)
    index = ctx.reference
    pool, active = ctx.pool, ctx.active
    reference_cand = pool[index]
    reference = _read(reference_cand)
    spec.check(reference, f"candidate {reference_cand.name}")
    report = AlignmentReport(
        method=method,
        reference=index,
        reference_name=reference_cand.name,
        groups={name: g.size for name, g in spec.groups.items()},
        seed=ctx.seed,
    )
    # MergeMany and STE search with every candidate at once: their permutations by name, and
    # the states they read, which are permuted from memory instead of being read again.
    many: dict[str, dict[str, torch.Tensor]] | None = None
    read: dict[str, State] = {}
    if method == "merge_many":
        many, read = _merge_many(ctx, spec, reference)
    elif method == "ste":
        many, read, report.ste = _ste(ctx, spec, reference)
    for i, cand in enumerate(pool):
        if i == index:
            report.candidates.append(_entry(i, cand.name, identity_permutation(spec), 0.0, 0.0))
        elif not active[i]:
            report.skipped.append(cand.name)
        else:
            state = read.pop(cand.name, None)
            pool[i], entry = _align_one(ctx, spec, reference, cand, i, many, state)
            report.candidates.append(entry)
    base = ctx.base_candidate
    if base is not None:
        state = read.pop(base.name, None)
        aligned_base, entry = _align_one(ctx, spec, reference, base, -1, many, state)
        ctx.base_candidate, report.base = aligned_base, entry
    report.seconds = round(time.perf_counter() - start, 3)
    log.info(
        "aligned %d candidates to %s by %s in %.1f s",
        len(report.candidates) - 1,
        reference_cand.name,
        method,
        report.seconds,
    )
    return report


def _align_one(
    ctx: MergeContext,
    spec: PermutationSpec,
    reference: State,
    cand: Candidate,
    index: int,
    many: dict[str, dict[str, torch.Tensor]] | None,
    state: State | None = None,
) -> tuple[Candidate, CandidateAlignment]:
    """Permute one candidate (``state``: its weights when a search already read them)."""
    if state is None:
        state = _read(cand)
        spec.check(state, f"candidate {cand.name}")
    perm = many.get(cand.name) if many is not None else None
    if perm is None:
        perm = _permutation(ctx, spec, reference, state)
    aligned = apply_permutation(spec, perm, state)
    before = matching_cost(spec, reference, state)
    after = matching_cost(spec, reference, aligned)
    del state
    return _aligned(cand, aligned), _entry(index, cand.name, perm, before, after)


def _read_all(
    ctx: MergeContext, spec: PermutationSpec, cands: list[Candidate], reference: State
) -> tuple[list[State], int]:
    """Every candidate's weights for a search over all of them (the reference as given), and
    the reference's position among them."""
    ref_cand = ctx.pool[ctx.reference]
    states = []
    for c in cands:
        if c is ref_cand:  # read and checked by align_context
            states.append(reference)
            continue
        states.append(_read(c))
        spec.check(states[-1], f"candidate {c.name}")
    return states, next(i for i, c in enumerate(cands) if c is ref_cand)


def _by_name(
    ctx: MergeContext, cands: list[Candidate], states: list[State], perms: list
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, State]]:
    """Permutations by candidate name, and the states read (the reference's left out)."""
    ref_cand = ctx.pool[ctx.reference]
    read = {c.name: s for c, s in zip(cands, states, strict=True) if c is not ref_cand}
    return {c.name: p for c, p in zip(cands, perms, strict=True)}, read


def _merge_many(
    ctx: MergeContext, spec: PermutationSpec, reference: State
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, State]]:
    """MergeMany needs every model at once (base included): permutations and states by name.
    It starts from weight matching to the reference (measured on S2, MNIST MLPs: the aligned
    uniform soup 1.9 pt below the best single model from the weight matching alone, 1.0 pt
    after MergeMany from there, 1.1 pt after MergeMany from the identity)."""
    cands = [c for c, ok in zip(ctx.pool, ctx.active, strict=True) if ok]
    if ctx.base_candidate is not None:
        cands.append(ctx.base_candidate)
    states, ref = _read_all(ctx, spec, cands, reference)
    init = weight_matched_to(spec, states, ref, seed=ctx.seed)
    perms = merge_many(spec, states, seed=ctx.seed, reference=ref, init=init)
    return _by_name(ctx, cands, states, perms)


def _ste(
    ctx: MergeContext, spec: PermutationSpec, reference: State
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, State], dict[str, Any]]:
    """STE matching of the finite candidates (the reference as it is), against the uniform
    soup's loss under the merge objective on the merge data: permutations and states by
    candidate name, and the search's note. The merge loader's shuffle order is left
    untouched."""
    loader = ctx.require_data("plan.align 'ste'")
    model = ctx.require_model("plan.align 'ste'")
    cands = [c for c, ok in zip(ctx.pool, ctx.active, strict=True) if ok]
    states, ref = _read_all(ctx, spec, cands, reference)
    loss_of = functional_loss(model, ctx.objective_fn, ctx.device, prepare=ctx.model_state)

    def search() -> SteResult:
        return ste_matching(
            spec,
            states,
            loss_of,
            loader,
            reference=ref,
            steps=ctx.plan.align_steps,
            seed=ctx.seed,
        )

    result = untouched_order(loader, search)
    perms, read = _by_name(ctx, cands, states, result.perms)
    return perms, read, result.note()


# ---------------------------------------------------------------------------------------------
# REPAIR of a merged state


def _finite_weights(ctx: MergeContext, weights: Sequence[float]) -> list[float]:
    return [float(w) if ok else 0.0 for w, ok in zip(weights, ctx.active, strict=True)]


def outcome_weights(ctx: MergeContext, info: Mapping[str, Any]) -> list[float]:
    """Interpolation weights a registry method's result implies: greedy soup's kept
    candidates, the learned soup's mean weights, else every finite candidate alike."""
    names = ctx.candidate_names
    if info.get("kept"):
        kept = set(info["kept"])
        return _finite_weights(ctx, [1.0 if n in kept else 0.0 for n in names])
    mean = info.get("mean_weight")
    if isinstance(mean, Mapping) and all(n in mean for n in names):
        return _finite_weights(ctx, [max(0.0, float(mean[n])) for n in names])
    return _finite_weights(ctx, [1.0] * len(names))


def soft_layer_weights(
    ctx: MergeContext, layout: GateLayout, mixing: torch.Tensor, delta: bool
) -> dict[str, list[float]]:
    """Per layer REPAIR corrects: the candidates' mixing weights of that layer's weight tensor
    (mean over its channel gates). Layers outside the plan take the weights of where their
    tensors come from (``rest_from``). With ``delta``, the base comes first and gets what the
    task vectors leave, ``max(0, 1 - sum_j w_j)``."""
    model = ctx.require_model("plan.repair")
    layers = repair_layers(model, context_spec(ctx))
    count = len(ctx.pool)
    merged: dict[str, list[float]] = {}
    for slot in layout.slots:
        if slot.name.endswith(".weight"):
            cols = mixing[:, slot.start : slot.start + slot.count].detach().double()
            merged[slot.name.rsplit(".", 1)[0]] = cols.mean(1).tolist()
    rest = _rest_weights(ctx, count)
    out = {}
    for layer in layers:
        w = _finite_weights(ctx, merged.get(layer, rest))
        out[layer] = [max(0.0, 1.0 - sum(w)), *w] if delta else w
    return out


def _rest_weights(ctx: MergeContext, count: int) -> list[float]:
    choice = ctx.plan.rest_from
    if choice == "average":
        return [1.0] * count
    names = ctx.candidate_names
    chosen = ctx.reference if choice == "best" or choice not in names else names.index(choice)
    return [1.0 if i == chosen else 0.0 for i in range(count)]


def repair_merged(
    ctx: MergeContext, state: Mapping[str, torch.Tensor], weights: Weights, *, delta: bool = False
) -> tuple[State, dict[str, Any]]:
    """REPAIR ``state`` (a full merged state dict) towards the candidates' statistics on the
    merge data, interpolated with ``weights`` (per candidate, or per layer; with ``delta`` the
    base comes first). Returns the repaired state (CPU, the state's dtypes) and a note for the
    reports. The merge loader's shuffle order is left untouched."""
    model = ctx.require_model("plan.repair")
    loader = ctx.require_data("plan.repair")
    spec = context_spec(ctx)
    cands = [c.state for c in ctx.pool]
    if delta:
        cands.insert(0, ctx.require_base("plan.repair with combine 'delta'").state)
    start = time.perf_counter()
    repaired = untouched_order(loader, lambda: repair(model, state, cands, weights, loader, spec))
    for c in [*ctx.pool, *([ctx.base_candidate] if ctx.base_candidate is not None else [])]:
        c.close()
    # In the state's own key order: a streaming writer expects the candidates' order.
    out = {k: repaired[k].detach().to("cpu", state[k].dtype).contiguous() for k in state}
    note = {
        "layers": repair_layers(model, spec),
        "seconds": round(time.perf_counter() - start, 3),
        "weights": weights,
    }
    return out, note
