"""Gate training survives a crash: checkpoint every K steps, ``--resume``, same final gates.

The end-to-end test kills a real ``softmerge merge`` process with SIGKILL (no clean-up code can
run) as soon as its first checkpoint exists, resumes it with ``--resume`` in a new process, and
compares the outputs with an uninterrupted run bit for bit. The model has BatchNorm and the run
validates, records history and shuffles its data, so every piece of state a checkpoint must
carry (gates, optimiser, noise generator, data order, history) is exercised.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from softmerge import FitConfig, SoftMerger
from softmerge.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from softmerge.cli import main
from softmerge.errors import ConfigError, PlanError

SCRIPT = Path(sys.executable).with_name("softmerge")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MPLBACKEND": "Agg"}

MODEL_SOURCE = """from torch import nn


def make(width: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 4)
    )
"""


def _bn_model(width: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 4)
    )


def _candidate(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = _bn_model()
    model.train()
    model(torch.randn(32, 16))  # running statistics that are not the defaults
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=gen), torch.randint(0, 4, (n,), generator=gen)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("resume")
    (folder / "bnnet.py").write_text(MODEL_SOURCE)
    for i in range(3):
        save_file(_candidate(i), str(folder / f"c{i}.safetensors"))
    x, y = _data(0, 64)
    save_file({"x": x, "y": y}, str(folder / "merge.safetensors"))
    x, y = _data(1, 48)
    save_file({"x": x, "y": y}, str(folder / "eval.safetensors"))
    config = {
        "model": {"factory": "bnnet:make"},
        "candidates": [f"c{i}.safetensors" for i in range(3)],
        "data": {
            "dataset": "tensors",
            "merge": "merge.safetensors",
            "eval": "eval.safetensors",
            "batch_size": 16,
            "seed": 3,
        },
        "fit": {"steps": 150, "eval_every": 25, "record_every": 10, "checkpoint_every": 3},
        "output": {"dir": "out"},
    }
    (folder / "merge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def _gates(out: Path) -> dict[str, Any]:
    gates = json.loads((out / "gates.json").read_text())
    gates.pop("merge", None)  # run metadata: timings and the config's path
    return gates


def _assert_same_outputs(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "merged.safetensors")), load_file(str(b / "merged.safetensors"))
    assert list(wa) == list(wb)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert _gates(a) == _gates(b)
    assert json.loads((a / "history.json").read_text()) == json.loads(
        (b / "history.json").read_text()
    )
    ra = json.loads((a / "summary.json").read_text())["results"]
    rb = json.loads((b / "summary.json").read_text())["results"]
    assert ra == rb  # each candidate, the uniform soup and the merge, on the eval set


def _kill_at_first_checkpoint(process: subprocess.Popen, ckpt: Path, found: dict) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if ckpt.exists():
            os.kill(process.pid, signal.SIGKILL)
            found["killed"] = True
            return
        time.sleep(0.005)


def test_sigkill_then_resume_gives_the_same_merge(project: Path) -> None:
    config = project / "merge.yaml"
    ckpt = checkpoint_path(project / "out")
    assert ckpt == project / ".out.checkpoint.pt"
    # A checkpoint at every step (the interval is not part of what a checkpoint must match):
    # the first one comes early, and the run is slower, so the kill lands long before its end.
    process = subprocess.Popen(
        [str(SCRIPT), "merge", str(config), "--no-progress", "-q", "--checkpoint-every", "1"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    found: dict[str, bool] = {}
    killer = threading.Thread(target=_kill_at_first_checkpoint, args=(process, ckpt, found))
    killer.start()
    # Meanwhile, the uninterrupted run (in this process, on one thread like the others).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert (
            main(["merge", str(config), "--no-progress", "-q", "--out", str(project / "ref")]) == 0
        )
    finally:
        torch.set_num_threads(threads)
    killer.join()
    _, err = process.communicate(timeout=60)
    assert found.get("killed"), f"the run ended before its first checkpoint: {err}"
    assert process.returncode == -signal.SIGKILL
    saved = load_checkpoint(ckpt)
    assert 1 <= saved["step"] < saved["total_steps"] == 150
    assert not (project / "out").exists()

    done = subprocess.run(
        [str(SCRIPT), "merge", str(config), "--no-progress", "--resume"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"resuming gate training at step {saved['step']} of 150" in done.stderr
    _assert_same_outputs(project / "ref", project / "out")
    # The checkpoint (and any temporary file a killed write left) is gone after success.
    assert not [p.name for p in project.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------- the API


def _merger(candidates: list[dict[str, torch.Tensor]] | None = None) -> SoftMerger:
    return SoftMerger(_bn_model(), candidates or [_candidate(i) for i in range(3)])


def _loader(seed: int = 0, data_seed: int = 0) -> DataLoader:
    x, y = _data(data_seed, 64)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=gen)


def _val_loader() -> DataLoader:
    return DataLoader(TensorDataset(*_data(1, 32)), batch_size=16)


def _skip_some(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy, but NaN on batches whose first label is 0: those steps are skipped, and
    must still count as used batches when a resumed run fast-forwards its data."""
    assert labels is not None
    if int(labels[0]) == 0:
        return torch.tensor(math.nan)
    return nn.functional.cross_entropy(logits, labels)


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    calls = {"n": 0}
    original = SoftMerger.l0_penalty

    def penalty(self: SoftMerger) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(SoftMerger, "l0_penalty", penalty)


