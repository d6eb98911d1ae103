"""Tests for softmerge.data.text: local text files, saved data sets, blocks, batch checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from softmerge.data.text import (  # noqa: E402
    IGNORE_INDEX,
    accepted_fields,
    check_batch_fields,
    check_block_size,
    check_labels,
    check_tokenizer_fits,
    collate_dict,
    load_hf_disk,
    load_text_files,
    load_tokenizer,
    tokenize_blocks,
    tokenize_classification,
)
from softmerge.errors import DataError  # noqa: E402

WORDS = ["a", "b", "c", "d", "e", "hello", "world"]


def word_tokenizer(*, eos: bool = True, type_ids: bool = False):
    """A whitespace word-level tokenizer built in memory: [UNK]=0, [PAD]=1, [EOS]=2, words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["[UNK]", "[PAD]", *(["[EOS]"] if eos else [])]
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    names = ["input_ids", "attention_mask", *(["token_type_ids"] if type_ids else [])]
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="[EOS]" if eos else None,
        model_input_names=names,
    )


def tiny_llama(vocab_size: int = 16):
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------- files


def test_txt_file_is_one_document(tmp_path):
    code = "def f(x):\n    return x\n\n\nclass A:\n    pass\n"
    first = write(tmp_path / "a.txt", code)
    second = write(tmp_path / "b.TXT", "hello world\n")
    ds = load_text_files([first, second])
    assert ds.column_names == ["text"]
    assert ds["text"] == [code, "hello world\n"]


def test_jsonl_reads_text_or_named_column_and_label(tmp_path):
    path = jsonl(
        tmp_path / "d.jsonl",
        [{"text": "a b", "body": "x", "y": 1}, {"text": "c", "body": "z", "y": 0}],
    )
    assert load_text_files([path])["text"] == ["a b", "c"]
    ds = load_text_files([path], column="body", label_column="y")
    assert sorted(ds.column_names) == ["label", "text"]
    assert ds["text"] == ["x", "z"] and ds["label"] == [1, 0]
    swapped = load_text_files([path], column="body", label_column="text")
    assert swapped["text"] == ["x", "z"] and swapped["label"] == ["a b", "c"]


def test_jsonl_drops_rows_without_text(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": ""}, {"text": None}, {"text": "b"}])
    assert load_text_files([path])["text"] == ["a", "b"]


def test_csv_and_parquet(tmp_path):
    csv = write(tmp_path / "d.csv", 'sentence,label\n"hello, world",pos\nd e,neg\n')
    ds = load_text_files([csv], column="sentence", label_column="label")
    assert ds["text"] == ["hello, world", "d e"] and ds["label"] == ["pos", "neg"]
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"text": ["a b c", "d"], "n": [3, 1]}).to_parquet(str(parquet))
    assert load_text_files([parquet])["text"] == ["a b c", "d"]
    both = load_text_files([parquet, write(tmp_path / "e.txt", "e")])
    assert both["text"] == ["a b c", "d", "e"]


def test_reading_leaves_no_cache_behind(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)  # datasets' default
    ds = load_text_files([jsonl(tmp_path / "d.jsonl", [{"text": "a"}])])
    assert ds["text"] == ["a"]  # in memory: readable after its temporary cache is gone
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.txt", b"", "empty"),
        ("blank.txt", b"  \n\n\t", "empty"),
        ("empty.jsonl", b"", "empty"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "byte 0xe9 at offset 3"),
        ("latin1.csv", b"text\nna\xefve\n", "byte 0xef at offset 7"),
    ],
)
def test_bad_file_contents_name_the_file(tmp_path, name, content, expected):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=expected) as err:
        load_text_files([path])
    assert str(path) in str(err.value)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: no such file"):
        load_text_files([tmp_path / "nope.txt"])
    with pytest.raises(DataError, match=r"unknown text file type '\.docx'.*\.jsonl"):
        load_text_files([write(tmp_path / "a.docx", "a")])
    with pytest.raises(DataError, match="no text files"):
        load_text_files([])


def test_missing_column_lists_the_columns(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"body": "a", "label": 1}])
    with pytest.raises(DataError, match=r"no text column 'text'; the columns are: body, label"):
        load_text_files([path])
    with pytest.raises(DataError, match="no label column 'y'"):
        load_text_files([path], column="body", label_column="y")


