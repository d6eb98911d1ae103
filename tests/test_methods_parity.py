"""Per-tensor merge methods: parity with mergekit 0.1.5, and properties that need no mergekit.

Parity tests run mergekit's own in-memory entry point (``mergekit.merge_methods.merge_tensors``,
which calls the same kernels as a YAML merge) on random float32 tensors and require a max
absolute difference of at most 1e-6. They are skipped, with the reason shown by ``pytest -ra``,
when mergekit 0.1.5 is not installed (``pip install --no-deps mergekit==0.1.5``).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from softmerge.methods.tensorwise import (
    METHODS,
    dare,
    linear,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
)

MERGEKIT_VERSION = "0.1.5"
TOLERANCE = 1e-6
# A 2-D weight, a 1-D bias and a conv-like 4-D kernel.
SHAPES = [(16, 24), (24,), (4, 3, 3, 3)]
WEIGHTS = [0.5, 1.0, 0.3]

MergeKit = Callable[..., Tensor]


@pytest.fixture(scope="module")
def mergekit_merge() -> MergeKit:
    """mergekit's in-memory ``merge_tensors``; skips visibly when mergekit 0.1.5 is absent."""
    pytest.importorskip(
        "mergekit", reason="mergekit is not installed: parity with mergekit cannot be checked"
    )
    version = importlib.metadata.version("mergekit")
    if version != MERGEKIT_VERSION:
        pytest.skip(f"mergekit {version} is installed; parity is defined against 0.1.5")
    from mergekit.merge_methods import merge_tensors

    return merge_tensors


def _reference(
    merge: MergeKit, method: str, base: Tensor | None, tensors: Sequence[Tensor], **params: Any
) -> Tensor:
    """Run mergekit with the base (if any) as input 0, the way its config marks a base model."""
    inputs = ([base] if base is not None else []) + list(tensors)
    return merge(inputs, method, parameters=params, base_index=0 if base is not None else None)


def _max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a.double() - b.double()).abs().max().item()


