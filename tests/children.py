"""Local optima of one run on scikit-learn digits, shared by the tests that merge them: a parent
trained once, then children trained on different random halves of the data in their own order."""

from __future__ import annotations

import copy

import torch
from torch.utils.data import Dataset, Subset

from softmerge.zoo import MLP, train


def digits_mlp() -> MLP:
    return MLP(64, hidden=(32,), num_classes=10)


def train_children(train_set: Dataset, count: int = 3) -> list[dict[str, torch.Tensor]]:
    """``count`` children of one parent (seeded: the same states on every call)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        parent = digits_mlp()
    train(parent, train_set, epochs=10, lr=3e-3, seed=0)
    out = []
    for k in range(count):
        half = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(k))
        child = train(
            copy.deepcopy(parent),
            Subset(train_set, half[: len(half) // 2].tolist()),
            epochs=10,
            lr=3e-3,
            seed=10 + k,
        )
        out.append({n: t.detach().clone() for n, t in child.state_dict().items()})
    return out
