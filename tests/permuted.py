"""Permuted copies of a model's state: test inputs for permutation alignment."""

from __future__ import annotations

import torch
from torch import nn

from softmerge.align import apply_permutation, permutation_spec


def permuted_copies(model: nn.Module, x: torch.Tensor, count: int) -> list[dict]:
    """``count`` copies of ``model``'s state with their hidden units randomly permuted (copy k
    from seed 10 + k): each computes the same function, but their unit orders differ."""
    spec = permutation_spec(model, x[:2])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    copies = []
    for k in range(count):
        g = torch.Generator().manual_seed(10 + k)
        perms = {n: torch.randperm(grp.size, generator=g) for n, grp in spec.groups.items()}
        copies.append(apply_permutation(spec, perms, state))
    return copies
