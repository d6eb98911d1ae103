"""plan.align, plan.repair and the learned task-vector scale inside the merge pipeline: the
context aligns its pool before any method runs, REPAIR is what is evaluated and written, the
learned scale is checkpointed with the gates, and the reports say what was done."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from permuted import permuted_copies
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from softmerge import FitConfig, MergePlan, PlanError, SoftMerger
from softmerge.checkpoint import load_checkpoint
from softmerge.cli import main
from softmerge.data import digits_splits
from softmerge.gates import MergeGates
from softmerge.methods import MergeContext, get_method
from softmerge.zoo import CNN2D, MLP, ResNet1D, evaluate, seeded, train

# ---------------------------------------------------------------------------------------------
# Helpers


def zoo(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A small zoo model, trained a little on random labels (so BatchNorm statistics and
    weights are off their initial values), and inputs of its shape (the same for any seed)."""
    with seeded(seed):
        model = {
            "mlp": lambda: MLP(16, (12, 10)),
            "cnn": lambda: CNN2D(channels=4, hidden=8),
            "resnet": lambda: ResNet1D(channels=4),
        }[name]()
    with seeded(0):
        x = {"mlp": (64, 16), "cnn": (64, 1, 28, 28), "resnet": (64, 40)}[name]
        x = torch.randn(*x)
    y = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(0))
    train(model, TensorDataset(x, y), epochs=2, batch_size=16, seed=seed, lr=1e-2)
    return model.eval(), x


def loader_of(x: torch.Tensor, seed: int = 0, batch: int = 16) -> DataLoader:
    y = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=gen)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_close_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)


# ---------------------------------------------------------------------------------------------
# Alignment inside MergeContext


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_permuted_copies_align_back_to_the_reference_exactly(name):
    """Through the context (weightless template, example input from the merge loader): every
    permuted copy becomes the reference's exact weights, BatchNorm statistics included."""
    model, x = zoo(name)
    copies = [state_of(model), *permuted_copies(model, x, 2)]
    ctx = MergeContext(
        model,
        copies,
        names=["a", "b", "c"],
        plan=MergePlan(align="weight_matching"),
        merge_loader=loader_of(x),
    )
    reference = dict(ctx.pool[ctx.reference].state)
    for cand in ctx.pool:
        assert_same_state(dict(cand.state), reference)
    report = ctx.alignment.to_dict()
    assert report["method"] == "weight_matching" and report["reference"] == ctx.reference
    others = [c for c in report["candidates"] if c["index"] != ctx.reference]
    assert len(others) == 2
    assert all(c["cost_before"] > 0 and c["cost_after"] == 0.0 for c in others)
    assert all(c["moved_units"] > 0 for c in others)
    sizes = {g: len(p) for g, p in others[0]["permutation"].items()}
    assert sizes == report["groups"]


def test_alignment_leaves_the_merge_loaders_order_alone():
    model, x = zoo("cnn")
    loader = loader_of(x)
    order = [b[1].tolist() for b in loader_of(x)]  # a twin loader's first pass
    MergeContext(
        model,
        [state_of(model), *permuted_copies(model, x, 1)],
        plan=MergePlan(align="activation_matching"),
        merge_loader=loader,
    )
    assert [b[1].tolist() for b in loader] == order


METHODS = [
    ("uniform_soup", {}),
    ("greedy_soup", {}),
    ("learned_soup", {"steps": 3}),
    ("task_arithmetic", {"lambda": 0.5}),
    ("ties", {"density": 0.5, "lambda": 0.5}),
    ("task_wise_adamerging", {"steps": 3}),
    ("soft", {"steps": 3, "progress": False}),
]


