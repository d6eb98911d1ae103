"""Hugging Face models end to end (issue 11): tied GPT-2, Llama and LoRA adapter folders merged
by `softmerge merge` over text files; exports reload with from_pretrained (or
PeftModel.from_pretrained) and give the same numbers; the objectives are the right ones.

Everything is built here from transformers configs and trained for a few steps: no download."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from softmerge import FitConfig, MergePlan, SoftMerger  # noqa: E402
from softmerge.batches import split_batch  # noqa: E402
from softmerge.cli import main  # noqa: E402
from softmerge.errors import CandidateError, DataError  # noqa: E402
from softmerge.lm_demo import byte_tokenizer  # noqa: E402
from softmerge.objectives import resolve_objective  # noqa: E402


def _text_files(folder: Path) -> tuple[Path, Path]:
    merge, evals = folder / "merge.txt", folder / "eval.jsonl"
    merge.write_text(inspect.getsource(json)[:5000], encoding="utf-8")
    rows = [{"text": p} for p in inspect.getsource(yaml).split("\n\n")[:40] if p.strip()]
    evals.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return merge, evals


def _train_a_little(model: torch.nn.Module, seed: int, tokenizer) -> None:
    """A few steps on a distinct text, so the candidates differ."""
    text = inspect.getsource([json, yaml, torch.nn.functional][seed % 3])[:4000]
    ids = torch.tensor(tokenizer(text)["input_ids"][: 8 * 32]).view(8, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(seed)
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _folders(tmp: Path, config, count: int = 3) -> list[Path]:
    tokenizer = byte_tokenizer()
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(config)
        _train_a_little(model, i, tokenizer)
        path = tmp / f"m{i}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def _run(tmp: Path, config: dict) -> dict:
    path = tmp / "merge.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["merge", str(path), "--no-progress", "-q"]) == 0
    return json.loads((tmp / "out" / "summary.json").read_text())


def _eval_ppl(folder: Path, evals: Path, block: int) -> float:
    """Perplexity of a saved model on the eval file, exactly as the run scored its merge."""
    from softmerge.data.text import load_text_files, load_tokenizer, tokenize_blocks
    from softmerge.evaluation import evaluate

    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    blocks = tokenize_blocks(load_text_files([evals]), load_tokenizer(folder), block)
    loader = torch.utils.data.DataLoader(blocks, batch_size=8)
    return evaluate(model, loader)["perplexity"]


TINY = dict(vocab_size=259, bos_token_id=256, eos_token_id=257, pad_token_id=258)


def test_tied_gpt2_folders_merge_over_text_and_stay_tied(tmp_path: Path) -> None:
    config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, **TINY)
    _folders(tmp_path, config)
    merge, evals = _text_files(tmp_path)
    summary = _run(
        tmp_path,
        {
            "model": {"hf": "m0"},
            "candidates": ["m0", "m1", "m2"],
            "data": {
                "dataset": "text",
                "merge": [merge.name],
                "eval": evals.name,
                "block_size": 32,
                "batch_size": 8,
            },
            "plan": {"granularity": "channel"},  # GPT-2's Conv1D: output channels in dim 1
            "fit": {"steps": 20, "eval_every": 0},
            "output": {"dir": "out"},
        },
    )
    out = tmp_path / "out"
    merged = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()
    soft = next(r for r in summary["results"] if r["model"] == "soft merge")
    assert math.isclose(_eval_ppl(out, evals, 32), soft["perplexity"], rel_tol=1e-5)
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
    gates = json.loads((out / "gates.json").read_text())
    unit_names = [u["name"] for u in gates["units"]]
    assert len(unit_names) == len(set(unit_names))  # no channel unit listed twice


def test_llama_folders_merge_and_reload_with_the_same_numbers(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **TINY,
    )
    _folders(tmp_path, config)
    merge, evals = _text_files(tmp_path)
    summary = _run(
        tmp_path,
        {
            "model": {"hf": "m0"},
            "candidates": ["m0", "m1", "m2"],
            "data": {
                "dataset": "text",
                "merge": merge.name,
                "eval": evals.name,
                "block_size": 32,
                "batch_size": 8,
            },
            "fit": {"steps": 20, "eval_every": 10},
            "output": {"dir": "out", "shard_size": "40KB"},
        },
    )
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file()  # sharded above shard_size
    soft = next(r for r in summary["results"] if r["model"] == "soft merge")
    assert math.isclose(_eval_ppl(out, evals, 32), soft["perplexity"], rel_tol=1e-5)
    history = json.loads((out / "history.json").read_text())
    assert any("val_ppl" in h for h in history)  # LM validation reports perplexity


def test_lora_adapter_folders_merge_into_a_model_and_one_adapter(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **TINY,
    )
    (base,) = _folders(tmp_path, config, count=1)
    tokenizer = byte_tokenizer()
    for i, targets in enumerate([["q_proj", "v_proj"], ["q_proj", "v_proj", "down_proj"]]):
        model = transformers.LlamaForCausalLM.from_pretrained(base)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
        adapted = peft.get_peft_model(model, lora)
        _train_a_little(adapted, i + 1, tokenizer)
        adapted.save_pretrained(tmp_path / f"a{i}")
    merge, evals = _text_files(tmp_path)
    summary = _run(
        tmp_path,
        {
            "model": {"hf": base.name},
            "candidates": ["a0", "a1"],
            "data": {
                "dataset": "text",
                "merge": merge.name,
                "eval": evals.name,
                "block_size": 32,
                "batch_size": 8,
            },
            "plan": {"combine": "delta", "base": base.name},
            "fit": {"steps": 20, "eval_every": 0},
            "output": {"dir": "out"},
        },
    )
    out = tmp_path / "out"
    soft = next(r for r in summary["results"] if r["model"] == "soft merge")
    assert math.isclose(_eval_ppl(out, evals, 32), soft["perplexity"], rel_tol=1e-5)
    full = transformers.LlamaForCausalLM.from_pretrained(out)
    adapted = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(base), out / "adapter"
    )
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            adapted(input_ids=ids).logits, full(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


# ------------------------------------------------------------------------------- objectives


def test_causal_lm_objective_is_the_models_own_loss() -> None:
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        **TINY,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding: not a target
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    objective = resolve_objective("auto", model)
    assert objective.name == "causal_lm"
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        logits = model(input_ids=ids, attention_mask=mask).logits
    ours = objective.loss(logits, split_batch(batch))
    torch.testing.assert_close(ours, own, atol=1e-6, rtol=1e-6)
    all_ignored = {**batch, "labels": torch.full_like(ids, -100)}
    with pytest.raises(DataError, match="every label is -100"):
        objective.loss(logits, split_batch(all_ignored))


def test_callable_objective_from_the_api_and_yaml(tmp_path: Path) -> None:
    calls = []

    def my_loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        calls.append(logits.shape)
        return torch.nn.functional.cross_entropy(logits, labels)

    from softmerge.zoo import MLP

    cands = []
    for seed in range(2):
        torch.manual_seed(seed)
        cands.append(MLP(8, (8,), 3).state_dict())
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    merger = SoftMerger(MLP(8, (8,), 3), cands, MergePlan())
    merger.fit(loader, config=FitConfig(steps=3, progress=False, objective=my_loss))
    assert calls  # the callable is the merge's objective (ranking and steps)
    assert merger.ctx.objective_fn.name.endswith("my_loss")


def test_adapter_and_vocabulary_mismatches_are_clear(tmp_path: Path) -> None:
    small = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        **TINY,
    )
    wide = transformers.LlamaConfig(
        **{**small.to_dict(), "hidden_size": 32, "intermediate_size": 64}
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(small).save_pretrained(tmp_path / "small")
    transformers.LlamaForCausalLM(wide).save_pretrained(tmp_path / "wide")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "wide")
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "ad_wide"
    )
    with pytest.raises(CandidateError, match="adapter trained for another base"):
        SoftMerger(
            transformers.LlamaForCausalLM(small),
            [tmp_path / "ad_wide"] * 2,
            MergePlan(base=str(tmp_path / "small")),  # the adapters' base: not theirs
            names=["a", "b"],
        )
    (tmp_path / "ad_empty").mkdir()
    (tmp_path / "ad_empty" / "adapter_config.json").write_text(
        (tmp_path / "ad_wide" / "adapter_config.json").read_text()
    )
    with pytest.raises(CandidateError, match="adapter folder without weights"):
        SoftMerger(
            transformers.LlamaForCausalLM(wide),
            [tmp_path / "ad_empty"] * 2,
            MergePlan(base=str(tmp_path / "wide")),
            names=["a", "b"],
        )


def test_yaml_objective_module_function(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from softmerge.zoo import MLP

    (tmp_path / "myloss.py").write_text(
        "import torch.nn.functional as F\n\nCALLS = []\n\n"
        "def loss(logits, labels):\n    CALLS.append(1)\n"
        "    return F.cross_entropy(logits, labels)\n"
    )
    for seed in range(2):
        torch.manual_seed(seed)
        save_file(dict(MLP(8, (8,), 3).state_dict()), str(tmp_path / f"c{seed}.safetensors"))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    save_file({"x": x, "y": y}, str(tmp_path / "merge.safetensors"))
    config = {
        "model": {
            "factory": "softmerge.zoo:MLP",
            "kwargs": {"in_features": 8, "hidden": [8], "num_classes": 3},
        },
        "candidates": ["c0.safetensors", "c1.safetensors"],
        "data": {"dataset": "tensors", "merge": "merge.safetensors", "batch_size": 8},
        "fit": {"steps": 4, "objective": "myloss:loss"},
        "output": {"dir": "out"},
    }
    _run(tmp_path, config)
    import sys

    assert sys.modules["myloss"].CALLS  # the user's function was the objective
    bad = {**config, "fit": {"objective": "myloss:nope"}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["merge", str(tmp_path / "bad.yaml")]) == 2
