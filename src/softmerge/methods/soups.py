"""Model soups (Wortsman et al., ICML 2022) and output ensembles: the baselines of every merge.

State dicts in, state dict out; evaluation is a callable so these work for any model and data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

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


def greedy_soup(
    states: Sequence[State], score: Callable[[State], float]
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Add candidates in order of their held-out score; keep one only if the soup's score rises.

    ``score`` must be computed on held-out data (higher is better). Returns the soup and the
    indices of the candidates it kept, in the order they were added."""
    scores = [score(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: scores[i], reverse=True)
    kept = [order[0]]
    best = scores[order[0]]
    for i in order[1:]:
        trial = uniform_soup([states[j] for j in [*kept, i]])
        trial_score = score(trial)
        if trial_score > best:  # strictly better: ties keep the smaller soup
            kept.append(i)
            best = trial_score
    return uniform_soup([states[j] for j in kept]), kept


@torch.no_grad()
def ensemble_probabilities(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Output ensemble: the average of the members' softmax probabilities (N x the cost)."""
    probs = [torch.softmax(m.eval()(x), dim=-1) for m in models]
    return torch.stack(probs).mean(0)


@torch.no_grad()
def evaluate_ensemble(
    models: Sequence[nn.Module], dataset: torch.utils.data.Dataset, batch_size: int = 1024
) -> tuple[float, float]:
    """(accuracy in percent, mean NLL) of the averaged-probability ensemble on ``dataset``."""
    correct, nll, count = 0, 0.0, 0
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        p = ensemble_probabilities(models, x)
        nll += float(-torch.log(p.gather(1, y[:, None]).clamp_min(1e-12)).sum())
        correct += int((p.argmax(1) == y).sum())
        count += len(y)
    return 100.0 * correct / count, nll / count
