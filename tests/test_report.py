"""Tests for softmerge.report: gates.json, figures and tables."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure

from softmerge.report import (
    GateSnapshot,
    format_markdown_table,
    format_table,
    gates_to_dict,
    plot_convergence,
    plot_gate_heatmap,
    read_gates_json,
    write_gates_json,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _snapshot(n_units: int, seed: int = 0) -> GateSnapshot:
    rng = np.random.default_rng(seed)
    shape = (3, n_units)
    gate = np.clip(rng.uniform(-0.3, 1.3, size=shape), 0.0, 1.0)  # plenty of exact 0 and 1
    gate[2] = 0.0  # the excluded candidate is fixed at 0
    return GateSnapshot(
        candidates=["base", "math", "broken"],
        units=[f"layer.{j}.weight" for j in range(n_units)],
        log_alpha=rng.normal(size=shape),
        gate=gate,
        p_nonzero=rng.uniform(size=shape),
        excluded=["broken"],
    )


def _history(length: int) -> list[dict[str, Any]]:
    history = []
    for s in range(length):
        rec: dict[str, Any] = {"step": s, "loss": 1.0 / (s + 1), "l0": 10.0 - 0.001 * s}
        rec["mean_gate"] = [0.5, 0.5 + 0.4 * s / max(length, 1), 0.0]
        if s % 10 == 0:
            rec["val_loss"], rec["val_acc"] = 1.1 / (s + 1), 0.5 + 0.001 * s
        history.append(rec)
    return history


@pytest.fixture
def capture_figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Record every figure that gets saved, so tests can inspect what was drawn."""
    saved: list[Figure] = []
    original = Figure.savefig

    def recording_savefig(self: Figure, *args: Any, **kwargs: Any) -> None:
        saved.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    return saved


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > len(PNG_SIGNATURE)
    assert data[:8] == PNG_SIGNATURE


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------
# gates.json


def test_json_round_trip_keeps_exact_gates_and_excluded(tmp_path: Path) -> None:
    snap = _snapshot(7)
    assert (snap.gate == 0.0).any() and (snap.gate == 1.0).any()
    path = write_gates_json(tmp_path / "gates.json", snap, extra={"granularity": "tensor"})

    back = read_gates_json(path)
    assert back.candidates == snap.candidates
    assert back.units == snap.units
    assert back.excluded == ["broken"]
    np.testing.assert_array_equal(back.gate == 0.0, snap.gate == 0.0)
    np.testing.assert_array_equal(back.gate == 1.0, snap.gate == 1.0)
    for name in ("log_alpha", "gate", "p_nonzero"):
        np.testing.assert_allclose(getattr(back, name), getattr(snap, name), atol=1e-6)

    raw = json.loads(path.read_text())
    assert list(raw)[:4] == ["candidates", "excluded", "units", "summary"]
    assert raw["granularity"] == "tensor"
    cell = raw["units"][0]["gates"]["base"]
    assert set(cell) == {"log_alpha", "gate", "p_nonzero"}
    assert all(type(v) is float for v in cell.values())
    assert not _leftovers(tmp_path)


def test_json_rounds_but_never_fakes_an_exact_end(tmp_path: Path) -> None:
    snap = GateSnapshot(
        candidates=["a"],
        units=["model"],
        log_alpha=np.array([[1.23456789]]),
        gate=np.array([[0.99999999]]),  # rounds to 1.0 at 6 decimals, but is not exactly on
        p_nonzero=np.array([[0.5]]),
    )
    cell = gates_to_dict(snap)["units"][0]["gates"]["a"]
    assert cell["log_alpha"] == 1.234568
    assert cell["gate"] != 1.0 and cell["gate"] == pytest.approx(1.0)
    assert gates_to_dict(snap)["summary"]["a"]["fraction_one"] == 0.0


def test_non_finite_values_give_strict_json(tmp_path: Path) -> None:
    snap = _snapshot(2)
    snap.log_alpha[2, :] = -np.inf  # e.g. an excluded candidate pinned far below zero
    path = write_gates_json(tmp_path / "gates.json", snap)

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    raw = json.loads(path.read_text(), parse_constant=reject)
    assert raw["units"][0]["gates"]["broken"]["log_alpha"] is None
    assert np.isnan(read_gates_json(path).log_alpha[2]).all()


def test_summary_on_hand_made_example() -> None:
    snap = GateSnapshot(
        candidates=["a", "b"],
        units=["fc1", "fc2", "head"],
        log_alpha=np.zeros((2, 3)),
        gate=np.array([[0.0, 0.5, 1.0], [1.0, 1.0, 0.25]]),
        p_nonzero=np.full((2, 3), 0.5),
    )
    summary = gates_to_dict(snap)["summary"]
    assert summary["a"] == {
        "mean_gate": 0.5,
        "max_gate": 1.0,
        "min_gate": 0.0,
        "fraction_zero": pytest.approx(1 / 3, abs=1e-6),
        "fraction_one": pytest.approx(1 / 3, abs=1e-6),
    }
    assert summary["b"] == {
        "mean_gate": 0.75,
        "max_gate": 1.0,
        "min_gate": 0.25,
        "fraction_zero": 0.0,
        "fraction_one": pytest.approx(2 / 3, abs=1e-6),
    }


