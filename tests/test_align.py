"""Permutation alignment (softmerge.align): spec derivation, weight / activation matching,
MergeMany, REPAIR and the alignment report."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from softmerge import PlanError, recalibrate_batchnorm
from softmerge.align import (
    PermutationSpec,
    activation_matching,
    align_candidates,
    apply_permutation,
    matching_cost,
    merge_many,
    permutation_spec,
    repair,
    repair_layers,
    weight_matching,
)
from softmerge.zoo import CNN1D, CNN2D, MLP, ResNet1D, seeded, train

# ---------------------------------------------------------------------------------------------
# Models and helpers


def zoo_model(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A small zoo model and a matching example batch."""
    with seeded(seed):
        model, x = {
            "mlp": lambda: (MLP(64, (32, 24)), torch.randn(16, 64)),
            "cnn1d": lambda: (CNN1D(channels=8), torch.randn(16, 40)),
            "cnn2d": lambda: (CNN2D(channels=4, hidden=16), torch.randn(16, 1, 28, 28)),
            "resnet1d": lambda: (ResNet1D(channels=4), torch.randn(16, 40)),
        }[name]()
    return model.eval(), x


def briefly_trained(model: nn.Module, x: torch.Tensor, seed: int = 0):
    """A few Adam epochs on random labels: weights and BatchNorm statistics move off init.
    Returns (model, x), the model trained in place and in eval mode."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (len(x),), generator=g)
    train(model, TensorDataset(x, y), epochs=3, batch_size=8, seed=seed, lr=1e-2)
    return model.eval(), x


def random_perms(spec: PermutationSpec, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(group.size, generator=g) for name, group in spec.groups.items()}


def outputs(model: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
    net = copy.deepcopy(model)
    net.load_state_dict(state)
    with torch.no_grad():
        return net.eval()(x)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


ZOO = ["mlp", "cnn1d", "cnn2d", "resnet1d"]


# ---------------------------------------------------------------------------------------------
# Spec derivation


def test_mlp_spec_without_example_input():
    model, _ = zoo_model("mlp")
    spec = permutation_spec(model)
    assert {n: g.size for n, g in spec.groups.items()} == {"net.1": 32, "net.3": 24}
    axes = {(r.key, r.axis, r.block) for r in spec.groups["net.1"].axes}
    assert axes == {("net.1.weight", 0, 1), ("net.1.bias", 0, 1), ("net.3.weight", 1, 1)}
    # the output layer's rows are never permuted, its input columns are
    assert ("net.5.weight", 1, 1) in {(r.key, r.axis, r.block) for r in spec.groups["net.3"].axes}
    assert not any(r.key == "net.5.bias" for g in spec.groups.values() for r in g.axes)


def test_cnn_flatten_permutes_linear_columns_in_blocks_of_the_spatial_size():
    model, x = zoo_model("cnn2d")
    spec = permutation_spec(model, x)
    refs = {r.key: r for r in spec.groups["features.3"].axes}
    assert refs["head.0.weight"].axis == 1 and refs["head.0.weight"].block == 7 * 7


def test_resnet_residual_additions_tie_groups_and_batchnorm_stats_are_buffers():
    model, x = zoo_model("resnet1d")
    spec = permutation_spec(model, x)
    group_of = {(r.key, r.axis): n for n, g in spec.groups.items() for r in g.axes}
    # identity shortcut: the stem's channels and block1's second conv add up
    assert group_of[("stem.0.weight", 0)] == group_of[("block1.conv2.weight", 0)]
    # 1x1-conv shortcut: block2's second conv and the shortcut conv add up
    assert group_of[("block2.conv2.weight", 0)] == group_of[("block2.shortcut.0.weight", 0)]
    assert group_of[("block1.conv1.weight", 0)] != group_of[("stem.0.weight", 0)]
    assert "stem.1.running_var" in spec.buffers
    assert not any(
        r.key.endswith("num_batches_tracked") for g in spec.groups.values() for r in g.axes
    )


def test_shape_dependent_control_flow_needs_an_example_input():
    model, _ = zoo_model("cnn2d")
    with pytest.raises(PlanError, match="example_input"):
        permutation_spec(model)


class LayerNormMLP(nn.Module):
    """LayerNorm, GELU, dropout, F.relu, a residual add and scaling by a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.norm = nn.LayerNorm(16)
        self.hidden = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.inp(x)))
        h = h + 0.5 * self.drop(F.relu(self.hidden(h)))
        return self.out(h)


