"""Hard concrete gates (Louizos, Welling & Kingma, ICLR 2018), the differentiable L0 surrogate.

A gate is ``z = clamp(s * (zeta - gamma) + gamma, 0, 1)`` with ``s`` a binary-concrete sample.
Stretching to ``(gamma, zeta) = (-0.1, 1.1)`` and clamping puts positive probability on exactly
0 and exactly 1: a gate can switch a candidate off (or fully on), and yet ``log_alpha`` gets
gradients from every sample that lands strictly inside (0, 1).
"""

from __future__ import annotations

import math

import torch

BETA = 2.0 / 3.0  # temperature of the binary concrete
GAMMA = -0.1  # lower end of the stretch interval
ZETA = 1.1  # upper end of the stretch interval
EPS = 1e-6  # keeps u away from 0 and 1 so log(u) and log(1 - u) stay finite

# log_alpha shift in the closed forms: P(z != 0) = sigmoid(log_alpha - BETA * log(-GAMMA / ZETA))
_L0_SHIFT = BETA * math.log(-GAMMA / ZETA)
_ONE_SHIFT = BETA * math.log((1.0 - GAMMA) / (ZETA - 1.0))


def _stretch_and_clamp(s: torch.Tensor) -> torch.Tensor:
    return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def sample_gates(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one train-time gate per entry of ``log_alpha`` (reparameterised: differentiable)."""
    u = torch.rand(log_alpha.shape, generator=generator, dtype=log_alpha.dtype)
    u = u * (1.0 - 2.0 * EPS) + EPS
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return _stretch_and_clamp(s)


def deterministic_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """Test-time gate: the clamped, stretched sigmoid of ``log_alpha`` (no noise)."""
    return _stretch_and_clamp(torch.sigmoid(log_alpha))


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0), the expected L0 norm contributed by each gate (differentiable)."""
    return torch.sigmoid(log_alpha - _L0_SHIFT)


def prob_one(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z == 1): the probability that a train-time sample is clamped at exactly one."""
    return torch.sigmoid(log_alpha - _ONE_SHIFT)


def log_alpha_for_gate(gate: float) -> float:
    """The ``log_alpha`` whose deterministic gate equals ``gate`` (for 0 < gate < 1)."""
    if not 0.0 < gate < 1.0:
        raise ValueError(f"gate must lie strictly between 0 and 1, got {gate}")
    s = (gate - GAMMA) / (ZETA - GAMMA)
    return math.log(s / (1.0 - s))


# log_alpha below this gives a deterministic gate of exactly 0; above the other, exactly 1.
CLOSED_BELOW = math.log(-GAMMA / ZETA)
OPEN_ABOVE = math.log((1.0 - GAMMA) / (ZETA - 1.0))
