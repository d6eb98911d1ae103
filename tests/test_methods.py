"""The method registry: every method from the API and from YAML, on the same candidates.

Candidates are children of one parent trained on scikit-learn digits (a small MLP), so every
method has something sensible to merge; the parent is the base of the task-vector methods."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from softmerge import ConfigError, PlanError
from softmerge.cli import main
from softmerge.compare import Entry, compare, default_entries, split_held_out
from softmerge.data import digits_splits
from softmerge.methods import METHOD_NAMES, REGISTRY, MergeContext, get_method
from softmerge.methods import tensorwise as tw
from softmerge.methods.ensemble import OutputEnsemble
from softmerge.methods.soups import uniform_soup
from softmerge.plan import MergePlan
from softmerge.zoo import MLP, evaluate, train

FAST = {  # small step counts: these tests check behaviour, not accuracy
    "learned_soup": {"steps": 20, "select_every": 5},
    "task_wise_adamerging": {"steps": 20, "select_every": 5},
    "layer_wise_adamerging": {"steps": 20, "select_every": 5},
    "soft": {"steps": 20},
    "ties": {"density": 0.5, "lambda": 0.5},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "task_arithmetic": {"lambda": 0.3},
}


def _mlp() -> MLP:
    return MLP(64, (32,))


@pytest.fixture(scope="module")
def digits():
    return digits_splits(num_merge=300, num_test=400, seed=0)


@pytest.fixture(scope="module")
def family(digits):
    """(parent state, [3 child states]) of one training run."""
    torch.manual_seed(0)
    parent = train(_mlp(), digits.train, epochs=3, lr=1e-2, seed=0)
    children = []
    for i in range(3):
        child = train(copy.deepcopy(parent), digits.train, epochs=2, lr=3e-3, seed=i + 1)
        children.append({k: v.detach().clone() for k, v in child.state_dict().items()})
    return {k: v.detach().clone() for k, v in parent.state_dict().items()}, children


def _loader(dataset, seed: int = 0) -> DataLoader:
    return DataLoader(
        dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


def _context(digits, family, **kwargs) -> MergeContext:
    parent, children = family
    learn, held = split_held_out(digits.merge, 0.3, seed=0)
    options = {
        "names": ["a", "b", "c"],
        "base": parent,
        "merge_loader": _loader(learn),
        "held_out_loader": DataLoader(held, batch_size=256),
        "seed": 0,
    }
    options.update(kwargs)
    return MergeContext(_mlp(), children, **options)


# Methods for full checkpoints (the LoRA-only 'peft' is tested on adapters in test_hf.py).
FULL = [n for n in METHOD_NAMES if not REGISTRY[n].needs_adapters]


@pytest.mark.parametrize("name", FULL)
def test_every_method_runs_from_the_api(name, digits, family):
    ctx = _context(digits, family)
    if name == "slerp":  # exactly two models: the base and one candidate
        ctx = _context(digits, (family[0], family[1][:2]), names=["a", "b"], base=None)
    outcome = get_method(name, **FAST.get(name, {})).merge(ctx)
    accuracy, loss = evaluate(outcome.model, digits.test)
    assert accuracy > 50.0 and math.isfinite(loss)
    assert outcome.seconds > 0 and outcome.peak_mb > 0
    if name == "ensemble":
        assert outcome.state is None
    else:  # an ordinary state dict that loads strictly into the architecture
        fresh = _mlp()
        fresh.load_state_dict(outcome.state, strict=True)
        assert evaluate(fresh, digits.test) == (accuracy, loss)


def test_tensorwise_methods_equal_the_mergekit_checked_functions(digits, family):
    parent, children = family
    ctx = _context(digits, family)
    for name, params in [("ties", {"density": 0.5}), ("task_arithmetic", {"lambda": 0.3})]:
        state = get_method(name, **params).merge(ctx).state
        for key in ctx.merged_names:
            expected = tw.METHODS[name]([c[key] for c in children], parent[key], **params)
            assert torch.equal(state[key], expected), (name, key)


def test_dare_masks_follow_the_seed(digits, family):
    def merged(seed):
        return get_method("dare_ties", density=0.5).merge(_context(digits, family, seed=seed))

    a, b, c = merged(0).state, merged(0).state, merged(1).state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_uniform_soup_and_the_learning_methods_start_from_it(digits, family):
    ctx = _context(digits, family)
    soup = get_method("uniform_soup").merge(ctx).state
    expected = uniform_soup(family[1])
    assert all(torch.allclose(soup[k], expected[k]) for k in soup)
    held = ctx.held_out_loader
    soup_loss = evaluate(ctx.build(soup), held)[1]
    for name in ("learned_soup", "task_wise_adamerging", "layer_wise_adamerging"):
        outcome = get_method(name, steps=30, select_every=5).merge(ctx)
        # Step 0 is the uniform soup and is a selection candidate: never worse on held-out.
        assert outcome.info["history"][0]["step"] == 0
        assert outcome.info["history"][0]["held_out_loss"] == pytest.approx(soup_loss, rel=1e-5)
        assert evaluate(outcome.model, held)[1] <= soup_loss + 1e-6


def test_greedy_soup_is_never_below_the_best_single_on_its_held_out_split(digits, family):
    ctx = _context(digits, family)
    outcome = get_method("greedy_soup").merge(ctx)
    singles = {c.name: evaluate(ctx.build(c.state), ctx.held_out_loader)[0] for c in ctx.pool}
    soup_held_out = evaluate(outcome.model, ctx.held_out_loader)[0]
    assert soup_held_out >= max(singles.values())
    assert outcome.info["kept"][0] == max(singles, key=singles.get)
    assert outcome.info["held_out_accuracy"] == soup_held_out


def test_output_ensemble_averages_probabilities(digits, family):
    outcome = get_method("ensemble").merge(_context(digits, family))
    assert isinstance(outcome.model, OutputEnsemble)
    x = digits.test.tensors[0][:16]
    probs = []
    for state in family[1]:
        m = _mlp()
        m.load_state_dict(state)
        probs.append(torch.softmax(m.eval()(x), -1))
    expected = torch.stack(probs).mean(0)
    assert torch.allclose(outcome.model(x).exp(), expected, atol=1e-6)


def test_partial_plan_merges_only_the_chosen_tensors(digits, family):
    ctx = _context(digits, family, plan=MergePlan(include=["net.1.*"], rest_from="a"))
    state = get_method("uniform_soup").merge(ctx).state
    a = family[1][0]
    for key in state:
        if key.startswith("net.1."):
            assert not torch.equal(state[key], a[key])
        else:
            assert torch.equal(state[key], a[key]), key


def test_clear_errors_for_bad_method_requests(digits, family):
    with pytest.raises(ConfigError, match="did you mean 'ties'"):
        get_method("tie")
    with pytest.raises(ConfigError, match="unknown parameter 'densty'; did you mean 'density'"):
        get_method("ties", densty=0.5)
    with pytest.raises(ConfigError, match=r"'slerp': t: .*less than or equal to 1"):
        get_method("slerp", t=2.0)
    with pytest.raises(PlanError, match=r"'ties' merges task vectors .* needs a base"):
        get_method("ties").merge(_context(digits, family, base=None))
    with pytest.raises(PlanError, match=r"exactly 2 models .* got 4"):
        get_method("slerp").merge(_context(digits, family))
    with pytest.raises(PlanError, match="weight needs one value per candidate: 3, got 2"):
        get_method("linear", weight=[1.0, 2.0]).merge(_context(digits, family))


def test_default_comparison_skips_what_does_not_apply():
    names = [e.method.name for e in default_entries(5, has_base=False)]
    assert "ties" not in names and "slerp" not in names and "soft" in names
    names = [e.method.name for e in default_entries(5, has_base=True)]
    assert {"ties", "task_arithmetic", "dare_ties", "model_stock"} <= set(names)


def test_compare_api_gives_one_row_per_candidate_and_method(digits, family):
    parent, children = family
    learn, _ = split_held_out(digits.merge, 0.3, seed=0)
    rows = compare(
        _mlp(),
        children,
        [Entry("soup", get_method("uniform_soup")), Entry("ens", get_method("ensemble"))],
        eval_loader=DataLoader(digits.test, batch_size=256),
        base=parent,
        merge_loader=_loader(learn),
    )
    assert [r["method"] for r in rows] == ["candidate0", "candidate1", "candidate2", "soup", "ens"]
    assert rows[-1]["models"] == 3 and rows[-2]["models"] == 1


# --------------------------------------------------------------------------- from YAML


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits, family):
    folder = tmp_path_factory.mktemp("methods")
    parent, children = family
    save_file(parent, str(folder / "parent.safetensors"))
    for name, state in zip("abc", children, strict=True):
        save_file(state, str(folder / f"{name}.safetensors"))
    for split in ("merge", "test"):
        x, y = getattr(digits, split).tensors
        save_file({"x": x, "y": y}, str(folder / f"{split}.safetensors"))
    return folder


def _yaml(folder: Path, **extra) -> Path:
    cfg = {
        "model": {"factory": "softmerge.zoo:MLP", "kwargs": {"in_features": 64, "hidden": [32]}},
        "candidates": ["a.safetensors", "b.safetensors", "c.safetensors"],
        "data": {
            "dataset": "tensors",
            "merge": "merge.safetensors",
            "eval": "test.safetensors",
            "batch_size": 64,
            "held_out": 0.3,
        },
        "plan": {"base": "parent.safetensors"},
        "fit": {"steps": 20},
        "output": {"dir": "out"},
        **extra,
    }
    path = folder / f"cfg-{len(list(folder.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_compare_runs_every_method_from_yaml(files, capsys):
    entries = [{"method": n, "params": FAST.get(n, {})} for n in FULL if n not in ("slerp",)]
    # SLERP interpolates two models: two of the candidates, without the comparison's base.
    entries.append({"method": "slerp", "candidates": ["a", "c"], "plan": {"base": None}})
    channel = {"granularity": "channel"}
    entries.append({"method": "soft", "label": "soft (channel)", "plan": channel})
    cfg = _yaml(files, methods=entries)
    assert main(["compare", str(cfg), "--out", str(files / "cmp"), "--no-progress", "-q"]) == 0
    report = json.loads((files / "cmp" / "compare.json").read_text())
    methods = [r["method"] for r in report["rows"] if r["kind"] != "candidate"]
    assert methods == [e.get("label", e["method"]) for e in entries]
    assert all(r["accuracy"] > 50 for r in report["rows"])
    assert report["held_out_samples"] == 90
    table = capsys.readouterr().out
    assert "peak_mb" in table and "soft (channel)" in table
    assert (files / "cmp" / "compare.md").read_text().count("|") > 40


def test_merge_with_a_registry_method_writes_its_state_dict(files, digits, family):
    cfg = _yaml(files, method="ties", params={"density": 0.5, "lambda": 0.5})
    assert main(["merge", str(cfg), "--out", str(files / "ties"), "--no-progress", "-q"]) == 0
    written = load_file(str(files / "ties" / "merged.safetensors"))
    parent, children = family
    expected = tw.METHODS["ties"](
        [c["net.1.weight"] for c in children],
        parent["net.1.weight"],
        density=0.5,
        **{"lambda": 0.5},
    )
    assert torch.equal(written["net.1.weight"], expected)
    summary = json.loads((files / "ties" / "summary.json").read_text())
    assert summary["method"] == "ties" and summary["params"]["density"] == 0.5


def test_soft_merge_early_stopping_from_yaml(files):
    """fit.select_every with data.held_out: the summary names the step whose gates were kept."""
    fit = {"steps": 20, "select_every": 5, "optimizer": "adam", "lr": 0.05}
    cfg = _yaml(files, method="soft", plan={"base": None}, fit=fit)
    assert main(["merge", str(cfg), "--out", str(files / "es"), "--no-progress", "-q"]) == 0
    info = json.loads((files / "es" / "summary.json").read_text())["info"]
    assert info["selected_step"] in range(0, 21, 5)
    assert math.isfinite(info["held_out_loss"])
    text = (files / "es" / "summary.md").read_text()
    assert f"the gates of step {info['selected_step']} were kept" in text
    assert "(300 samples; 90 of them held out)" in text


def test_soft_merge_early_stopping_without_held_out_data_is_refused(files, capsys):
    cfg = _yaml(files, method="soft", plan={"base": None}, fit={"steps": 20, "select_every": 5})
    config = yaml.safe_load(cfg.read_text())
    config["data"]["held_out"] = 0.0
    cfg.write_text(yaml.safe_dump(config))
    out = files / "never-es"
    assert main(["merge", str(cfg), "--out", str(out), "--no-progress", "-q"]) == 2
    assert "fit.select_every" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"method": "tiez"}, "method: unknown merge method 'tiez'; did you mean 'ties'?"),
        ({"method": "ties", "params": {"dens": 1}}, "params: method 'ties': unknown parameter"),
        ({"methods": ["uniform_soup", "gready_soup"]}, "methods[1]: unknown merge method"),
        (
            {"methods": [{"method": "slerp", "params": {"t": 2}}]},
            "methods[0].params: method 'slerp': t: input should be less than or equal to 1",
        ),
        (
            {"methods": [{"method": "soft", "plan": {"granularty": "model"}}]},
            "methods[0].plan: unknown key 'granularty'; did you mean 'granularity'?",
        ),
        ({"method": "ensemble"}, "keeps all 3 models and has no single merged state dict"),
        (
            {"methods": [{"method": "slerp", "candidates": ["a", "x"]}]},
            "methods[0].candidates: 'x' is not a candidate name (a, b, c)",
        ),
    ],
)
def test_bad_method_config_is_one_clear_error(files, capsys, extra, message):
    cfg = _yaml(files, **extra)
    out = files / "never"
    assert main(["merge", str(cfg), "--out", str(out), "--no-progress", "-q"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_registry_lists_each_method_once():
    assert sorted(METHOD_NAMES) == sorted(REGISTRY)
    assert all(REGISTRY[n].summary for n in METHOD_NAMES)


def test_methods_command_lists_every_method_with_its_parameters(capsys):
    assert main(["methods", "-v"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHOD_NAMES)
    assert "density = 1.0" in out and "[needs base]" in out


def test_compare_without_a_methods_list_runs_what_applies(files, capsys):
    cfg = _yaml(files)  # plan.base is a file: the task-vector methods apply, SLERP does not
    args = ["compare", str(cfg), "--out", str(files / "dflt"), "--no-progress", "-q"]
    assert main([*args, "--methods", "uniform_soup,ties,slerp"]) == 2
    assert "--methods: 'slerp' is not in this comparison" in capsys.readouterr().err
    assert main([*args, "--methods", "uniform_soup,ties,output ensemble"]) == 0
    rows = json.loads((files / "dflt" / "compare.json").read_text())["rows"]
    assert [r["method"] for r in rows[3:]] == ["uniform soup", "ties", "output ensemble"]


def test_each_compared_method_sees_the_same_data_order(digits, family):
    """A method's result does not depend on which methods ran before it in a comparison."""
    learn, _ = split_held_out(digits.merge, 0.3, seed=0)
    soup = Entry("soup", get_method("learned_soup", steps=15, select_every=0))
    other = Entry("soft", get_method("soft", steps=7))

    def run(entries):
        rows = compare(
            _mlp(),
            family[1],
            entries,
            eval_loader=DataLoader(digits.test, batch_size=256),
            merge_loader=_loader(learn),
            include_candidates=False,
        )
        return rows[-1]["loss"]

    assert run([soup]) == run([other, soup])


def test_ties_trimming_by_selection_keeps_what_a_stable_sort_keeps() -> None:
    """TIES keeps its ``density`` fraction by selection (kthvalue), not a full sort; ties at
    the threshold must resolve exactly as a stable descending sort does (first by position)."""
    from softmerge.methods.tensorwise import _largest

    for trial in range(100):
        g = torch.Generator().manual_seed(trial)
        n = int(torch.randint(1, 200, (1,), generator=g))
        values = torch.randint(0, 5, (n,), generator=g).float()  # many ties
        if trial % 2:
            values = torch.rand(n, generator=g).bfloat16().float()
        count = int(torch.randint(1, n + 1, (1,), generator=g))
        expected = torch.zeros(n, dtype=torch.bool)
        expected[torch.argsort(values, descending=True, stable=True)[:count]] = True
        assert torch.equal(_largest(values, count), expected), trial
        if trial % 2:  # selection among half-precision bit patterns: the same entries
            assert torch.equal(_largest(values.bfloat16(), count), expected), trial
    with_nan = torch.tensor([1.0, float("nan"), 3.0, 2.0])
    assert _largest(with_nan, 2).tolist() == [False, True, True, False]