@pytest.mark.parametrize(("method", "params"), METHODS, ids=[m for m, _ in METHODS])
def test_every_method_merges_the_aligned_pool(method, params):
    """Permuted copies of one model (the base too): aligned, every method's merge is that
    model (task vectors are all zero); unaligned, averaging mixes unrelated units."""
    model, x = zoo("mlp")
    base, *copies = permuted_copies(model, x, 4)
    uses_base = method in ("task_arithmetic", "ties", "task_wise_adamerging")
    cands = [base, *copies] if uses_base else copies
    names = ["base", "a", "b", "c"] if uses_base else ["a", "b", "c"]
    plan = {"base": "base"} if uses_base else {}

    def merged(align: str) -> tuple[dict, MergeContext]:
        ctx = MergeContext(
            model,
            cands,
            names=names,
            plan=MergePlan(align=align, **plan),
            merge_loader=loader_of(x),
        )
        outcome = get_method(method, **params).merge(ctx)
        return dict(outcome.items()), ctx

    state, ctx = merged("weight_matching")
    reference = dict(ctx.pool[ctx.reference].state)
    assert_close_state(state, reference)
    assert ctx.alignment.base is not None if uses_base else ctx.alignment.base is None
    soup, _ = merged("none")
    assert not torch.allclose(soup["net.1.weight"], reference["net.1.weight"], atol=1e-3)


def test_non_finite_candidates_are_left_as_they_are():
    model, x = zoo("mlp")
    a, b = permuted_copies(model, x, 2)
    bad = {k: torch.full_like(v, float("nan")) for k, v in a.items()}
    ctx = MergeContext(
        model,
        [a, b, bad],
        names=["a", "b", "bad"],
        plan=MergePlan(align="weight_matching"),
        merge_loader=loader_of(x),
    )
    assert ctx.alignment.skipped == ["bad"]
    assert torch.isnan(ctx.pool[2].tensor("net.1.weight")).all()
    assert_same_state(dict(ctx.pool[0].state), dict(ctx.pool[1].state))


@pytest.mark.parametrize("align", ["weight_matching", "merge_many", "ste"])
def test_each_candidate_is_read_once_by_the_alignment(align, monkeypatch):
    """The searches over every candidate at once (MergeMany, STE) permute the weights they
    already read; no candidate (base included) is read a second time to apply its permutation."""
    from softmerge.align import pool

    reads: list[str] = []
    real_read = pool._read

    def counting_read(cand):
        reads.append(cand.name)
        return real_read(cand)

    monkeypatch.setattr(pool, "_read", counting_read)
    model, x = zoo("mlp")
    base, *copies = permuted_copies(model, x, 4)
    ctx = MergeContext(
        model,
        [base, *copies],
        names=["base", "a", "b", "c"],
        plan=MergePlan(align=align, align_steps=5, base="base"),
        merge_loader=loader_of(x),
    )
    assert sorted(reads) == ["a", "b", "base", "c"]
    reference = dict(ctx.pool[ctx.reference].state)
    for cand in ctx.pool:
        assert_same_state(dict(cand.state), reference)
    assert_same_state(dict(ctx.base_candidate.state), reference)


