"""Hard concrete gates against their closed forms (Louizos et al. 2018)."""

import math

import pytest
import torch
from scipy import integrate

from softmerge import gates as hc

N_SAMPLES = 200_000
TOL = 0.005


def _mean_by_quadrature(log_alpha: float) -> float:
    """E[z] = integral over u of the clamped, stretched binary-concrete sample."""

    def z_of_u(u: float) -> float:
        s = 1.0 / (1.0 + math.exp(-(math.log(u) - math.log1p(-u) + log_alpha) / hc.BETA))
        return min(1.0, max(0.0, s * (hc.ZETA - hc.GAMMA) + hc.GAMMA))

    value, _ = integrate.quad(z_of_u, hc.EPS, 1 - hc.EPS, limit=200)
    return value / (1 - 2 * hc.EPS)


@pytest.mark.parametrize("log_alpha", [-3.0, -1.0, 0.0, 0.7, 2.5])
def test_samples_match_closed_forms(log_alpha: float) -> None:
    la = torch.full((N_SAMPLES,), log_alpha, dtype=torch.float64)
    z = hc.sample_gates(la, torch.Generator().manual_seed(1))
    p_zero = float((z == 0).double().mean())
    p_one = float((z == 1).double().mean())
    assert p_zero == pytest.approx(1 - float(hc.prob_nonzero(la[:1])), abs=TOL)
    assert p_one == pytest.approx(float(hc.prob_one(la[:1])), abs=TOL)
    assert float(z.mean()) == pytest.approx(_mean_by_quadrature(log_alpha), abs=TOL)
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0


def test_gradients_reach_log_alpha_through_samples_and_l0() -> None:
    la = torch.zeros(64, requires_grad=True)
    z = hc.sample_gates(la, torch.Generator().manual_seed(0))
    (z.sum() + hc.prob_nonzero(la).sum()).backward()
    assert la.grad is not None
    assert torch.all(la.grad > 0)  # both terms grow with log_alpha


def test_deterministic_gate_is_exactly_zero_and_one_at_the_ends() -> None:
    la = torch.tensor([hc.CLOSED_BELOW - 1e-3, -100.0, hc.OPEN_ABOVE + 1e-3, 100.0, 0.0])
    g = hc.deterministic_gates(la)
    assert g[0] == 0.0 and g[1] == 0.0
    assert g[2] == 1.0 and g[3] == 1.0
    assert g[4] == pytest.approx(0.5)


def test_log_alpha_for_gate_inverts_the_deterministic_gate() -> None:
    for gate in (0.05, 0.3, 0.5, 0.9):
        la = torch.tensor(hc.log_alpha_for_gate(gate))
        assert float(hc.deterministic_gates(la)) == pytest.approx(gate, abs=1e-6)
    with pytest.raises(ValueError):
        hc.log_alpha_for_gate(1.0)


def test_same_seed_same_gates() -> None:
    la = torch.linspace(-3, 3, 50)
    a = hc.sample_gates(la, torch.Generator().manual_seed(7))
    b = hc.sample_gates(la, torch.Generator().manual_seed(7))
    c = hc.sample_gates(la, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
