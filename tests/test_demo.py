"""The demo end to end, on a smaller MNIST-1D (quick=True): structure and guarantees.

The documented demo numbers come from the full run (`make demo`); this checks what must hold
at any size: every row present, malicious gates exactly 0, exported files that reproduce the
reported accuracy, and a uniform soup that the malicious candidates ruin."""

import json

from safetensors.torch import load_file

from softmerge.data import mnist1d_splits
from softmerge.demo import CHANNELS, QUICK_SIZES, run_demo
from softmerge.zoo import CNN1D, evaluate

NAMES = [
    "best_single",
    "uniform_soup",
    "uniform_soup_all",
    "greedy_soup",
    "ensemble",
    "soft_model",
    "soft_tensor",
    "soft_model_all",
    "soft_tensor_all",
]


def test_quick_demo(tmp_path):
    summary = run_demo(tmp_path, quick=True, progress=False)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["accuracy"] == summary["accuracy"]
    acc = summary["accuracy"]
    assert set(NAMES) <= set(acc)
    assert summary["malicious_gates_max"] == 0.0
    assert all(summary["export_matches_reported"].values())
    assert acc["uniform_soup_all"] < acc["uniform_soup"]
    assert summary["loss"]["uniform_soup_all"] > 100 * summary["loss"]["uniform_soup"]
    for name in ("soft_tensor", "soft_tensor_all"):
        assert acc[name] >= min(acc[f"child{k}"] for k in range(5))
        for f in ("merged.safetensors", "gates.json", "gates.png", "convergence.png"):
            assert (tmp_path / name / f).exists()
    model = CNN1D(channels=CHANNELS)
    model.load_state_dict(
        load_file(str(tmp_path / "soft_tensor_all" / "merged.safetensors")), strict=True
    )
    test_set = mnist1d_splits(**QUICK_SIZES).test
    assert round(evaluate(model, test_set)[0], 4) == acc["soft_tensor_all"]
