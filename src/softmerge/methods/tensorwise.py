"""Per-tensor merge methods: pure functions over one tensor from each candidate.

Each function merges the tensors that several checkpoints hold under one name. The numerics
follow mergekit 0.1.5 (same defaults, same order of operations, same dtype rules) so that a
merge made here can be checked against a mergekit merge of the same checkpoints. Where mergekit
departs from the original paper (DARE's rescaling, for instance) the docstring says so.

Dtype rule shared by all methods: the inputs are promoted to a common dtype and the result has
that dtype. ``linear`` and ``slerp`` compute in float32 (float64 for float64 inputs), while the
task-vector methods and ``model_stock`` compute in the promoted dtype itself, as mergekit does.

``METHODS`` maps mergekit's method names to wrappers with one call signature,
``fn(tensors, base, **params)``, taking mergekit's parameter names (``weight``, ``density``,
``t``, ``lambda``...). A scalar ``weight`` or ``density`` applies to every candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "METHODS",
    "dare",
    "linear",
    "model_stock",
    "slerp",
    "task_arithmetic",
    "ties",
]

# mergekit's thresholds; changing any of them breaks parity.
_SLERP_DOT_THRESHOLD = 0.9995
_RESCALE_EPS = 1e-7
_WEIGHT_SUM_EPS = 1e-8
_COSINE_NORM_FLOOR = 1e-6
_SINGULAR_EPS = 1e-6

_CONSENSUS_RULES = ("sum", "count")
# Entries per step of the per-entry part of the task-vector methods (see _combine_task_vectors).
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- helpers


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """Promote like torch's binary ops, so a float16 candidate never downcasts a float32 one."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"merging needs floating-point tensors, got {dtype}")
    return dtype


