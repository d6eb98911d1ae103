"""Tests for softmerge.config: schema, defaults, path resolution and one-line errors."""

from __future__ import annotations

import copy
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from softmerge.config import MergeConfig, load_config
from softmerge.errors import ConfigError
from softmerge.plan import MergePlan
from softmerge.soft import FitConfig
from softmerge.zoo import MLP

BASE: dict[str, Any] = {
    "model": {"factory": "softmerge.zoo:MLP", "kwargs": {"in_features": 64, "hidden": [8]}},
    "candidates": [{"path": "ckpt/a.safetensors", "name": "a"}, "ckpt/b.pt"],
    "data": {"dataset": "digits"},
    "output": {"dir": "merged-out"},
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A config folder with two (empty) checkpoint files: loading a config never reads them."""
    (tmp_path / "ckpt").mkdir()
    for name in ("a.safetensors", "b.pt"):
        (tmp_path / "ckpt" / name).touch()
    return tmp_path


def write(folder: Path, content: dict[str, Any] | str, name: str = "merge.yaml") -> Path:
    path = folder / name
    text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------ valid


def test_defaults_come_from_the_settings_classes(folder: Path) -> None:
    cfg = load_config(write(folder, BASE))
    assert cfg.plan() == MergePlan()
    assert cfg.fit_config() == FitConfig()
    assert cfg.data.batch_size == 128 and cfg.data.seed == 0
    # The sections are the settings classes themselves: every field is a key, and no other.
    assert type(cfg.plan()) is MergePlan and type(cfg.fit_config()) is FitConfig
    dumped = cfg.model_dump(by_alias=True)
    assert set(dumped["plan"]) == set(MergePlan.model_fields)
    assert set(dumped["fit"]) == set(FitConfig.model_fields)


def test_overrides_meet_the_same_schema_and_leave_the_file_alone(folder: Path) -> None:
    path = write(folder, BASE)
    before = path.read_text()
    cfg = load_config(path, ["fit.steps=7", "plan.granularity=module", "?nosuch.key=1"])
    assert (cfg.fit.steps, cfg.plan().granularity) == (7, "module")
    assert path.read_text() == before
    with pytest.raises(ConfigError, match=r"fit\.lr: must be > 0, got -1"):
        load_config(path, ["fit.lr=-1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["fit.lr"])


def test_validation_returns_a_new_frozen_config(folder: Path) -> None:
    content = copy.deepcopy(BASE)
    content["plan"] = {"combine": "delta", "base": "ckpt/a.safetensors"}
    raw = copy.deepcopy(content)
    cfg = MergeConfig.model_validate(content, context={"root": folder})
    assert content == raw  # the input was not edited: names and paths are on the result
    assert cfg.candidate_names() == ["a", "b"]
    assert Path(cfg.plan().base) == folder / "ckpt" / "a.safetensors"
    with pytest.raises(ValidationError):
        cfg.fit.lr = 3.0  # type: ignore[misc]


def test_every_value_round_trips(folder: Path) -> None:
    text = """
model:
  factory: softmerge.zoo:MLP
  kwargs: {in_features: 64, hidden: [8]}
candidates:
  - path: ckpt/a.safetensors
    name: first
  - ckpt/b.pt
data: {dataset: digits, kwargs: {num_merge: 100, seed: 3}, batch_size: 32, seed: 7}
plan:
  include: ["net.*"]
  exclude: ["net.0.bias"]
  granularity: channel
  combine: convex
  rest_from: first
  candidate_gate: false
fit:
  steps: 50
  lr: 1e-2            # YAML 1.1 reads this as a string; the loader makes it a float
  l0_lambda: 0.003
  init_gate: 0.7
  seed: 4
  objective: entropy
  eval_every: 0
  record_every: 5
  rank_batches: 2
  recalibrate_bn: false
  progress: false
  grad_clip: null
output: {dir: out}
"""
    cfg = load_config(write(folder, text))
    assert cfg.plan() == MergePlan(
        include=["net.*"],
        exclude=["net.0.bias"],
        granularity="channel",
        rest_from="first",
        candidate_gate=False,
    )
    expected = FitConfig().replace(
        steps=50,
        lr=0.01,
        l0_lambda=0.003,
        init_gate=0.7,
        seed=4,
        objective="entropy",
        eval_every=0,
        record_every=5,
        rank_batches=2,
        recalibrate_bn=False,
        progress=False,
        grad_clip=None,
    )
    assert cfg.fit_config() == expected
    assert cfg.candidate_names() == ["first", "b"]
    assert cfg.data.kwargs == {"num_merge": 100, "seed": 3}
    assert (cfg.data.batch_size, cfg.data.seed) == (32, 7)


def test_relative_paths_resolve_against_the_config_folder(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (folder / "data").mkdir()
    (folder / "data" / "merge.pt").touch()
    (folder / "base.pt").touch()
    sub = folder / "configs"
    sub.mkdir()
    content = copy.deepcopy(BASE)
    content["candidates"] = [{"path": "../ckpt/a.safetensors", "name": "a"}, "../ckpt/b.pt"]
    content["data"] = {"dataset": "tensors", "merge": "../data/merge.pt"}
    content["plan"] = {"combine": "delta", "base": "../base.pt"}
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the config, never to the working directory
    cfg = load_config(write(sub, content))
    assert cfg.candidate_paths() == [sub / "../ckpt/a.safetensors", sub / "../ckpt/b.pt"]
    assert all(p.is_absolute() and p.exists() for p in cfg.candidate_paths())
    assert cfg.data.merge == sub / "../data/merge.pt"
    assert cfg.output.dir == sub / "merged-out"
    assert Path(cfg.plan().base).resolve() == (folder / "base.pt").resolve()
    keys = [key for key, _ in cfg.input_paths()]
    assert keys == ["candidates[0]", "candidates[1]", "data.merge", "plan.base"]


def test_base_may_name_a_candidate_and_names_default_to_stems(folder: Path) -> None:
    (folder / "ckpt" / "sub").mkdir()
    (folder / "ckpt" / "sub" / "b.pt").touch()
    content = copy.deepcopy(BASE)
    content["candidates"] += ["ckpt/sub/b.pt"]
    content["plan"] = {"combine": "delta", "base": "a"}
    cfg = load_config(write(folder, content))
    assert cfg.candidate_names() == ["a", "b-1", "b-2"]  # repeated stems are numbered
    assert cfg.plan().base == "a"


def test_factory_may_live_beside_the_config(folder: Path) -> None:
    module = f"models_{uuid.uuid4().hex}"
    (folder / f"{module}.py").write_text(
        "from torch import nn\n\ndef make(width=3):\n    return nn.Linear(width, 2)\n"
    )
    content = copy.deepcopy(BASE)
    content["model"] = {"factory": f"{module}:make", "kwargs": {"width": 5}}
    before = list(sys.path)
    cfg = load_config(write(folder, content))
    assert sys.path == before  # the folder is only on the path while importing
    assert cfg.build_model().in_features == 5
    assert isinstance(load_config(write(folder, BASE)).build_model(), MLP)


def test_empty_sections_read_as_defaults(folder: Path) -> None:
    text = yaml.safe_dump(BASE) + "plan:\nfit:\n"
    cfg = load_config(write(folder, text))
    assert cfg.fit_config() == FitConfig()


# ------------------------------------------------------------------------- schema errors

Edit = Callable[[dict[str, Any]], None]


def _set(section: str, **values: Any) -> Edit:
    return lambda c: c.setdefault(section, {}).update(values)


ERRORS: list[tuple[str, Edit, str]] = [
    (
        "unknown key",
        _set("plan", granularty="tensor"),
        "plan.granularty: unknown key; did you mean 'granularity'?",
    ),
    ("unknown section", lambda c: c.update(fitt={}), "fitt: unknown key; did you mean 'fit'?"),
    (
        "unknown candidate key",
        lambda c: c["candidates"].__setitem__(0, {"path": "ckpt/a.safetensors", "nmae": "x"}),
        "candidates[0].nmae: unknown key; did you mean 'name'?",
    ),
    ("negative l0_lambda", _set("fit", l0_lambda=-1.0), "fit.l0_lambda: must be >= 0, got -1.0"),
    (
        "bad granularity",
        _set("plan", granularity="foo"),
        "plan.granularity: expected one of model, module, tensor, channel, unit, got 'foo'",
    ),
    ("zero steps", _set("fit", steps=0), "fit.steps: must be >= 1, got 0"),
    ("string steps", _set("fit", steps="300"), "fit.steps: expected an integer, got '300'"),
    ("init_gate 1", _set("fit", init_gate=1.0), "fit.init_gate: must be < 1, got 1.0"),
    ("bad objective", _set("fit", objective="mse"), "fit.objective: expected one of"),
    ("bool as text", _set("fit", progress="no"), "fit.progress: expected true or false"),
    ("include string", _set("plan", include="*"), "plan.include: expected a list, got '*'"),
    (
        "dataset typo",
        _set("data", dataset="tensor"),
        "data.dataset: expected one of mnist1d, mnist, digits, tensors, text, hf, got 'tensor'; "
        "did you mean 'tensors'?",
    ),
    ("missing output", lambda c: c.pop("output"), "output: required key is missing"),
    ("no output dir", lambda c: c.update(output={}), "output.dir: required key is missing"),
    (
        "one candidate",
        lambda c: c.update(candidates=["ckpt/b.pt"]),
        "candidates: needs at least 2 entries, got 1",
    ),
    (
        "missing candidate file",
        lambda c: c["candidates"].append("ckpt/c.safetensors"),
        "candidates[2].path: no such file or folder: ",
    ),
    (
        "two problems",
        lambda c: c.update(fit={"steps": 0, "lr": 0}),
        "fit.steps: must be >= 1, got 0 (and 1 more problem)",
    ),
]


@pytest.mark.parametrize(("edit", "expected"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_schema_errors_name_the_key(folder: Path, edit: Edit, expected: str) -> None:
    content = copy.deepcopy(BASE)
    edit(content)
    assert expected in config_error(write(folder, content))


def test_missing_candidate_is_named(folder: Path) -> None:
    content = copy.deepcopy(BASE)
    content["candidates"][1] = "ckpt/missing.pt"
    message = config_error(write(folder, content))
    assert "candidates[1]" in message and str(folder / "ckpt" / "missing.pt") in message


# ------------------------------------------------------------------ checks beyond the schema

CHECKS: list[tuple[str, Edit, str]] = [
    (
        "factory form",
        _set("model", factory="softmerge.zoo.MLP"),
        "model.factory: expected 'module:callable' (e.g. softmerge.zoo:CNN1D), "
        "got 'softmerge.zoo.MLP'",
    ),
    (
        "factory module",
        _set("model", factory="softmerge.nope:MLP"),
        "model.factory: cannot import module 'softmerge.nope'",
    ),
    (
        "factory attribute",
        _set("model", factory="softmerge.zoo:MPL"),
        "model.factory: 'softmerge.zoo' has no attribute 'MPL'; did you mean 'MLP'?",
    ),
    (
        "factory not callable",
        _set("model", factory="softmerge.zoo:MODELS"),
        "model.factory: 'softmerge.zoo:MODELS' is not callable (it is a dict)",
    ),
    (
        "factory kwarg typo",
        _set("model", kwargs={"in_features": 64, "hiden": [8]}),
        "model.kwargs.hiden: not an argument of softmerge.zoo:MLP; did you mean 'hidden'?",
    ),
    (
        "factory kwarg missing",
        _set("model", kwargs={}),
        "model.kwargs: softmerge.zoo:MLP: missing a required argument: 'in_features'",
    ),
    (
        "data kwarg typo",
        _set("data", kwargs={"num_merg": 10}),
        "data.kwargs.num_merg: not an argument of digits_splits; did you mean 'num_merge'?",
    ),
    ("tensors need merge", _set("data", dataset="tensors"), "data.merge: required with dataset"),
    ("path not used", _set("data", path="ckpt"), "data.path: not used with dataset 'digits'"),
    (
        "mnist path is a file",
        _set("data", dataset="mnist", path="ckpt/a.safetensors"),
        "a.safetensors is not a folder",
    ),
    (
        "duplicate names",
        lambda c: c["candidates"].__setitem__(1, {"path": "ckpt/b.pt", "name": "a"}),
        "candidates[1].name: 'a' is already the name of candidates[0]",
    ),
    (
        "rest_from typo",
        _set("plan", rest_from="averag"),
        "plan.rest_from: expected 'best', 'average' or a candidate name (a, b), got 'averag'; "
        "did you mean 'average'?",
    ),
    ("delta without base", _set("plan", combine="delta"), "plan: combine 'delta' needs a base"),
    (
        "unknown base",
        _set("plan", combine="delta", base="c"),
        "plan.base: 'c' is neither a candidate name (a, b) nor an existing file",
    ),
]


@pytest.mark.parametrize(("edit", "expected"), [e[1:] for e in CHECKS], ids=[e[0] for e in CHECKS])
def test_checks_beyond_the_schema(folder: Path, edit: Edit, expected: str) -> None:
    content = copy.deepcopy(BASE)
    edit(content)
    assert expected in config_error(write(folder, content))


def test_factory_failure_is_reported_when_building(folder: Path) -> None:
    content = copy.deepcopy(BASE)
    content["model"]["kwargs"]["hidden"] = "wide"  # accepted by the signature, fails inside
    cfg = load_config(write(folder, content))
    with pytest.raises(ConfigError, match=r"model\.factory: softmerge\.zoo:MLP\(\*\*.*\) failed"):
        cfg.build_model()


# ------------------------------------------------------------------------------ file errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: [\n", "line 2, column 1: invalid YAML"),
        (
            "fit:\n  steps: 1\n  steps: 2\n",
            "line 3, column 3: invalid YAML: key 'steps' is given twice (first on line 2)",
        ),
        (
            "- a\n- b\n",
            "the top level must be a mapping of sections (model, candidates, data, "
            "plan, fit, output, method, params, methods), got a list",
        ),
        ("", "the config is empty"),
    ],
    ids=["syntax", "duplicate key", "not a mapping", "empty"],
)
def test_file_errors(folder: Path, text: str, expected: str) -> None:
    assert expected in config_error(write(folder, text))


def test_missing_config_file(tmp_path: Path) -> None:
    assert "config file not found" in config_error(tmp_path / "nope.yaml")
    assert "is a folder" in config_error(tmp_path)


def test_model_validate_without_a_file_uses_the_working_directory(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(folder)
    cfg = MergeConfig.model_validate(copy.deepcopy(BASE))
    assert cfg.candidate_paths()[0] == folder / "ckpt" / "a.safetensors"
