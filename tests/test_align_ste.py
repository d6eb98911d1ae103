"""STE matching (plan.align 'ste'): permutations searched against the uniform soup's loss."""

from __future__ import annotations

import itertools

import pytest
import torch
from permuted import permuted_copies
from torch.utils.data import DataLoader, TensorDataset

from softmerge import MergePlan, PlanError
from softmerge.align import (
    align_candidates,
    apply_permutation,
    functional_loss,
    permutation_spec,
    ste_matching,
)
from softmerge.data import digits_splits
from softmerge.methods import MergeContext
from softmerge.objectives import resolve_objective
from softmerge.zoo import MLP, ResNet1D, seeded, train


def digits_mlps(count: int = 3):
    """``count`` narrow MLPs trained on digits from different initialisations, and the data."""
    splits = digits_splits(seed=0)
    states = []
    for seed in range(count):
        with seeded(seed):
            model = MLP(64, (24, 24))
        train(model, splits.train, epochs=15, batch_size=64, seed=seed, lr=3e-3)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model.eval(), states, splits


def batches_of(dataset, size: int = 64) -> list:
    x, y = dataset.tensors
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def soup_of(states):
    return {k: sum(s[k] for s in states) / len(states) for k in states[0]}


def test_ste_lowers_the_soup_loss_keeps_functions_and_is_seeded():
    model, states, splits = digits_mlps()
    spec = permutation_spec(model)
    loss_of = functional_loss(model, resolve_objective("classification"))
    select = batches_of(splits.merge)

    def search():
        return ste_matching(spec, states, loss_of, select, steps=150, select_every=10)

    result = search()
    aligned = [apply_permutation(spec, p, s) for p, s in zip(result.perms, states, strict=True)]
    # The returned permutations are the ones scored: their soup's loss is loss_end.
    soup = soup_of(aligned)
    with torch.no_grad():
        measured = sum(float(loss_of(soup, b)) for b in select) / len(select)
    assert measured == pytest.approx(result.loss_end, rel=1e-5)
    # The search found a better soup than weight matching's (its start) on these batches.
    assert result.loss_end < result.loss_start and result.chosen_step > 0
    # Each aligned candidate computes the function it computed before.
    x = splits.test.tensors[0][:50]
    for before, after in zip(states, aligned, strict=True):
        model.load_state_dict(before)
        expected = model(x)
        model.load_state_dict(after)
        torch.testing.assert_close(model(x), expected)
    again = search()
    assert all(
        torch.equal(a[g], b[g]) for a, b in zip(result.perms, again.perms, strict=True) for g in a
    )


def test_ste_through_align_candidates_needs_data_and_sane_settings():
    model, states, splits = digits_mlps(2)
    with pytest.raises(PlanError, match="needs data"):
        align_candidates(model, states, method="ste")
    spec = permutation_spec(model)
    loss_of = functional_loss(model, resolve_objective("classification"))
    select = batches_of(splits.merge)
    with pytest.raises(PlanError, match="lr > 0"):
        ste_matching(spec, states, loss_of, select, lr=0.0)
    with pytest.raises(PlanError, match="at least 2 models"):
        ste_matching(spec, states[:1], loss_of, select)


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_plan_align_ste_brings_permuted_copies_back_and_reports_the_search(name):
    """Through the context: permuted copies of one model (a ResNet with BatchNorm too) come
    back to the reference's exact weights; the report holds the search; the loader's order is
    left alone."""
    with seeded(0):
        model = MLP(16, (12, 10)) if name == "mlp" else ResNet1D(channels=4)
        x = torch.randn(64, 16 if name == "mlp" else 40)
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    train(model, TensorDataset(x, y), epochs=2, batch_size=16, seed=0, lr=1e-2)
    with torch.no_grad():
        y = model.eval()(x).argmax(-1)  # labels the model fits: its own exact copy is best
    loader = DataLoader(
        TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    twin = DataLoader(
        TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    order = [b[1].tolist() for b in twin]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    copies = [state, *permuted_copies(model, x, 2)]
    untouched = [{k: v.clone() for k, v in c.items()} for c in copies]
    ctx = MergeContext(
        model.eval(),
        copies,
        names=["a", "b", "c"],
        plan=MergePlan(align="ste", align_steps=40),
        merge_loader=loader,
    )
    reference = dict(ctx.pool[ctx.reference].state)
    for cand in ctx.pool:
        for key, value in cand.state.items():
            assert torch.equal(value, reference[key]), key
    report = ctx.alignment.to_dict()
    assert report["method"] == "ste"
    # Three copies of one function: no permutation beats the exact alignment it starts from.
    assert report["ste"]["chosen_step"] == 0 and report["ste"]["steps"] == 40
    assert report["ste"]["soup_loss_end"] == report["ste"]["soup_loss_start"]
    assert "ste" in ctx.alignment.summary()
    assert [b[1].tolist() for b in itertools.islice(loader, len(order))] == order
    for given, kept in zip(copies, untouched, strict=True):  # inputs (BatchNorm counters too)
        assert all(torch.equal(given[k], kept[k]) for k in kept)
