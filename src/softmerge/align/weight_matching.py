"""Weight matching (Ainsworth, Hayase, Srinivasa, "Git Re-Basin", ICLR 2023).

Find, for every permutation group, the permutation of ``other``'s units that makes its weights
closest to ``reference``'s. For one group with the others fixed, the problem is a linear
assignment: unit ``i`` of the reference and unit ``j`` of the other score the summed inner
product of every weight slice they own, ``A[i, j] = sum_k <ref_k[i], other_k[j]>``, and
``scipy.optimize.linear_sum_assignment`` maximises ``sum_i A[i, perm[i]]``. The groups are
solved in turn (coordinate descent, a seeded random order per sweep) until a full sweep
improves none of them. Starting from the identity and accepting only improvements, the total
inner product never decreases, so the distance to the reference never grows.

Convention: a permutation ``perm`` of a group is an index tensor; the aligned tensor is
``other.index_select(axis, perm)``, i.e. aligned unit ``i`` is the other's unit ``perm[i]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from scipy.optimize import linear_sum_assignment

from softmerge.align.spec import AxisRef, PermutationSpec
from softmerge.errors import PlanError

__all__ = [
    "apply_permutation",
    "identity_permutation",
    "matching_cost",
    "merge_many",
    "permute_axis",
    "weight_matched_to",
    "weight_matching",
]

Perms = dict[str, torch.Tensor]
State = Mapping[str, torch.Tensor]


def _block_index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Index of every entry along an axis whose units are ``block`` consecutive entries."""
    if block == 1:
        return perm
    offsets = torch.arange(block, device=perm.device)
    return (perm.unsqueeze(1) * block + offsets).reshape(-1)