class PooledCNN(nn.Module):
    """Conv2d + BatchNorm2d + pooling, a view into a Linear, a mean over a spatial dim."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d((4, 4))
        self.fc = nn.Linear(6 * 4, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.bn(self.conv(x)))).mean(-1)  # (B, 6, 4)
        h = h.view(h.size(0), -1)
        return self.head(F.silu(self.fc(h)))


class SharedLayer(nn.Module):
    """One hidden Linear applied twice: its rows and columns must share one group."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(10, 8)
        self.shared = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.shared(torch.tanh(self.shared(self.a(x)))))


CUSTOM = [
    (LayerNormMLP, lambda: torch.randn(8, 12)),
    (PooledCNN, lambda: torch.randn(8, 2, 8, 8)),
    (SharedLayer, lambda: torch.randn(8, 10)),
]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_specs_are_permutation_invariant(name):
    model, x = briefly_trained(*zoo_model(name))
    spec = permutation_spec(model, x)
    state = model.state_dict()
    permuted = apply_permutation(spec, random_perms(spec, 1), state)
    assert any(not torch.equal(permuted[k], state[k]) for k in spec.permuted_keys())
    torch.testing.assert_close(outputs(model, permuted, x), outputs(model, state, x))


@pytest.mark.parametrize(("cls", "make_input"), CUSTOM, ids=lambda v: getattr(v, "__name__", ""))
def test_custom_specs_are_permutation_invariant(cls, make_input):
    with seeded(0):
        model, x = cls().eval(), make_input()
    spec = permutation_spec(model, x)
    assert spec.groups
    state = model.state_dict()
    permuted = apply_permutation(spec, random_perms(spec, 3), state)
    assert any(not torch.equal(permuted[k], state[k]) for k in spec.permuted_keys())
    torch.testing.assert_close(outputs(model, permuted, x), outputs(model, state, x))


def test_layernorm_affine_joins_the_group_and_the_shared_layer_is_one_group():
    with seeded(0):
        ln = permutation_spec(LayerNormMLP(), torch.randn(2, 12))
        shared = permutation_spec(SharedLayer(), torch.randn(2, 10))
    group_of = {(r.key, r.axis): n for n, g in ln.groups.items() for r in g.axes}
    assert group_of[("norm.weight", 0)] == group_of[("inp.weight", 0)]
    assert group_of[("hidden.weight", 0)] == group_of[("inp.weight", 0)]  # residual add
    assert len(shared.groups) == 1  # a, shared (both calls) tied by the weight sharing


# ---------------------------------------------------------------------------------------------
# Unsupported operations


class Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.cat([self.a(x), self.b(x)], dim=-1))


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.a(x) * torch.sigmoid(self.b(x)))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.attn, self.out = (
            nn.Linear(4, 8),
            nn.MultiheadAttention(8, 2),
            nn.Linear(8, 2),
        )

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.attn(h, h, h)[0])


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(4, 3), nn.Linear(5, 2)

    def forward(self, x):  # x: (B, 5, 4)
        return self.out(self.a(x).transpose(1, 2))


class RawParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(4, 3), nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.out(self.a(x) + self.scale)


@pytest.mark.parametrize(
    ("cls", "shape", "named"),
    [
        (Cat, (2, 4), "cat"),
        (Gated, (2, 4), "product of two activations"),
        (Attention, (3, 2, 4), "'attn' (MultiheadAttention)"),
        (Transposed, (2, 5, 4), "transpose"),
        (RawParameter, (2, 4), "'scale'"),
    ],
)
def test_unsupported_operations_raise_plan_error_naming_them(cls, shape, named):
    with pytest.raises(PlanError, match="hand-written spec") as err:
        permutation_spec(cls(), torch.randn(*shape))
    assert named in str(err.value)


# ---------------------------------------------------------------------------------------------
# Weight matching, activation matching, MergeMany