def _state(merger: SoftMerger) -> dict[str, Any]:
    result = merger.result
    assert result is not None
    return {
        "log_alpha": merger.log_alpha.detach().clone(),
        "cand": merger.log_alpha_candidate.detach().clone(),
        "history": result.history,
        "trajectory": result.gate_trajectory,
        "merged": merger.merged_state_dict(),
    }


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert torch.equal(a["log_alpha"], b["log_alpha"])
    assert torch.equal(a["cand"], b["cand"])
    assert a["history"] == b["history"]
    assert len(a["trajectory"]) == len(b["trajectory"])
    assert all(torch.equal(x, y) for x, y in zip(a["trajectory"], b["trajectory"], strict=True))
    assert all(torch.equal(a["merged"][k], b["merged"][k]) for k in a["merged"])


@pytest.mark.parametrize(
    ("optimizer", "loss_fn", "stop"),
    [("sgd", None, 23), ("adam", None, 11), ("sgd", _skip_some, 17)],
    ids=["sgd", "adam", "skipped-steps"],
)
def test_resume_in_process_is_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimizer: str, loss_fn: Any, stop: int
) -> None:
    cfg = FitConfig(
        steps=40,
        optimizer=optimizer,
        checkpoint_every=4,
        eval_every=8,
        record_every=3,
        progress=False,
        seed=5,
    )
    reference = _merger()
    reference.fit(_loader(), _val_loader(), cfg, loss_fn)
    want = _state(reference)

    ckpt = tmp_path / "fit.ckpt"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, stop)
        with pytest.raises(KeyboardInterrupt):
            _merger().fit(_loader(), _val_loader(), cfg, loss_fn, checkpoint=ckpt)
    assert load_checkpoint(ckpt)["step"] == (stop - 1) // 4 * 4

    resumed = _merger()
    resumed.fit(_loader(), _val_loader(), cfg, loss_fn, checkpoint=ckpt, resume=True)
    _assert_same(want, _state(resumed))
    assert not ckpt.exists()  # deleted once training is done


