"""The L0 path (softmerge.path): grid ends, warm starts, importance, the auto choice of λ, the
``softmerge path`` command, and bad inputs. Small real data (scikit-learn digits)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from children import train_children
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from softmerge import ConfigError, FitConfig, MergePlan, PlanError, SoftMerger
from softmerge.cli import main
from softmerge.data import digits_splits
from softmerge.fit import FitLoop
from softmerge.methods import MergeContext, get_method
from softmerge.path import (
    PathPoint,
    check_grid,
    choice_text,
    choose,
    importance,
    split_held_out,
)
from softmerge.report import read_gates_json
from softmerge.zoo import MLP

NAMES = ["a", "b", "c", "useless"]


def _mlp() -> MLP:
    return MLP(64, hidden=(32,), num_classes=10)


@pytest.fixture(scope="module")
def digits():
    return digits_splits(seed=0)


@pytest.fixture(scope="module")
def pool(digits) -> list[dict[str, torch.Tensor]]:
    """3 children of one parent, and a useless candidate: an untrained network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        useless = _mlp()
    return [*train_children(digits.train), dict(useless.state_dict())]


def loader(ds, seed: int = 0) -> DataLoader:
    return DataLoader(
        ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


FAST = dict(steps=60, progress=False, eval_every=0)


def run_path(pool, digits, granularity="model", **fit: Any):
    learn, held = split_held_out(loader(digits.merge), seed=0)
    merger = SoftMerger(_mlp(), pool, MergePlan(granularity=granularity), names=NAMES)
    path = merger.fit_path(learn, config=FitConfig(**{**FAST, **fit}), held_out=held)
    return merger, path


@pytest.fixture(scope="module")
def model_path(pool, digits):
    return run_path(pool, digits, "model", solo_prior=0.0)


# ------------------------------------------------------------------------------- the grid


def test_grid_ends_are_found_automatically(model_path) -> None:
    _, path = model_path
    points = path.points
    assert points[0].lam == 0.0 and points[0].steps == 60  # the dense, cold fit
    lower, upper = path.grid["lower"], path.grid["upper"]
    assert 0 < lower < upper and path.grid["upper_reached"]
    # Lower end: nothing that was open at λ = 0 has closed; upper end: one candidate per unit.
    assert points[1].lam == lower and points[1].open_units == points[0].open_units
    assert points[-1].lam == upper and points[-1].open_max <= 1
    assert all(p.open_max > 1 for p in points[:-1])  # the path stops at the first such λ
    # Between the ends: log-spaced, one fixed ratio.
    lams = [p.lam for p in points[1:]]
    ratios = [b / a for a, b in itertools.pairwise(lams)]
    assert all(math.isclose(r, path.grid["ratio"], rel_tol=1e-9) for r in ratios)
    # The coarse search's probe that closed a gate is not on the path, but is reported.
    assert path.search[-1]["closed"] and path.search[-1]["lambda"] > lower
    # The cost: within the step budget, counted over every stage (probes included).
    assert path.cost["steps"] <= path.cost["max_steps"] == 150
    assert points[-1].total_steps == path.cost["steps"] - 0  # the last stage ran last


def test_warm_starts_continue_the_gates_and_open_gates_only_fall(pool, digits) -> None:
    """Each later λ starts from the previous λ's gates (not from the initialisation), and on
    this pool no gate reopens as λ grows."""
    starts: list[torch.Tensor] = []
    original = FitLoop.run

    def spy(loop: FitLoop, batches):  # the gates each stage starts from
        starts.append(loop.problem.merger.gates.log_alpha.detach().clone())  # type: ignore[attr-defined]
        return original(loop, batches)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FitLoop, "run", spy)
        _, path = run_path(pool, digits, "tensor", solo_prior=0.0)
    assert not torch.equal(starts[1], starts[0])  # stage 2 does not start from scratch
    last = path.points[-1]
    assert torch.equal(starts[-1], path.points[-2].gates["log_alpha"])
    assert not torch.equal(last.gates["log_alpha"], path.points[-2].gates["log_alpha"])
    opens = [p.open_per_unit for p in path.points]
    assert opens == sorted(opens, reverse=True) and opens[-1] < opens[0]
    for name in NAMES:
        counts = [p.open_units[name] for p in path.points]
        assert counts == sorted(counts, reverse=True), name


