"""Bad input, faults and hostile checkpoints, through the ``softmerge merge`` command.

Every case of ``docs/errors.md`` runs here: the command must exit non-zero (2; 130 when
interrupted) with one line ``softmerge: error: ...`` that names the culprit, and must leave every
file of the run's folder (inputs, output folder, checkpoint) byte for byte and mtime for mtime
as it was. The message each case prints must be the one ``docs/errors.md`` shows, so the table
cannot drift from the code. To regenerate the table's messages after changing one::

    SOFTMERGE_RECORD_ERRORS=/tmp/errors.jsonl .venv/bin/python -m pytest tests/test_errors.py
    .venv/bin/python tests/test_errors.py /tmp/errors.jsonl    # prints the table rows
"""

from __future__ import annotations

import ast
import ctypes
import email.message
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.response
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from softmerge import soft
from softmerge.cli import main
from softmerge.data import locate
from softmerge.zoo import MLP

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
SCRIPT = Path(sys.executable).with_name("softmerge")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MPLBACKEND": "Agg"}
IS_ROOT = os.geteuid() == 0
NAME0 = "train-images-idx3-ubyte.gz"  # the first MNIST file a download asks for

MODEL = {
    "factory": "softmerge.zoo:MLP",
    "kwargs": {"in_features": 16, "hidden": [8], "num_classes": 4},
}


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in MLP(16, (8,), 4).state_dict().items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that merges cleanly: 3 candidates, labelled merge data, a config."""
    folder = tmp_path_factory.mktemp("base")
    (folder / "ckpt").mkdir()
    (folder / "data").mkdir()
    save_file(_state(0), str(folder / "ckpt" / "a.safetensors"))
    save_file(_state(1), str(folder / "ckpt" / "b.safetensors"))
    torch.save(_state(2), folder / "ckpt" / "c.pt")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    save_file({"x": x, "y": y}, str(folder / "data" / "merge.safetensors"))
    config = {
        "model": MODEL,
        "candidates": ["ckpt/a.safetensors", "ckpt/b.safetensors", "ckpt/c.pt"],
        "data": {"dataset": "tensors", "merge": "data/merge.safetensors", "batch_size": 16},
        "fit": {"steps": 6, "eval_every": 0, "record_every": 2, "rank_batches": 1},
        "output": {"dir": "out"},
    }
    (folder / "merge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


# ------------------------------------------------------------------------------- helpers


def edit_config(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "merge.yaml"
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def setting(section: str, **values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda c: c.setdefault(section, {}).update(values)


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: type, mode, and for files size, mtime and content hash.

    Folders' own mtimes are left out: a probe file or staging folder that was created and
    removed again changes them without changing what the folder holds."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        kind, mode = stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)
        if stat.S_ISREG(st.st_mode):
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except PermissionError:  # a chmod-000 input when not root: size and mtime still count
                digest = None
            entries[str(path.relative_to(folder))] = (
                kind,
                mode,
                st.st_size,
                st.st_mtime_ns,
                digest,
            )
        else:
            entries[str(path.relative_to(folder))] = (kind, mode)
    return entries


def run_console_script(argv: list[str]) -> subprocess.CompletedProcess:
    command = [str(SCRIPT), *argv]
    return subprocess.run(
        command, capture_output=True, text=True, env=ENV, timeout=120, check=False
    )


_CAP_VERSION_3, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 0x20080522, 1, 2


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]


def _drop_root_file_access() -> None:
    """Clear CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: root then obeys permission bits."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    data[0].effective &= keep
    data[0].permitted &= keep
    data[0].inheritable &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def run_as_root_without_file_access(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in a forked child whose root user obeys permission bits like anyone:
    the only way for root to meet a chmod-000 file (forked, so torch is not imported again)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read)
            sys.stderr = os.fdopen(write, "w")
            _drop_root_file_access()
            code = main(argv)
        except BaseException as exc:
            print(f"child failed: {exc!r}", file=sys.stderr)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        err = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


class _Evil:
    """Unpickling this calls open(path, "w"): the marker file appearing would prove code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def interrupt_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Ctrl-C during gate training: l0_penalty runs once per training step."""
    calls = {"n": 0}
    original = soft.SoftMerger.l0_penalty

    def penalty(self: soft.SoftMerger) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(soft.SoftMerger, "l0_penalty", penalty)