def test_bad_inputs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        GateSnapshot(["a"], ["u1", "u2"], np.zeros((1, 3)), np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="not among"):
        GateSnapshot(["a"], ["u"], np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)), ["b"])
    with pytest.raises(ValueError, match="clash"):
        gates_to_dict(_snapshot(1), extra={"summary": 1})
    bad = tmp_path / "bad.json"
    bad.write_text('{"candidates": ["a"]}')
    with pytest.raises(ValueError, match=r"not a gates\.json"):
        read_gates_json(bad)


# --------------------------------------------------------------------------------------------
# figures


@pytest.mark.parametrize("n_units", [1, 7, 3000])
def test_heatmap_png(tmp_path: Path, capture_figures: list[Figure], n_units: int) -> None:
    snap = _snapshot(n_units)
    path = plot_gate_heatmap(tmp_path / "heat.png", snap)
    _assert_png(path)
    assert not _leftovers(tmp_path)

    ax = capture_figures[-1].axes[0]
    image = ax.get_images()[0]
    assert image.get_clim() == (0.0, 1.0)
    np.testing.assert_array_equal(image.get_array(), snap.gate)
    assert capture_figures[-1].axes[1].get_ylabel() == "gate"  # the colorbar
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert names == ["base", "math", "broken (excluded)"]
    if n_units <= 60:
        assert [t.get_text() for t in ax.get_xticklabels()] == snap.units
    else:
        assert list(ax.get_xticks()) == []
        assert ax.get_xlabel() == f"gate unit ({n_units} units)"


def test_heatmap_width_grows_with_units_up_to_a_cap(
    tmp_path: Path, capture_figures: list[Figure]
) -> None:
    widths = []
    for n_units in (1, 20, 3000):
        plot_gate_heatmap(tmp_path / f"heat{n_units}.png", _snapshot(n_units))
        widths.append(capture_figures[-1].get_figwidth())
    assert widths[0] < widths[1] < widths[2] == 20.0


@pytest.mark.parametrize("length", [1, 7, 3000])
def test_convergence_png(tmp_path: Path, capture_figures: list[Figure], length: int) -> None:
    path = plot_convergence(tmp_path / "conv.png", _history(length), ["base", "math", "broken"])
    _assert_png(path)
    assert not _leftovers(tmp_path)

    loss_ax, l0_ax, gate_ax, acc_ax = capture_figures[-1].axes
    assert [ln.get_label() for ln in loss_ax.get_lines()] == ["loss", "val_loss"]
    assert len(l0_ax.get_lines()) == 1
    assert [ln.get_label() for ln in gate_ax.get_lines()] == ["base", "math", "broken"]
    assert [ln.get_label() for ln in acc_ax.get_lines()] == ["val_acc"]
    legend = acc_ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["base", "math", "broken", "val_acc"]


def test_convergence_with_missing_keys(tmp_path: Path, capture_figures: list[Figure]) -> None:
    history = [{"step": 0, "task_loss": 2.0}, {"step": 5, "task_loss": 1.0, "mean_gate": [0.3]}]
    _assert_png(plot_convergence(tmp_path / "conv.png", history))
    fig = capture_figures[-1]
    assert len(fig.axes) == 3  # no val_acc, no twin axis
    loss_ax, l0_ax, gate_ax = fig.axes
    assert [ln.get_label() for ln in loss_ax.get_lines()] == ["task_loss"]
    assert l0_ax.get_lines() == []
    assert [ln.get_label() for ln in gate_ax.get_lines()] == ["candidate 0"]
    with pytest.raises(ValueError, match="mean_gate has 1 values for 2"):
        plot_convergence(tmp_path / "bad.png", history, candidates=["a", "b"])
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("kind", ["heatmap", "convergence"])
def test_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    def broken_savefig(self: Figure, fname: Any, **kwargs: Any) -> None:
        Path(fname).write_bytes(PNG_SIGNATURE)  # a partial file, then the failure
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    target = tmp_path / "out" / "fig.png"
    with pytest.raises(RuntimeError, match="disk full"):
        if kind == "heatmap":
            plot_gate_heatmap(target, _snapshot(3))
        else:
            plot_convergence(target, _history(3))
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_failed_write_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "heat.png"
    target.write_bytes(b"old")

    def broken_savefig(self: Figure, fname: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError):
        plot_gate_heatmap(target, _snapshot(2))
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["heat.png"]


# --------------------------------------------------------------------------------------------
# tables

ROWS = [
    {"method": "average", "acc": 0.91234, "n": 3, "note": None},
    {"method": "softmerge|l0", "acc": 0.95, "n": 12, "ok": True},
]


def test_format_table() -> None:
    expected = "\n".join(
        [
            "method         acc   n  note  ok",
            "------------  ----  --  ----  ----",
            "average       0.91   3  -     -",
            "softmerge|l0  0.95  12  -     True",
        ]
    )
    assert format_table(ROWS) == expected


def test_format_table_columns_and_floatfmt() -> None:
    text = format_table(ROWS, columns=["acc", "method"], floatfmt=".3f")
    assert text.splitlines() == [
        "  acc  method",
        "-----  ------------",
        "0.912  average",
        "0.950  softmerge|l0",
    ]
    assert format_table([]) == ""
    assert format_table([{"x": math.nan}]).splitlines()[-1] == "nan"


def test_format_markdown_table() -> None:
    expected = "\n".join(
        [
            "| method        |  acc |   n | note | ok   |",
            "| ------------- | ---: | --: | ---- | ---- |",
            "| average       | 0.91 |   3 | -    | -    |",
            "| softmerge\\|l0 | 0.95 |  12 | -    | True |",
        ]
    )
    assert format_markdown_table(ROWS) == expected