def test_same_seed_same_path(pool, digits, model_path) -> None:
    _, path = model_path
    _, again = run_path(pool, digits, "model", solo_prior=0.0)
    assert [p.lam for p in again.points] == [p.lam for p in path.points]
    for p, q in zip(path.points, again.points, strict=True):
        assert torch.equal(p.gates["log_alpha"], q.gates["log_alpha"])


def test_given_grid_is_followed_with_warm_starts(pool, digits) -> None:
    learn, held = split_held_out(loader(digits.merge), seed=0)
    merger = SoftMerger(_mlp(), pool, MergePlan(granularity="model"), names=NAMES)
    path = merger.fit_path(
        learn, [0.0, 0.5, 50.0], config=FitConfig(**FAST), held_out=held, stage_steps=10
    )
    assert [p.lam for p in path.points] == [0.0, 0.5, 50.0]
    assert [p.steps for p in path.points] == [60, 10, 10] and path.cost["steps"] == 80
    assert path.grid["found"] == "given" and path.search == []
    assert path.grid["upper_reached"] == (path.points[-1].open_max <= 1)
    assert path.points[-1].open_per_unit < path.points[0].open_per_unit  # λ = 50 closes some


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([0.0, -0.1], "lambdas[1]: λ must be a finite number >= 0, got -0.1"),
        ([0.1, 0.1], "lambdas[1]: the grid must be strictly increasing"),
        ([1.0, 0.5], "got 0.5 after 1.0"),
        ([], "the λ grid is empty"),
        ([0.0, float("nan")], "lambdas[1]: λ must be a finite number >= 0, got nan"),
        (["0.1"], "lambdas[0]: expected a number, got '0.1'"),
    ],
)
def test_bad_grids_are_one_clear_error(grid, message) -> None:
    with pytest.raises(PlanError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_grid(grid)


def test_bad_lambda_settings_are_clear_errors() -> None:
    with pytest.raises(PlanError, match="l0_lambda must be a number >= 0 or 'auto', got 'aut'"):
        FitConfig(l0_lambda="aut")
    with pytest.raises(PlanError, match=r"l0_lambda must be >= 0, got -1\.0"):
        FitConfig(l0_lambda=-1.0)
    with pytest.raises(PlanError, match="l0_tolerance must be >= 0"):
        FitConfig(l0_tolerance=-0.01)
    assert FitConfig(l0_lambda="auto").l0_tolerance == 0.01
    for bad in (0.4, 1.0):  # below 0.5 would accept gaps beyond the tolerance; 1: no point
        with pytest.raises(PlanError, match="l0_confidence must be"):
            FitConfig(l0_confidence=bad)
    # The soft method's parameters carry the same check (a config's `params:` or `methods:`).
    with pytest.raises(ConfigError, match=r"method 'soft': l0_lambda: must be >= 0, got -1\.0$"):
        get_method("soft", l0_lambda=-1.0)


# ------------------------------------------------------------------------------- importance


def test_useless_candidate_closes_first_and_ranks_last(model_path) -> None:
    _, path = model_path
    order = [r["candidate"] for r in path.importance]
    assert order[-1] == "useless"
    rows = {r["candidate"]: r for r in path.importance}
    assert rows["useless"]["close_lambda"] == 0.0 and rows["useless"]["share"] == 0.0
    # The survivor never closes; every other child closes somewhere on the path.
    assert rows[order[0]]["close_lambda"] is None and rows[order[0]]["open_at_end"]
    closes = [rows[n]["close_lambda"] for n in order[1:]]
    assert all(c is not None for c in closes) and closes == sorted(closes, reverse=True)
    assert math.isclose(sum(r["share"] for r in path.importance), 1.0)


def _point(
    lam: float, used: float, loss: float, open_units: dict[str, int], learn: float | None = None
) -> PathPoint:
    return PathPoint(
        lam=lam,
        steps=1,
        total_steps=1,
        open_per_unit=used,
        open_max=int(used),
        used_per_unit=used,
        open_units=open_units,
        zero_fraction=0.0,
        one_fraction=0.0,
        expected_l0=used,
        gates={},
        learn={"loss": loss + 1 if learn is None else learn},
        held_out={"loss": loss},
    )


def test_importance_ignores_a_candidate_that_closes_and_reopens() -> None:
    points = [
        _point(0.0, 2, 1.0, {"x": 1, "y": 1}),
        _point(0.1, 1, 1.0, {"x": 0, "y": 1}),  # x closes...
        _point(0.2, 2, 1.0, {"x": 1, "y": 1}),  # ...and reopens
        _point(0.4, 1, 1.0, {"x": 0, "y": 1}),
    ]
    rows = {r["candidate"]: r for r in importance(points, ["x", "y"])}
    assert rows["x"]["close_lambda"] == 0.4 and rows["y"]["close_lambda"] is None
    assert rows["y"]["rank"] == 1 and rows["x"]["rank"] == 2


# ------------------------------------------------------------------------------- auto choice


def test_choice_is_the_sparsest_point_within_the_tolerance() -> None:
    points = [
        _point(0.0, 5, 1.000, {}),
        _point(0.1, 4, 0.990, {}),  # the best held-out loss
        _point(0.2, 3, 0.9995, {}),  # within 1 % of it: chosen
        _point(0.3, 2, 1.0001, {}),  # 1.02 % worse: not allowed
        _point(0.4, 1, 1.5, {}),
    ]
    choice = choose(points, 0.01, "held_out")
    assert choice["index"] == 2 and choice["best_index"] == 1
    assert choice["loss"] <= choice["best_loss"] * 1.01 == choice["limit"]
    assert choose(points, 0.0, "held_out")["index"] == 1  # no tolerance: the best
    assert choose(points, 1.0, "held_out")["index"] == 4  # anything goes: the sparsest
    # On the learning losses (1 higher): 1 % of a larger loss lets the 2-per-unit point in.
    assert choose(points, 0.01, "learn")["index"] == 3


def test_choice_ignores_a_held_out_best_the_learning_loss_disowns() -> None:
    """A point whose learning loss is more than the tolerance above the path's best does not
    compete (nor set the bar), however low its held-out loss; equal sparsity: smaller λ."""
    points = [
        _point(0.0, 5, 1.000, {}, learn=1.000),
        _point(0.1, 5, 1.004, {}, learn=1.001),
        _point(0.2, 5, 0.950, {}, learn=1.050),  # held-out best, but 5 % worse where it learns
        _point(0.3, 4, 1.008, {}, learn=1.005),
    ]
    choice = choose(points, 0.01, "held_out")
    assert choice["eligible"] == 3 and choice["best_index"] == 0
    assert choice["index"] == 3 and choice["limit"] == pytest.approx(1.01)
    points[3] = _point(0.3, 4, 1.02, {}, learn=1.005)  # now too far on held-out data
    assert choose(points, 0.01, "held_out")["index"] == 0  # 5 per unit: the smaller λ


def _with_samples(point: PathPoint, losses: torch.Tensor) -> PathPoint:
    """``point`` scored sample by sample on the held-out split: its loss is their mean."""
    point.held_out = {"loss": float(losses.mean())}
    point.samples["held_out"] = (losses.double(), torch.ones(losses.shape, dtype=torch.float64))
    return point


def test_choice_holds_back_a_sparser_point_whose_gap_is_noise() -> None:
    """Two sparser points are 0.5 % worse than the dense one on 400 held-out samples. Where the
    per-sample differences are noisy the data cannot show the gap is within 1 %: held back at
    95 % confidence, taken on the mean gap alone (confidence 0.5). Where every sample moves a
    little, the same mean gap is certain: taken."""
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(400, generator=g, dtype=torch.float64) * 0.4
    noisy = dense + 0.001 + torch.randn(400, generator=g, dtype=torch.float64) * 0.05
    noisy += dense.mean() * 1.005 - noisy.mean()  # the mean gap exactly 0.5 %
    steady = dense * 1.005
    points = [
        _with_samples(_point(0.0, 5, 0.0, {}, learn=1.0), dense),
        _with_samples(_point(0.1, 3, 0.0, {}, learn=1.0), steady),
        _with_samples(_point(0.2, 2, 0.0, {}, learn=1.0), noisy),
    ]
    loose = choose(points, 0.01, "held_out", confidence=0.5)
    assert loose["index"] == 2 and loose["held_back"] == 0
    sure = choose(points, 0.01, "held_out", confidence=0.95)
    assert sure["index"] == 1 and sure["held_back"] == 1
    assert sure["gap_se"] < 1e-4
    only_noisy = choose([points[0], points[2]], 0.01, "held_out")
    assert only_noisy["index"] == 0 and only_noisy["held_back"] == 1
    # The standard error is the paired one: the noise's 0.05 over sqrt(400), not the losses'.
    gap_se = choose([points[2], points[0]], 0.01, "held_out", confidence=0.5)["gap_se"]
    assert gap_se == pytest.approx(0.05 / 20, rel=0.15)


def test_sample_totals_add_up_to_the_totals() -> None:
    """Per-sample losses and weights sum to what ``totals`` reports, for classification and
    for a causal LM whose padding predicts nothing."""
    from softmerge.batches import split_on
    from softmerge.objectives import resolve_objective

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 10, generator=g)
    b = split_on((torch.zeros(6, 3), torch.randint(0, 10, (6,), generator=g)), torch.device("cpu"))
    obj = resolve_objective("classification")
    losses, weights = obj.sample_totals(logits, b)
    t = obj.totals(logits, b)
    assert losses.shape == (6,) and float(losses.sum()) == pytest.approx(t.loss)
    assert float(weights.sum()) == t.weight
    ids = torch.randint(0, 10, (3, 5), generator=g)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0
    lm = split_on({"input_ids": ids, "attention_mask": mask}, torch.device("cpu"))
    obj = resolve_objective("causal_lm")
    logits = torch.randn(3, 5, 10, generator=g)
    losses, weights = obj.sample_totals(logits, lm)
    t = obj.totals(logits, lm)
    assert weights.tolist() == [4.0, 2.0, 4.0]
    assert float(losses.sum()) == pytest.approx(t.loss) and float(weights.sum()) == t.weight


