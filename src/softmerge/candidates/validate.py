"""Checks on candidates, all from their headers: same keys, shapes and dtypes; fit a model."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from ..errors import CandidateError
from .candidate import Candidate, CandidateSource, load_candidate
from .readers import TensorInfo


def validate_candidates(candidates: Sequence[Candidate]) -> None:
    """Raise CandidateError unless names are unique and all agree on keys, shapes and dtypes.

    Each check runs over all candidates (each against the first) before the next starts, so
    the most basic mismatch is reported first. Only headers are read."""
    dupes = sorted(n for n, c in Counter(c.name for c in candidates).items() if c > 1)
    if dupes:
        raise CandidateError(f"candidate names must be unique; repeated: {', '.join(dupes)}")
    if candidates:
        ref = candidates[0]
        for check in (_check_keys, _check_shapes, _check_dtypes):
            for other in candidates[1:]:
                check(ref, other)


def _check_keys(a: Candidate, b: Candidate) -> None:
    ka, kb = a.infos.keys(), b.infos.keys()
    only_a, only_b = ka - kb, kb - ka
    if not only_a and not only_b:
        return
    key = min(only_a | only_b)
    has, lacks = (a, b) if key in only_a else (b, a)
    raise CandidateError(
        f"{b.source} and {a.source} have different tensors: '{key}' is in {has.source} "
        f"but not in {lacks.source} ({len(only_a)} only in {a.source}, "
        f"{len(only_b)} only in {b.source})"
    )


def _check_shapes(a: Candidate, b: Candidate) -> None:
    for key in sorted(a.infos):
        sa, sb = a.infos[key].shape, b.infos[key].shape
        if sa != sb:
            raise CandidateError(
                f"{b.source}: tensor '{key}' has shape {sb} but {a.source} has {sa}"
            )


def _check_dtypes(a: Candidate, b: Candidate) -> None:
    for key in sorted(a.infos):
        da, db = a.infos[key].dtype, b.infos[key].dtype
        if da != db:
            raise CandidateError(
                f"{b.source}: tensor '{key}' has dtype {dtype_name(db)} "
                f"but {a.source} has {dtype_name(da)}"
            )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "floating"
    if dtype.is_complex:
        return "complex"
    return "boolean" if dtype == torch.bool else "integer"


def model_infos(model: torch.nn.Module) -> dict[str, TensorInfo]:
    """Keys, shapes and dtypes of a model's state dict (works on a weightless meta model)."""
    return {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_fits_model(cand: Candidate, expected: Mapping[str, TensorInfo]) -> None:
    """Raise CandidateError unless ``cand`` has the model's keys, shapes and kinds of dtype
    (a float16 checkpoint fits a float32 model; an integer tensor for a float one does not)."""
    have = cand.infos
    missing = sorted(set(expected) - set(have))
    extra = sorted(set(have) - set(expected))
    if missing or extra:
        what = f"lacks '{missing[0]}'" if missing else f"has unexpected key '{extra[0]}'"
        raise CandidateError(
            f"{cand.source}: checkpoint does not fit the model: it {what} "
            f"({len(missing)} missing, {len(extra)} unexpected keys)"
        )
    for key, ref in expected.items():
        got = have[key]
        if got.shape != ref.shape:
            raise CandidateError(
                f"{cand.source}: tensor '{key}' has shape {got.shape} "
                f"but the model expects {ref.shape}"
            )
        if dtype_kind(got.dtype) != dtype_kind(ref.dtype):
            raise CandidateError(
                f"{cand.source}: tensor '{key}' has dtype {dtype_name(got.dtype)} but the "
                f"model expects {dtype_name(ref.dtype)} ({dtype_kind(ref.dtype)} values)"
            )


def split_base(
    candidates: list[Candidate], wanted: CandidateSource
) -> tuple[Candidate, list[Candidate]]:
    """theta_0 of task vectors: a candidate's name (it leaves the pool) or a checkpoint."""
    if isinstance(wanted, str) and wanted in {c.name for c in candidates}:
        base = next(c for c in candidates if c.name == wanted)
        return base, [c for c in candidates if c.name != wanted]
    base = load_candidate(wanted, name="base")
    validate_candidates([candidates[0], base])  # same keys, shapes, dtypes
    if not base.is_finite:
        raise CandidateError(f"{base.source}: the base model has non-finite values")
    return base, candidates