class Cat(nn.Module):
    """Two branches concatenated: torch.cat is outside what the tracer handles."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=-1))


def test_an_operation_the_tracer_cannot_handle_is_named_through_the_context():
    torch.manual_seed(0)
    states = [state_of(Cat()), state_of(Cat())]
    with pytest.raises(PlanError) as err:
        MergeContext(
            Cat(),
            states,
            plan=MergePlan(align="weight_matching"),
            merge_loader=loader_of(torch.randn(8, 4)),
        )
    text = str(err.value)
    assert "cat" in text and "plan.align" in text and "align_spec" in text


def test_a_hand_written_spec_is_used_instead_and_checked():
    model, x = zoo("mlp")
    copies = [state_of(model), *permuted_copies(model, x, 1)]
    spec = {
        "h1": {"size": 12, "axes": [["net.1.weight", 0], ["net.1.bias", 0], ["net.3.weight", 1]]},
        "h2": {"size": 10, "axes": [["net.3.weight", 0], ["net.3.bias", 0], ["net.5.weight", 1]]},
    }
    ctx = MergeContext(model, copies, plan=MergePlan(align="weight_matching"), align_spec=spec)
    assert ctx.alignment.groups == {"h1": 12, "h2": 10}
    assert_same_state(dict(ctx.pool[0].state), dict(ctx.pool[1].state))
    spec["h1"]["axes"][0] = ["net.1.weights", 0]
    with pytest.raises(PlanError, match=r"net\.1\.weights"):
        MergeContext(model, copies, plan=MergePlan(align="weight_matching"), align_spec=spec)


# ---------------------------------------------------------------------------------------------
# REPAIR


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_repair_changes_the_merge_and_the_model_holds_exactly_it(name):
    """plan.repair after a registry method: a different state (hidden statistics restored;
    for BatchNorm networks the statistics re-estimated), and the evaluated model holds it."""
    model, x = zoo(name)
    cands = [state_of(model), state_of(zoo(name, seed=1)[0])]

    def soup(repair: bool):
        ctx = MergeContext(
            model,
            cands,
            plan=MergePlan(align="weight_matching", repair=repair),
            merge_loader=loader_of(x),
        )
        return get_method("uniform_soup").merge(ctx)

    plain, fixed = soup(False), soup(True)
    assert "repair" in fixed.info and "repair" not in plain.info
    state = dict(fixed.items())
    assert any(not torch.equal(state[k], v) for k, v in dict(plain.items()).items())
    assert_same_state(state_of(fixed.model), state)


def test_soft_merge_with_repair_exports_and_evaluates_the_repaired_state(tmp_path: Path):
    model, x = zoo("mlp")
    cands = [state_of(model), state_of(zoo("mlp", seed=1)[0]), state_of(zoo("mlp", seed=2)[0])]

    def fitted(repair: bool) -> SoftMerger:
        ctx = MergeContext(
            model,
            cands,
            plan=MergePlan(align="weight_matching", repair=repair),
            merge_loader=loader_of(x),
        )
        outcome = get_method("soft", steps=5, progress=False).merge(ctx)
        assert ("repair" in outcome.info) is repair
        assert_same_state(dict(outcome.state), outcome.info["merger"].merged_state_dict())
        assert_same_state(state_of(outcome.model), dict(outcome.state))
        return outcome.info["merger"]

    plain, fixed = fitted(False), fitted(True)
    assert torch.equal(plain.log_alpha, fixed.log_alpha)  # same fit, then REPAIR
    repaired = fixed.merged_state_dict()
    assert not torch.equal(repaired["net.1.weight"], plain.merged_state_dict()["net.1.weight"])
    paths = fixed.export(tmp_path)
    assert_same_state(load_file(str(paths["weights"])), repaired)
    merge = json.loads((tmp_path / "gates.json").read_text())["merge"]
    assert merge["repair"]["layers"] == ["net.1", "net.3"]
    assert len(merge["repair"]["weights"]["net.1"]) == 3


# ---------------------------------------------------------------------------------------------
# From YAML: softmerge merge with plan.align / plan.repair


@pytest.fixture(scope="module")
def independent(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Three digits MLPs from different initialisations, as safetensors files."""
    folder = tmp_path_factory.mktemp("independent")
    splits = digits_splits(num_merge=300, num_test=400, seed=0)
    paths = []
    for seed in range(3):
        with seeded(seed):
            net = MLP(64, (32,))
        train(net, splits.train, epochs=3, lr=1e-2, seed=seed)
        paths.append(folder / f"m{seed}.safetensors")
        save_file({k: v.contiguous() for k, v in state_of(net).items()}, str(paths[-1]))
    return folder, paths


def _config(folder: Path, paths: list[Path], **sections: Any) -> Path:
    content = {
        "model": {"factory": "softmerge.zoo:MLP", "kwargs": {"in_features": 64, "hidden": [32]}},
        "candidates": [str(p) for p in paths],
        "data": {
            "dataset": "digits",
            "kwargs": {"num_merge": 300, "num_test": 400, "seed": 0},
            "batch_size": 64,
        },
        "fit": {"steps": 20},
        "output": {"dir": "out"},
        **sections,
    }
    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    return path