def test_auto_lambda_through_the_method_picks_within_tolerance(pool, digits) -> None:
    ctx = MergeContext(
        _mlp(),
        pool,
        names=NAMES,
        plan=MergePlan(granularity="tensor"),
        merge_loader=loader(digits.merge),
    )
    outcome = get_method("soft", l0_lambda="auto", steps=60, progress=False).merge(ctx)
    choice, path = outcome.info["l0_choice"], outcome.info["path"]
    assert choice["held_out"].startswith("split: 20 %")
    held = [p.held_out["loss"] for p in path.points]
    learn = [p.learn["loss"] for p in path.points]
    eligible = [k for k in range(len(held)) if learn[k] <= min(learn) * 1.01]
    assert choice["loss"] == held[choice["index"]] <= min(held[k] for k in eligible) * 1.01
    sparser = [k for k in eligible if path.points[k].used_per_unit < path.chosen.used_per_unit]
    # A sparser point within the limit on its mean gap is held back for its noise.
    assert sum(held[k] <= choice["limit"] for k in sparser) <= choice["held_back"]
    assert choice["confidence"] == 0.95 and "95 % confidence" in choice_text(choice)
    # The merge is the chosen point's: its gates, its weights.
    merger = outcome.info["merger"]
    assert torch.equal(merger.gates.log_alpha.detach(), path.chosen.gates["log_alpha"])
    merged = merger.merged_state_dict()
    assert all(torch.equal(outcome.state[k], merged[k]) for k in merged)
    assert merger.result.steps == path.cost["steps"]
    assert [r["candidate"] for r in outcome.info["importance"]][-1] == "useless"


