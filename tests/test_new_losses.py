"""The token- and distribution-level forget terms against their published formulas, by hand, and the
weight-form identity ∇L = mean W·∇log p; the general divergence law against the exact flow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from npo_sim import losses as L
from npo_sim import theory as T

LP = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1], [1, 0]])


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x), x)
    return g


def test_wga_by_hand_and_weight_identity():
    want = ((math.exp(-1) * -1 + math.exp(-2) * -2) / 2 + math.exp(-0.5) * -0.5) / 2
    assert L.wga(LP, MASK, 1.0).item() == pytest.approx(want)
    # ∂L/∂log p_t = sg(p_t^β) / (|y_i|·n) on answer tokens: the weight W = p^β, without its own gradient
    g = _grad(lambda x: L.wga(x, MASK, 0.7), LP)
    n_tok = MASK.sum(-1, keepdim=True)
    assert torch.allclose(g, torch.exp(0.7 * LP) * MASK / n_tok / 2)


def test_tnpo_is_npo_per_token():
    ref = LP + torch.tensor([[0.3, -0.2], [0.1, 0.0]], dtype=torch.float64)
    per_tok = 2 / 0.5 * F.softplus(0.5 * (LP - ref))
    want = ((per_tok[0, 0] + per_tok[0, 1]) / 2 + per_tok[1, 0]) / 2
    assert L.tnpo(LP, ref, MASK, 0.5).item() == pytest.approx(want.item())
    g = _grad(lambda x: L.tnpo(x, ref, MASK, 0.5), LP)
    w = 2 * torch.sigmoid(0.5 * (LP - ref))   # NPO's weight, token by token
    assert torch.allclose(g, w * MASK / MASK.sum(-1, keepdim=True) / 2)
    one = torch.ones(2, 1, dtype=torch.int64)   # one token per example: exactly NPO
    assert L.tnpo(LP[:, :1], ref[:, :1], one, 0.5).item() == pytest.approx(L.npo(LP[:, 0], ref[:, 0], 0.5).item())


def test_satimp_weight_is_p_beta1_times_one_minus_p_beta2():
    p = LP.exp()
    w = p ** 2.0 * (1 - p) ** 0.5
    want = ((w[0, 0] * LP[0, 0] + w[0, 1] * LP[0, 1]) / 2 + w[1, 0] * LP[1, 0]) / 2
    assert L.satimp(LP, MASK, 2.0, 0.5).item() == pytest.approx(want.item())
    g = _grad(lambda x: L.satimp(x, MASK, 2.0, 0.5), LP)
    assert torch.allclose(g, w * MASK / MASK.sum(-1, keepdim=True) / 2)
    assert L.satimp(LP, MASK, 1.0, 0.0).item() == pytest.approx(L.wga(LP, MASK, 1.0).item())


def _logits(seed=0, shape=(2, 3, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_undial_targets_the_reference_with_the_true_logit_lowered():
    ref, labels, mask = _logits(1), torch.tensor([[0, 2, 4], [1, 1, 3]]), torch.ones(2, 3)
    assert L.undial(ref.clone(), ref, labels, mask, 0.0).item() == pytest.approx(0.0, abs=1e-12)
    target = ref - 2.0 * F.one_hot(labels, 5)
    assert L.undial(target, ref, labels, mask, 2.0).item() == pytest.approx(0.0, abs=1e-12)  # its minimiser
    z = _logits(2)
    q = F.softmax(target, -1)
    want = (q * (q.log() - F.log_softmax(z, -1))).sum(-1).mean()
    assert L.undial(z, ref, labels, mask, 2.0).item() == pytest.approx(want.item())


def test_ce_u_gradient_on_the_true_logit_is_p():
    z, labels, mask = _logits(3), torch.tensor([[0, 2, 4], [1, 1, 3]]), torch.ones(2, 3)
    g = _grad(lambda x: L.ce_u(x, labels, mask), z)
    p = F.softmax(z, -1)
    true = g.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(true, p.gather(-1, labels.unsqueeze(-1)).squeeze(-1) / 6)   # W = p (tail a = 1)
    q = F.softmax(z.masked_fill(F.one_hot(labels, 5).bool(), -math.inf), -1)
    assert torch.allclose(g, (p - q) / 6)


def test_rmu_terms_by_hand():
    h = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    c = torch.tensor([1.0, 1.0])
    assert L.rmu(h, c, torch.ones(1, 2)).item() == pytest.approx(((0 + 1) / 2 + (1 + 1) / 2) / 2)
    assert L.hidden_mse(h, torch.zeros_like(h), torch.tensor([[1, 0]])).item() == pytest.approx(0.5)


def test_kto_as_in_the_npo_repository():
    lp, ref = torch.tensor([-2.0, -1.0], dtype=torch.float64), torch.tensor([-1.5, -1.5], dtype=torch.float64)
    z0 = torch.tensor(0.2, dtype=torch.float64)
    u = z0 - 0.5 * (lp - ref)
    assert L.kto(lp, ref, z0, 0.5).item() == pytest.approx(1 - (2 / 0.5 * torch.sigmoid(u)).mean().item())
    g = _grad(lambda x: L.kto(x, ref, z0, 0.5), lp)
    assert torch.allclose(g, 2 * torch.sigmoid(u) * (1 - torch.sigmoid(u)) / 2)   # 2σ'(u): a = β


@pytest.mark.parametrize("a", [0.0, 0.5, 1.0, 2.0])
def test_general_law_matches_the_exact_single_sample_flow(a):
    m0, c, eta = -6.0, 1.0, 0.5
    t = np.array([10.0, 100.0, 1e3, 1e4])
    exact = T.weighted_flow_margin(lambda lp, lp0: np.exp(a * lp), t, m0, c, eta) - m0   # W = p^a (WGA)
    law = T.weighted_ascent_shift(t, a, c * math.exp(a * m0), eta)
    assert np.max(np.abs(exact - law) / np.abs(law)) < 0.02
    # and steps-to-reach inverts the law
    assert T.steps_to_reach(-law[-1], a, c * math.exp(a * m0), eta) == pytest.approx(t[-1], rel=1e-9)


def test_general_flow_reproduces_the_npo_flow():
    m0, c, eta, beta = 1.0, 2.0, 0.3, 1.5
    t = np.array([1.0, 10.0, 200.0])
    npo_w = lambda lp, lp0: 2.0 / (1.0 + np.exp(-beta * (lp - lp0)))  # noqa: E731
    assert np.allclose(T.weighted_flow_margin(npo_w, t, m0, c, eta), T.npo_flow_margin(t, m0, c, eta, beta),
                       rtol=1e-8)


@pytest.mark.parametrize("name", [n for n, o in L.OBJECTIVES.items()
                                  if not o.retain and L.FORGET_TERMS[o.forget].weight is not None])
def test_registry_weight_is_the_autograd_gradient(name):
    """Every registered weight-form term: ∂L/∂log p_i = W_i/n (per example), or W_t/(|y_i|·n) per token."""
    obj = L.get_objective(name, beta=0.7)
    term = L.FORGET_TERMS[obj.forget]
    ref = LP + torch.tensor([[0.4, -0.3], [0.2, 0.1]], dtype=torch.float64)
    if "token_logp" in term.needs:
        g = _grad(lambda x: obj({"token_logp": x, "ref_token_logp": ref, "token_mask": MASK}).forget, LP)
        want = obj.weight(LP, ref) * MASK / MASK.sum(-1, keepdim=True) / 2
    else:
        lp, lp0 = LP[:, 0], ref[:, 0]
        g = _grad(lambda x: obj({"logp": x, "logp_ref": lp0, "length": torch.ones_like(x)}).forget, lp)
        want = obj.weight(lp, lp0) / 2
    assert torch.allclose(g, want), name


def test_tail_exponent_is_the_weights_power_law():
    """W(p) ~ c·p^a as p -> 0: the slope of log W in log p, deep in the tail (a·log p ~ -100, -200), is a."""
    for name, obj in L.OBJECTIVES.items():
        if obj.retain or L.FORGET_TERMS[obj.forget].weight is None:
            continue
        lp = torch.tensor([-100.0, -200.0], dtype=torch.float64) / max(float(obj.tail), 0.05)
        w = obj.weight(lp, torch.zeros_like(lp)).log()
        slope = float((w[1] - w[0]) / (lp[1] - lp[0]))
        assert slope == pytest.approx(float(obj.tail), abs=1e-6), name
    assert L.OBJECTIVES["undial"].law == "converges" and L.OBJECTIVES["rmu"].law == "n/a"
    assert L.OBJECTIVES["ga"].law == "linear" and L.OBJECTIVES["ce_u"].tail == 1.0
