"""The whole merge path on a GPU: stack, gates, every step, evaluation and export on CUDA.

Skipped (with the reason) on machines without CUDA. On one with it, the same merge is run on
the CPU and on the GPU: the gate noise comes from a CPU generator on both, so the gates agree
up to float differences of the two devices' kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

from softmerge import FitConfig, MergeContext, MergePlan, SoftMerger
from softmerge.cli import main
from softmerge.methods import get_method
from softmerge.zoo import MLP

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


def _candidates(n: int = 3) -> list[dict[str, torch.Tensor]]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append({k: v.contiguous() for k, v in MLP(16, (32,), 4).state_dict().items()})
    return out


def _loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=gen)


@pytest.mark.parametrize("storage_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_soft_merge_on_cuda_matches_cpu(granularity: str, storage_dtype: str | None) -> None:
    cfg = FitConfig(steps=30, progress=False, eval_every=0)
    plan = MergePlan(granularity=granularity)
    gates = {}
    for device in ("cpu", "cuda"):
        merger = SoftMerger(
            MLP(16, (32,), 4), _candidates(), plan, device=device, storage_dtype=storage_dtype
        )
        merger.fit(_loader(), config=cfg)
        assert all(b.device.type == device for b in merger.stack.buffers.values())
        assert merger.gates.log_alpha.device.type == device
        state = merger.merged_state_dict()
        assert all(t.device.type == "cpu" for t in state.values())  # what gets written
        assert next(merger.merged_model().parameters()).device.type == device
        gates[device] = merger.deterministic_gates().cpu()
    torch.testing.assert_close(gates["cuda"], gates["cpu"], atol=1e-4, rtol=1e-4)


def test_learned_soup_and_static_methods_on_cuda() -> None:
    ctx = MergeContext(
        MLP(16, (32,), 4), _candidates(), merge_loader=_loader(), device="cuda", base=None
    )
    for name, params in (("learned_soup", {"steps": 5}), ("greedy_soup", {}), ("uniform_soup", {})):
        outcome = get_method(name, **params).merge(ctx)
        assert next(outcome.model.parameters()).device.type == "cuda"


def test_cli_merge_with_device_cuda(tmp_path: Path) -> None:
    for i, state in enumerate(_candidates()):
        save_file(state, str(tmp_path / f"c{i}.safetensors"))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    save_file({"x": x, "y": y}, str(tmp_path / "merge.safetensors"))
    config = {
        "model": {
            "factory": "softmerge.zoo:MLP",
            "kwargs": {"in_features": 16, "hidden": [32], "num_classes": 4},
        },
        "candidates": [f"c{i}.safetensors" for i in range(3)],
        "data": {"dataset": "tensors", "merge": "merge.safetensors", "eval": "merge.safetensors"},
        "fit": {"steps": 10},
        "output": {"dir": "out"},
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "m.yaml"), "--device", "cuda", "-q"]) == 0
    merged = load_file(str(tmp_path / "out" / "merged.safetensors"))
    assert set(merged) == set(_candidates()[0])
    for method in ("ties", "dare_linear"):
        out = tmp_path / method
        argv = ["merge", str(tmp_path / "m.yaml"), "--device", "cuda", "-q", "--out", str(out)]
        argv += ["--set", f"method={method}", "--set", "plan.base=c0"]
        assert main(argv) == 0