def test_fit_with_auto_lambda_holds_out_part_of_the_loader(pool, digits) -> None:
    merger = SoftMerger(_mlp(), pool, MergePlan(granularity="model"), names=NAMES)
    result = merger.fit(loader(digits.merge), config=FitConfig(l0_lambda="auto", **FAST))
    assert merger.path is not None and result is merger.result
    assert merger.path.choice["selected_on"] == "held_out"
    with pytest.raises(PlanError, match="not checkpointed"):
        merger.fit(
            loader(digits.merge), config=FitConfig(l0_lambda="auto", **FAST), checkpoint="x.pt"
        )


def test_split_held_out_of_a_list_of_batches() -> None:
    batches = [(torch.full((2, 1), float(i)), torch.zeros(2, dtype=torch.long)) for i in range(10)]
    learn, held = split_held_out(batches)
    assert [int(b[0][0]) for b in held] == [4, 9]
    assert [int(b[0][0]) for b in learn] == [0, 1, 2, 3, 5, 6, 7, 8]
    with pytest.raises(Exception, match="at least 2 merge batches"):
        split_held_out(batches[:1])


# ------------------------------------------------------------------------------- command line


def test_cli_path_writes_its_files(tmp_path: Path, pool, capsys) -> None:
    paths = []
    for name, state in zip(NAMES, pool, strict=True):
        paths.append({"path": str(tmp_path / f"{name}.safetensors"), "name": name})
        save_file({k: v.contiguous() for k, v in state.items()}, paths[-1]["path"])
    config = {
        "model": {"factory": "softmerge.zoo:MLP", "kwargs": {"in_features": 64, "hidden": [32]}},
        "candidates": paths,
        "data": {"dataset": "digits", "batch_size": 64, "held_out": 0.2},
        "plan": {"granularity": "model"},
        "fit": {"steps": 60, "eval_every": 0},
        "output": {"dir": "out"},
    }
    cfg = tmp_path / "path.yaml"
    cfg.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["path", str(cfg), "--no-progress"]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["path.json", "path.md", "path.png"]
    data = json.loads((out / "path.json").read_text())
    assert data["candidates"] == NAMES and data["choice"]["held_out"] == "given"
    assert data["points"][0]["lambda"] == 0.0 and "eval_accuracy" in data["points"][0]
    assert (out / "path.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "candidate importance" in printed and "chosen λ" in printed
    ranking = printed.split("candidate importance")[1].strip().splitlines()
    assert ranking[-3].split()[:2] == ["4", "useless"]  # then a blank line and the files

    # `softmerge merge` with l0_lambda auto: gates.json carries the importance and choice.
    assert (
        main(
            [
                "merge",
                str(cfg),
                "--no-progress",
                "--set",
                "fit.l0_lambda=auto",
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    gates = json.loads((tmp_path / "merged" / "gates.json").read_text())
    assert gates["path"]["importance"][-1]["candidate"] == "useless"
    assert gates["path"]["choice"]["lambda"] in gates["path"]["lambdas"]
    read_gates_json(tmp_path / "merged" / "gates.json")  # still a valid gates.json
    summary = json.loads((tmp_path / "merged" / "summary.json").read_text())
    assert summary["info"]["l0_choice"]["selected_on"] == "held_out"
    assert "λ chosen on held-out data" in (tmp_path / "merged" / "summary.md").read_text()
    assert (tmp_path / "merged" / "path.json").is_file()


def test_cli_path_refuses_other_methods_and_bad_lambda(tmp_path: Path, pool, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    paths = []
    for name, state in zip(NAMES[:2], pool, strict=False):
        paths.append(str(tmp_path / f"{name}.safetensors"))
        save_file({k: v.contiguous() for k, v in state.items()}, paths[-1])
    base = {
        "model": {"factory": "softmerge.zoo:MLP", "kwargs": {"in_features": 64, "hidden": [32]}},
        "candidates": paths,
        "data": {"dataset": "digits"},
        "output": {"dir": "out"},
    }
    cfg.write_text(yaml.safe_dump({**base, "method": "uniform_soup"}), encoding="utf-8")
    assert main(["path", str(cfg)]) == 2
    assert "softmerge path follows soft merging's gates" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({**base, "fit": {"l0_lambda": "automatic"}}), encoding="utf-8")
    assert main(["path", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "fit.l0_lambda: expected a number >= 0 or 'auto', got 'automatic'" in err
    assert not (tmp_path / "out").exists()


def test_engine_page_rewrites_only_the_parts_that_ran() -> None:
    """`benchmarks/engine.py --only path` replaces its section of docs/performance.md and keeps
    the others as they were, under the latest run's header."""
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        import engine
    finally:
        sys.path.remove(str(bench))
    old = "# T\n\nrun 1\n\n## A\n\none\n\n## B\n\ntwo\n"
    new = "# T\n\nrun 2\n\n## B\n\nthree\n\n## C\n\nfour\n"
    assert (
        engine._splice(old, new) == "# T\n\nrun 2\n\n## A\n\none\n\n## B\n\nthree\n\n## C\n\nfour\n"
    )
    # every section of a run is dated (unless it dates itself), so a spliced page says which
    # run each section comes from
    meta = {"date": "2026-12-03 20:00:00", "seconds": 90.0}
    dated = engine._dated(["# T", "", "## A", "", "one", "## B", "", "_Measured x_"], meta, ["b"])
    stamp = "_Measured 2026-12-03 20:00:00, 1.5 min (--only b)._"
    assert dated == ["# T", "", "## A", "", stamp, "", "one", "## B", "", "_Measured x_"]