def permute_axis(tensor: torch.Tensor, ref: AxisRef, perm: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the units along ``ref.axis`` reordered by ``perm`` (a new tensor)."""
    return tensor.index_select(ref.axis, _block_index(perm.to(tensor.device), ref.block))


def identity_permutation(spec: PermutationSpec) -> Perms:
    return {name: torch.arange(g.size) for name, g in spec.groups.items()}


def _check_perms(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> None:
    for name, group in spec.groups.items():
        perm = perms.get(name)
        if perm is None:
            raise PlanError(f"no permutation given for group {name!r}")
        perm = torch.as_tensor(perm)
        expected = torch.arange(group.size)
        if perm.shape != (group.size,) or not torch.equal(perm.sort().values.cpu(), expected):
            raise PlanError(
                f"permutation of group {name!r} is not a permutation of 0..{group.size - 1}"
            )


def apply_permutation(
    spec: PermutationSpec, perms: Mapping[str, torch.Tensor], state: State
) -> dict[str, torch.Tensor]:
    """A new state dict with every group's axes permuted; ``state`` is left untouched.

    Keys outside the spec are returned as clones (a result that shares no storage)."""
    _check_perms(spec, perms)
    spec.check(state)
    out = {k: v.clone() for k, v in state.items()}
    for key, refs in spec.axes_by_key().items():
        tensor = state[key]
        for name, ref in refs:
            tensor = permute_axis(tensor, ref, torch.as_tensor(perms[name]))
        out[key] = tensor.contiguous()
    return out


def _unit_rows(tensor: torch.Tensor, ref: AxisRef, size: int) -> torch.Tensor:
    """(size, -1) float64 view: row i holds every entry of unit i along ``ref.axis``."""
    return tensor.movedim(ref.axis, 0).reshape(size, -1).double()


def _matched_keys(spec: PermutationSpec, keys: Sequence[str] | None) -> set[str]:
    if keys is not None:
        return set(keys)
    return set(spec.permuted_keys()) - set(spec.buffers)


def _others_applied(
    tensor: torch.Tensor,
    refs: list[tuple[str, AxisRef]],
    skip: AxisRef,
    perms: Perms,
) -> torch.Tensor:
    """``tensor`` with the current permutations of every axis but ``skip`` applied."""
    for name, ref in refs:
        if ref != skip:
            tensor = permute_axis(tensor, ref, perms[name])
    return tensor


def _assignment_scores(
    spec: PermutationSpec,
    name: str,
    reference: State,
    other: State,
    perms: Perms,
    by_key: dict[str, list[tuple[str, AxisRef]]],
    matched: set[str],
) -> torch.Tensor:
    """A[i, j]: summed inner products of reference unit i and other unit j over the group's
    weights, the other groups' current permutations applied."""
    size = spec.groups[name].size
    scores = torch.zeros(size, size, dtype=torch.float64)
    for ref in spec.groups[name].axes:
        if ref.key not in matched:
            continue
        w_ref = _unit_rows(reference[ref.key], ref, size)
        w_other = _others_applied(other[ref.key], by_key[ref.key], ref, perms)
        scores += w_ref @ _unit_rows(w_other, ref, size).T
    return scores


def weight_matching(
    spec: PermutationSpec,
    reference: State,
    other: State,
    *,
    max_iter: int = 100,
    seed: int = 0,
    keys: Sequence[str] | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
) -> Perms:
    """Permutations (group name -> index tensor) that bring ``other`` close to ``reference``.

    ``keys`` restricts the weights that are compared (default: every permuted key except the
    spec's buffers, i.e. BatchNorm running statistics). ``init`` starts from given
    permutations instead of the identity. Deterministic given ``seed`` (the group order)."""
    spec.check(reference, "reference")
    spec.check(other, "candidate")
    if max_iter < 1:
        raise PlanError(f"max_iter must be >= 1, got {max_iter}")
    perms = {k: torch.as_tensor(v).clone() for k, v in (init or identity_permutation(spec)).items()}
    _check_perms(spec, perms)
    by_key = spec.axes_by_key()
    matched = _matched_keys(spec, keys)
    names = list(spec.groups)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        improved = False
        for index in torch.randperm(len(names), generator=generator).tolist():
            name = names[index]
            scores = _assignment_scores(spec, name, reference, other, perms, by_key, matched)
            _, cols = linear_sum_assignment(scores.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            rows = torch.arange(len(new))
            gain = float(scores[rows, new].sum() - scores[rows, perms[name]].sum())
            # A relative tolerance: rounding must not count as progress (endless flipping).
            if gain > 1e-12 * max(1.0, float(scores.abs().sum())):
                perms[name] = new
                improved = True
        if not improved:
            break
    return perms


def weight_matched_to(
    spec: PermutationSpec, states: Sequence[State], reference: int, *, seed: int = 0
) -> list[Perms]:
    """One permutation per model: weight matching to ``states[reference]`` (the identity for
    the reference itself). Where MergeMany and STE matching start from."""
    return [
        identity_permutation(spec)
        if i == reference
        else weight_matching(spec, states[reference], state, seed=seed)
        for i, state in enumerate(states)
    ]


def matching_cost(
    spec: PermutationSpec, reference: State, state: State, keys: Sequence[str] | None = None
) -> float:
    """Squared L2 distance ``sum_k ||reference[k] - state[k]||^2`` over the permuted weights
    (every key of the spec except its buffers, or ``keys``): what weight matching minimises.
    Compare a candidate's cost before and after :func:`apply_permutation`."""
    total = 0.0
    for key in sorted(_matched_keys(spec, keys)):
        diff = reference[key].double() - state[key].double()
        total += float((diff * diff).sum())
    return total


def merge_many(
    spec: PermutationSpec,
    states: Sequence[State],
    *,
    max_iter: int = 100,
    rounds: int = 20,
    seed: int = 0,
    reference: int = 0,
    init: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> list[Perms]:
    """Align several models to their common average (Git Re-Basin's MergeMany, Alg. 3).

    Each round, every model in turn (seeded random order) is matched to the mean of all the
    others (aligned so far), until a round changes no permutation. Returns one permutation per
    model: ``apply_permutation(spec, perms[i], states[i])`` are the aligned models. The result
    is only defined up to one common permutation, so model ``reference`` keeps its own unit order:
    all permutations are composed so that its permutation is the identity. ``init`` (one
    permutation per model, e.g. weight matching to the reference) replaces the identity start."""
    if len(states) < 2:
        raise PlanError(f"merge_many needs at least 2 models, got {len(states)}")
    if not 0 <= reference < len(states):
        raise PlanError(f"reference {reference} is outside 0..{len(states) - 1}")
    for i, state in enumerate(states):
        spec.check(state, f"candidate {i}")
    if init is not None and len(init) != len(states):
        raise PlanError(f"merge_many got {len(init)} initial permutations for {len(states)} models")
    perms = [
        {k: torch.as_tensor(v).clone() for k, v in p.items()}
        for p in (init or [identity_permutation(spec) for _ in states])
    ]
    for p in perms:
        _check_perms(spec, p)
    aligned = [apply_permutation(spec, p, s) for p, s in zip(perms, states, strict=True)]
    keys = spec.permuted_keys()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        changed = False
        for i in torch.randperm(len(states), generator=generator).tolist():
            mean = {
                k: sum(aligned[j][k].double() for j in range(len(states)) if j != i)
                / (len(states) - 1)
                for k in keys
            }
            new = weight_matching(
                spec, mean, states[i], max_iter=max_iter, seed=seed, init=perms[i]
            )
            if any(not torch.equal(new[g], perms[i][g]) for g in spec.groups):
                changed = True
                perms[i] = new
                aligned[i] = apply_permutation(spec, new, states[i])
        if not changed:
            break
    # Fix the global symmetry: express every permutation relative to the reference's.
    inverse = {g: torch.argsort(p) for g, p in perms[reference].items()}
    return [{g: p[inverse[g]] for g, p in perm.items()} for perm in perms]