def _fine_tunes(
    shape: tuple[int, ...], count: int = 3, seed: int = 0
) -> tuple[Tensor, list[Tensor]]:
    """A base and candidates that share part of their update, like fine-tunes of one model.

    Shared structure makes the interesting branches happen: sign agreement and disagreement in
    TIES, a clearly non-zero angle in Model Stock.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    shared = 0.1 * torch.randn(shape, generator=g)
    tensors = [base + shared + 0.1 * torch.randn(shape, generator=g) for _ in range(count)]
    return base, tensors


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("weights", "normalize"), [(WEIGHTS, True), (WEIGHTS, False), (None, True)]
)
def test_linear_parity(mergekit_merge: MergeKit, shape, weights, normalize) -> None:
    _, tensors = _fine_tunes(shape)
    expected = _reference(
        mergekit_merge, "linear", None, tensors, weight=weights or 1.0, normalize=normalize
    )
    assert _max_diff(linear(tensors, weights, normalize), expected) <= TOLERANCE
    got = METHODS["linear"](tensors, None, weight=weights, normalize=normalize)
    assert _max_diff(got, expected) <= TOLERANCE


@pytest.mark.parametrize("shape", [*SHAPES, (1100, 1000)])  # the last exceeds mergekit's chunk
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.2])
def test_slerp_parity(mergekit_merge: MergeKit, shape, t) -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    expected = _reference(mergekit_merge, "slerp", a, [b], t=t)
    assert _max_diff(slerp(a, b, t), expected) <= TOLERANCE
    assert _max_diff(METHODS["slerp"]([b], a, t=t), expected) <= TOLERANCE
    assert _max_diff(METHODS["slerp"]([a, b], None, t=t), expected) <= TOLERANCE


@pytest.mark.parametrize("scale", [2.0, -3.0, 0.0])
def test_slerp_parity_colinear_and_zero(mergekit_merge: MergeKit, scale) -> None:
    """Parallel, antiparallel and zero second vectors take mergekit's lerp / zero-norm paths."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(16, 24, generator=g)
    b = scale * a + 1e-4 * torch.randn(16, 24, generator=g) * (scale != 0)
    expected = _reference(mergekit_merge, "slerp", a, [b], t=0.3)
    assert _max_diff(slerp(a, b, 0.3), expected) <= TOLERANCE


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "params",
    [{}, {"normalize": True}, {"lambda": 0.7}, {"weight": [0.5, -1.0, 0.5], "normalize": True}],
)
def test_task_arithmetic_parity(mergekit_merge: MergeKit, shape, params) -> None:
    base, tensors = _fine_tunes(shape)
    params = {"weight": WEIGHTS, **params}
    expected = _reference(mergekit_merge, "task_arithmetic", base, tensors, **params)
    got = METHODS["task_arithmetic"](tensors, base, **params)
    assert _max_diff(got, expected) <= TOLERANCE
    direct = task_arithmetic(
        base, tensors, params["weight"], params.get("normalize", False), params.get("lambda", 1.0)
    )
    assert _max_diff(direct, expected) <= TOLERANCE


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "params",
    [
        {"density": 0.5},
        {"density": 1.0},
        {"density": [0.2, 0.5, 0.9], "rescale": True},
        {"density": 0.3, "normalize": False, "lambda": 1.5},
        {"density": 0.01},  # rounds to one kept entry for small tensors
    ],
)
def test_ties_parity(mergekit_merge: MergeKit, shape, params) -> None:
    base, tensors = _fine_tunes(shape)
    params = {"weight": WEIGHTS, **params}
    expected = _reference(mergekit_merge, "ties", base, tensors, **params)
    assert _max_diff(METHODS["ties"](tensors, base, **params), expected) <= TOLERANCE
    direct = ties(
        base,
        tensors,
        WEIGHTS,
        params["density"],
        params.get("normalize", True),
        rescale=params.get("rescale", False),
        lambda_=params.get("lambda", 1.0),
    )
    assert _max_diff(direct, expected) <= TOLERANCE


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "params",
    [
        {"density": 0.5},
        {"density": [0.3, 0.6, 0.9], "normalize": True},
        {"density": 0.4, "rescale": False, "lambda": 0.8},
    ],
)
@pytest.mark.parametrize("seed", [0, 7])
def test_dare_parity_exact_mask(mergekit_merge: MergeKit, method, shape, params, seed) -> None:
    """DARE's random mask is reproduced exactly, so parity is exact rather than statistical.

    mergekit draws one ``torch.bernoulli`` per candidate, in order, from torch's global RNG.
    softmerge draws the same calls from a ``torch.Generator`` seeded alike (or from the global
    RNG when no generator is given), so both see the same mask.
    """
    base, tensors = _fine_tunes(shape)
    params = {"weight": WEIGHTS, **params}
    torch.manual_seed(seed)
    expected = _reference(mergekit_merge, method, base, tensors, **params)
    generator = torch.Generator().manual_seed(seed)
    got = METHODS[method](tensors, base, generator=generator, **params)
    assert _max_diff(got, expected) <= TOLERANCE

    torch.manual_seed(seed)  # the global-RNG path must agree too
    consensus = "sum" if method == "dare_ties" else None
    direct = dare(
        base,
        tensors,
        WEIGHTS,
        params["density"],
        params.get("rescale", True),
        consensus,
        None,
        params.get("normalize", False),
        params.get("lambda", 1.0),
    )
    assert _max_diff(direct, expected) <= TOLERANCE


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("count", [2, 3, 5])
def test_model_stock_parity(mergekit_merge: MergeKit, shape, filter_wise, count) -> None:
    base, tensors = _fine_tunes(shape, count=count)
    expected = _reference(mergekit_merge, "model_stock", base, tensors, filter_wise=filter_wise)
    assert _max_diff(model_stock(base, tensors, filter_wise), expected) <= TOLERANCE
    got = METHODS["model_stock"](tensors, base, filter_wise=filter_wise)
    assert _max_diff(got, expected) <= TOLERANCE


