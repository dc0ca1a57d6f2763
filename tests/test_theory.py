"""theory.py's closed forms as oracles: gradient descent on a single logistic sample follows them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from npo_sim import theory
from npo_sim.losses import ga, npo


def _single_sample_gd(method: str, eta: float, steps: int, record: np.ndarray, beta: float = 1.0, seed: int = 0):
    """Plain GD on one logistic sample with the library losses; returns (c, m0, margins at record steps)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, generator=g, dtype=torch.float64)
    theta = (0.4 * x / x.norm() + 0.1 * torch.randn(6, generator=g, dtype=torch.float64)).requires_grad_(True)
    c = float(x @ x)
    logp_ref = F.logsigmoid(x @ theta).detach().reshape(1)
    m0 = float(x @ theta.detach())
    out, rec = [], set(record.tolist())
    for t in range(steps + 1):
        if t in rec:
            out.append(float(x @ theta.detach()))
        if t == steps:
            break
        logp = F.logsigmoid(x @ theta).reshape(1)
        loss = ga(logp) if method == "ga" else npo(logp, logp_ref, beta)
        (gr,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= eta * gr
    return c, m0, np.array(out)


RECORD = np.array([1, 10, 100, 1000, 3000, 10_000])


def test_ga_gradient_descent_matches_exact_flow():
    eta = 1e-3
    c, m0, m = _single_sample_gd("ga", eta, 10_000, RECORD)
    flow = theory.ga_flow_margin(RECORD, m0, c, eta)
    # the flow solves m + e^m = m0 + e^{m0} - η c t exactly
    assert np.allclose(flow + np.exp(flow), m0 + np.exp(m0) - eta * c * RECORD, atol=1e-9)
    rel = np.abs((m - m0) - (flow - m0)) / np.abs(flow - m0)
    assert rel.max() < 0.02, rel
    # and GA's shift approaches the linear law b = -c·η·t (σ(-m) -> 1)
    lin = theory.ga_logit_shift(RECORD, c, eta)
    ratio = (flow - m0) / lin
    assert np.all(np.diff(ratio) > 0) and ratio[-1] > 0.9


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_npo_gradient_descent_matches_exact_flow(beta):
    eta = 1e-3
    c, m0, m = _single_sample_gd("npo", eta, 10_000, RECORD, beta=beta)
    flow = theory.npo_flow_margin(RECORD, m0, c, eta, beta)
    # the quadrature time of the flow margin is the requested time
    assert np.allclose(theory.npo_flow_time(flow, m0, c, eta, beta), RECORD, rtol=1e-8)
    rel = np.abs((m - m0) - (flow - m0)) / np.abs(flow - m0)
    assert rel.max() < 0.02, rel
    # approach to the asymptotic logarithmic law −(1/β)log(1+βcηt): the relative gap shrinks with t
    asym = theory.npo_logit_shift(RECORD, c, eta, beta)
    far = np.array([1e4, 1e6, 1e8, 1e10])
    gaps = np.abs(theory.npo_flow_margin(far, m0, c, eta, beta) - m0 - theory.npo_logit_shift(far, c, eta, beta))
    gaps /= np.abs(theory.npo_logit_shift(far, c, eta, beta))
    assert np.all(np.diff(gaps) < 0), gaps  # the gap is an O(1) offset, so relative to log t it decays
    # the rate: the exact flow's shift per unit of log t tends to the asymptotic law's −1/β
    slopes = np.diff(theory.npo_flow_margin(far, m0, c, eta, beta)) / np.diff(np.log(far))
    assert slopes[-1] == pytest.approx(-1.0 / beta, rel=0.02), slopes
    # NPO moves far less than GA by the end
    assert abs(flow[-1] - m0) < 0.5 * abs(theory.ga_flow_margin(RECORD[-1:], m0, c, eta)[0] - m0)
    assert np.all(np.isfinite(asym))


def test_npo_logit_shift_solves_its_ode_and_tends_to_ga():
    t = np.linspace(0, 50, 2001)
    c, eta0 = 1.3, 0.2
    for beta in [0.5, 2.0]:
        b = theory.npo_logit_shift(t, c, eta0, beta)
        db = np.gradient(b, t)
        assert np.allclose(db[5:-5], -c * eta0 * np.exp(beta * b[5:-5]), rtol=1e-3)
    gaps = [np.max(np.abs(theory.npo_logit_shift(t, c, eta0, be) - theory.ga_logit_shift(t, c, eta0)))
            for be in [1e-1, 1e-2, 1e-3]]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.1


def test_steps_to_reach_is_exponentially_slower():
    R = np.array([1.0, 2.0, 4.0, 8.0])
    ga_steps = theory.steps_to_reach_ga(R, 1.0, 0.1)
    npo_steps = theory.steps_to_reach_npo(R, 1.0, 0.1, 1.0)
    # invert the closed forms
    assert np.allclose(-theory.ga_logit_shift(ga_steps, 1.0, 0.1), R)
    assert np.allclose(-theory.npo_logit_shift(npo_steps, 1.0, 0.1, 1.0), R)
    assert np.allclose(np.log(npo_steps[1:] / npo_steps[:-1]), np.log(np.expm1(R[1:]) / np.expm1(R[:-1])))
    assert np.allclose(ga_steps[1:] / ga_steps[:-1], R[1:] / R[:-1])


def test_envelope_constants_bracket_a_trajectory():
    t = np.logspace(0, 5, 50)
    eta0, beta = 0.01, 1.5
    shift = np.abs(theory.npo_logit_shift(t, 2.0, eta0, beta))
    Ca, Cb = theory.envelope_constants(t, shift, eta0, beta)
    # the exact Lemma-4 solution has C(t) = βc for all t: the envelope is tight
    assert Ca == pytest.approx(3.0, rel=1e-9) and Cb == pytest.approx(3.0, rel=1e-9)
    lo, hi = theory.npo_envelope(t, eta0, beta, Ca * 0.9, Cb * 1.1)
    assert np.all(lo <= shift) and np.all(shift <= hi)


def test_prop1_gap_leading_order():
    r = np.array([-3.0, -1.0, 0.5, 2.0])
    for beta in [1e-2, 1e-3]:
        assert theory.prop1_gap(r, beta) == pytest.approx(theory.prop1_gap_leading_order(r, beta), rel=0.05)
    assert theory.npo_loss(np.zeros(3), 0.1) == pytest.approx(20 * np.log(2))