def test_yaml_plan_align_is_reported_in_gates_json_and_the_summary(tmp_path, independent):
    _, paths = independent
    cfg = _config(tmp_path, paths, plan={"align": "weight_matching"})
    assert main(["merge", str(cfg), "--no-progress", "-q"]) == 0
    out = tmp_path / "out"
    alignment = json.loads((out / "gates.json").read_text())["merge"]["alignment"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["alignment"] == alignment
    assert alignment["method"] == "weight_matching" and alignment["groups"] == {"net.1": 32}
    moved = [c for c in alignment["candidates"] if c["name"] != alignment["reference_name"]]
    assert len(moved) == 2
    for c in moved:
        assert sorted(c["permutation"]["net.1"]) == list(range(32))
        assert c["cost_after"] < c["cost_before"]
    text = (out / "summary.md").read_text()
    assert f"aligned by weight_matching to {alignment['reference_name']}" in text


def test_yaml_registry_method_with_align_and_repair_writes_what_it_evaluated(tmp_path, independent):
    _, paths = independent
    cfg = _config(
        tmp_path, paths, method="uniform_soup", plan={"align": "weight_matching", "repair": True}
    )
    assert main(["merge", str(cfg), "--no-progress", "-q"]) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["info"]["repair"]["layers"] == ["net.1"]
    assert summary["alignment"]["method"] == "weight_matching"
    rows = {r["model"]: r for r in summary["results"]}
    model = MLP(64, (32,))
    model.load_state_dict(load_file(str(out / "merged.safetensors")))
    test = digits_splits(num_merge=300, num_test=400, seed=0).test
    accuracy, _ = evaluate(model, DataLoader(test, batch_size=64))
    assert accuracy == rows["uniform_soup"]["accuracy"]


def test_yaml_plan_align_ste_reports_its_search(tmp_path, independent):
    """plan.align 'ste' from YAML: the summary holds the search (steps, the step kept and the
    soup's loss on the selection batches, never above weight matching's)."""
    _, paths = independent
    cfg = _config(tmp_path, paths, method="uniform_soup", plan={"align": "ste", "align_steps": 60})
    assert main(["merge", str(cfg), "--no-progress", "-q"]) == 0
    alignment = json.loads((tmp_path / "out" / "summary.json").read_text())["alignment"]
    assert alignment["method"] == "ste"
    search = alignment["ste"]
    assert search["steps"] == 60 and 0 <= search["chosen_step"] <= 60
    assert search["soup_loss_end"] <= search["soup_loss_start"]
    assert "aligned by ste" in (tmp_path / "out" / "summary.md").read_text()


def test_yaml_plan_granularity_unit_gates_whole_hidden_units(tmp_path, independent):
    """plan.granularity 'unit' from YAML, after alignment: one gate column per hidden unit of
    net.1 (shared by its row of net.1 and its column of net.2) and per class; the written file
    is the model the summary evaluated."""
    _, paths = independent
    plan = {"align": "weight_matching", "granularity": "unit"}
    cfg = _config(tmp_path, paths, plan=plan)
    assert main(["merge", str(cfg), "--no-progress", "-q"]) == 0
    out = tmp_path / "out"
    units = [u["name"] for u in json.loads((out / "gates.json").read_text())["units"]]
    assert len(units) == 32 + 10 and units[0] == "net.1[0]" and units[-1] == "net.3[9]"
    model = MLP(64, (32,))
    model.load_state_dict(load_file(str(out / "merged.safetensors")))
    test = digits_splits(num_merge=300, num_test=400, seed=0).test
    accuracy, _ = evaluate(model, DataLoader(test, batch_size=64))
    rows = json.loads((out / "summary.json").read_text())["results"]
    assert accuracy == next(r for r in rows if r["model"].startswith("soft"))["accuracy"]


def test_yaml_rejects_an_unknown_alignment(tmp_path, independent, capsys):
    _, paths = independent
    cfg = _config(tmp_path, paths, plan={"align": "weights"})
    assert main(["merge", str(cfg), "--no-progress", "-q"]) == 2
    assert "plan.align" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The learned task-vector scale (plan.delta_scale: learn) and shared gate noise


def _finetunes() -> tuple[nn.Module, list[dict], torch.Tensor]:
    """A parent MLP and three fine-tunes of it (small random task vectors)."""
    model, x = zoo("mlp")
    parent = state_of(model)
    tunes = []
    for k in range(3):
        g = torch.Generator().manual_seed(20 + k)
        tunes.append({n: v + 0.05 * torch.randn(v.shape, generator=g) for n, v in parent.items()})
    return model, [parent, *tunes], x


def _learned_merger(model, cands, **plan) -> SoftMerger:
    plan = {"combine": "delta", "base": "parent", "delta_scale": "learn", **plan}
    return SoftMerger(model, cands, MergePlan(**plan), names=["parent", "a", "b", "c"])


def test_learned_scale_starts_at_the_average_of_the_fine_tunes():
    model, cands, x = _finetunes()
    merger = _learned_merger(model, cands)
    # Without the solo-loss prior every candidate starts alike: the start is the plain average
    merger.make_loop(loader_of(x), FitConfig(steps=4, progress=False, solo_prior=0.0))
    start = merger.merged_state_dict()
    average = {k: sum(c[k] for c in cands[1:]) / 3 for k in cands[0]}
    assert_close_state(start, average)
    assert "log_scale" in merger.gates.state_dict()
    scale = merger.gates.scale()
    merger.fit(loader_of(x), config=FitConfig(steps=20, progress=False))
    learned = merger.gates.scale()
    assert (learned > 0).all() and not torch.allclose(learned, scale)
    assert set(merger.describe()["delta_scale_learned"]) == set(merger.layout.units)


def test_learned_scale_resumes_bit_identically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    model, cands, x = _finetunes()
    cfg = FitConfig(steps=24, checkpoint_every=4, record_every=3, progress=False, seed=2)
    reference = _learned_merger(model, cands)
    reference.fit(loader_of(x), config=cfg)

    calls = {"n": 0}
    original = SoftMerger.l0_penalty

    def penalty(self: SoftMerger) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return original(self)

    ckpt = tmp_path / "fit.ckpt"
    with monkeypatch.context() as patch:
        patch.setattr(SoftMerger, "l0_penalty", penalty)
        with pytest.raises(KeyboardInterrupt):
            _learned_merger(model, cands).fit(loader_of(x), config=cfg, checkpoint=ckpt)
    assert "log_scale" in load_checkpoint(ckpt)["module"]
    resumed = _learned_merger(model, cands)
    resumed.fit(loader_of(x), config=cfg, checkpoint=ckpt, resume=True)
    assert torch.equal(resumed.gates.log_scale, reference.gates.log_scale)
    assert torch.equal(resumed.log_alpha, reference.log_alpha)
    assert resumed.result.history == reference.result.history
    assert_same_state(resumed.merged_state_dict(), reference.merged_state_dict())


def test_learned_scale_needs_a_delta_merge():
    with pytest.raises(PlanError, match=r"delta_scale 'learn'.*combine 'delta'"):
        MergePlan(delta_scale="learn")


def test_shared_noise_keeps_the_order_of_a_units_gates():
    gates = MergeGates(4, 6, shared_noise=True)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.linspace(-2, 2, 4).unsqueeze(1).expand(4, 6))
        gates.log_alpha_candidate.zero_()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        z = gates.sample(g)
        assert (z[1:] >= z[:-1]).all()  # a larger log_alpha never samples a smaller gate
    independent = MergeGates(4, 6)
    with torch.no_grad():
        independent.log_alpha.copy_(gates.log_alpha)
    samples = torch.stack([independent.sample(g) for _ in range(20)])
    assert (samples[:, 1:] < samples[:, :-1]).any()


