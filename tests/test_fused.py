"""The compiled merge passes (softmerge.fused): the same merge and gate gradients as the eager
kernels, the fallback when compiling fails, and when "auto" compiles."""

from __future__ import annotations

import logging
from functools import cache

import pytest
import torch

from softmerge import FitConfig, MergePlan, SoftMerger, fused
from softmerge.errors import ConfigError, PlanError
from softmerge.zoo import MLP


@cache
def _compile_problem() -> str | None:
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(4))
    except Exception as exc:  # no C++ compiler, an unsupported platform, ...
        return f"{type(exc).__name__}: {exc}"
    return None


needs_compile = pytest.mark.skipif(
    _compile_problem() is not None, reason=f"torch.compile does not work here: {_compile_problem()}"
)


def _merger(storage: str | None, with_base: bool) -> SoftMerger:
    torch.manual_seed(0)
    states = [MLP(16, (32,), 4).state_dict() for _ in range(3)]
    base = MLP(16, (32,), 4).state_dict() if with_base else None
    return SoftMerger(
        MLP(16, (32,), 4),
        states,
        MergePlan(granularity="tensor"),
        base=base,
        storage_dtype=storage,
    )


def _step(merger: SoftMerger) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """One leaf-merge step: the merged tensors and the gates' gradients."""
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    merger.gates.zero_grad(set_to_none=True)
    z = merger.gates.sample(torch.Generator().manual_seed(2))
    merged, pending = merger.merged_leaves(z)
    values = {k: v.detach().clone() for k, v in merged.items()}
    logits, _ = merger.forward(merger.functional_state(merged), (x, y))
    torch.nn.functional.cross_entropy(logits, y).backward()
    pending.backward()
    return values, [p.grad.clone() for p in merger.gate_parameters]


@needs_compile
@pytest.mark.parametrize(("storage", "with_base"), [(None, False), ("bfloat16", True)])
def test_fused_passes_match_the_eager_ones(
    monkeypatch: pytest.MonkeyPatch, storage: str | None, with_base: bool
) -> None:
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)  # the test model's tensors are small
    calls: list[str] = []
    real = fused._compiled

    def counted(name: str):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(fused, "_compiled", counted)
    merger = _merger(storage, with_base)
    eager_values, eager_grads = _step(merger)
    merger.stack.release_outputs()
    merger.stack.fused = fused.FusedMerge(required=True)
    values, grads = _step(merger)
    assert calls.count("mix") == len(values) and calls.count("weight_grad") == len(values)
    assert merger.stack._conversion is None  # fused kernels convert half rows in registers
    for name, value in values.items():
        torch.testing.assert_close(value, eager_values[name], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert want.abs().sum() > 0


@needs_compile
def test_a_fit_with_compiled_passes_learns_the_eager_gates(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen))]
    gates = []
    for setting in (False, True):
        merger = _merger(None, False)
        cfg = FitConfig(steps=5, progress=False, eval_every=0, compile_merge=setting)
        merger.fit(batches, config=cfg)
        gates.append(merger.deterministic_gates())
    torch.testing.assert_close(gates[1], gates[0], rtol=1e-4, atol=1e-5)


def _broken(name: str):
    def fail(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    return fail


def test_a_failed_compile_falls_back_under_auto(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)
    merger = _merger(None, False)
    eager_values, eager_grads = _step(merger)
    monkeypatch.setattr(fused, "_compiled", _broken)
    merger.stack.fused = fused.FusedMerge(required=False)
    with caplog.at_level(logging.WARNING, logger="softmerge"):
        values, grads = _step(merger)
    assert merger.stack.fused.broken
    assert "no C++ compiler found" in caplog.text and caplog.text.count("torch.compile") == 1
    for name, value in values.items():
        torch.testing.assert_close(value, eager_values[name])
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_a_failed_compile_is_an_error_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(fused, "_compiled", _broken)
    merger = _merger(None, False)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen))]
    cfg = FitConfig(steps=2, progress=False, eval_every=0, compile_merge=True)
    with pytest.raises(ConfigError, match=r"compile_merge: true.*no C\+\+ compiler found"):
        merger.fit(batches, config=cfg)


def test_auto_compiles_big_long_fits_on_cpu_only() -> None:
    gib, cpu = 2**30, torch.device("cpu")
    assert fused.fused_merge("auto", 2 * gib, 300, cpu) is not None
    assert fused.fused_merge("auto", 2 * gib, 50, cpu) is None  # too few steps to repay it
    assert fused.fused_merge("auto", gib // 2, 10_000, cpu) is None  # too small a stack
    assert fused.fused_merge("auto", 2 * gib, 300, torch.device("meta")) is None
    assert fused.fused_merge(False, 2 * gib, 300, cpu) is None
    required = fused.fused_merge(True, 1, 1, cpu)
    assert required is not None and required.required
    # a small fit on the default setting stays eager
    merger = _merger(None, False)
    batches = [(torch.randn(8, 16), torch.randint(0, 4, (8,)))]
    merger.make_loop(batches, FitConfig(steps=5, progress=False, eval_every=0))
    assert merger.stack.fused is None


def test_a_bad_compile_setting_is_refused() -> None:
    with pytest.raises(PlanError, match="compile_merge must be true, false or 'auto', got 'som"):
        FitConfig(compile_merge="sometimes")
