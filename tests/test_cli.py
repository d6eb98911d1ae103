"""Tests for the ``softmerge`` command line: merge end to end, errors, inspect, demo wiring."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from softmerge import __version__, cli
from softmerge.cli import main
from softmerge.data import Splits, digits_splits
from softmerge.io import staged_output
from softmerge.zoo import MLP, evaluate, train

SPLIT_KWARGS = {"num_merge": 300, "num_test": 400, "seed": 0}
MODEL = {"factory": "softmerge.zoo:MLP", "kwargs": {"in_features": 64, "hidden": [32]}}
BATCH = 64


def _mlp() -> MLP:
    return MLP(64, (32,))


@pytest.fixture(scope="module")
def digits() -> Splits:
    return digits_splits(**SPLIT_KWARGS)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, digits: Splits) -> dict[str, Path]:
    """Three children of one parent (so they merge well): two .safetensors files and a .pt."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    parent = train(_mlp(), digits.train, epochs=4, lr=1e-2, seed=0)
    paths = {}
    for i, name in enumerate(["a.safetensors", "b.safetensors", "c.pt"]):
        child = train(copy.deepcopy(parent), digits.train, epochs=2, lr=3e-3, seed=i + 1)
        state = {k: v.detach().clone().contiguous() for k, v in child.state_dict().items()}
        paths[name] = folder / name
        if name.endswith(".pt"):
            torch.save(state, paths[name])
        else:
            save_file(state, str(paths[name]))
    return paths


def write_config(folder: Path, ckpts: dict[str, Path], **sections: Any) -> Path:
    content: dict[str, Any] = {
        "model": MODEL,
        "candidates": [
            {"path": str(ckpts["a.safetensors"]), "name": "alpha"},
            str(ckpts["b.safetensors"]),
            str(ckpts["c.pt"]),
        ],
        "data": {"dataset": "digits", "kwargs": SPLIT_KWARGS, "batch_size": BATCH},
        "fit": {"steps": 60, "eval_every": 20, "record_every": 10},
        "output": {"dir": "out"},
        **sections,
    }
    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- merge