def test_yaml_compare_entries_align_each_method_kind(tmp_path, independent, capsys):
    """softmerge compare: an entry's plan can ask for alignment; a static, a learned and a
    soft merge run on the aligned pool, and the aligned soup beats the plain one."""
    _, paths = independent
    methods = [
        {"method": "uniform_soup", "label": "soup"},
        {"method": "uniform_soup", "label": "aligned soup", "plan": {"align": "weight_matching"}},
        {
            "method": "learned_soup",
            "label": "aligned learned soup",
            "params": {"steps": 3},
            "plan": {"align": "weight_matching"},
        },
        {
            "method": "soft",
            "label": "aligned soft",
            "params": {"steps": 5},
            "plan": {"align": "weight_matching", "repair": True},
        },
    ]
    cfg = _config(tmp_path, paths, methods=methods)
    assert main(["compare", str(cfg), "--no-progress", "-q"]) == 0
    rows = {
        r["method"]: r for r in json.loads((tmp_path / "out" / "compare.json").read_text())["rows"]
    }
    assert rows["aligned soup"]["accuracy"] > rows["soup"]["accuracy"] + 10
    assert rows["aligned soft"]["info"]["repair"]["layers"] == ["net.1"]
    assert all(rows[k]["accuracy"] is not None for k in ("aligned learned soup", "aligned soft"))
