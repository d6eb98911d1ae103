"""The language-model demo at quick size: every merge runs through the registry, the poisoned
child is switched off exactly, the soft merge's folder reloads, and the goal holds.

The documented numbers come from the full run (`softmerge demo --task lm`, README)."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from softmerge.demo_lm import run_lm_demo


def test_quick_lm_demo(tmp_path):
    summary = run_lm_demo(tmp_path, quick=True, progress=False)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["goal"] == summary["goal"]
    names = [r["model"] for r in summary["rows"]]
    for expected in ("parent", "poisoned", "lora_code", "full: uniform soup", "lora: peft cat"):
        assert expected in names
    goal = summary["goal"]
    assert goal["poisoned_gates_exactly_zero"] and goal["poisoned_gate_max"] == 0.0
    assert goal["soft_beats_every_other_merge"], goal
    import transformers

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "soft")
    assert merged.config.vocab_size == 259