def test_merge_end_to_end(
    tmp_path: Path, ckpts: dict[str, Path], digits: Splits, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, ckpts)
    assert main(["merge", str(cfg), "--no-progress"]) == 0
    out = tmp_path / "out"
    for name in (
        "merged.safetensors",
        "gates.json",
        "gates.png",
        "convergence.png",
        "summary.json",
        "summary.md",
    ):
        assert (out / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    summary = json.loads((out / "summary.json").read_text())
    rows = {r["model"]: r for r in summary["results"]}
    assert list(rows) == ["alpha", "b", "c", "uniform soup", "soft merge"]
    assert set(summary["gates"]) == {"alpha", "b", "c"}

    # The exported file is the model the summary reports on, bit for bit.
    model = _mlp()
    model.load_state_dict(load_file(str(out / "merged.safetensors")), strict=True)
    accuracy, _ = evaluate(model, torch.utils.data.DataLoader(digits.test, batch_size=BATCH))
    assert accuracy == rows["soft merge"]["accuracy"]
    worst = min(rows[n]["accuracy"] for n in ("alpha", "b", "c"))
    assert rows["soft merge"]["accuracy"] >= worst

    printed = capsys.readouterr().out
    assert "soft merge" in printed and "uniform soup" in printed and str(out) in printed


def test_console_script_merges_tensor_files(
    tmp_path: Path, ckpts: dict[str, Path], digits: Splits
) -> None:
    """The installed entry point, on unlabeled merge data (entropy objective) from files."""
    save_file({"x": digits.merge.tensors[0].contiguous()}, str(tmp_path / "merge.safetensors"))
    torch.save({"x": digits.test.tensors[0], "y": digits.test.tensors[1]}, tmp_path / "eval.pt")
    cfg = write_config(
        tmp_path,
        ckpts,
        data={"dataset": "tensors", "merge": "merge.safetensors", "eval": "eval.pt"},
        fit={"steps": 20, "objective": "entropy", "eval_every": 0},
    )
    script = Path(sys.executable).with_name("softmerge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "softmerge.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [*command, "merge", str(cfg), "--no-progress", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_set"]["samples"] == len(digits.test)
    assert summary["steps"] == 20


def test_rerun_replaces_outputs_and_keeps_other_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "summary.json").write_text("old")
    with staged_output(out) as stage:
        (stage / "summary.json").write_text("new")
    assert (out / "summary.json").read_text() == "new"
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_output(out) as stage:
        (stage / "merged.safetensors").write_text("half")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- errors


def test_bad_config_exits_2_and_writes_nothing(
    tmp_path: Path, ckpts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, ckpts, fit={"l0_lambda": -1.0})
    assert main(["merge", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("softmerge: error: ")
    assert f"{cfg}: fit.l0_lambda: must be >= 0, got -1.0" in err
    assert not (tmp_path / "out").exists()


def test_data_error_names_the_file(
    tmp_path: Path, ckpts: dict[str, Path], digits: Splits, capsys: pytest.CaptureFixture[str]
) -> None:
    merge = tmp_path / "merge.pt"
    torch.save({"x": digits.merge.tensors[0]}, merge)  # no labels, but cross-entropy needs them
    cfg = write_config(tmp_path, ckpts, data={"dataset": "tensors", "merge": "merge.pt"})
    assert main(["merge", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{merge}: no tensor 'y'" in err and "fit.objective: entropy" in err
    assert not (tmp_path / "out").exists()


def test_model_that_cannot_take_the_data_is_named(
    tmp_path: Path, ckpts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    merge = tmp_path / "merge.safetensors"
    save_file({"x": torch.zeros(8, 10), "y": torch.zeros(8, dtype=torch.long)}, str(merge))
    cfg = write_config(tmp_path, ckpts, data={"dataset": "tensors", "merge": merge.name})
    assert main(["merge", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{merge}: the model from softmerge.zoo:MLP cannot run on this data" in err


def test_output_dir_holding_inputs_is_refused(
    tmp_path: Path, ckpts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, ckpts)
    folder = ckpts["a.safetensors"].parent
    assert main(["merge", str(cfg), "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "--out: the output folder" in err and "candidates[0]" in err
    assert sorted(p.name for p in folder.iterdir()) == ["a.safetensors", "b.safetensors", "c.pt"]


def test_usage_errors_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"softmerge {__version__}"
    assert main(["merge", "x.yaml", "--steps", "0"]) == 2
    assert "--steps: expected a positive integer" in capsys.readouterr().err
    assert main([]) == 2


def test_interrupt_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_config", interrupted)
    assert main(["merge", "x.yaml"]) == 130
    assert "softmerge: interrupted" in capsys.readouterr().err


# ------------------------------------------------------------------------------- inspect, demo


def test_inspect_prints_names_and_similarity(
    ckpts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(ckpts["a.safetensors"]), str(ckpts["c.pt"])]) == 0
    out = capsys.readouterr().out
    assert "Pairwise cosine similarity" in out
    matrix = out.split("Pairwise cosine similarity")[1].split("Pairwise L2 distance")[0]
    assert re.search(r"^\s+a\s+c$", matrix, re.M)  # header: both names
    assert re.search(r"^a\s+1\.000000\s+0\.99\d+$", matrix, re.M)
    assert re.search(r"^c\s+0\.99\d+\s+1\.000000$", matrix, re.M)
    assert str(ckpts["a.safetensors"]) in out and str(ckpts["c.pt"]) in out


def test_inspect_json(ckpts: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(ckpts["b.safetensors"]), str(ckpts["c.pt"])]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairwise"]["names"] == ["b", "c"]
    assert len(report["pairwise"]["cosine"]) == 2


def test_inspect_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt: no such file or folder" in capsys.readouterr().err


def test_demo_calls_run_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[Path, dict[str, Any]]] = []
    fake = types.ModuleType("softmerge.demo")
    fake.run_demo = lambda out, **kw: calls.append((out, kw)) or {}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "softmerge.demo", fake)
    assert main(["demo", "--out", str(tmp_path / "d"), "--quick", "--seed", "3", "-q"]) == 0
    assert calls == [(tmp_path / "d", {"quick": True, "seed": 3, "progress": False})]
    assert str(tmp_path / "d") in capsys.readouterr().out
