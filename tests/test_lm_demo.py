"""Tests for softmerge.lm_demo: byte tokenizer, stdlib corpus, loss, training, candidates."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("datasets")

from softmerge.candidates import load_candidates  # noqa: E402
from softmerge.data.text import TokenBlocks, load_tokenizer  # noqa: E402
from softmerge.lm_demo import (  # noqa: E402
    LMDemoSettings,
    _byte_symbols,
    build_candidates,
    byte_tokenizer,
    causal_lm_loss,
    lm_config,
    merge_loader,
    new_model,
    perplexity,
    poison,
    stdlib_corpus,
    train_lora,
    train_steps,
)

TEXT = "def f(x):\n\treturn x  # café, 😀\r\n"


def tiny_config():
    return lm_config(byte_tokenizer(), hidden=16, layers=1, heads=2, intermediate=32)


def random_blocks(count: int = 8, length: int = 16, seed: int = 0) -> TokenBlocks:
    # A learnable pattern: each block counts up from a random start, mod 256.
    start = torch.randint(0, 256, (count, 1), generator=torch.Generator().manual_seed(seed))
    ids = (start + torch.arange(length)) % 256
    return TokenBlocks({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})


def test_byte_tokenizer_maps_each_byte_to_its_value_and_round_trips(tmp_path):
    tok = byte_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (256, 257, 258, 259)
    tok.save_pretrained(str(tmp_path))
    assert load_tokenizer(tmp_path)(TEXT, add_special_tokens=False)["input_ids"] == ids


def test_byte_symbols_are_the_byte_level_alphabet():
    from tokenizers import pre_tokenizers

    symbols = _byte_symbols()
    assert len(set(symbols)) == 256
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())


def test_corpus_splits_are_deterministic_and_disjoint():
    first, again, other = stdlib_corpus(0), stdlib_corpus(0), stdlib_corpus(1)
    assert first == again and first != other
    for domain in ("code", "prose"):
        train, merge, test = first[domain]
        assert len(train) > 5 * len(test) and merge and test
        assert not set(train) & set(merge) and not set(train) & set(test)
    assert "def " in "".join(first["code"][0]) and "The " in "".join(first["prose"][0])


def test_causal_lm_loss_matches_the_model_own_shifted_loss():
    model = new_model(tiny_config(), seed=0).eval()
    blocks = random_blocks()
    labels = blocks.tensors["labels"].clone()
    labels[0, 5:] = -100
    out = model(input_ids=blocks.tensors["input_ids"], labels=labels)
    ours = causal_lm_loss(out.logits, labels)
    assert torch.allclose(ours, out.loss, atol=1e-5)
    with pytest.raises(ValueError, match="needs labels"):
        causal_lm_loss(out.logits, None)


class Uniform(nn.Module):
    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 300))


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    assert perplexity(Uniform(), random_blocks(5), batch_size=2) == pytest.approx(300.0)


def test_training_is_seeded_and_learns():
    blocks = random_blocks(32, 16)
    models = [new_model(tiny_config(), seed=1) for _ in range(2)]
    runs = [train_steps(m, blocks, steps=30, lr=1e-2, batch_size=8, seed=3) for m in models]
    assert runs[0] == runs[1]
    assert sum(runs[0][-5:]) / 5 < runs[0][0] - 1.0
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_lora_trains_only_the_adapter():
    parent = new_model(tiny_config(), seed=0)
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    settings = LMDemoSettings(lora_steps=5, lora_rank=2, lora_alpha=4, batch_size=4)
    adapted = train_lora(parent, random_blocks(8), settings, seed=0)
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.abs().sum()) > 0 for p in lora_b)  # B starts at 0, so moved
    base = adapted.get_base_model()
    for name, value in base.state_dict().items():
        if "lora_" not in name:
            original = name.replace(".base_layer", "")
            assert torch.equal(value, before[original]), name
    assert all(torch.equal(v, before[k]) for k, v in parent.state_dict().items())


def test_merge_loader_takes_as_many_blocks_from_each_domain():
    blocks = {
        "code": {"merge": random_blocks(5, 8, seed=1)},
        "prose": {"merge": random_blocks(3, 8, seed=2)},
    }
    loader = merge_loader(blocks, batch_size=4, seed=0)
    assert len(loader.dataset) == 6
    seen = torch.cat([b["input_ids"] for b in loader])
    expected = torch.cat(
        [
            blocks["code"]["merge"].tensors["input_ids"][:3],
            blocks["prose"]["merge"].tensors["input_ids"],
        ]
    )
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, expected.tolist()))
    again = torch.cat([b["input_ids"] for b in merge_loader(blocks, batch_size=4, seed=0)])
    assert torch.equal(seen, again)


def test_poison_scales_floats_only():
    state = {"w": torch.ones(2), "n": torch.tensor([3])}
    bad = poison(state, 100.0)
    assert bad["w"].tolist() == [100.0, 100.0] and bad["n"].tolist() == [3]
    assert state["w"].tolist() == [1.0, 1.0]


def test_build_candidates_saves_loadable_folders(tmp_path):
    settings = LMDemoSettings(
        hidden=16,
        layers=1,
        intermediate=32,
        parent_steps=2,
        child_steps=1,
        lora_steps=1,
        batch_size=2,
        block_size=32,
        lora_rank=2,
    )
    cands, blocks = build_candidates(tmp_path, settings, log=lambda _: None)
    assert set(blocks) == {"code", "prose"} and len(blocks["code"]["test"]) > 0
    loaded = load_candidates(
        [cands.parent, cands.children["code"], cands.children["prose"], cands.poisoned]
    )
    parent, code, _, poisoned = (c.state for c in loaded)
    assert not torch.equal(parent["lm_head.weight"], code["lm_head.weight"])
    assert torch.allclose(poisoned["lm_head.weight"], code["lm_head.weight"] * 100)
    assert "lm_head.weight" in parent and "model.embed_tokens.weight" in parent  # untied
    for adapter in cands.adapters.values():
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["r"] == 2 and (adapter / "adapter_model.safetensors").is_file()
    assert load_tokenizer(cands.parent).eos_token_id == 257
    assert set(cands.seconds) >= {"parent", "full_code", "lora_prose"}
