"""The demo end to end, on a smaller MNIST-1D (quick=True): structure and guarantees.

The documented demo numbers come from the full run (`make demo`); this checks what must hold
at any size: every row present, malicious gates exactly 0, exported files that reproduce the
reported accuracy, and a uniform soup that the malicious candidates ruin."""

import json

import pytest
import yaml
from safetensors.torch import load_file

from softmerge.cli import main
from softmerge.data import mnist1d_splits
from softmerge.demo import CHANNELS, QUICK_SIZES, run_demo
from softmerge.methods import METHOD_NAMES, REGISTRY
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


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, quick=True, progress=False)


def test_quick_demo(quick_demo):
    tmp_path, summary = quick_demo
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


def test_compare_runs_every_method_on_the_demo_candidates(quick_demo, capsys):
    """Issue 3's acceptance in miniature: one `softmerge compare` over the demo's clean
    candidates (the parent as base) runs every registered method from YAML."""
    out, _ = quick_demo
    learn = {"steps": 30, "select_every": 10}
    short = {"learned_soup": learn, "task_wise_adamerging": learn, "layer_wise_adamerging": learn}
    short["soft"] = {"steps": 30}
    full = [n for n in METHOD_NAMES if not REGISTRY[n].needs_adapters]  # no LoRA adapters here
    entries = [{"method": name, "params": short.get(name, {})} for name in full]
    for entry in entries:
        if entry["method"] == "slerp":  # exactly two models: two children, not the parent
            entry.update(candidates=["child0", "child1"], plan={"base": None})
    config = {
        "model": {"factory": "softmerge.zoo:CNN1D", "kwargs": {"channels": CHANNELS}},
        "candidates": [str(out / "candidates" / f"child{k}.safetensors") for k in range(5)],
        "data": {"dataset": "mnist1d", "kwargs": QUICK_SIZES, "held_out": 0.2},
        "plan": {"base": str(out / "parent.safetensors")},
        "methods": entries,
        "output": {"dir": str(out / "compare")},
    }
    path = out / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", str(path), "--no-progress", "-q"]) == 0
    rows = json.loads((out / "compare" / "compare.json").read_text())["rows"]
    assert [r["method"] for r in rows[5:]] == [e["method"] for e in entries]
    printed = capsys.readouterr().out
    assert all(e["method"] in printed for e in entries)