def test_model_stock_parity_singular(mergekit_merge: MergeKit) -> None:
    """Two opposite updates make 1 + (N-1) cos θ vanish: both keep the base."""
    base, (first, _) = _fine_tunes((8, 8), count=2)
    tensors = [first, 2 * base - first]
    expected = _reference(mergekit_merge, "model_stock", base, tensors)
    assert _max_diff(model_stock(base, tensors), expected) <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    ("method", "params", "with_base"),
    [
        ("linear", {"weight": WEIGHTS}, False),
        ("slerp", {"t": 0.4}, True),
        ("task_arithmetic", {"weight": WEIGHTS}, True),
        ("ties", {"weight": WEIGHTS, "density": 0.5}, True),
        ("dare_ties", {"weight": WEIGHTS, "density": 0.5}, True),
        ("model_stock", {}, True),
    ],
)
def test_dtype_parity(mergekit_merge: MergeKit, dtype, method, params, with_base) -> None:
    """Other float dtypes: same result dtype, and values equal up to one rounding of it."""
    base, tensors = _fine_tunes((16, 24))
    base = base.to(dtype)
    tensors = [t.to(dtype) for t in tensors[: 1 if method == "slerp" else 3]]
    if not with_base:
        base = None
    extra = {"generator": torch.Generator().manual_seed(3)} if method.startswith("dare") else {}
    torch.manual_seed(3)
    expected = _reference(mergekit_merge, method, base, tensors, **params)
    got = METHODS[method](tensors, base, **params, **extra)
    assert got.dtype == expected.dtype == dtype
    # One unit in the last place of values of size ~4: the half types round at 2**-8 or 2**-11.
    tolerance = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}[dtype]
    assert _max_diff(got, expected) <= tolerance


def test_mixed_dtype_promotes_like_mergekit(mergekit_merge: MergeKit) -> None:
    base, tensors = _fine_tunes((16, 24))
    tensors = [tensors[0].half(), *tensors[1:]]
    expected = _reference(mergekit_merge, "ties", base, tensors, weight=WEIGHTS, density=0.5)
    got = METHODS["ties"](tensors, base, weight=WEIGHTS, density=0.5)
    assert got.dtype == torch.float32
    assert _max_diff(got, expected) <= TOLERANCE


# --------------------------------------------------------------------------- properties


def test_linear_of_identical_tensors_is_that_tensor() -> None:
    x = torch.randn(5, 7)
    assert torch.allclose(linear([x, x, x], [0.2, 0.5, 3.0]), x, atol=1e-6)
    assert torch.allclose(linear([x, x]), x, atol=1e-6)


def test_linear_unnormalized_is_weighted_sum() -> None:
    x, y = torch.randn(4), torch.randn(4)
    assert torch.allclose(linear([x, y], [2.0, -1.0], normalize=False), 2 * x - y, atol=1e-6)


def test_slerp_endpoints_and_norm() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    # Unit vectors stay on the sphere along the whole arc, unlike linear interpolation.
    ua, ub = a / a.norm(), b / b.norm()
    assert slerp(ua, ub, 0.5).norm().item() == pytest.approx(1.0, abs=1e-5)


def test_slerp_falls_back_to_lerp_for_parallel_vectors() -> None:
    a = torch.randn(10)
    assert torch.allclose(slerp(a, 3 * a, 0.25), 0.75 * a + 0.25 * 3 * a, atol=1e-6)


def test_ties_density_one_single_candidate_is_base_plus_delta() -> None:
    base, (tuned, *_) = _fine_tunes((7, 9))
    assert torch.allclose(ties(base, [tuned]), tuned, atol=1e-6)
    assert torch.allclose(ties(base, [tuned], [0.5]), tuned, atol=1e-6)  # normalised weight


def test_ties_drops_the_minority_sign() -> None:
    base = torch.zeros(3)
    tensors = [torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, -1.0, -1.0])]
    # Elected signs (weighted sums 4, 1, -2): +, +, -. Disjoint mean of the agreeing entries.
    assert torch.equal(ties(base, tensors), torch.tensor([2.0, 2.0, -1.0]))


def test_dare_density_one_equals_task_arithmetic() -> None:
    base, tensors = _fine_tunes((6, 6))
    expected = task_arithmetic(base, tensors, WEIGHTS)
    assert torch.allclose(dare(base, tensors, WEIGHTS, density=1.0), expected, atol=1e-6)


