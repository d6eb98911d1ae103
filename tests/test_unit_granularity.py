"""plan.granularity 'unit': one gate per hidden unit of the permutation groups, covering the
unit's incoming and outgoing weights alike; an entry between two units mixes by the product of
their weights, renormalised, and by their mean where no candidate is open in both."""

from __future__ import annotations

import pytest
import torch
from permuted import permuted_copies
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from softmerge import MergePlan, PlanError, SoftMerger
from softmerge.methods import MergeContext, get_method
from softmerge.plan import build_layout
from softmerge.zoo import CNN2D, MLP, ResNet1D, seeded

SHAPES = {"mlp": (32, 8), "cnn": (32, 1, 28, 28), "resnet": (32, 40)}


def make(kind: str, seed: int) -> nn.Module:
    with seeded(seed):
        return {
            "mlp": lambda: MLP(8, (6, 5), 3),
            "cnn": lambda: CNN2D(num_classes=3, channels=2, hidden=4),
            "resnet": lambda: ResNet1D(num_classes=3, channels=4),
        }[kind]()


def loader(kind: str) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*SHAPES[kind], generator=g)
    y = torch.randint(0, 3, (len(x),), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def merger_of(kind: str, count: int = 3) -> tuple[SoftMerger, list[dict[str, torch.Tensor]]]:
    states = [make(kind, s).state_dict() for s in range(count)]
    ctx = MergeContext(
        model=make(kind, 0),
        candidates=states,
        names=[f"c{k}" for k in range(count)],
        plan=MergePlan(granularity="unit"),
        merge_loader=loader(kind),
        seed=0,
    )
    return SoftMerger(None, context=ctx), states


def gates_for(merger: SoftMerger, choice: dict[str, list[float]]) -> torch.Tensor:
    """Effective gates (N, U): every unit on candidate 0, except units named in ``choice``."""
    units = merger.layout.units
    z = torch.zeros(len(merger.names), len(units))
    z[0] = 1.0
    for unit, column in choice.items():
        z[:, units.index(unit)] = torch.tensor(column)
    return z


def test_units_are_the_permutation_groups_shared_by_incoming_and_outgoing_weights() -> None:
    merger, _ = merger_of("mlp")
    slots = {s.name: s for s in merger.layout.slots}
    assert len(merger.layout.units) == 6 + 5 + 3  # two hidden groups, and the 3 classes
    hidden1 = slots["net.1.weight"]
    assert (hidden1.start, hidden1.count, hidden1.axis, hidden1.inputs) == (0, 6, 0, ())
    assert slots["net.1.bias"].start == 0
    # the next layer's input columns are hidden1's units: the same gate columns
    assert slots["net.3.weight"].inputs == ((1, 0, 6, 1),)
    assert slots["net.5.weight"].inputs == ((1, 6, 5, 1),)
    assert slots["net.5.weight"].start == 11  # the classes: units of their own


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet"])
def test_every_unit_on_one_candidate_gives_that_candidate_exactly(kind: str) -> None:
    merger, states = merger_of(kind)
    z = torch.zeros(len(merger.names), len(merger.layout.units))
    z[2] = 1.0
    with torch.no_grad():
        merged = merger.merged_parameters(z)
    for name, tensor in merged.items():
        assert torch.equal(tensor, states[2][name]), name


def test_a_unit_taken_from_one_candidate_brings_its_outgoing_weights() -> None:
    merger, states = merger_of("mlp")
    u, v = 3, 1  # hidden1 unit u from c1 alone; hidden2 unit v half c0, half c1
    group1, group2 = merger.layout.units[0].split("[")[0], merger.layout.units[6].split("[")[0]
    z = gates_for(merger, {f"{group1}[{u}]": [0, 1, 0], f"{group2}[{v}]": [1, 1, 0]})
    with torch.no_grad():
        merged = merger.merged_parameters(z)
    a, b = states[0], states[1]
    assert torch.equal(merged["net.1.weight"][u], b["net.1.weight"][u])  # incoming row
    # the outgoing column: product (0.5, 0.5) x (0, 1) renormalised is c1 alone
    assert torch.equal(merged["net.3.weight"][v, u], b["net.3.weight"][v, u])
    # where v is mixed and the input unit is c0's: c0 alone as well
    assert torch.equal(merged["net.3.weight"][v, 0], a["net.3.weight"][v, 0])
    assert torch.allclose(merged["net.3.bias"][v], (a["net.3.bias"][v] + b["net.3.bias"][v]) / 2)
    # entries of hidden2 units on c0 reading unit u on c1: no candidate open in both, the mean
    mean = (a["net.3.weight"][0, u] + b["net.3.weight"][0, u]) / 2
    assert torch.allclose(merged["net.3.weight"][0, u], mean)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_the_training_step_gives_the_gates_the_gradient_of_plain_autograd(kind: str) -> None:
    """The step's per-entry leaves (their dL/dw handed on after the model's backward) agree
    with ordinary autograd through the merge."""
    merger, _ = merger_of(kind)
    x = next(iter(loader(kind)))[0]
    model = make(kind, 0)
    grads = []
    for leaves in (False, True):
        g = torch.Generator().manual_seed(3)
        z = torch.rand(len(merger.names), len(merger.layout.units), generator=g)
        z.requires_grad_(True)
        if leaves:
            merged, pending = merger.merged_leaves(z)
        else:
            merged, pending = merger.merged_parameters(z), None
        out = torch.func.functional_call(model, merger.functional_state(merged), (x,))
        out.square().mean().backward()
        if pending is not None:
            pending.backward()
        grads.append(z.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_permuted_copies_aligned_and_merged_by_units_give_the_model_back() -> None:
    model = make("cnn", 0)
    x = next(iter(loader("cnn")))[0]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    copies = permuted_copies(model, x, 2)
    ctx = MergeContext(
        model=make("cnn", 0),
        candidates=[state, *copies],
        names=["a", "b", "c"],
        plan=MergePlan(granularity="unit", align="weight_matching"),
        merge_loader=loader("cnn"),
        seed=0,
    )
    out = get_method("soft", steps=5, progress=False).merge(ctx)
    for name in model.state_dict():
        if "running" in name or "num_batches" in name:
            continue
        torch.testing.assert_close(out.state[name], state[name], rtol=1e-5, atol=1e-6)


def test_unit_granularity_needs_convex_merges_and_the_models_groups() -> None:
    with pytest.raises(PlanError, match=r"granularity 'unit'.*needs combine 'convex'"):
        MergePlan(granularity="unit", combine="delta", base="a")
    with pytest.raises(PlanError, match="permutation groups"):
        build_layout(MergePlan(granularity="unit"), {"w": (3, 4)})