def test_non_text_column_and_all_empty_rows(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "", "n": 1}, {"text": " ", "n": 2}])
    with pytest.raises(DataError, match="column 'n' holds int64, not text"):
        load_text_files([path], column="n")
    with pytest.raises(DataError, match="no text: every row"):
        load_text_files([path])


def test_malformed_jsonl_and_txt_columns(tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: cannot read as json"):
        load_text_files([bad])
    with pytest.raises(DataError, match=r"\.txt file has no columns"):
        load_text_files([write(tmp_path / "a.txt", "a")], column="body")


# --------------------------------------------------------------------------- saved data sets


def test_load_hf_disk_dataset_and_splits(tmp_path):
    single = datasets.Dataset.from_dict({"sentence": ["a b", "c"], "y": [0, 1], "id": [5, 6]})
    single.save_to_disk(str(tmp_path / "one"))
    ds = load_hf_disk(tmp_path / "one", columns={"text": "sentence", "label": "y"})
    assert sorted(ds.column_names) == ["label", "text"] and ds["label"] == [0, 1]
    with pytest.raises(DataError, match="without splits"):
        load_hf_disk(tmp_path / "one", split="train", columns={"text": "sentence"})

    both = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["a", "b"]}),
            "validation": datasets.Dataset.from_dict({"text": ["c"]}),
        }
    )
    both.save_to_disk(str(tmp_path / "two"))
    assert load_hf_disk(tmp_path / "two", split="validation")["text"] == ["c"]
    with pytest.raises(DataError, match="splits train, validation: choose one"):
        load_hf_disk(tmp_path / "two")
    with pytest.raises(DataError, match="no split 'test'; the splits are: train, validation"):
        load_hf_disk(tmp_path / "two", split="test")