def disk_full(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ------------------------------------------------------------------------------- the cases


@dataclass
class Case:
    id: str
    case: str  # docs/errors.md: the case
    trigger: str  # docs/errors.md: how to trigger it
    setup: Callable[[Path, pytest.MonkeyPatch], list[str]]  # prepares the folder; extra argv
    culprit: list[str]  # what the message must name ({dir} is the run's folder)
    code: int = 2
    console: bool = False  # also run through the console script, in a subprocess
    drop_dac: bool = False  # the case needs permission bits to apply (root: a subprocess)
    extra: Callable[[Path], None] | None = None  # more checks after the run
    notes: list[str] = field(default_factory=list)


def _drop_key(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    state = _state(1)
    del state["net.3.bias"]
    save_file(state, str(folder / "ckpt" / "b.safetensors"))
    return []


def _reshape(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    state = _state(1)
    state["net.1.weight"] = torch.zeros(8, 15)
    save_file(state, str(folder / "ckpt" / "b.safetensors"))
    return []


def _half(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    state = _state(1)
    state["net.1.weight"] = state["net.1.weight"].half()
    save_file(state, str(folder / "ckpt" / "b.safetensors"))
    return []


def _wrong_model(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    edit_config(folder, lambda c: c["model"]["kwargs"].update(hidden=[12]))
    return []


def _missing(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    edit_config(folder, lambda c: c["candidates"].append("ckpt/d.safetensors"))
    return []


def _unreadable(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    (folder / "ckpt" / "b.safetensors").chmod(0)
    return []


def _truncate(name: str) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    def setup(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
        path = folder / "ckpt" / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return []

    return setup


def _malicious(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    torch.save({**_state(2), "payload": _Evil(folder / "pwned")}, folder / "ckpt" / "c.pt")
    return []


def _no_marker(folder: Path) -> None:
    assert not (folder / "pwned").exists()


def _not_a_dict(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    torch.save(list(_state(2).values()), folder / "ckpt" / "c.pt")
    return []


def _all_nonfinite(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    for i, name in enumerate(["a.safetensors", "b.safetensors", "c.pt"]):
        state = _state(i)
        state["net.1.bias"][0] = float("inf")
        path = folder / "ckpt" / name
        save_file(state, str(path)) if name.endswith(".safetensors") else torch.save(state, path)
    return []


def _one_candidate(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    edit_config(folder, lambda c: c.update(candidates=["ckpt/a.safetensors"]))
    return []


def _data(**tensors: torch.Tensor) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    def setup(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
        save_file(tensors, str(folder / "data" / "merge.safetensors"))
        return []

    return setup


def _config(change: Callable[[dict[str, Any]], None]) -> Callable[..., list[str]]:
    def setup(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
        edit_config(folder, change)
        return []

    return setup


def _environment(**values: str) -> Callable[..., list[str]]:
    def setup(_: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        from softmerge import memory

        monkeypatch.setattr(memory, "_applied", [])  # as in a fresh process
        for key, value in values.items():
            monkeypatch.setenv(key, value)
        return []

    return setup


def _read_only_output(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    (folder / "results").mkdir()
    (folder / "results").chmod(0o555)
    return ["--out", str(folder / "results" / "out")]


def _out_is_input(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    return ["--out", str(folder / "ckpt")]


def _missing_shard(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    """A Hugging Face style sharded candidate whose index names a shard that is not there."""
    shard = folder / "sharded"
    shard.mkdir()
    state = _state(1)
    first = dict(list(state.items())[:2])
    save_file(first, str(shard / "model-00001-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in state if k not in first})
    index = {"metadata": {}, "weight_map": weight_map}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    edit_config(folder, lambda c: c["candidates"].__setitem__(1, "sharded"))
    return []


# ------------------------------------------------------------------------------- Hugging Face


def _llama(folder: Path, name: str, vocab: int = 259, hidden: int = 16, seed: int = 0) -> Path:
    """A tiny Llama folder with the byte tokenizer (transformers imported only here)."""
    import transformers

    from softmerge.lm_demo import byte_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **(dict(bos_token_id=256, eos_token_id=257, pad_token_id=258) if vocab > 258 else {}),
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(folder / name)
    byte_tokenizer().save_pretrained(folder / name)
    return folder / name


def _hf_config(folder: Path, **changes: Any) -> None:
    """The run's config as a Hugging Face merge over text files: model.hf, dataset text."""
    (folder / "data" / "merge.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    config = {
        "model": {"hf": "hf/base"},
        "candidates": ["hf/base", "hf/c1"],
        "data": {"dataset": "text", "merge": "data/merge.txt", "block_size": 32, "batch_size": 4},
        "fit": {"steps": 2, "eval_every": 0, "rank_batches": 1},
        "output": {"dir": "out"},
    }
    for key, value in changes.items():
        config[key] = value
    (folder / "merge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _hf_pair(folder: Path) -> None:
    (folder / "hf").mkdir()
    _llama(folder / "hf", "base")
    _llama(folder / "hf", "c1", seed=1)


def _vocab_mismatch(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    (folder / "hf").mkdir()
    _llama(folder / "hf", "base")
    _llama(folder / "hf", "c1", vocab=300, seed=1)  # resized embeddings
    _hf_config(folder)
    return []


def _tokenizer_too_big(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    (folder / "hf").mkdir()
    _llama(folder / "hf", "base", vocab=200)
    _llama(folder / "hf", "c1", vocab=200, seed=1)
    _hf_config(folder)
    return []


def _adapter(folder: Path, name: str, base: Path, targets: list[str]) -> Path:
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(base)
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets))
    adapted.save_pretrained(folder / name)
    return folder / name


def _adapter_other_base(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    _hf_pair(folder)
    wide = _llama(folder / "hf", "wide", hidden=32)
    _adapter(folder / "hf", "ad", wide, ["q_proj"])
    _hf_config(folder, candidates=["hf/ad", "hf/ad"], plan={"base": "hf/base"})
    return []


def _adapter_other_targets(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    _hf_pair(folder)
    ad = _adapter(folder / "hf", "ad", folder / "hf" / "base", ["q_proj"])
    weights = ad / "adapter_model.safetensors"
    state = load_file(str(weights))
    save_file({k.replace("q_proj", "qkv_proj"): v for k, v in state.items()}, str(weights))
    _hf_config(folder, candidates=["hf/ad", "hf/ad"], plan={"base": "hf/base"})
    return []


def _adapter_without_weights(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    _hf_pair(folder)
    ad = _adapter(folder / "hf", "ad", folder / "hf" / "base", ["q_proj"])
    (ad / "adapter_model.safetensors").unlink()
    _hf_config(folder, candidates=["hf/ad", "hf/ad"], plan={"base": "hf/base"})
    return []


def _all_labels_ignored(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    _hf_pair(folder)
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    tokens = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.full_like(ids, -100),
    }
    save_file(tokens, str(folder / "data" / "tokens.safetensors"))
    _hf_config(
        folder, data={"dataset": "tensors", "merge": "data/tokens.safetensors", "batch_size": 4}
    )
    return []


def _text_file(content: bytes) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    def setup(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
        _hf_pair(folder)
        _hf_config(folder)
        (folder / "data" / "merge.txt").write_bytes(content)
        return []

    return setup


def _disk_full(folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    (folder / "out").mkdir()
    (folder / "out" / "notes.txt").write_text("kept")  # an existing output folder stays as it was
    monkeypatch.setattr("softmerge.export.weights.write_bytes", disk_full)
    return []


def _disk_full_checkpoint(folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(torch, "save", disk_full)
    return ["--checkpoint-every", "2"]


def _interrupt(folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    interrupt_at_step(monkeypatch, 3)
    return []


def _checkpointed_run(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted run that leaves its checkpoint (.out.checkpoint.pt) behind."""
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 5)
        argv = ["merge", str(folder / "merge.yaml"), "--no-progress", "-q"]
        assert main([*argv, "--checkpoint-every", "2"]) == 130
    assert (folder / ".out.checkpoint.pt").is_file()


def _resume_other_merge(folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    _checkpointed_run(folder, monkeypatch)
    edit_config(folder, setting("fit", seed=1))
    return ["--resume"]


def _resume_corrupt(folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    _checkpointed_run(folder, monkeypatch)
    path = folder / ".out.checkpoint.pt"
    path.write_bytes(path.read_bytes()[:100])
    return ["--resume"]


def _config_text(text: str) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    def setup(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
        (folder / "merge.yaml").write_text(text)
        return []

    return setup


def _no_config(folder: Path, _: pytest.MonkeyPatch) -> list[str]:
    (folder / "merge.yaml").rename(folder / "merge.yml")
    return []


def _mnist_offline(folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """dataset mnist with no path: no SOFTMERGE_DATA, an empty cache, a machine offline."""
    edit_config(folder, lambda c: c.update(data={"dataset": "mnist", "batch_size": 16}))
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder / "cache"))

    def offline(url: str, timeout: float) -> Any:
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(locate, "_open_url", offline)
    return []


def _mnist_corrupt_mirror(folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """dataset mnist with no path; the one mirror serves a file whose bytes are not MNIST's."""
    _mnist_offline(folder, monkeypatch)
    monkeypatch.setattr(locate, "MIRRORS", ("https://mirror.example/mnist/",))

    def corrupt(url: str, timeout: float) -> Any:
        body = b"not the MNIST file"
        headers = email.message.Message()
        headers["Content-Length"] = str(len(body))
        return urllib.response.addinfourl(io.BytesIO(body), headers, url, 200)

    monkeypatch.setattr(locate, "_open_url", corrupt)
    return []


CKPT = "{dir}/ckpt"
CASES = [
    Case(
        "key-mismatch",
        "Candidates with different tensor names",
        "`b.safetensors` lacks `net.3.bias`",
        _drop_key,
        [f"{CKPT}/b.safetensors", f"{CKPT}/a.safetensors", "'net.3.bias'"],
    ),
    Case(
        "shape-mismatch",
        "Candidates with different shapes",
        "`net.1.weight` of `b` is (8, 15), of `a` (8, 16)",
        _reshape,
        [f"{CKPT}/b.safetensors", "'net.1.weight'", "(8, 15)", "(8, 16)"],
    ),
    Case(
        "dtype-mismatch",
        "Candidates with different dtypes",
        "`net.1.weight` of `b` saved as float16",
        _half,
        [f"{CKPT}/b.safetensors", "'net.1.weight'", "float16", "float32"],
    ),
    Case(
        "model-mismatch",
        "Candidates that do not fit the model",
        "`model.kwargs.hidden: [12]`, checkpoints have 8 hidden units",
        _wrong_model,
        [f"{CKPT}/a.safetensors", "'net.1.weight'", "(8, 16)", "(12, 16)"],
    ),
    Case(
        "missing-file",
        "A candidate file that does not exist",
        "`candidates:` lists `ckpt/d.safetensors`",
        _missing,
        ["candidates[3].path", f"{CKPT}/d.safetensors"],
    ),
    Case(
        "unreadable-file",
        "A candidate file that cannot be read",
        "`chmod 000 ckpt/b.safetensors`",
        _unreadable,
        [f"{CKPT}/b.safetensors", "Permission denied"],
        drop_dac=True,
    ),
    Case(
        "truncated-safetensors",
        "A truncated safetensors file",
        "`b.safetensors` cut to half its bytes",
        _truncate("b.safetensors"),
        [f"{CKPT}/b.safetensors", "truncated or corrupt"],
    ),
    Case(
        "truncated-pickle",
        "A truncated PyTorch checkpoint",
        "`c.pt` cut to half its bytes",
        _truncate("c.pt"),
        [f"{CKPT}/c.pt", "truncated or corrupt"],
    ),
    Case(
        "malicious-pickle",
        "A pickle that would run code when loaded",
        "`c.pt` holds an object whose unpickling calls `open(...)`",
        _malicious,
        [f"{CKPT}/c.pt", "refused", "io.open"],
        console=True,
        extra=_no_marker,
    ),
    Case(
        "not-a-state-dict",
        "A checkpoint that holds no state dict",
        "`torch.save(list_of_tensors, 'c.pt')`",
        _not_a_dict,
        [f"{CKPT}/c.pt", "list"],
    ),
    Case(
        "all-nonfinite",
        "Every candidate has NaN/Inf values",
        "`net.1.bias[0] = inf` in all three",
        _all_nonfinite,
        [f"{CKPT}/a.safetensors", f"{CKPT}/c.pt", "'net.1.bias'"],
    ),
    Case(
        "one-candidate",
        "A single candidate",
        "`candidates: [ckpt/a.safetensors]`",
        _one_candidate,
        ["candidates", "got 1"],
    ),
    Case(
        "empty-data",
        "An empty data set",
        "`x` of the merge file has shape (0, 16)",
        _data(x=torch.zeros(0, 16), y=torch.zeros(0, dtype=torch.long)),
        ["{dir}/data/merge.safetensors", "'x'", "(0, 16)"],
    ),
    Case(
        "mnist-not-found",
        "MNIST found nowhere",
        "`data: {dataset: mnist}` without `path`, `SOFTMERGE_DATA` unset, an empty user cache "
        "(`XDG_CACHE_HOME=<dir>/cache`), no network",
        _mnist_offline,
        ["MNIST not found", "SOFTMERGE_DATA", "{dir}/cache/softmerge/mnist", locate.MIRRORS[0]],
    ),
    Case(
        "mnist-checksum",
        "A downloaded MNIST file with the wrong checksum",
        "as `mnist-not-found`, but the one mirror serves other bytes as "
        "`train-images-idx3-ubyte.gz`",
        _mnist_corrupt_mirror,
        ["train-images-idx3-ubyte.gz", "checksum mismatch", locate.CHECKSUMS[NAME0]],
    ),
    Case(
        "labels-outside",
        "Labels outside the model's outputs",
        "`y` holds 7, the model has 4 outputs",
        _data(x=torch.zeros(8, 16), y=torch.tensor([0, 1, 2, 3, 7, 0, 1, 2])),
        ["{dir}/data/merge.safetensors", "label 7", "4 outputs"],
    ),
    Case(
        "data-does-not-fit",
        "Inputs that do not fit the model",
        "`x` has 10 features, the model takes 16",
        _data(x=torch.zeros(8, 10), y=torch.zeros(8, dtype=torch.long)),
        ["{dir}/data/merge.safetensors", "softmerge.zoo:MLP", "(10,)"],
    ),
    Case(
        "no-labels",
        "Unlabelled data with a supervised objective",
        "no `y` in the merge file, the default objective (classification)",
        _data(x=torch.zeros(8, 16)),
        ["{dir}/data/merge.safetensors", "'y'", "fit.objective: entropy"],
    ),
    Case(
        "unknown-key",
        "A misspelled YAML key",
        "`fit: {l0_lamda: 0.01}`",
        _config(setting("fit", l0_lamda=0.01)),
        ["{dir}/merge.yaml", "fit.l0_lamda", "did you mean 'l0_lambda'?"],
        console=True,
    ),
    Case(
        "unknown-method",
        "A misspelled merge method",
        "`method: tiez`",
        _config(lambda cfg: cfg.update(method="tiez")),
        ["{dir}/merge.yaml", "method", "'tiez'", "did you mean 'ties'?"],
    ),
    Case(
        "unknown-method-parameter",
        "A parameter the method does not have",
        "`method: ties`, `params: {densty: 0.5}`",
        _config(lambda cfg: cfg.update(method="ties", params={"densty": 0.5})),
        ["{dir}/merge.yaml", "params", "'densty'", "did you mean 'density'?"],
    ),
    Case(
        "ensemble-has-no-state-dict",
        "A method that keeps N models, asked for one",
        "`method: ensemble` in `softmerge merge`",
        _config(lambda cfg: cfg.update(method="ensemble")),
        ["{dir}/merge.yaml", "'ensemble'", "softmerge compare"],
    ),
    Case(
        "wrong-type",
        "A value of the wrong type",
        "`fit: {steps: '300'}` (a string)",
        _config(setting("fit", steps="300")),
        ["{dir}/merge.yaml", "fit.steps", "'300'"],
    ),
    Case(
        "negative-lambda",
        "A value out of range",
        "`fit: {l0_lambda: -1}`",
        _config(setting("fit", l0_lambda=-1.0)),
        ["{dir}/merge.yaml", "fit.l0_lambda", "-1.0"],
    ),
    Case(
        "lambda-word",
        "A word where λ is a number or 'auto'",
        "`fit: {l0_lambda: automatic}`",
        _config(setting("fit", l0_lambda="automatic")),
        ["{dir}/merge.yaml", "fit.l0_lambda", "'automatic'"],
    ),
    Case(
        "auto-lambda-checkpointed",
        "λ chosen on held-out data, with checkpoints",
        "`fit: {l0_lambda: auto, checkpoint_every: 10}`",
        _config(setting("fit", l0_lambda="auto", checkpoint_every=10)),
        ["{dir}/merge.yaml", "fit.l0_lambda", "not checkpointed"],
    ),
    Case(
        "select-every-no-held-out",
        "Early stopping with no held-out data",
        "`fit: {select_every: 25}`",
        _config(setting("fit", select_every=25)),
        ["{dir}/merge.yaml", "fit.select_every", "data.held_out"],
    ),
    Case(
        "select-every-auto-lambda",
        "Early stopping and λ chosen on held-out data",
        "`fit: {select_every: 25, l0_lambda: auto}`",
        _config(setting("fit", select_every=25, l0_lambda="auto")),
        ["{dir}/merge.yaml", "fit", "select_every"],
    ),
    Case(
        "infinite-lr",
        "A non-finite number",
        "`fit: {lr: .inf}`",
        _config(setting("fit", lr=float("inf"))),
        ["{dir}/merge.yaml", "fit.lr", "inf"],
    ),
    Case(
        "missing-device",
        "A device this machine does not have",
        "`fit: {device: cuda:7}` on a machine without that GPU",
        _config(setting("fit", device="cuda:7")),
        ["{dir}/merge.yaml", "fit.device", "'cuda:7'"],
    ),
    Case(
        "integer-storage-dtype",
        "A stack dtype that is not a floating type",
        "`fit: {storage_dtype: int8}`",
        _config(setting("fit", storage_dtype="int8")),
        ["{dir}/merge.yaml", "fit.storage_dtype", "'int8'"],
    ),
    Case(
        "bad-compile-merge",
        "A setting that is neither true, false nor auto",
        "`fit: {compile_merge: sometimes}`",
        _config(setting("fit", compile_merge="sometimes")),
        ["{dir}/merge.yaml", "fit.compile_merge", "'sometimes'"],
    ),
    Case(
        "bad-mmap-threshold",
        "A heap setting in the environment that is not a size",
        "`SOFTMERGE_MMAP_THRESHOLD=4MiB softmerge merge ...`",
        _environment(SOFTMERGE_MMAP_THRESHOLD="4MiB"),
        ["SOFTMERGE_MMAP_THRESHOLD", "'4MiB'"],
    ),
    Case(
        "missing-shard",
        "A shard index naming a shard file that is not there",
        "candidate `sharded/` holds `model.safetensors.index.json` naming a missing second shard",
        _missing_shard,
        ["{dir}/sharded/model.safetensors.index.json", "model-00002-of-00002.safetensors"],
    ),
    Case(
        "bad-granularity",
        "A value that is not one of the choices",
        "`plan: {granularity: foo}`",
        _config(setting("plan", granularity="foo")),
        ["{dir}/merge.yaml", "plan.granularity", "'foo'"],
    ),
    Case(
        "negative-align-steps",
        "STE matching asked for a negative number of steps",
        "`plan: {align: ste, align_steps: -5}`",
        _config(setting("plan", align="ste", align_steps=-5)),
        ["{dir}/merge.yaml", "plan.align_steps", "-5"],
    ),
    Case(
        "include-matches-nothing",
        "An include pattern that matches no parameter",
        "`plan: {include: ['encoder.*']}`",
        _config(setting("plan", include=["encoder.*"])),
        ["{dir}/merge.yaml", "plan.include", "'encoder.*'", "net.1.weight"],
    ),
    Case(
        "output-not-writable",
        "An output folder that cannot be written",
        "`chmod 555 results`, `--out results/out`",
        _read_only_output,
        ["--out", "{dir}/results", "Permission denied"],
        drop_dac=True,
    ),
    Case(
        "output-is-input",
        "An output folder that holds an input",
        "`--out ckpt` (the candidates' folder)",
        _out_is_input,
        ["--out", CKPT, "candidates[0]", f"{CKPT}/a.safetensors"],
    ),
    Case(
        "output-is-a-file",
        "An output folder that is a file",
        "`output: {dir: merge.yaml}`",
        _config(setting("output", dir="merge.yaml")),
        ["output.dir", "{dir}/merge.yaml", "not a folder"],
    ),
    Case(
        "vocab-mismatch",
        "Candidates with different vocabulary sizes (resized embeddings)",
        "`c1` was saved with 300 tokens, `base` with 259",
        _vocab_mismatch,
        ["{dir}/hf/c1", "(300, 16)", "(259, 16)"],
    ),
    Case(
        "tokenizer-too-big",
        "A tokenizer whose vocabulary does not fit the model",
        "the folders' 259-token tokenizer, a model of 200 tokens",
        _tokenizer_too_big,
        ["259 tokens", "200"],
    ),
    Case(
        "adapter-other-base",
        "A LoRA adapter trained for another base model",
        "`ad` was trained on a model of width 32, `plan.base` has width 16",
        _adapter_other_base,
        ["{dir}/hf/ad", "another base"],
    ),
    Case(
        "adapter-other-targets",
        "A LoRA adapter for modules the base model does not have",
        "`ad`'s factors name `qkv_proj`",
        _adapter_other_targets,
        ["{dir}/hf/ad", "qkv_proj"],
    ),
    Case(
        "adapter-without-weights",
        "A LoRA adapter folder without its weights",
        "`ad/adapter_model.safetensors` deleted",
        _adapter_without_weights,
        ["{dir}/hf/ad", "adapter_model.safetensors"],
    ),
    Case(
        "all-labels-ignored",
        "A batch whose labels are all -100",
        "tokenised merge data (`input_ids`, `labels`) with every label -100",
        _all_labels_ignored,
        ["{dir}/data/tokens.safetensors", "-100"],
    ),
    Case(
        "empty-text",
        "An empty text file",
        "`data/merge.txt` holds nothing",
        _text_file(b""),
        ["{dir}/data/merge.txt"],
    ),
    Case(
        "non-utf8-text",
        "A text file that is not UTF-8",
        "`data/merge.txt` holds a Latin-1 byte",
        _text_file(b"caf\xe9 au lait\n"),
        ["{dir}/data/merge.txt", "UTF-8"],
    ),
    Case(
        "disk-full",
        "The disk fills up while the outputs are written",
        "writing `merged.safetensors` fails with ENOSPC (simulated)",
        _disk_full,
        ["{dir}/out/merged.safetensors", "No space left on device"],
    ),
    Case(
        "disk-full-checkpoint",
        "The disk fills up while a checkpoint is written",
        "`--checkpoint-every 2`, `torch.save` fails with ENOSPC (simulated)",
        _disk_full_checkpoint,
        ["{dir}/.out.checkpoint.pt", "No space left on device"],
    ),
    Case(
        "interrupt",
        "Ctrl-C during gate training",
        "`KeyboardInterrupt` at step 3 (simulated)",
        _interrupt,
        [],
        code=130,
    ),
    Case(
        "resume-without-checkpoint",
        "`--resume` with nothing to resume",
        "`softmerge merge merge.yaml --resume`, no earlier run",
        lambda folder, _: ["--resume"],
        ["--resume", "{dir}/.out.checkpoint.pt"],
    ),
    Case(
        "resume-other-merge",
        "`--resume` of a checkpoint from another merge",
        "interrupted run, then `fit.seed` changed, then `--resume`",
        _resume_other_merge,
        ["{dir}/.out.checkpoint.pt", "different merge"],
    ),
    Case(
        "resume-corrupt-checkpoint",
        "`--resume` of a damaged checkpoint",
        "the checkpoint cut to 100 bytes, then `--resume`",
        _resume_corrupt,
        ["{dir}/.out.checkpoint.pt", "truncated or corrupt"],
    ),
    Case(
        "no-config",
        "A config file that does not exist",
        "`softmerge merge merge.yaml`, no such file",
        _no_config,
        ["{dir}/merge.yaml", "not found"],
    ),
    Case(
        "yaml-syntax",
        "A YAML syntax error",
        "an unclosed `[` on line 2",
        _config_text("fit:\n  steps: [\n"),
        ["{dir}/merge.yaml", "line 3"],
    ),
]


# ------------------------------------------------------------------------------- docs table


def _doc_rows() -> dict[str, tuple[str, str]]:
    """id -> (message, exit code) of each row of docs/errors.md's table."""
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 5 and re.fullmatch(r"`[a-z0-9-]+`", cells[0]):
            lines = [re.sub(r"^`|`$", "", m.strip()) for m in cells[3].split("<br>")]
            rows[cells[0].strip("`")] = ("\n".join(lines).replace("\\|", "|"), cells[4])
    return rows


def _doc_form(text: str, folder: Path) -> str:
    return text.replace(str(folder), "<dir>").strip()


def _record(case: Case, message: str, code: int) -> bool:
    """With SOFTMERGE_RECORD_ERRORS set, append the real message for the docs and skip the
    comparison with docs/errors.md."""
    target = os.environ.get("SOFTMERGE_RECORD_ERRORS")
    if not target:
        return False
    with open(target, "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": case.id, "message": message, "code": code}) + "\n")
    return True


def test_docs_table_lists_every_case() -> None:
    rows = _doc_rows()
    assert len(rows) >= 20
    assert sorted(rows) == sorted([c.id for c in CASES] + ["nan-candidate"])


# ------------------------------------------------------------------------------- the tests


@pytest.fixture
def folder(base: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(base, dest)
    return dest


def _check_message(case: Case, folder: Path, err: str, code: int) -> None:
    """One line, the last one on stderr; before it at most progress lines (without -q)."""
    *before, message = err.strip().splitlines()
    assert "Traceback" not in err
    assert code == case.code, err
    assert all(line.startswith("softmerge: ") and "error" not in line for line in before), err
    if case.code == 130:
        assert message == "softmerge: interrupted", err
    else:
        assert message.startswith("softmerge: error: "), err
        for culprit in case.culprit:
            assert culprit.format(dir=folder) in message, (culprit, message)
    if not _record(case, _doc_form(message, folder), code):
        assert _doc_rows()[case.id] == (f"{_doc_form(message, folder)}", str(code))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_named_and_changes_nothing(
    case: Case,
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    extra = case.setup(folder, monkeypatch)
    argv = ["merge", str(folder / "merge.yaml"), "--no-progress", "-q", *extra]
    before = snapshot(folder)
    capsys.readouterr()
    if case.drop_dac and IS_ROOT:
        code, err = run_as_root_without_file_access(argv)
        assert len(err.strip().splitlines()) == 1, err
    else:
        code = main(argv)
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err  # -q: the error line alone
    _check_message(case, folder, err, code)
    assert snapshot(folder) == before
    if case.extra:
        case.extra(folder)


CONSOLE = [c for c in CASES if c.console]


@pytest.mark.parametrize("case", CONSOLE, ids=[c.id for c in CONSOLE])
def test_console_script_prints_one_line(
    case: Case, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The installed command, as a user runs it: one stderr line, exit 2, nothing written."""
    extra = case.setup(folder, monkeypatch)
    before = snapshot(folder)
    done = run_console_script(["merge", str(folder / "merge.yaml"), "--no-progress", *extra])
    _check_message(case, folder, done.stderr, done.returncode)
    assert done.stdout == ""
    assert snapshot(folder) == before
    if case.extra:
        case.extra(folder)


def test_nan_candidate_is_excluded_with_a_warning(
    folder: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """NaN/Inf in one candidate is not an error: it is left out (gate 0) with a warning."""
    state = _state(2)
    state["net.1.weight"][0, 0] = float("nan")
    state["net.3.bias"][1] = float("-inf")
    torch.save(state, folder / "ckpt" / "c.pt")
    with caplog.at_level(logging.WARNING, logger="softmerge"):
        assert main(["merge", str(folder / "merge.yaml"), "--no-progress", "-q"]) == 0
    assert capsys.readouterr().err == ""
    warnings = [f"softmerge: warning: {r.getMessage()}" for r in caplog.records]
    excluded = [w for w in warnings if "excluding candidate" in w]
    assert len(excluded) == 1
    assert str(folder / "ckpt" / "c.pt") in excluded[0] and "net.1.weight" in excluded[0]
    gates = json.loads((folder / "out" / "gates.json").read_text())
    assert gates["summary"]["c"]["max_gate"] == 0.0
    merged = load_file(str(folder / "out" / "merged.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())
    message = "\n".join(_doc_form(w, folder) for w in warnings)
    if not _record(Case("nan-candidate", "", "", _drop_key, []), message, 0):
        assert _doc_rows()["nan-candidate"] == (message, "0")


def test_interrupt_leaves_a_checkpoint_and_says_how_to_resume(
    folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    interrupt_at_step(monkeypatch, 4)
    argv = ["merge", str(folder / "merge.yaml"), "--no-progress", "-q", "--checkpoint-every", "2"]
    with caplog.at_level(logging.WARNING, logger="softmerge"):
        assert main(argv) == 130
    ckpt = folder / ".out.checkpoint.pt"
    assert ckpt.is_file() and not (folder / "out").exists()
    assert f"training state kept in {ckpt}: add --resume to continue" in caplog.text
    assert not [p for p in folder.iterdir() if p.name.startswith(".") and p != ckpt]


# ------------------------------------------------------------------------------- hostile pickles

SRC = Path(__file__).resolve().parents[1] / "src" / "softmerge"


def _torch_load_calls(tree: ast.AST) -> list[ast.Call]:
    """Calls of torch.load / torch.serialization.load, however torch was imported."""
    aliases = {"torch"}  # names bound to the torch module (import torch as th)
    direct = set()  # names bound to the load function itself (from torch import load)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch"}
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            direct |= {a.asname or a.name for a in node.names if a.name == "load"}
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = ast.unparse(func)
        if (isinstance(func, ast.Name) and func.id in direct) or any(
            name in (f"{a}.load", f"{a}.serialization.load") for a in aliases
        ):
            calls.append(node)
    return calls


def test_every_torch_load_is_weights_only() -> None:
    """No code path can unpickle arbitrary objects: every torch.load in src/ passes the
    literal weights_only=True, and nothing calls pickle's loaders directly."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for call in _torch_load_calls(tree):
            where = f"{path.relative_to(SRC.parent)}:{call.lineno}"
            flags = [k for k in call.keywords if k.arg == "weights_only"]
            assert flags, f"{where}: torch.load without weights_only"
            value = flags[0].value
            assert isinstance(value, ast.Constant) and value.value is True, (
                f"{where}: weights_only={ast.unparse(value)}"
            )
            found.append(where)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                assert name not in ("pickle.load", "pickle.loads", "dill.load"), (
                    f"{path}:{node.lineno}: {name}"
                )
    # candidates, data tensors files and gate-training checkpoints
    assert {w.split(":")[0] for w in found} >= {
        "softmerge/candidates/readers.py",
        "softmerge/data/tensors.py",
        "softmerge/checkpoint.py",
    }


def test_the_scan_sees_every_spelling() -> None:
    source = (
        "import torch as th\nfrom torch import load as L\nimport torch\n"
        "th.load(p)\nL(p, weights_only=True)\ntorch.serialization.load(p, weights_only=False)\n"
    )
    assert len(_torch_load_calls(ast.parse(source))) == 3


# ------------------------------------------------------------------------------- docs helper


def _print_table(records: Path) -> None:  # pragma: no cover - a maintenance tool
    seen = {}
    for line in records.read_text().splitlines():
        item = json.loads(line)
        seen[item["id"]] = item
    by_id = {c.id: c for c in CASES}
    by_id["nan-candidate"] = Case(
        "nan-candidate",
        "A candidate with NaN/Inf values",
        "`c.pt` has a NaN in `net.1.weight` and -inf in `net.3.bias`",
        _drop_key,
        [],
        code=0,
    )
    for case_id, case in by_id.items():
        item = seen[case_id]
        lines = item["message"].replace("|", "\\|").splitlines()
        message = "<br>".join(f"`{line}`" for line in lines)
        print(f"| `{case_id}` | {case.case} | {case.trigger} | {message} | {item['code']} |")


if __name__ == "__main__":  # pragma: no cover
    _print_table(Path(sys.argv[1]))
