"""The stack's merge product and its gradient against plain autograd, in every storage dtype,
across column chunks (a small chunk size forces several)."""

from __future__ import annotations

import pytest
import torch

from softmerge import stack as st


def _reference(w: torch.Tensor, rows: torch.Tensor, axis: int | None, offset) -> torch.Tensor:
    """offset + sum_j w_j * rows_j in float64, w broadcast along ``axis``."""
    w64, rows64 = w.double(), rows.double()
    if axis is not None:
        shape = [1] * (rows.dim() - 1)
        shape[axis] = -1
        terms = [w64[j].view(shape) * rows64[j] for j in range(rows.shape[0])]
    else:
        terms = [w64[j] * rows64[j] for j in range(rows.shape[0])]
    total = torch.stack(terms).sum(0)
    return total if offset is None else total + offset.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("axis", [None, 0])
def test_mix_and_its_gradient_match_autograd(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, with_offset: bool, axis: int | None
) -> None:
    monkeypatch.setattr(st, "_SCRATCH", 64)  # 12 x 37 = 444 elements: 7 chunks
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 12, 37, generator=gen).to(dtype)
    offset = torch.randn(12, 37, generator=gen) if with_offset else None
    shape = (3,) if axis is None else (3, 12)
    w = torch.rand(shape, generator=gen, requires_grad=True)
    # A conversion buffer of the stack's kind (garbage from earlier use: it must not leak in).
    scratch = torch.full((64,), float("nan"))
    out = st._StackedMix.apply(w, rows, axis, offset, None, scratch)
    assert out.dtype == torch.float32
    # float32 accumulation of the exact (float64) product: float32 tolerances
    torch.testing.assert_close(out, _reference(w.detach(), rows, axis, offset).float())

    upstream = torch.randn(12, 37, generator=gen)
    (out * upstream).sum().backward()
    w_ref = w.detach().double().requires_grad_(True)
    (_reference(w_ref, rows, axis, offset) * upstream.double()).sum().backward()
    torch.testing.assert_close(w.grad.double(), w_ref.grad, rtol=1e-5, atol=1e-5)


def test_reused_output_buffer_is_overwritten_not_accumulated() -> None:
    rows = torch.arange(6.0).view(2, 3)
    buffer = torch.full((3,), 99.0)
    first = st.mix_into(torch.tensor([1.0, 0.0]), rows, None, None, buffer)
    torch.testing.assert_close(first, rows[0])
    second = st.mix_into(torch.tensor([0.0, 2.0]), rows, None, None, buffer)
    torch.testing.assert_close(second, 2 * rows[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_empty_tensor_mixes_to_an_empty_tensor(dtype: torch.dtype) -> None:
    rows = torch.empty(3, 0, 4, dtype=dtype)
    out = st.mix_into(torch.tensor([0.2, 0.3, 0.5]), rows, None, None)
    assert out.shape == (0, 4) and out.dtype == torch.float32


def test_a_half_precision_stack_converts_into_one_kept_buffer() -> None:
    """A bf16 stack's rows are converted into one float32 buffer that every tensor and step
    reuses (no 8 MiB allocation per tensor and step to fragment the heap), dropped with the
    step buffers; the merge matches the float32 stack's to bf16 rounding."""
    from softmerge import MergePlan, SoftMerger
    from softmerge.zoo import MLP

    torch.manual_seed(0)
    states = [MLP(16, (32,), 4).state_dict() for _ in range(3)]
    half = SoftMerger(
        MLP(16, (32,), 4), states, MergePlan(granularity="tensor"), storage_dtype="bfloat16"
    )
    full = SoftMerger(MLP(16, (32,), 4), states, MergePlan(granularity="tensor"))
    z = torch.rand(half.gates.shape, generator=torch.Generator().manual_seed(1))
    half.merged_parameters(z, reuse=True)
    kept = half.stack._conversion
    assert kept is not None and kept.dtype == torch.float32 and kept.numel() == st._SCRATCH
    again = half.merged_parameters(z, reuse=True)
    assert half.stack._conversion is kept
    reference = full.merged_parameters(z)
    for name, value in again.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-2, atol=1e-2)
    half.stack.release_outputs()
    assert half.stack._conversion is None
    assert full.stack._conversion is None  # a float32 stack never needs one


@pytest.mark.parametrize("storage", [None, "bfloat16"])
def test_leaf_merge_gives_the_gate_gradients_of_plain_autograd(storage: str | None) -> None:
    """A training step's merge through leaves (each tensor's gradient turned into dL/dw as
    soon as it exists, then sent on into the gates' graph) gives the gates the gradients
    plain autograd through the merge gives them, and leaves no gradient on the tensors."""
    from softmerge import MergePlan, SoftMerger
    from softmerge.zoo import MLP

    torch.manual_seed(0)
    states = [MLP(16, (32,), 4).state_dict() for _ in range(3)]
    merger = SoftMerger(
        MLP(16, (32,), 4), states, MergePlan(granularity="tensor"), storage_dtype=storage
    )
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    grads = []
    for leaves in (False, True):
        merger.gates.zero_grad(set_to_none=True)
        z = merger.gates.sample(torch.Generator().manual_seed(2))
        pending = None
        if leaves:
            merged, pending = merger.merged_leaves(z)
        else:
            merged = merger.merged_parameters(z)
        logits, _ = merger.forward(merger.functional_state(merged), (x, y))
        torch.nn.functional.cross_entropy(logits, y).backward()
        if pending is not None:
            pending.backward()
            assert all(t.grad is None for t in merged.values())
        grads.append([p.grad.clone() for p in merger.gate_parameters])
    for plain, leaf in zip(*grads, strict=True):
        torch.testing.assert_close(leaf, plain, rtol=1e-5, atol=1e-7)
        assert plain.abs().sum() > 0