def test_resume_keeps_the_early_stopping_selection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fit.select_every: the best step seen before the interruption is saved with the loop, so
    the resumed run keeps the same gates as an uninterrupted one."""
    cfg = FitConfig(steps=40, checkpoint_every=4, select_every=6, progress=False, seed=2)
    held = DataLoader(TensorDataset(*_data(2, 48)), batch_size=16)
    reference = _merger()
    reference.fit(_loader(), config=cfg, held_out=held)
    want = _state(reference)

    ckpt = tmp_path / "fit.ckpt"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 27)
        with pytest.raises(KeyboardInterrupt):
            _merger().fit(_loader(), config=cfg, held_out=held, checkpoint=ckpt)
    assert load_checkpoint(ckpt)["callbacks"]["select_best"]["history"]  # saved with the loop

    resumed = _merger()
    resumed.fit(_loader(), config=cfg, held_out=held, checkpoint=ckpt, resume=True)
    _assert_same(want, _state(resumed))
    assert reference.result is not None and resumed.result is not None
    assert resumed.result.selected_step == reference.result.selected_step
    assert resumed.result.held_out_loss == reference.result.held_out_loss


def test_training_does_not_change_the_candidates_batchnorm_statistics() -> None:
    merger = _merger()
    before = {k: v.clone() for c in merger.candidates for k, v in c.state.items()}
    merger.fit(_loader(), config=FitConfig(steps=5, progress=False))
    after = {k: v for c in merger.candidates for k, v in c.state.items()}
    assert all(torch.equal(before[k], after[k]) for k in before)


def _interrupted_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cfg: FitConfig):
    ckpt = tmp_path / "fit.ckpt"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 7)
        with pytest.raises(KeyboardInterrupt):
            _merger().fit(_loader(), config=cfg, checkpoint=ckpt)
    return ckpt


CFG = FitConfig(steps=20, checkpoint_every=3, progress=False)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"config": FitConfig(steps=20, checkpoint_every=3, progress=False, seed=1)}, "different"),
        ({"config": FitConfig(steps=30, checkpoint_every=3, progress=False)}, "different"),
        ({"run_key": "other data settings"}, "different merge"),
        ({"candidates": [_candidate(i) for i in (0, 1, 3)]}, "different merge"),
        ({"data_seed": 9}, "losses on the merge data differ"),
    ],
    ids=["seed", "steps", "run-key", "candidates", "data"],
)
def test_resume_refuses_a_checkpoint_of_another_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict[str, Any], expected: str
) -> None:
    ckpt = _interrupted_checkpoint(tmp_path, monkeypatch, CFG)
    before = ckpt.read_bytes()
    merger = _merger(change.get("candidates"))
    with pytest.raises(ConfigError, match=expected) as err:
        merger.fit(
            _loader(data_seed=change.get("data_seed", 0)),
            config=change.get("config", CFG),
            checkpoint=ckpt,
            resume=True,
            run_key=change.get("run_key", ""),
        )
    assert str(ckpt) in str(err.value)
    assert ckpt.read_bytes() == before  # refused, not consumed


def test_resume_ignores_progress_and_checkpoint_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _interrupted_checkpoint(tmp_path, monkeypatch, CFG)
    cfg = FitConfig(steps=20, checkpoint_every=0, progress=True)
    _merger().fit(_loader(), config=cfg, checkpoint=ckpt, resume=True)
    assert not ckpt.exists()


def test_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="resume=True needs checkpoint"):
        _merger().fit(_loader(), config=CFG, resume=True)
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        _merger().fit(_loader(), config=CFG, checkpoint=tmp_path / "none.pt", resume=True)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    """Checkpoints are read with weights_only=True, like candidates."""

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    ckpt = tmp_path / "evil.pt"
    torch.save({"format": "softmerge-fit-checkpoint", "version": 1, "x": Evil()}, ckpt)
    with pytest.raises(ConfigError, match="cannot read the checkpoint"):
        load_checkpoint(ckpt)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"a": 1}, "not a softmerge gate-training checkpoint"),
        ({"format": "softmerge-fit-checkpoint", "version": 99}, "format version 99"),
    ],
)
def test_foreign_checkpoints_are_refused(tmp_path: Path, content: dict, expected: str) -> None:
    path = tmp_path / "x.pt"
    torch.save(content, path)
    with pytest.raises(ConfigError, match=expected):
        load_checkpoint(path)


def test_malformed_checkpoint_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _interrupted_checkpoint(tmp_path, monkeypatch, CFG)
    saved = load_checkpoint(ckpt)
    saved["module"]["log_alpha"] = torch.zeros(2, 2)  # wrong shape
    save_checkpoint(ckpt, {k: v for k, v in saved.items() if k not in ("format", "version")})
    with pytest.raises(ConfigError, match="malformed checkpoint"):
        _merger().fit(_loader(), config=CFG, checkpoint=ckpt, resume=True)


def test_keep_checkpoint_saves_the_last_step(tmp_path: Path) -> None:
    ckpt = tmp_path / "fit.ckpt"
    _merger().fit(_loader(), config=CFG, checkpoint=ckpt, keep_checkpoint=True)
    assert load_checkpoint(ckpt)["step"] == 20
    again = _merger()
    again.fit(_loader(), config=CFG, checkpoint=ckpt, resume=True)  # nothing left to train
    assert again.result is not None and again.result.steps == 20


def test_cli_resume_after_interrupt(
    tmp_path: Path, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process: Ctrl-C (exit 130) keeps the checkpoint; --resume finishes and removes it."""
    config = project / "merge.yaml"
    out = tmp_path / "out"
    argv = ["merge", str(config), "--no-progress", "-q", "--out", str(out), "--steps", "30"]
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 12)
        assert main(argv) == 130
    ckpt = checkpoint_path(out)
    assert load_checkpoint(ckpt)["step"] == 9 and not out.exists()  # every 3 steps
    assert main([*argv, "--resume"]) == 0
    assert (out / "merged.safetensors").is_file() and not ckpt.exists()
