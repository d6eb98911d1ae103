"""Hard concrete gates (Louizos, Welling & Kingma, ICLR 2018), the differentiable L0 surrogate.

A gate is ``z = clamp(s * (zeta - gamma) + gamma, 0, 1)`` with ``s`` a binary-concrete sample.
Stretching to ``(gamma, zeta) = (-0.1, 1.1)`` and clamping puts positive probability on exactly
0 and exactly 1: a gate can switch a candidate off (or fully on), and yet ``log_alpha`` gets
gradients from every sample that lands strictly inside (0, 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

BETA = 2.0 / 3.0  # temperature of the binary concrete
GAMMA = -0.1  # lower end of the stretch interval
ZETA = 1.1  # upper end of the stretch interval
EPS = 1e-6  # keeps u away from 0 and 1 so log(u) and log(1 - u) stay finite

# log_alpha shift in the closed forms: P(z != 0) = sigmoid(log_alpha - BETA * log(-GAMMA / ZETA))
_L0_SHIFT = BETA * math.log(-GAMMA / ZETA)
_ONE_SHIFT = BETA * math.log((1.0 - GAMMA) / (ZETA - 1.0))


def _stretch_and_clamp(s: torch.Tensor) -> torch.Tensor:
    return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def sample_gates(
    log_alpha: torch.Tensor, generator: torch.Generator | None = None, shared: bool = False
) -> torch.Tensor:
    """Draw one train-time gate per entry of ``log_alpha`` (reparameterised: differentiable).

    ``shared``: every row (candidate) uses the same uniform noise, broadcast along dim 0: each
    gate is still hard concrete, but within a sample the gates keep their order."""
    shape = (1, *log_alpha.shape[1:]) if shared else log_alpha.shape
    u = torch.rand(shape, generator=generator, dtype=log_alpha.dtype)
    u = (u * (1.0 - 2.0 * EPS) + EPS).to(log_alpha.device)
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


def solo_loss_prior(losses: Sequence[float], strength: float) -> torch.Tensor:
    """Per candidate, how far below the common start its gate begins: ``strength`` times the
    log of its solo loss over the best one (0 for the best; 0 for a non-finite loss, whose
    candidate is excluded anyway).

    A candidate with extreme values has a solo loss orders of magnitude above the best one
    (x100 weights: ~1e7 vs ~0.5): it starts closed, where its gate never samples open and the
    L0 term keeps it shut. Near-equal candidates start near-equal. Without the prior, a mix
    dominated by an extreme candidate sits on a loss plateau whose gradients barely move its
    gate (see docs/method.md)."""
    finite = [v for v in losses if math.isfinite(v) and v > 0]
    best = min(finite) if finite else 1.0
    return torch.tensor(
        [strength * math.log(max(v, best) / best) if math.isfinite(v) else 0.0 for v in losses]
    )


# ---------------------------------------------------------------------------------------------
# The gates of one merge as a module: both levels, sampling, penalty, mixing weights.


class MergeGates(nn.Module):
    """Hard concrete gates of N candidates over U gate units.

    ``log_alpha`` (N, U) holds one gate per candidate and unit. With ``candidate_level`` a
    second gate per candidate (``log_alpha_candidate``, N) multiplies all of that candidate's
    unit gates: the evidence against a bad candidate from every unit adds up in one gate that
    can switch it off everywhere at once (redundant, and skipped, with a single unit).
    ``active`` marks candidates allowed to open at all (non-finite candidates are not).
    ``learn_scale`` adds ``log_scale`` (U): one positive scale per unit, ``exp(log_scale)``,
    that multiplies the task vectors of a delta merge (``plan.delta_scale: learn``).
    ``shared_noise``: the candidates' gates of one unit (and the candidate-level gates) are
    sampled from one shared uniform draw (delta merges, see docs/method.md).

    Everything the fit changes is in ``state_dict()``: that is what a checkpoint saves."""

    def __init__(
        self,
        candidates: int,
        units: int,
        *,
        candidate_level: bool = True,
        active: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        learn_scale: bool = False,
        shared_noise: bool = False,
    ) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.zeros(candidates, units, device=device))
        two_level = candidate_level and units > 1
        self.log_alpha_candidate = (
            nn.Parameter(torch.zeros(candidates, device=device)) if two_level else None
        )
        self.log_scale = nn.Parameter(torch.zeros(units, device=device)) if learn_scale else None
        self.shared_noise = shared_noise
        mask = torch.ones(candidates, dtype=torch.bool) if active is None else active.bool()
        self.register_buffer("active", mask.to(device))
        self._all_active = bool(mask.all())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.log_alpha.shape)  # type: ignore[return-value]

    @property
    def two_level(self) -> bool:
        return self.log_alpha_candidate is not None

    @torch.no_grad()
    def initialise(self, init_gate: float, prior: torch.Tensor | None = None) -> None:
        """Every gate at ``init_gate``, minus a per-candidate ``prior`` (applied to the candidate
        level when there is one, else to every unit gate of that candidate)."""
        start = log_alpha_for_gate(init_gate)
        prior = torch.zeros(self.shape[0]) if prior is None else prior
        prior = prior.to(self.log_alpha.device, self.log_alpha.dtype)
        self.log_alpha.fill_(start)
        if self.log_alpha_candidate is not None:
            self.log_alpha_candidate.copy_(start - prior)
        else:
            self.log_alpha.sub_(prior.unsqueeze(1))

    @torch.no_grad()
    def initialise_scale(self, scale: torch.Tensor) -> None:
        """Start the learned scale at ``scale`` (U, positive)."""
        if self.log_scale is not None:
            self.log_scale.copy_(scale.to(self.log_scale).log())

    def scale(self) -> torch.Tensor | None:
        """The learned scale of each unit (U), or None without one; differentiable."""
        return None if self.log_scale is None else self.log_scale.exp()

    def _combine(self, unit: torch.Tensor, candidate: torch.Tensor | None) -> torch.Tensor:
        out = unit if candidate is None else candidate.unsqueeze(1) * unit
        # Excluded candidates are forced to 0 (skipped when all are active: every small
        # operation of a step adds up).
        return out if self._all_active else out * self.active.to(out.dtype).unsqueeze(1)

    def sample(self, generator: torch.Generator | None) -> torch.Tensor:
        """Train-time effective gates (N, U): candidate gate x unit gate, both sampled.

        The noise comes from a CPU generator whatever the device, so a seed gives the same
        gates on every device and on every process of a distributed run."""
        shared = self.shared_noise
        unit = sample_gates(self.log_alpha, generator, shared)
        cand = self.log_alpha_candidate
        return self._combine(unit, None if cand is None else sample_gates(cand, generator, shared))

    def deterministic(self) -> torch.Tensor:
        """Test-time effective gates (N, U), exactly 0 where either level is closed."""
        with torch.no_grad():
            cand = self.log_alpha_candidate
            unit = deterministic_gates(self.log_alpha)
            return self._combine(unit, None if cand is None else deterministic_gates(cand))

    def prob_nonzero(self) -> torch.Tensor:
        """P(effective gate != 0): the two levels are independent, so probabilities multiply."""
        cand = self.log_alpha_candidate
        unit = prob_nonzero(self.log_alpha)
        return self._combine(unit, None if cand is None else prob_nonzero(cand))

    def penalty(self, convex: bool) -> torch.Tensor:
        """Expected number of open gates per unit, averaged over units.

        convex: the most likely gate of each unit is not charged: a convex merge needs at least
        one candidate, and charging it only pushes every gate of a unit to 0 together."""
        p = self.prob_nonzero()
        per_unit = p.sum(0)
        if convex:
            per_unit = per_unit - p.max(0).values
        return per_unit.mean()

    def expected_l0(self) -> float:
        with torch.no_grad():
            return float(self.prob_nonzero().sum(0).mean())

    def mixing_weights(self, z: torch.Tensor, convex: bool, fallback: int) -> torch.Tensor:
        """Per-unit weights of the candidates for gates ``z`` (N, U).

        convex: z_j / sum_j z_j. A unit whose gates are all 0 falls back to candidate
        ``fallback`` (the best-ranked) alone: a valid tensor, never a division by zero.
        delta: the gates themselves (theta_0 + sum_j z_j * tau_j)."""
        if not convex:
            return z
        total = z.sum(0, keepdim=True)
        alone = torch.zeros_like(z)
        alone[fallback] = 1.0
        return torch.where(total > 0, z / total.clamp_min(1e-12), alone)

    @torch.no_grad()
    def candidate_gates(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate, P(non-zero)) of the candidate level, or None without one."""
        if self.log_alpha_candidate is None:
            return None
        la = self.log_alpha_candidate
        keep = self.active.to(la.dtype)
        return deterministic_gates(la) * keep, prob_nonzero(la) * keep
