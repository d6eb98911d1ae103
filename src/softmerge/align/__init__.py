"""Permutation alignment of independently trained candidates, and REPAIR after merging.

Hidden units of networks trained from different initialisations are permuted relative to each
other, so averaging them mixes unrelated units. Alignment permutes every candidate's hidden
units to match a reference candidate before any merge method runs; the candidates still compute
exactly the functions they computed before.

>>> spec = permutation_spec(model, example_batch)              # derived by torch.fx tracing
>>> aligned, report = align_candidates(model, states, reference_index=0, spec=spec)
>>> report.to_dict()["candidates"][1]["cost_after"]            # squared L2 to the reference
>>> merged = {k: sum(s[k] for s in aligned) / len(aligned) for k in aligned[0]}
>>> merged = repair(model, merged, aligned, None, loader, spec)  # REPAIR the statistics

See docs/alignment.md for the algorithm and the operations supported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from softmerge.align.activation_matching import activation_matching, batch_inputs
from softmerge.align.pool import align_context, context_spec, repair_merged
from softmerge.align.repair import repair, repair_layers
from softmerge.align.report import COST, AlignmentReport, CandidateAlignment
from softmerge.align.spec import (
    ActivationPoint,
    AxisRef,
    PermGroup,
    PermutationSpec,
    permutation_spec,
)
from softmerge.align.ste import SteResult, functional_loss, ste_matching
from softmerge.align.weight_matching import (
    apply_permutation,
    identity_permutation,
    matching_cost,
    merge_many,
    weight_matching,
)
from softmerge.errors import PlanError
from softmerge.objectives import resolve_objective

__all__ = [
    "COST",
    "METHODS",
    "ActivationPoint",
    "AlignmentReport",
    "AxisRef",
    "CandidateAlignment",
    "PermGroup",
    "PermutationSpec",
    "SteResult",
    "activation_matching",
    "align_candidates",
    "align_context",
    "apply_permutation",
    "context_spec",
    "functional_loss",
    "identity_permutation",
    "matching_cost",
    "merge_many",
    "permutation_spec",
    "repair",
    "repair_layers",
    "repair_merged",
    "ste_matching",
    "weight_matching",
]

METHODS = ("weight_matching", "activation_matching", "merge_many", "ste")


def _example_from(loader: Iterable[Any] | None) -> tuple | None:
    if loader is None:
        return None
    first = next(iter(loader), None)
    if first is None:
        return None
    args, _ = batch_inputs(first)
    return args or None


def _permutations(
    method: str,
    model: nn.Module,
    spec: PermutationSpec,
    states: Sequence[Mapping[str, torch.Tensor]],
    reference_index: int,
    loader: Iterable[Any] | None,
    seed: int,
    max_iter: int,
) -> list[dict[str, torch.Tensor]]:
    if method == "merge_many":
        return merge_many(spec, states, max_iter=max_iter, seed=seed, reference=reference_index)
    if method == "ste":  # against the uniform soup's cross-entropy on the loader
        if loader is None:
            raise PlanError("STE matching needs data: pass loader=")
        loss_of = functional_loss(model, resolve_objective("classification"))
        return ste_matching(
            spec, states, loss_of, loader, reference=reference_index, seed=seed
        ).perms
    reference = states[reference_index]
    perms = []
    for i, state in enumerate(states):
        if i == reference_index:
            perms.append(identity_permutation(spec))
        elif method == "weight_matching":
            perms.append(weight_matching(spec, reference, state, max_iter=max_iter, seed=seed))
        else:
            if loader is None:
                raise PlanError("activation matching needs data: pass loader=")
            perms.append(activation_matching(model, spec, reference, state, loader))
    return perms


def align_candidates(
    model: nn.Module,
    states: Sequence[Mapping[str, torch.Tensor]],
    reference_index: int = 0,
    method: str = "weight_matching",
    example_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
    spec: PermutationSpec | None = None,
    loader: Iterable[Any] | None = None,
    seed: int = 0,
    *,
    names: Sequence[str] | None = None,
    max_iter: int = 100,
) -> tuple[list[dict[str, torch.Tensor]], AlignmentReport]:
    """Permute every candidate's hidden units to match ``states[reference_index]``.

    ``method``: ``weight_matching`` (Git Re-Basin coordinate descent on the weights),
    ``activation_matching`` (correlation of activations on ``loader``), ``merge_many`` (every
    candidate matched to the average of the others, iterated; the reference keeps its unit
    order) or ``ste`` (weight matching, then the straight-through search that lowers the
    uniform soup's cross-entropy on ``loader``: :func:`ste_matching`). ``spec`` defaults to
    :func:`permutation_spec` of ``model`` with ``example_input`` (or the loader's first batch).
    Returns new state dicts (the reference's a copy; inputs are untouched) and the report.
    Each aligned candidate computes the same function as before."""
    if method not in METHODS:
        raise PlanError(f"alignment method must be one of {METHODS}, got {method!r}")
    if len(states) < 2:
        raise PlanError(f"alignment needs at least 2 candidates, got {len(states)}")
    if not 0 <= reference_index < len(states):
        raise PlanError(f"reference_index {reference_index} is outside 0..{len(states) - 1}")
    labels = list(names) if names is not None else [f"candidate{i}" for i in range(len(states))]
    if len(labels) != len(states):
        raise PlanError(f"got {len(labels)} names for {len(states)} candidates")
    if spec is None:
        example = example_input if example_input is not None else _example_from(loader)
        spec = permutation_spec(model, example)
    for label, state in zip(labels, states, strict=True):
        spec.check(state, f"candidate {label}")
    perms = _permutations(method, model, spec, states, reference_index, loader, seed, max_iter)
    aligned = [apply_permutation(spec, p, s) for p, s in zip(perms, states, strict=True)]
    reference = aligned[reference_index]
    report = AlignmentReport(
        method=method,
        reference=reference_index,
        reference_name=labels[reference_index],
        groups={name: g.size for name, g in spec.groups.items()},
        seed=seed,
    )
    for i, (perm, state) in enumerate(zip(perms, states, strict=True)):
        moved = sum(int((p != torch.arange(len(p))).sum()) for p in perm.values())
        report.candidates.append(
            CandidateAlignment(
                index=i,
                name=labels[i],
                permutation={g: [int(v) for v in p] for g, p in perm.items()},
                cost_before=matching_cost(spec, states[reference_index], state),
                cost_after=matching_cost(spec, reference, aligned[i]),
                moved_units=moved,
            )
        )
    return aligned, report