@pytest.mark.parametrize("trained", [False, True], ids=["init", "trained"])
@pytest.mark.parametrize("name", ["mlp", "cnn2d", "resnet1d"])
def test_permuted_copy_aligns_back_to_its_exact_weights(name, trained):
    model, x = zoo_model(name)
    if trained:
        briefly_trained(model, x)
    spec = permutation_spec(model, x)
    state = model.state_dict()
    permuted = apply_permutation(spec, random_perms(spec, 7), state)
    assert matching_cost(spec, state, permuted) > 0
    perms = weight_matching(spec, state, permuted, seed=0)
    back = apply_permutation(spec, perms, permuted)
    assert_same_state(back, state)
    assert matching_cost(spec, state, back) == 0.0
    torch.testing.assert_close(outputs(model, back, x), outputs(model, state, x))
    by_activation = activation_matching(model, spec, state, permuted, [(x, None)])
    assert_same_state(apply_permutation(spec, by_activation, permuted), state)


def independent_mlps(count: int = 2) -> tuple[nn.Module, torch.Tensor, list[dict]]:
    """``count`` MLPs from different inits, trained briefly on the same random task."""
    states = []
    with seeded(123):
        x = torch.randn(64, 64)
    for seed in range(count):
        model, _ = zoo_model("mlp", seed=seed)
        states.append(briefly_trained(model, x, seed=0)[0].state_dict())
    return model, x, states


def test_alignment_lowers_the_cost_keeps_functions_and_is_seeded():
    model, x, states = independent_mlps(3)
    aligned, report = align_candidates(model, states, reference_index=1, example_input=x, seed=4)
    _, report_again = align_candidates(model, states, 1, example_input=x, seed=4)
    assert report.to_dict() == report_again.to_dict()
    assert_same_state(aligned[1], states[1])  # the reference keeps its units
    for i, entry in enumerate(report.candidates):
        assert entry.cost_after <= entry.cost_before
        torch.testing.assert_close(outputs(model, aligned[i], x), outputs(model, states[i], x))
    moved = [c for c in report.candidates if c.index != 1]
    assert all(c.cost_after < c.cost_before and c.moved_units > 0 for c in moved)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["reference"] == 1 and set(data["groups"]) == {"net.1", "net.3"}
    assert sorted(data["candidates"][0]["permutation"]["net.1"]) == list(range(32))
    assert data["candidates"][1]["cost_before"] == data["candidates"][1]["cost_after"] == 0.0


def test_inputs_are_not_modified():
    model, x, states = independent_mlps(2)
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    aligned, _ = align_candidates(model, states, 0, example_input=x)
    for old, new in zip(before, states, strict=True):
        assert_same_state(old, new)
    assert all(
        a[k].data_ptr() != s[k].data_ptr() for a, s in zip(aligned, states, strict=True) for k in s
    )


def test_merge_many_aligns_permuted_copies_onto_the_reference():
    model, x = briefly_trained(*zoo_model("mlp"))
    spec = permutation_spec(model, x)
    state = model.state_dict()
    copies = [apply_permutation(spec, random_perms(spec, s), state) for s in (1, 2, 3)]
    perms = merge_many(spec, copies, seed=0, reference=1)
    aligned = [apply_permutation(spec, p, c) for p, c in zip(perms, copies, strict=True)]
    assert_same_state(aligned[1], copies[1])
    assert_same_state(aligned[0], copies[1])
    assert_same_state(aligned[2], copies[1])


def test_hand_written_spec_is_accepted_and_checked():
    model, _ = zoo_model("mlp")
    spec = PermutationSpec.from_dict(
        {
            "h1": {
                "size": 32,
                "axes": [["net.1.weight", 0], ["net.1.bias", 0], ["net.3.weight", 1]],
            },
            "h2": {
                "size": 24,
                "axes": [["net.3.weight", 0], ["net.3.bias", 0], ["net.5.weight", 1, 1]],
            },
        }
    )
    assert PermutationSpec.from_dict(spec.to_dict()).groups == spec.groups
    state = model.state_dict()
    permuted = apply_permutation(spec, random_perms(spec, 5), state)
    aligned, report = align_candidates(model, [state, permuted], 0, spec=spec)
    assert_same_state(aligned[1], state)
    assert set(report.groups) == {"h1", "h2"}
    wrong_size = PermutationSpec.from_dict({"h1": {"size": 31, "axes": [["net.1.weight", 0]]}})
    with pytest.raises(PlanError, match=r"net\.1\.weight"):
        align_candidates(model, [state, permuted], 0, spec=wrong_size)
    missing = PermutationSpec.from_dict({"h1": {"size": 32, "axes": [["fc9.weight", 0]]}})
    with pytest.raises(PlanError, match=r"fc9\.weight"):
        align_candidates(model, [state, permuted], 0, spec=missing)
    with pytest.raises(PlanError, match="not \\[key, axis"):
        PermutationSpec.from_dict({"h1": {"size": 4, "axes": [["net.1.weight"]]}})