def _aligned(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Check shapes and cast every tensor to the common dtype."""
    if not tensors:
        raise ValueError("at least one tensor is needed")
    shape = tensors[0].shape
    for tensor in tensors[1:]:
        if tensor.shape != shape:
            raise ValueError(
                f"tensors must share one shape, got {tuple(shape)} and {tuple(tensor.shape)}"
            )
    dtype = _common_dtype(tensors)
    return [tensor.to(dtype) for tensor in tensors]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types lose too much when summed, so accumulate in float32 unless given float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_candidate(
    value: float | Sequence[float] | None, count: int, name: str, default: float
) -> list[float]:
    """Broadcast a scalar (or the default, for None) to one value per candidate."""
    if value is None:
        return [default] * count
    if isinstance(value, (int, float)):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise ValueError(f"{name} needs one value per candidate: {count}, got {len(values)}")
    return values


def _check_densities(densities: Sequence[float]) -> None:
    for density in densities:
        if density < 0:
            raise ValueError(f"density must be >= 0, got {density}")


@dataclass
class _Mask:
    """What sparsifying one task vector keeps: a 0/1 mask (None: everything), the L1 rescale
    factor (None: none), and the dtype the masking is computed in. Stored instead of the
    sparsified delta (a bool per entry rather than a float), and applied chunk by chunk."""

    keep: Tensor | None
    ratio: Tensor | None = None
    work: torch.dtype | None = None
    zero: bool = False

    def apply(self, delta: Tensor, part: slice) -> Tensor:
        if self.zero:
            return torch.zeros_like(delta)
        if self.keep is None:
            return delta
        work = self.work or delta.dtype
        kept = delta.to(work) * self.keep[part].to(work)
        if self.ratio is not None:
            kept = kept * self.ratio
        return kept.to(delta.dtype)


def _masked(delta: Tensor, keep: Tensor, rescale: bool, work: torch.dtype) -> _Mask:
    """The mask of ``delta`` and, with rescale, the factor restoring its L1 norm (mergekit's
    rule). A delta that is (nearly) all zeros before or after masking is left unscaled rather
    than blown up by a ratio of tiny numbers."""
    flat_keep = keep.reshape(-1).bool()
    if not rescale:
        return _Mask(flat_keep, None, work)
    d = delta.to(work)
    before = d.abs().sum()
    after = (d * keep.to(work)).abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return _Mask(flat_keep, None, work)
    return _Mask(flat_keep, before / after, work)


def _keep_largest(delta: Tensor, density: float, rescale: bool) -> _Mask:
    """TIES trimming: keep the ``density`` fraction of entries with the largest magnitude."""
    if density >= 1:
        return _Mask(None)
    if density <= 0 or delta.numel() == 0:
        return _Mask(None, zero=True)
    # At least one entry survives, so a tiny density never silently empties a tensor.
    count = max(1, int(density * delta.numel()))
    # Magnitudes in the delta's own dtype: exact, and selection (kthvalue) handles half types.
    magnitude = delta.abs().reshape(-1)
    keep = _largest(magnitude, count)
    del magnitude
    return _masked(delta, keep.reshape(delta.shape), rescale, delta.dtype)


def _largest(magnitude: Tensor, count: int) -> Tensor:
    """A mask of the ``count`` largest entries; ties resolved by position, first kept.

    That is exactly what a stable descending sort keeps (``argsort(stable=True)[:count]``), but
    found by selection (linear time) instead of a full sort: the threshold value, every entry
    above it, and the first entries equal to it until ``count`` are kept."""
    n = magnitude.numel()
    if count >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if bool(torch.isnan(magnitude.max())):  # NaN sorts above every number: keep the sort
        top = torch.argsort(magnitude.float(), descending=True, stable=True)[:count]
        keep = torch.zeros(n, dtype=torch.bool, device=magnitude.device)
        keep[top] = True
        return keep
    threshold = _kth_smallest(magnitude, n - count)
    keep = magnitude > threshold
    _keep_first_ties(keep, magnitude, threshold, count - int(keep.sum()))
    return keep


def _keep_first_ties(keep: Tensor, magnitude: Tensor, threshold: float, wanted: int) -> None:
    """Set ``keep`` at the first ``wanted`` entries equal to ``threshold`` (by position),
    a chunk at a time: in half precision millions of entries can tie."""
    for start in range(0, magnitude.numel(), _CHUNK):
        if wanted <= 0:
            return
        tied = (magnitude[start : start + _CHUNK] == threshold).nonzero().flatten()[:wanted]
        keep[start + tied] = True
        wanted -= tied.numel()


def _kth_smallest(values: Tensor, k: int) -> float:
    """The value at position ``k`` (0-based) of ``values`` (>= 0) sorted ascending, by selection.

    On the CPU numpy's in-place introselect on one float copy; ``torch.kthvalue`` would also
    build an int64 index for every entry (8 bytes each: 256 MiB for a 32M-entry embedding)."""
    if values.device.type != "cpu":
        return float(torch.kthvalue(values, k + 1).values)
    if values.dtype in (torch.float16, torch.bfloat16):
        # Magnitudes are >= 0, and the bit patterns of non-negative floats order like their
        # values: select among the 16-bit patterns (half the memory of a float copy).
        bits = values.detach().view(torch.int16).numpy().copy()
        bits.partition(k)
        return float(torch.tensor(bits[k], dtype=torch.int16).view(values.dtype))
    work = torch.float64 if values.dtype == torch.float64 else torch.float32
    scratch = values.detach().to(work, copy=True).numpy()
    scratch.partition(k)
    return float(scratch[k])


def _drop_random(
    delta: Tensor, density: float, rescale: bool, generator: torch.Generator | None
) -> _Mask:
    """DARE: keep each entry independently with probability ``density``.

    One ``torch.bernoulli`` call over a tensor filled with ``density`` per candidate, in
    candidate order: with the same seed this draws exactly the mask mergekit draws.
    """
    if density >= 1:
        return _Mask(None)
    # CPU bernoulli lacks float16, so draw in float32 there; bfloat16 keeps its own. Masks are
    # drawn where the generator lives (a CPU generator: on the CPU), so a seed gives the same
    # mask on every device.
    draw_on = generator.device if generator is not None else delta.device
    keep_native = draw_on.type != "cpu" or delta.dtype == torch.bfloat16
    work = delta.dtype if keep_native else torch.float32
    probability = torch.full(delta.shape, density, dtype=work, device=draw_on)
    keep = torch.bernoulli(probability, generator=generator).to(delta.device)
    del probability
    return _masked(delta, keep, rescale, work)


def _sign_agreement(weighted: Tensor, rule: str) -> Tensor:
    """TIES sign election: True where a candidate's delta has the elected sign.

    ``sum`` elects the sign of the summed (weighted) deltas, as in the paper; ``count`` elects
    the sign most candidates have. Zero sums elect +. Zero deltas never agree, so they do not
    count towards the normalising weight either.
    """
    signs = weighted.sign()
    if rule == "sum":
        votes = weighted.sum(dim=0)
    elif rule == "count":
        votes = signs.sum(dim=0)
    else:
        raise ValueError(f"majority must be one of {_CONSENSUS_RULES}, got {rule!r}")
    elected = torch.where(votes >= 0, 1.0, -1.0).to(signs.dtype)
    return signs == elected


def _combine_task_vectors(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None,
    sparsify: Callable[[Tensor, int], _Mask] | None,
    consensus: str | None,
    normalize: bool,
    lambda_: float,
) -> Tensor:
    """The task-vector family: base + lambda * combine(weight_i * sparsify(tensor_i - base)).

    ``sparsify(delta, index)`` trims candidate ``index``'s delta; ``consensus`` (if any) drops
    entries whose sign disagrees with the elected one. ``normalize`` divides by the weights
    that contributed to each entry, so equal weights give a mean rather than a sum.

    Every step after sparsifying is per entry, so it runs over chunks of ``_CHUNK`` entries:
    a large tensor (an embedding) never has its N deltas, their weighted copies and their
    signs in memory at once, and the result is the same, entry for entry."""
    aligned = _aligned([base, *tensors])
    base, candidates = aligned[0], aligned[1:]
    if not candidates:
        return base
    w = _per_candidate(weights, len(candidates), "weights", 1.0)
    masks = [
        sparsify(candidate - base, index) if sparsify else _Mask(None)
        for index, candidate in enumerate(candidates)
    ]
    # The weights live in the tensors' dtype and broadcast over all but the candidate axis.
    coefficient = torch.tensor(w, dtype=base.dtype, device=base.device).reshape(-1, 1)
    flat_base = base.reshape(-1)
    flat = [c.reshape(-1) for c in candidates]
    out = torch.empty_like(flat_base)
    for start in range(0, flat_base.numel(), _CHUNK):
        part = slice(start, start + _CHUNK)
        b = flat_base[part]
        deltas = [m.apply(c[part] - b, part) for m, c in zip(masks, flat, strict=True)]
        stacked = torch.stack(deltas) * coefficient
        if consensus is not None:
            agree = _sign_agreement(stacked, consensus)
            mixed = (stacked * agree).sum(dim=0)
            divisor = (coefficient * agree).sum(dim=0)
            divisor[divisor == 0] = 1  # no candidate agrees: mixed is 0 there anyway
        else:
            mixed = stacked.sum(dim=0)
            divisor = coefficient.sum(dim=0)
            divisor[divisor.abs() < _WEIGHT_SUM_EPS] = 1  # weights cancelling out
        if normalize:
            mixed = mixed / divisor
        if lambda_ != 1:
            mixed = mixed * lambda_
        out[part] = b + mixed
    return out.reshape(base.shape)


# --------------------------------------------------------------------------- methods


def linear(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    normalize: bool = True,
) -> Tensor:
    """Weighted average of the candidates: a "model soup" (Wortsman et al. 2022, Model soups).

    ``weights`` default to 1 for every candidate. With ``normalize`` the weighted sum is divided
    by the sum of the weights (mergekit does not guard a zero sum: the result is then inf/NaN);
    without it the weighted sum is returned as is. Sums are accumulated in float32 (float64 for
    float64 inputs) and the result is cast back to the inputs' common dtype.
    """
    aligned = _aligned(tensors)
    dtype = aligned[0].dtype
    work = _accumulation_dtype(dtype)
    w = torch.tensor(
        _per_candidate(weights, len(aligned), "weights", 1.0), dtype=work, device=aligned[0].device
    )
    total = torch.zeros_like(aligned[0], dtype=work)
    for tensor, coefficient in zip(aligned, w, strict=True):
        total.addcmul_(tensor.to(work), coefficient)
    if normalize:
        total = total / w.sum()
    return total.to(dtype)


def slerp(
    a: Tensor,
    b: Tensor,
    t: float,
    eps: float = 1e-8,
    dot_threshold: float = _SLERP_DOT_THRESHOLD,
) -> Tensor:
    """Spherical linear interpolation from ``a`` (t=0) to ``b`` (t=1) (Shoemake 1985, SLERP).

    Each tensor is flattened into one vector. The angle comes from the vectors' directions
    (a norm <= ``eps`` counts as 1, so a zero tensor does not divide by zero) and the
    un-normalised inputs are combined as ``sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b``. When the
    directions are (anti)parallel, ``|cos θ| > dot_threshold``, sin θ is near 0 and the formula
    is ill-conditioned, so plain linear interpolation ``(1-t)·a + t·b`` is used instead. Computed
    in float32 (float64 for float64 inputs); the result has the inputs' common dtype. ``t`` may
    lie outside [0, 1] (extrapolation), as in mergekit.
    """
    x, y = _aligned([a, b])
    dtype, shape = x.dtype, x.shape
    work = _accumulation_dtype(dtype)
    x = x.reshape(-1).to(work)
    y = y.reshape(-1).to(work)
    # t as a tensor of the working dtype so that 1 - t rounds the way mergekit's does.
    s = torch.tensor(t, dtype=work, device=x.device)
    if x.numel() == 0:
        return ((1 - s) * x + s * y).reshape(shape).to(dtype)

    norm_x = torch.linalg.vector_norm(x)
    norm_y = torch.linalg.vector_norm(y)
    norm_x = torch.where(norm_x > eps, norm_x, 1)
    norm_y = torch.where(norm_y > eps, norm_y, 1)
    # Normalise before multiplying so that huge entries cannot overflow the dot product.
    cos = ((x / norm_x) * (y / norm_y)).sum().clamp(-1, 1)
    if cos.abs() > dot_threshold:
        coef_x, coef_y = 1 - s, s
    else:
        theta = torch.acos(cos)
        sin_theta = torch.sin(theta)
        coef_x = torch.sin((1 - s) * theta) / sin_theta
        coef_y = torch.sin(s * theta) / sin_theta
    return (coef_x * x + coef_y * y).reshape(shape).to(dtype)


def task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """Add the weighted task vectors to the base (Ilharco et al. 2023, Editing models with
    task arithmetic).

    A task vector is ``tensor_i - base``; the result is ``base + lambda_ * Σ w_i (tensor_i -
    base)``, divided by ``Σ w_i`` first when ``normalize`` (a sum of weights within 1e-8 of 0
    is treated as 1). ``weights`` default to 1 each, so the default is the plain sum of task
    vectors. Computed in the inputs' common dtype.
    """
    return _combine_task_vectors(base, tensors, weights, None, None, normalize, lambda_)


def ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] = 1.0,
    normalize: bool = True,
    majority: str = "sum",
    rescale: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """TIES-merging: trim, elect sign, disjoint merge (Yadav et al. 2023, Resolving
    interference when merging models).

    Each task vector keeps its ``density`` largest-magnitude entries (at least one; with
    ``rescale`` the kept entries are scaled back to the full L1 norm), is multiplied by its
    weight, and then only entries whose sign matches the elected sign (``majority="sum"``: sign
    of the weighted sum, the paper's rule; ``"count"``: sign of most candidates) are summed.
    With ``normalize`` each entry is divided by the sum of the weights of the candidates that
    agreed there (a disjoint mean). The result is ``base + lambda_ * merged``.
    """
    densities = _per_candidate(density, len(tensors), "density", 1.0)
    _check_densities(densities)
    if majority not in _CONSENSUS_RULES:
        raise ValueError(f"majority must be one of {_CONSENSUS_RULES}, got {majority!r}")

    def trim(delta: Tensor, index: int) -> _Mask:
        return _keep_largest(delta, densities[index], rescale)

    return _combine_task_vectors(base, tensors, weights, trim, majority, normalize, lambda_)


def dare(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] = 1.0,
    rescale: bool = True,
    consensus: str | None = None,
    generator: torch.Generator | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """DARE: drop and rescale task vectors (Yu et al. 2024, Language models are Super Mario).

    Each entry of each task vector is kept with probability ``density`` (one Bernoulli draw per
    entry, candidates in order, from ``generator`` or torch's global RNG). Unlike the paper's
    ``1/density`` factor, ``rescale`` scales the kept entries so that each task vector keeps its
    L1 norm, which is mergekit's rule and equal in expectation for large tensors. The weighted
    vectors are then summed (``consensus=None``: mergekit's ``dare_linear``) or TIES-merged with
    sign election (``consensus="sum"``: ``dare_ties``; ``"count"`` also accepted). ``density``
    defaults to mergekit's 1.0, which keeps everything: pass e.g. 0.5 for an actual DARE merge.
    """
    densities = _per_candidate(density, len(tensors), "density", 1.0)
    _check_densities(densities)
    if consensus is not None and consensus not in _CONSENSUS_RULES:
        raise ValueError(f"consensus must be None or one of {_CONSENSUS_RULES}, got {consensus!r}")

    def drop(delta: Tensor, index: int) -> _Mask:
        return _drop_random(delta, densities[index], rescale, generator)

    return _combine_task_vectors(base, tensors, weights, drop, consensus, normalize, lambda_)


def _flatten_for_stock(tensor: Tensor, filter_wise: bool) -> Tensor:
    """Model Stock's angle axis: the whole tensor, or each filter (last axis) separately."""
    if not filter_wise or tensor.dim() == 0:
        return tensor.reshape(-1)
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor


def model_stock(base: Tensor, tensors: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock: interpolate between the base and the candidates' average by an angle-derived
    ratio (Jang et al. 2024, Model Stock: all we need is just a few fine-tuned models).

    With ``cos θ`` the mean pairwise cosine between the candidates' offsets from the base, the
    ratio is ``t = N cos θ / (1 + (N-1) cos θ)`` for N candidates and the result is
    ``t · mean(candidates) + (1 - t) · base``. ``filter_wise`` computes one angle per filter
    (per slice along the last axis; a 1-D tensor is one filter) instead of one per tensor.
    Where the denominator vanishes (|.| < 1e-6) the base is kept. Needs at least 2 candidates.
    """
    if len(tensors) < 2:
        raise ValueError(
            f"model_stock needs at least 2 candidates besides the base, got {len(tensors)}"
        )
    aligned = _aligned([base, *tensors])
    shape = aligned[0].shape
    w0, *ws = (_flatten_for_stock(t, filter_wise) for t in aligned)
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=_COSINE_NORM_FLOOR)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < _SINGULAR_EPS
    # Mask the denominator too, so the unused branch of where() cannot produce inf/NaN.
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    ratio = torch.where(singular, torch.zeros_like(cos), count * cos / safe)
    average = torch.stack(ws).sum(dim=0) / count
    return (ratio * average + (1 - ratio) * w0).reshape(shape)


# --------------------------------------------------------------------------- registry

MergeFn = Callable[..., Tensor]


def _need_base(name: str, base: Tensor | None) -> Tensor:
    if base is None:
        raise ValueError(f"merge method {name!r} needs a base tensor, and none was given")
    return base


def _take_lambda(name: str, extra: dict[str, Any]) -> float:
    """Pull mergekit's ``lambda`` (a Python keyword) out of **params; reject anything else."""
    lambda_ = float(extra.pop("lambda", 1.0))
    extra.pop("int8_mask", None)  # only changes mergekit's mask storage, never the result
    if extra:
        raise TypeError(f"unknown parameter(s) for {name!r}: {', '.join(sorted(extra))}")
    return lambda_


def _linear_method(
    tensors: Sequence[Tensor],
    base: Tensor | None = None,
    *,
    weight: float | Sequence[float] | None = None,
    normalize: bool = True,
) -> Tensor:
    # mergekit's linear ignores the base role; to average the base in, list it among tensors.
    return linear(tensors, _per_candidate(weight, len(tensors), "weight", 1.0), normalize)


def _slerp_method(tensors: Sequence[Tensor], base: Tensor | None = None, *, t: float) -> Tensor:
    # Two inputs in all: base + one candidate (mergekit's form), or two candidates.
    inputs = ([base] if base is not None else []) + list(tensors)
    if len(inputs) != 2:
        raise ValueError(
            f"merge method 'slerp' needs exactly 2 tensors (the base counts as one), "
            f"got {len(inputs)}"
        )
    return slerp(inputs[0], inputs[1], t)


def _task_arithmetic_method(
    tensors: Sequence[Tensor],
    base: Tensor | None = None,
    *,
    weight: float | Sequence[float] | None = None,
    normalize: bool = False,
    **extra: Any,
) -> Tensor:
    base = _need_base("task_arithmetic", base)
    lambda_ = _take_lambda("task_arithmetic", extra)
    weights = _per_candidate(weight, len(tensors), "weight", 1.0)
    return task_arithmetic(base, tensors, weights, normalize, lambda_)


def _ties_method(
    tensors: Sequence[Tensor],
    base: Tensor | None = None,
    *,
    weight: float | Sequence[float] | None = None,
    density: float | Sequence[float] = 1.0,
    normalize: bool = True,
    rescale: bool = False,
    **extra: Any,
) -> Tensor:
    base = _need_base("ties", base)
    lambda_ = _take_lambda("ties", extra)
    weights = _per_candidate(weight, len(tensors), "weight", 1.0)
    return ties(base, tensors, weights, density, normalize, "sum", rescale, lambda_)


def _dare_method(name: str, consensus: str | None) -> MergeFn:
    def merge(
        tensors: Sequence[Tensor],
        base: Tensor | None = None,
        *,
        weight: float | Sequence[float] | None = None,
        density: float | Sequence[float] = 1.0,
        normalize: bool = False,
        rescale: bool = True,
        generator: torch.Generator | None = None,
        **extra: Any,
    ) -> Tensor:
        base_tensor = _need_base(name, base)
        lambda_ = _take_lambda(name, extra)
        weights = _per_candidate(weight, len(tensors), "weight", 1.0)
        return dare(
            base_tensor,
            tensors,
            weights,
            density,
            rescale,
            consensus,
            generator,
            normalize,
            lambda_,
        )

    merge.__name__ = f"_{name}_method"
    return merge


def _model_stock_method(
    tensors: Sequence[Tensor], base: Tensor | None = None, *, filter_wise: bool = False
) -> Tensor:
    return model_stock(_need_base("model_stock", base), tensors, filter_wise)


METHODS: dict[str, MergeFn] = {
    "linear": _linear_method,
    "slerp": _slerp_method,
    "task_arithmetic": _task_arithmetic_method,
    "ties": _ties_method,
    "dare_linear": _dare_method("dare_linear", None),
    "dare_ties": _dare_method("dare_ties", "sum"),
    "model_stock": _model_stock_method,
}
