"""``fit.select_every``: a soft merge keeps the gates of the step with the lowest held-out loss.

The merge data is labelled by one candidate's predictions and the held-out data by another's,
so every step moves the gates further from what the held-out data rewards: the start is the
best step, and only a merge that really puts the starting gates back scores its loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from softmerge import MergePlan, PlanError, SoftMerger
from softmerge.fit import FitConfig

STEPS, EVERY = 40, 5


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _candidates() -> list[dict[str, torch.Tensor]]:
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        out.append({k: v.detach().clone() for k, v in _mlp().state_dict().items()})
    return out


def _labelled_by(candidate: dict[str, torch.Tensor], seed: int, n: int) -> TensorDataset:
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    model = _mlp()
    model.load_state_dict(candidate)
    with torch.no_grad():
        return TensorDataset(x, model(x).argmax(1))


def _merger() -> SoftMerger:
    return SoftMerger(_mlp(), _candidates(), MergePlan(granularity="channel"))


def _loader() -> DataLoader:
    learn = _labelled_by(_candidates()[0], seed=10, n=128)
    return DataLoader(
        learn, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def _config(select_every: int) -> FitConfig:
    return FitConfig(
        steps=STEPS,
        optimizer="adam",
        lr=0.05,
        select_every=select_every,
        record_every=EVERY,
        progress=False,
        seed=3,
    )


def _fit(select_every: int, held_out: bool = True) -> tuple[SoftMerger, DataLoader]:
    held = DataLoader(_labelled_by(_candidates()[1], seed=11, n=64), batch_size=32)
    merger = _merger()
    merger.fit(_loader(), config=_config(select_every), held_out=held if held_out else None)
    return merger, held


def test_the_merge_is_the_one_of_the_best_held_out_step(tmp_path: Path) -> None:
    merger, held = _fit(EVERY)
    result = merger.result
    assert result is not None and result.selected_step is not None
    scored = [r for r in result.history if "held_out_loss" in r]
    assert [r["step"] for r in scored] == list(range(0, STEPS + 1, EVERY))
    best = min(r["held_out_loss"] for r in scored)
    first_best = next(r["step"] for r in scored if r["held_out_loss"] == best)
    assert result.selected_step == first_best == 0  # the premise: training only hurts here
    assert result.held_out_loss == best < scored[-1]["held_out_loss"]
    # The merger really holds the selected gates: its merge scores the selected loss ...
    assert merger._score(held)["loss"] == pytest.approx(best, rel=1e-6)
    # ... and its gates are the ones training started from.
    start = _merger()
    start.make_loop(_loader(), _config(EVERY))  # ranks the candidates and initialises the gates
    assert torch.equal(merger.deterministic_gates(), start.deterministic_gates())
    assert not torch.equal(merger.deterministic_gates().cpu(), result.gate_trajectory[-1])
    merger.export(tmp_path)  # gates.json names the step whose gates were written
    written = json.loads((tmp_path / "gates.json").read_text())["merge"]
    assert written["selected_step"] == 0 and written["held_out_loss"] == pytest.approx(best)


def test_without_select_every_the_last_gates_stay() -> None:
    merger, _ = _fit(0)  # held-out data given, but no select_every: nothing is selected
    result = merger.result
    assert result is not None and result.selected_step is None
    assert not any("held_out_loss" in r for r in result.history)
    assert torch.equal(merger.deterministic_gates().cpu(), result.gate_trajectory[-1])


def test_select_every_without_held_out_data_is_one_clear_error() -> None:
    with pytest.raises(PlanError, match=r"set data\.held_out"):
        _fit(EVERY, held_out=False)


def test_select_every_with_the_l0_path_is_refused() -> None:
    with pytest.raises(PlanError, match="select_every picks a step of one fit"):
        FitConfig(select_every=5, l0_lambda="auto")


def test_the_l0_path_refuses_select_every() -> None:
    with pytest.raises(PlanError, match="the L0 path already picks a point"):
        _merger().fit_path(_loader(), [0.0, 0.01], config=_config(EVERY))
