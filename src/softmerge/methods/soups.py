"""Model soups (Wortsman et al., ICML 2022): the plain average, and greedy selection.

State dicts in, state dict out; greedy selection takes a scoring callable, so it works for any
model, data and way of building a soup."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


def uniform_soup(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """Plain average of every floating tensor; integer tensors (counters) come from the first."""
    first = states[0]
    return {
        k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
        if v.is_floating_point()
        else v.clone()
        for k, v in first.items()
    }


def greedy_selection(
    count: int, score: Callable[[Sequence[int]], float]
) -> tuple[list[int], float]:
    """Greedy soup's selection over candidates ``0..count-1``.

    Candidates are tried in order of their own score (``score([i])``, on held-out data, higher
    is better); one is kept only if the soup of the kept ones plus it scores strictly higher
    (ties keep the smaller soup). Returns the kept indices, in the order they were added, and
    the soup's score."""
    alone = [score([i]) for i in range(count)]
    order = sorted(range(count), key=lambda i: alone[i], reverse=True)
    kept, best = [order[0]], alone[order[0]]
    for i in order[1:]:
        trial = score([*kept, i])
        if trial > best:
            kept.append(i)
            best = trial
    return kept, best
