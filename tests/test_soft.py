"""The soft-merging engine on small real data (scikit-learn digits)."""

from __future__ import annotations

import copy

import pytest
import torch
from children import train_children
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from softmerge import FitConfig, MergePlan, PlanError, SoftMerger
from softmerge.data import digits_splits
from softmerge.methods.soups import uniform_soup
from softmerge.zoo import MLP, evaluate, train

FAST = dict(steps=120, progress=False, eval_every=0)


@pytest.fixture(scope="module")
def digits():
    return digits_splits(seed=0)


@pytest.fixture(scope="module")
def children(digits):
    """3 local optima of one run: a shared parent, then different data halves and orders."""
    return train_children(digits.train)


def loader(ds, seed=0):
    return DataLoader(
        ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


def model() -> MLP:
    return MLP(64, hidden=(32,), num_classes=10)


def acc(state, ds) -> float:
    m = model()
    m.load_state_dict(state)
    return evaluate(m, ds)[0]


def test_only_gates_train_and_candidates_stay_frozen(children, digits):
    before = [copy.deepcopy(c) for c in children]
    merger = SoftMerger(model(), children, MergePlan(granularity="tensor"))
    stack_ptrs = {k: v.data_ptr() for k, v in merger.stacked.items()}
    merger.fit(loader(digits.merge), config=FitConfig(**FAST))
    assert merger.gate_parameters[0] is merger.log_alpha
    assert all(p.requires_grad for p in merger.gate_parameters)
    assert not any(p.requires_grad for p in merger.model.parameters() if p.grad is not None)
    for c, b in zip(merger.candidates, before, strict=True):
        assert all(torch.equal(c.state[k], b[k]) for k in b)
    # the stack is built once, never per step
    assert {k: v.data_ptr() for k, v in merger.stacked.items()} == stack_ptrs
    assert all(p.grad is None for p in merger.model.parameters())


def test_same_seed_same_gates_and_other_seed_differs(children, digits):
    def gates(seed):
        m = SoftMerger(model(), children, MergePlan(granularity="tensor"))
        m.fit(loader(digits.merge), config=FitConfig(seed=seed, **FAST))
        return m.log_alpha.detach().clone()

    assert torch.equal(gates(3), gates(3))
    assert not torch.equal(gates(3), gates(4))


@pytest.mark.parametrize("granularity", ["model", "module", "tensor", "channel"])
def test_merge_beats_the_worst_child_and_is_finite(children, digits, granularity):
    merger = SoftMerger(model(), children, MergePlan(granularity=granularity))
    merger.fit(loader(digits.merge), config=FitConfig(**FAST))
    state = merger.merged_state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    worst = min(acc(c, digits.test) for c in children)
    assert acc(state, digits.test) >= worst


def test_malicious_candidates_are_switched_off_exactly(children, digits):
    bad_scale = {k: v * 100 for k, v in children[0].items()}
    g = torch.Generator().manual_seed(0)
    bad_noise = {
        k: torch.randn(v.shape, generator=g) * v.std() * 10 for k, v in children[1].items()
    }
    for granularity in ("model", "tensor"):
        merger = SoftMerger(
            model(), [*children, bad_scale, bad_noise], MergePlan(granularity=granularity)
        )
        merger.fit(loader(digits.merge), config=FitConfig(steps=300, progress=False))
        gates = merger.deterministic_gates()
        assert torch.all(gates[3:] == 0), (granularity, gates[3:])
        assert (
            acc(merger.merged_state_dict(), digits.test)
            >= acc(uniform_soup(children), digits.test) - 3.0
        )


def test_all_closed_unit_falls_back_to_the_reference_candidate(children, digits):
    merger = SoftMerger(model(), children, MergePlan(granularity="tensor"))
    merger.rank_candidates(loader(digits.merge), "cross_entropy", 2)
    with torch.no_grad():
        merger.log_alpha.fill_(3.0)
        merger.log_alpha[:, 0] = -10.0  # every gate of the first unit closed
    state = merger.merged_state_dict()
    first = merger.layout.slots[0].name
    assert torch.equal(state[first], children[merger.reference][first])
    assert all(torch.isfinite(v).all() for v in state.values())


def test_nonfinite_candidate_is_excluded_and_does_not_poison(children, digits, caplog):
    broken = {k: v.clone() for k, v in children[2].items()}
    name = next(iter(broken))
    broken[name].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    merger = SoftMerger(model(), [children[0], children[1], broken], names=["a", "b", "broken"])
    assert "broken" in caplog.text and name in caplog.text
    merger.fit(loader(digits.merge), config=FitConfig(**FAST))
    assert torch.all(merger.deterministic_gates()[2] == 0)
    assert all(torch.isfinite(v).all() for v in merger.merged_state_dict().values())
    assert merger.gate_snapshot().excluded == ["broken"]


def test_partial_merge_takes_the_rest_from_a_named_candidate(children, digits):
    plan = MergePlan(include=["net.1.*"], rest_from="c1", granularity="tensor")
    merger = SoftMerger(model(), children, plan, names=["c0", "c1", "c2"])
    merger.fit(loader(digits.merge), config=FitConfig(**FAST))
    state = merger.merged_state_dict()
    for key in ("net.3.weight", "net.3.bias"):
        assert torch.equal(state[key], children[1][key])
    assert not torch.equal(state["net.1.weight"], children[1]["net.1.weight"])


def test_delta_combination_is_base_plus_gated_task_vectors(children):
    base = uniform_soup(children)
    merger = SoftMerger(
        model(),
        [base, *children],
        MergePlan(combine="delta", base="base"),
        names=["base", "t0", "t1", "t2"],
    )
    with torch.no_grad():
        merger.log_alpha.fill_(10.0)
        merger.log_alpha_candidate.fill_(10.0)
    state = merger.merged_state_dict()
    expected = {k: base[k] + sum(c[k] - base[k] for c in children) for k in base}
    assert all(torch.allclose(state[k], expected[k], atol=1e-5) for k in base)
    with torch.no_grad():
        merger.log_alpha.fill_(-10.0)
    state = merger.merged_state_dict()
    assert all(torch.allclose(state[k], base[k]) for k in base)


def test_delta_scale_scales_every_open_task_vector(children):
    base = uniform_soup(children)
    merger = SoftMerger(
        model(),
        [base, *children],
        MergePlan(combine="delta", base="base", delta_scale=0.3),
        names=["base", "t0", "t1", "t2"],
    )
    with torch.no_grad():
        merger.log_alpha.fill_(10.0)
        merger.log_alpha_candidate.fill_(10.0)
    state = merger.merged_state_dict()
    expected = {k: base[k] + 0.3 * sum(c[k] - base[k] for c in children) for k in base}
    assert all(torch.allclose(state[k], expected[k], atol=1e-5) for k in base)
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(PlanError, match="delta_scale must be a positive number"):
            MergePlan(combine="delta", base="base", delta_scale=bad)


def test_entropy_objective_needs_no_labels(children, digits):
    unlabeled = TensorDataset(digits.merge.tensors[0])
    merger = SoftMerger(model(), children)
    result = merger.fit(
        DataLoader(unlabeled, batch_size=64), config=FitConfig(objective="entropy", **FAST)
    )
    assert result.history and result.history[-1]["task_loss"] > 0


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def test_batchnorm_statistics_are_reestimated_and_export_round_trips(digits, tmp_path):
    parent = BNNet()
    train(parent, digits.train, epochs=2, seed=0)
    kids = []
    for k in range(2):
        kids.append(
            copy.deepcopy(
                train(copy.deepcopy(parent), digits.train, epochs=2, seed=5 + k)
            ).state_dict()
        )
    merger = SoftMerger(BNNet(), kids, MergePlan(granularity="module"))
    assert len(digits.merge) % 60 == 0  # equal batches: the mean of batch means is the mean
    merger.fit(
        DataLoader(digits.merge, batch_size=60, shuffle=True),
        val_loader=DataLoader(digits.merge, batch_size=256),
        config=FitConfig(steps=60, progress=False, eval_every=30),
    )
    state = merger.merged_state_dict()
    assert set(state) == set(kids[0])  # buffers kept, none dropped
    assert not torch.equal(state["bn.running_mean"], kids[0]["bn.running_mean"])
    # recalibrated statistics equal one cumulative pass over the merge data
    x = digits.merge.tensors[0]
    with torch.no_grad():
        h = x @ state["fc1.weight"].T + state["fc1.bias"]
    assert torch.allclose(state["bn.running_mean"], h.mean(0), atol=1e-4)
    paths = merger.export(tmp_path / "out")
    for key in ("weights", "gates", "heatmap", "convergence", "history"):
        assert paths[key].exists()
    fresh = BNNet()
    fresh.load_state_dict(load_file(str(paths["weights"])), strict=True)
    assert evaluate(fresh, digits.test) == evaluate(merger.merged_model(), digits.test)
    assert any("val_acc" in h for h in merger.result.history)
