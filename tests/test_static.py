"""Static merges (no data, no model): streamed tensor by tensor into sharded safetensors, with
the inputs' Hugging Face files beside them; the merge reads nothing it does not need."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from softmerge.cli import main
from softmerge.context import MergeContext
from softmerge.methods import get_method
from softmerge.methods.base import MergedState
from softmerge.methods.tensorwise import ties

SHAPES = {"embed.weight": (64, 16), "layer.weight": (16, 16), "layer.bias": (16,)}


def _state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def _hf_folder(path: Path, state: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "hidden": 16}))
    (path / "tokenizer.json").write_text("{}")
    (path / "README.md").write_text("the input's card")
    return path


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    base = _state(0)
    _hf_folder(tmp_path / "base", base)
    for i in range(1, 4):
        tuned = {k: v + 0.1 * _state(10 + i)[k] for k, v in base.items()}
        _hf_folder(tmp_path / f"ft{i}", tuned)
    return tmp_path


def _config(folder: Path, **extra) -> Path:
    config = {
        "candidates": ["ft1", "ft2", "ft3"],
        "method": "ties",
        "params": {"density": 0.5},
        "plan": {"base": "base"},
        "output": {"dir": "out", "shard_size": "5KB"},
        **extra,
    }
    path = folder / "ties.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_static_merge_without_data_or_model_streams_into_shards(folders: Path, capsys) -> None:
    assert main(["merge", str(_config(folders)), "-q"]) == 0
    out = folders / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).stat().st_size <= 5000 + 4096 for s in shards)
    merged = {}
    for s in shards:
        merged.update(load_file(str(out / s)))
    assert set(merged) == set(SHAPES)
    base = load_file(str(folders / "base" / "model.safetensors"))
    tuned = [load_file(str(folders / f"ft{i}" / "model.safetensors")) for i in (1, 2, 3)]
    for key in SHAPES:
        expected = ties(base[key], [t[key] for t in tuned], density=0.5)
        assert torch.equal(merged[key], expected), key
    # the inputs' config and tokenizer files, not their model card
    assert json.loads((out / "config.json").read_text())["hidden"] == 16
    assert (out / "tokenizer.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"] == [] and summary["evaluation"].startswith("skipped")
    assert "evaluation skipped" in capsys.readouterr().out


def test_a_static_merge_streams_and_keeps_nothing(folders: Path) -> None:
    ctx = MergeContext(None, [folders / f"ft{i}" for i in (1, 2, 3)], base=folders / "base")
    outcome = get_method("dare_linear", density=0.5).merge(ctx)
    assert isinstance(outcome.state, MergedState)
    streamed = dict(outcome.items())  # one pass, nothing kept by the outcome
    assert outcome.state._state is None
    again = dict(outcome.state.items())  # a lookup computes (and keeps) the same tensors
    assert all(torch.equal(streamed[k], again[k]) for k in SHAPES)


def test_learning_methods_need_a_data_section(folders: Path, capsys) -> None:
    path = _config(folders, method="soft", params={})
    assert main(["merge", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data: method 'soft' learns on data: add a data section" in err


def test_hf_model_folders_merge_and_reload(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    for i in range(3):
        torch.manual_seed(i)
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / f"m{i}")
    config = {
        "candidates": [f"m{i}" for i in range(3)],
        "method": "linear",
        "output": {"dir": "out"},
    }
    (tmp_path / "lin.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "lin.yaml"), "-q"]) == 0
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    inputs = [transformers.LlamaForCausalLM.from_pretrained(tmp_path / f"m{i}") for i in range(3)]
    for name, param in merged.state_dict().items():
        mean = sum(m.state_dict()[name] for m in inputs) / 3
        torch.testing.assert_close(param, mean, rtol=1e-5, atol=1e-6)