def test_dare_is_reproducible_with_a_generator() -> None:
    base, tensors = _fine_tunes((6, 6))
    first = dare(base, tensors, density=0.5, generator=torch.Generator().manual_seed(5))
    again = dare(base, tensors, density=0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)


def test_dare_without_rescale_matches_its_expectation() -> None:
    """Averaged over many draws, dropping at rate 1-p leaves p times the summed task vectors."""
    base, tensors = _fine_tunes((10, 10))
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [dare(base, tensors, density=0.5, rescale=False, generator=generator) for _ in range(400)]
    )
    expected = base + 0.5 * sum(t - base for t in tensors)
    assert (draws.mean(dim=0) - expected).abs().mean().item() < 0.01


def test_model_stock_equal_candidates_return_them() -> None:
    base, (tuned, *_) = _fine_tunes((5, 5))
    # Identical offsets: cos θ = 1, so t = 1 and the result is the (common) candidate.
    assert torch.allclose(model_stock(base, [tuned, tuned.clone()]), tuned, atol=1e-6)


@pytest.mark.parametrize(
    "name", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "model_stock"]
)
def test_methods_needing_a_base_say_so(name: str) -> None:
    _, tensors = _fine_tunes((3,))
    with pytest.raises(ValueError, match="needs a base"):
        METHODS[name](tensors, None)


@pytest.mark.parametrize("count", [1, 3])
def test_slerp_needs_exactly_two_tensors(count: int) -> None:
    _, tensors = _fine_tunes((3,), count=count)
    with pytest.raises(ValueError, match="exactly 2"):
        METHODS["slerp"](tensors, None, t=0.5)


def test_bad_inputs_are_rejected() -> None:
    base, tensors = _fine_tunes((3,))
    with pytest.raises(ValueError, match="at least 2"):
        model_stock(base, tensors[:1])
    with pytest.raises(ValueError, match="one shape"):
        linear([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ValueError, match="one value per candidate"):
        linear(tensors, [1.0])
    with pytest.raises(TypeError, match="floating-point"):
        linear([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match="unknown parameter"):
        METHODS["ties"](tensors, base, densty=0.5)
    with pytest.raises(ValueError, match="majority"):
        ties(base, tensors, majority="mean")


def test_registry_names_match_mergekit() -> None:
    assert set(METHODS) == {
        "linear",
        "slerp",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "model_stock",
    }


# --------------------------------------------------------------------------- registry parity

REGISTRY_CASES = [
    ("linear", {"weight": WEIGHTS}),
    ("slerp", {"t": 0.3}),
    ("task_arithmetic", {"weight": WEIGHTS, "lambda": 0.7}),
    ("ties", {"weight": WEIGHTS, "density": 0.4}),
    ("dare_linear", {"weight": WEIGHTS, "density": 0.5}),
    ("dare_ties", {"weight": WEIGHTS, "density": 0.5}),
    ("model_stock", {}),
]


@pytest.mark.parametrize(("method", "params"), REGISTRY_CASES)
def test_registry_merges_whole_state_dicts_like_mergekit(
    mergekit_merge: MergeKit, method: str, params: dict[str, Any]
) -> None:
    """The path users take (``get_method(...).merge(ctx)`` over whole state dicts) equals
    mergekit tensor by tensor; DARE's masks come from one generator in tensor order, which is
    mergekit's global RNG seeded once and drawn in the same order."""
    from softmerge.methods import MergeContext, get_method
    from softmerge.zoo import MLP

    model = MLP(64, (32,))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    count = 1 if method == "slerp" else 3
    per_key = {k: _fine_tunes(s, count=count, seed=i) for i, (k, s) in enumerate(shapes.items())}
    base = {k: b for k, (b, _) in per_key.items()}
    cands = [{k: ts[j] for k, (_, ts) in per_key.items()} for j in range(count)]
    ctx = MergeContext(model, cands, base=base, seed=3)  # slerp: the base (t = 0) + 1
    merged = get_method(method, **params).merge(ctx).state
    torch.manual_seed(3)
    for key in ctx.merged_names:
        b, ts = per_key[key]
        b = None if method == "linear" else b  # linear merges the candidates only
        expected = _reference(mergekit_merge, method, b, ts, **params)
        assert _max_diff(merged[key], expected) <= TOLERANCE, key