def test_load_hf_disk_errors(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_hf_disk(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a data set saved with save_to_disk"):
        load_hf_disk(tmp_path / "empty")
    with pytest.raises(DataError, match="columns must map 'text'"):
        load_hf_disk(tmp_path / "empty", columns={"sentence": "text"})


def test_load_tokenizer_round_trip_and_missing_folder(tmp_path):
    word_tokenizer().save_pretrained(str(tmp_path / "tok"))
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded("hello world", add_special_tokens=False)["input_ids"] == [8, 9]
    with pytest.raises(DataError, match="no such tokenizer folder"):
        load_tokenizer(tmp_path / "none")
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "bare")


# --------------------------------------------------------------------------- tokenising


def test_blocks_concatenate_documents_with_eos_and_pad_the_tail():
    tok = word_tokenizer()
    ids = {w: tok.convert_tokens_to_ids(w) for w in ["a", "b", "c", "[EOS]", "[PAD]"]}
    ds = datasets.Dataset.from_dict({"text": ["a b", "c"]})
    blocks = tokenize_blocks(ds, tok, 3)  # stream: a b EOS | c EOS (+pad)
    assert len(blocks) == 2
    assert blocks[0]["input_ids"].tolist() == [ids["a"], ids["b"], ids["[EOS]"]]
    assert blocks[1]["input_ids"].tolist() == [ids["c"], ids["[EOS]"], ids["[PAD]"]]
    assert blocks[1]["attention_mask"].tolist() == [1, 1, 0]
    assert blocks[1]["labels"].tolist() == [ids["c"], ids["[EOS]"], IGNORE_INDEX]
    assert blocks.target_tokens() == 2 + 1
    # A tail of one token holds no next-token target: dropped.
    assert len(tokenize_blocks(ds, tok, 2)) == 2


def test_text_longer_than_a_block_is_chunked_not_truncated():
    tok = word_tokenizer()
    words = (WORDS * 50)[:333]
    blocks = tokenize_blocks(datasets.Dataset.from_dict({"text": [" ".join(words)]}), tok, 32)
    ids = blocks.tensors["input_ids"][blocks.tensors["attention_mask"] == 1].tolist()
    assert len(blocks) == 11  # 334 tokens with EOS: 10 full blocks and a tail of 14
    assert ids == [*tok.convert_tokens_to_ids(words), tok.eos_token_id]


def test_block_errors():
    ds = datasets.Dataset.from_dict({"text": ["a b"]})
    with pytest.raises(DataError, match="block_size must be an integer >= 2"):
        tokenize_blocks(ds, word_tokenizer(), 1)
    with pytest.raises(DataError, match="has no EOS"):
        tokenize_blocks(ds, word_tokenizer(eos=False), 4)
    with pytest.raises(DataError, match="no text column 'body'"):
        tokenize_blocks(ds, word_tokenizer(), 4, column="body")
    with pytest.raises(DataError, match="fewer than 2"):
        tokenize_blocks(datasets.Dataset.from_dict({"text": [" ", ""]}), word_tokenizer(), 4)


def test_classification_pads_truncates_and_keeps_every_tokenizer_field():
    ds = datasets.Dataset.from_dict({"text": ["a b c d e", "hello"], "label": ["pos", "neg"]})
    items = tokenize_classification(ds, word_tokenizer(type_ids=True), 3)
    assert set(items.fields) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert items.tensors["input_ids"].shape == (2, 3)
    assert items.tensors["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert items.tensors["labels"].tolist() == [1, 0] and items.label_names == ["neg", "pos"]
    ints = datasets.Dataset.from_dict({"text": ["a"], "y": [3]})
    assert tokenize_classification(ints, word_tokenizer(), 4, label_column="y")[0]["labels"] == 3


def test_classification_label_errors():
    tok = word_tokenizer()
    for labels, message in (([1, -1], "row 1 holds -1"), ([0.5, 1.0], "row 0 holds 0.5")):
        ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": labels})
        with pytest.raises(DataError, match=message):
            tokenize_classification(ds, tok, 4)
    with pytest.raises(DataError, match="no label column 'label'"):
        tokenize_classification(datasets.Dataset.from_dict({"text": ["a"]}), tok, 4)


def test_collate_dict_stacks_fields_and_rejects_mismatched_items():
    batch = collate_dict([{"x": torch.tensor([1, 2]), "y": torch.tensor(0)}] * 3)
    assert batch["x"].shape == (3, 2) and batch["y"].tolist() == [0, 0, 0]
    with pytest.raises(DataError, match="item 1 has other fields than item 0: z"):
        collate_dict([{"x": torch.tensor(1)}, {"x": torch.tensor(1), "z": torch.tensor(2)}])


# --------------------------------------------------------------------------- checks


class Plain(nn.Module):
    def forward(self, input_ids, attention_mask=None):
        return input_ids


class Anything(nn.Module):
    def forward(self, input_ids, **kwargs):
        return input_ids


def test_batch_fields_the_model_does_not_take_are_errors():
    llama = tiny_llama()
    check_batch_fields(llama, ["input_ids", "attention_mask", "labels"])
    with pytest.raises(DataError, match=r"'token_type_ids' is not an argument of LlamaForCausal"):
        check_batch_fields(llama, ["input_ids", "token_type_ids", "labels"])
    with pytest.raises(DataError, match=r"'mask' is not an argument of Plain\.forward"):
        check_batch_fields(Plain(), ["input_ids", "mask"])
    check_batch_fields(Anything(), ["input_ids", "whatever"])
    assert accepted_fields(Anything()) is None
    bert = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=16,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
        )
    )
    check_batch_fields(bert, ["input_ids", "attention_mask", "token_type_ids", "labels"])


def test_tokenizer_must_fit_the_vocabulary():
    tok = word_tokenizer()  # 10 tokens
    check_tokenizer_fits(tok, 10)
    with pytest.raises(DataError, match=r"has 10 tokens but the model's vocabulary has 8"):
        check_tokenizer_fits(tok, tiny_llama(vocab_size=8).config.vocab_size)


def test_labels_all_ignored_is_an_error():
    check_labels({"labels": torch.tensor([[1, 2, IGNORE_INDEX]])}, causal=True)
    with pytest.raises(DataError, match="every label of the batch is -100"):
        check_labels({"labels": torch.full((2, 4), IGNORE_INDEX)})
    # Causal LM labels are shifted by the loss: a lone first label is no target.
    with pytest.raises(DataError, match="every label"):
        check_labels({"labels": torch.tensor([[5, IGNORE_INDEX, IGNORE_INDEX]])}, causal=True)
    with pytest.raises(DataError, match="no 'labels'"):
        check_labels({"input_ids": torch.zeros(1, 2)})


def test_block_size_must_fit_positions():
    check_block_size(32, 32)
    with pytest.raises(DataError, match="block_size 64 exceeds the model's 32 positions"):
        check_block_size(64, tiny_llama().config.max_position_embeddings)