def test_a_non_permutation_is_rejected():
    model, _ = zoo_model("mlp")
    spec = permutation_spec(model)
    perms = random_perms(spec, 0)
    perms["net.1"] = torch.zeros(32, dtype=torch.long)
    with pytest.raises(PlanError, match=r"'net\.1'"):
        apply_permutation(spec, perms, model.state_dict())


def test_align_candidates_rejects_bad_arguments():
    model, x, states = independent_mlps(2)
    with pytest.raises(PlanError, match="method"):
        align_candidates(model, states, 0, method="sinkhorn", example_input=x)
    with pytest.raises(PlanError, match="reference_index"):
        align_candidates(model, states, 2, example_input=x)
    with pytest.raises(PlanError, match="needs data"):
        align_candidates(model, states, 0, method="activation_matching", example_input=x)


# ---------------------------------------------------------------------------------------------
# REPAIR


def hidden_stats(model: nn.Module, state: dict, layer: str, x: torch.Tensor):
    net = copy.deepcopy(model)
    net.load_state_dict(state)
    seen = {}
    handle = dict(net.named_modules())[layer].register_forward_hook(
        lambda _m, _i, out: seen.setdefault("out", out.detach())
    )
    with torch.no_grad():
        net.eval()(x)
    handle.remove()
    out = seen["out"].double()
    return out.mean(0), out.std(0, unbiased=False)


def test_repair_matches_the_interpolated_statistics_of_an_mlp():
    model, x, states = independent_mlps(2)
    aligned, _ = align_candidates(model, states, 0, example_input=x)
    soup = {k: (aligned[0][k] + aligned[1][k]) / 2 for k in aligned[0]}
    spec = permutation_spec(model, x)
    assert repair_layers(model, spec) == ["net.1", "net.3"]
    loader = [(x[:32], None), (x[32:], None)]
    fixed = repair(model, soup, aligned, [0.5, 0.5], loader, spec)
    assert fixed.keys() == soup.keys() and fixed["net.5.weight"].equal(soup["net.5.weight"])
    for layer in ("net.1", "net.3"):  # each layer measured after the ones before it
        mean, std = hidden_stats(model, fixed, layer, x)
        stats = [hidden_stats(model, s, layer, x) for s in aligned]
        torch.testing.assert_close(mean, (stats[0][0] + stats[1][0]) / 2, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(std, (stats[0][1] + stats[1][1]) / 2, atol=1e-4, rtol=1e-4)


def test_repair_of_a_candidate_with_its_own_weight_changes_nothing():
    model, x, states = independent_mlps(2)
    fixed = repair(model, states[0], states, [1.0, 0.0], [(x, None)])
    for key, value in states[0].items():
        torch.testing.assert_close(fixed[key], value, atol=1e-5, rtol=1e-5)


def test_repair_of_a_batchnorm_network_resets_its_statistics():
    model, x = briefly_trained(*zoo_model("resnet1d"))
    other, _ = briefly_trained(*zoo_model("resnet1d", seed=1))
    states = [model.state_dict(), other.state_dict()]
    aligned, _ = align_candidates(model, states, 0, example_input=x)
    soup = {
        k: (aligned[0][k] + aligned[1][k]) / 2
        if k.endswith(("weight", "bias"))
        else aligned[0][k].clone()
        for k in aligned[0]
    }
    fixed = repair(model, soup, aligned, None, [(x, None)])
    expected = copy.deepcopy(model)
    expected.load_state_dict(soup)
    recalibrate_batchnorm(expected, [(x, None)])
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(fixed[key], value)
    assert not torch.equal(fixed["stem.1.running_var"], soup["stem.1.running_var"])


def test_repair_rejects_bad_weights():
    model, x, states = independent_mlps(2)
    with pytest.raises(PlanError, match="weights"):
        repair(model, states[0], states, [1.0], [(x, None)])
    with pytest.raises(PlanError, match="weights"):
        repair(model, states[0], states, [-1.0, 2.0], [(x, None)])
