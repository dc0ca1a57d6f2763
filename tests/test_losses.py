"""The loss library against its published definitions, closed forms and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from npo_sim import losses, theory
from npo_sim.losses import OBJECTIVES, dpo, ga, get_objective, kl, nll, npo, npo_weight, simnpo

torch.set_default_dtype(torch.float64)
BETAS = [1.0, 1e-1, 1e-2, 1e-3]


def _logistic(seed=0, n=8, d=5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    s = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    theta_ref = torch.randn(d, generator=g, dtype=torch.float64)
    theta = theta_ref + 0.7 * torch.randn(d, generator=g, dtype=torch.float64)
    return X, s, theta_ref, theta


def _logp(X, s, theta):
    return F.logsigmoid(s * (X @ theta))


# ---------------------------------------------------------------- definitions
def test_npo_matches_official_logsigmoid_form():
    g = torch.Generator().manual_seed(1)
    logp = -5 * torch.rand(64, generator=g, dtype=torch.float64)
    logp_ref = -5 * torch.rand(64, generator=g, dtype=torch.float64)
    for beta in [0.05, 0.1, 1.0, 3.0]:
        official = -(2 / beta) * F.logsigmoid(-beta * (logp - logp_ref)).mean()
        assert abs(npo(logp, logp_ref, beta).item() - official.item()) < 1e-12


def test_npo_finite_at_extreme_log_ratios():
    r = torch.tensor([-1e4, -1e3, 0.0, 1e3, 1e4], dtype=torch.float64, requires_grad=True)
    for beta in [1e-3, 0.1, 1.0, 10.0]:
        loss = npo(r, torch.zeros(5, dtype=torch.float64), beta)
        (grad,) = torch.autograd.grad(loss, r)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # large positive ratio: loss ≈ 2·mean(r) (softplus(x) ≈ x); 1e4 enters with weight 2/5
    assert npo(torch.tensor([1e4]), torch.tensor([0.0]), 1.0).item() == pytest.approx(2e4)
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([-1e4, 1e4], dtype=dtype)
        assert torch.isfinite(npo(x, torch.zeros_like(x), 0.1))
        assert torch.isfinite(simnpo(x, torch.tensor([3.0, 5.0], dtype=dtype), 0.1))
        assert torch.isfinite(dpo(x, -x, x.flip(0), x, 0.1))


def test_ga_nll_simnpo_dpo_closed_forms():
    logp = torch.tensor([-1.0, -3.0, -0.5])
    assert ga(logp).item() == pytest.approx(-1.5)
    assert nll(logp).item() == pytest.approx(1.5)
    length = torch.tensor([2.0, 6.0, 1.0])
    beta, gamma = 2.5, 0.3
    want = np.mean([-(2 / beta) * math.log(1 / (1 + math.exp(beta / L * lp + gamma)))
                    for lp, L in zip(logp.tolist(), length.tolist())])
    assert simnpo(logp, length, beta, gamma).item() == pytest.approx(want, rel=1e-12)
    lw, ll, rw, rl = torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-0.5])
    m = (-2 + 3) - (-1 + 0.5)
    assert dpo(lw, ll, rw, rl, 0.5).item() == pytest.approx(-(2 / 0.5) * math.log(1 / (1 + math.exp(-0.5 * m))))


def test_dpo_without_winner_signal_is_npo():
    """With the winner at its reference likelihood, DPO (2/β scaling) is exactly NPO."""
    g = torch.Generator().manual_seed(3)
    logp, logp_ref = -torch.rand(10, generator=g) * 4, -torch.rand(10, generator=g) * 4
    w = -torch.rand(10, generator=g)
    assert losses.DPO_SCALE == "2/beta"
    assert torch.allclose(dpo(w, logp, w, logp_ref, 0.3), npo(logp, logp_ref, 0.3), atol=1e-12)


def test_replica_axes_reduce_per_row():
    g = torch.Generator().manual_seed(4)
    logp, ref = -torch.rand(3, 7, generator=g), -torch.rand(3, 7, generator=g)
    beta = torch.tensor([0.1, 1.0, 5.0])
    out = npo(logp, ref, beta)
    assert out.shape == (3,)
    for i in range(3):
        assert out[i].item() == pytest.approx(npo(logp[i], ref[i], beta[i].item()).item(), rel=1e-12)
    assert torch.allclose(ga(logp), logp.mean(1))


# ---------------------------------------------------------------- gradient = mean(W ∇logp)
def test_npo_gradient_is_weighted_ga_gradient():
    X, s, theta_ref, theta = _logistic()
    theta = theta.clone().requires_grad_(True)
    logp_ref = _logp(X, s, theta_ref)
    for beta in [0.1, 1.0, 4.0]:
        (g_npo,) = torch.autograd.grad(npo(_logp(X, s, theta), logp_ref, beta), theta)
        logp = _logp(X, s, theta)
        W = npo_weight(logp.detach(), logp_ref, beta)
        per_example = torch.stack([torch.autograd.grad(logp[i], theta, retain_graph=True)[0] for i in range(len(s))])
        want = (W[:, None] * per_example).mean(0)
        assert torch.allclose(g_npo, want, atol=1e-12)


# ---------------------------------------------------------------- Proposition 1
def test_prop1_loss_and_gradient_gaps_shrink_to_zero():
    X, s, theta_ref, theta = _logistic(seed=5)
    theta = theta.clone().requires_grad_(True)
    logp_ref = _logp(X, s, theta_ref)
    loss_gaps, grad_gaps = [], []
    for beta in BETAS:
        logp = _logp(X, s, theta)
        lhs = npo(logp, logp_ref, beta) - 2 / beta * math.log(2)
        rhs = ga(logp) - logp_ref.mean()
        (g_npo,) = torch.autograd.grad(npo(logp, logp_ref, beta), theta, retain_graph=True)
        (g_ga,) = torch.autograd.grad(ga(logp), theta)
        loss_gaps.append(abs((lhs - rhs).item()))
        grad_gaps.append((g_npo - g_ga).norm().item())
        # the gap is β·E[r²]/4 to leading order (theory.prop1_gap_leading_order)
        r = (logp - logp_ref).detach().numpy()
        assert (lhs - rhs).item() == pytest.approx(theory.prop1_gap(r, beta), rel=1e-9, abs=1e-12)
        assert (lhs - rhs).item() == pytest.approx(theory.prop1_gap_leading_order(r, beta), rel=0.05 + beta)
    assert all(a > b for a, b in zip(loss_gaps, loss_gaps[1:])), loss_gaps
    assert all(a > b for a, b in zip(grad_gaps, grad_gaps[1:])), grad_gaps
    assert loss_gaps[-1] < 1e-3 and grad_gaps[-1] < 1e-3


def test_npo_weight_range_and_value_at_reference():
    g = torch.Generator().manual_seed(6)
    r = (torch.rand(1000, generator=g) - 0.5) * 60
    for beta in [1e-3, 0.1, 1.0, 10.0]:
        W = npo_weight(r, torch.zeros_like(r), beta)
        # strictly inside (0, 2) wherever float64 can tell 2σ(βr) from its limits (|βr| < 30) ...
        inner = (beta * r).abs() < 30
        assert (W[inner] > 0).all() and (W[inner] < 2).all()
        # ... and never outside [0, 2]
        assert (W >= 0).all() and (W <= 2).all()
        assert np.allclose(W.numpy(), theory.npo_weight(r.numpy(), beta), atol=1e-12)
    X, s, theta_ref, _ = _logistic(seed=7)
    lp = _logp(X, s, theta_ref)
    assert torch.equal(npo_weight(lp, lp, 0.7), torch.ones_like(lp))


def test_npo_loss_positive_and_log2_at_reference():
    X, s, theta_ref, theta = _logistic(seed=8)
    lp_ref = _logp(X, s, theta_ref)
    for beta in BETAS:
        assert npo(lp_ref, lp_ref, beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-12)
        assert npo(_logp(X, s, theta), lp_ref, beta).item() > 0
        assert npo(torch.full((4,), -50.0), torch.zeros(4), beta).item() > 0  # (underflows to 0 only past float range)


# ---------------------------------------------------------------- property tests
finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=16), st.lists(finite, min_size=1, max_size=16),
       st.floats(min_value=1e-4, max_value=50.0))
def test_losses_finite_for_any_log_ratio(a, b, beta):
    n = min(len(a), len(b))
    x, y = torch.tensor(a[:n]), torch.tensor(b[:n])
    for val in (npo(x, y, beta), npo_weight(x, y, beta), simnpo(-x.abs(), torch.ones(n) * 3, beta),
                dpo(x, y, y, x, beta)):
        assert torch.isfinite(val).all()
    xg = x.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(npo(xg, y, beta), xg)
    assert torch.isfinite(gr).all() and (gr >= 0).all() and (gr <= 2.0 / n + 1e-12).all()


logit_arrays = st.integers(min_value=0, max_value=2**31 - 1)


@settings(max_examples=40, deadline=None)
@given(logit_arrays, st.sampled_from([(6, 3), (2, 5, 7), (1, 1, 2)]), st.floats(-5, 5))
def test_kl_rules(seed, shape, shift):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g) * 3
    b = torch.randn(*shape, generator=g) * 3
    k = kl(a, b)
    assert k.ndim == 0 and k.item() >= -1e-12
    assert kl(a, a).item() == pytest.approx(0.0, abs=1e-12)
    # invariant to a constant shift of either set of logits (they are the same distributions)
    assert kl(a + shift, b - shift).item() == pytest.approx(k.item(), abs=1e-9)
    # direction: KL(ref ‖ θ) by brute force, so swapping arguments gives KL(θ ‖ ref)
    p_ref, q = F.softmax(b, -1), F.softmax(a, -1)
    brute = (p_ref * (p_ref.log() - q.log())).sum(-1).mean()
    assert k.item() == pytest.approx(brute.item(), rel=1e-9, abs=1e-12)
    rev = (q * (q.log() - p_ref.log())).sum(-1).mean()
    assert kl(b, a).item() == pytest.approx(rev.item(), rel=1e-9, abs=1e-12)
    # a mask averages over the selected positions only
    mask = torch.rand(shape[:-1], generator=g) < 0.5
    if mask.any():
        per = (p_ref * (p_ref.log() - q.log())).sum(-1)
        assert kl(a, b, mask).item() == pytest.approx(per[mask].mean().item(), rel=1e-9, abs=1e-12)


def test_kl_shape_errors_and_replicas():
    with pytest.raises(ValueError):
        kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        kl(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(3))
    a, b = torch.randn(4, 5, 2), torch.randn(4, 5, 2)
    per = kl(a, b, batch_dims=1)
    assert per.shape == (4,)
    assert torch.allclose(per, torch.stack([kl(a[i], b[i]) for i in range(4)]))


# ---------------------------------------------------------------- the registry
REQUIRED = {"ga", "ga_rt", "ga_kl", "idk_rt", "dpo", "dpo_rt", "dpo_kl", "npo", "npo_rt", "npo_kl", "simnpo",
            "simnpo_rt"}


def test_registry_names_and_needs():
    assert REQUIRED <= set(OBJECTIVES)
    assert OBJECTIVES["ga"].needs == {"logp"}
    assert OBJECTIVES["npo"].needs == {"logp", "logp_ref"}
    assert OBJECTIVES["npo_rt"].needs == {"logp", "logp_ref", "retain_logp"}
    assert OBJECTIVES["simnpo"].needs == {"logp", "length"}
    assert OBJECTIVES["idk_rt"].needs == {"idk_logp", "retain_logp"}
    assert OBJECTIVES["dpo_kl"].needs == {"logp", "logp_ref", "idk_logp", "idk_logp_ref", "retain_logits",
                                          "retain_ref_logits"}
    assert OBJECTIVES["npo_kl"].needs_ref_logits and not OBJECTIVES["npo_rt"].needs_ref_logits
    for obj in OBJECTIVES.values():
        assert obj.needs <= set(losses.INPUT_KEYS)


def test_objectives_compose_terms():
    g = torch.Generator().manual_seed(9)
    x = {"logp": -torch.rand(5, generator=g) * 3, "logp_ref": -torch.rand(5, generator=g) * 3,
         "retain_logp": -torch.rand(7, generator=g), "idk_logp": -torch.rand(5, generator=g),
         "idk_logp_ref": -torch.rand(5, generator=g), "length": torch.tensor([1.0, 2, 3, 4, 5]),
         "retain_logits": torch.randn(7, 3, generator=g), "retain_ref_logits": torch.randn(7, 3, generator=g)}
    o = get_objective("npo_rt", beta=0.2, retain_weight=0.5)
    t = o(x)
    assert t.loss.item() == pytest.approx((npo(x["logp"], x["logp_ref"], 0.2) + 0.5 * nll(x["retain_logp"])).item())
    t = get_objective("ga_kl")(x)
    assert t.loss.item() == pytest.approx((ga(x["logp"]) + kl(x["retain_logits"], x["retain_ref_logits"])).item())
    assert get_objective("idk_rt")(x).forget.item() == pytest.approx(nll(x["idk_logp"]).item())
    assert get_objective("ga")(x).retain.item() == 0.0
    with pytest.raises(KeyError):
        get_objective("npo")({"logp": x["logp"]})


@pytest.mark.parametrize("kwargs", [{"beta": 0}, {"beta": -1}, {"beta": float("nan")}, {"retain_weight": -0.1},
                                    {"gamma": -1.0}, {"alpha": 1.0}])
def test_invalid_hyperparameters_raise(kwargs):
    with pytest.raises(ValueError):
        get_objective("npo_rt", **kwargs)


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="choose from .*npo_rt"):
        get_objective("npo_rtt")
    with pytest.raises(ValueError):
        npo(torch.zeros(2), torch.zeros(2), 0.0)


def _all_inputs(n=2, T=3, V=4, d=5, seed=0):
    """One value for every key of INPUT_KEYS (n examples, T tokens, V classes, d activations)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    mask = torch.ones(n, T, dtype=torch.int64)
    mask[1, -1] = 0
    tok = -torch.rand(n, T, generator=g) * 2 - 0.1
    return {"logp": torch.tensor([-2.0, -0.5]), "logp_ref": torch.tensor([-1.0, -1.5]),
            "length": torch.tensor([2.0, 3.0]), "idk_logp": torch.tensor([-1.2, -0.7]),
            "idk_logp_ref": torch.tensor([-1.0, -1.0]), "retain_logp": torch.tensor([-0.3, -0.4]),
            "retain_logits": r(n, 3), "retain_ref_logits": r(n, 3), "token_logp": tok,
            "ref_token_logp": tok + 0.3 * r(n, T), "token_mask": mask, "forget_logits": r(n, T, V),
            "forget_ref_logits": r(n, T, V), "forget_labels": torch.randint(0, V, (n, T), generator=g),
            "hidden": r(n, T, d), "hidden_mask": mask, "rmu_control": r(d), "retain_hidden": r(n, T, d),
            "retain_ref_hidden": r(n, T, d), "retain_hidden_mask": mask}


def test_registry_method_facts():
    x = _all_inputs()
    assert set(x) >= set(losses.INPUT_KEYS) - {"retain_mask"}
    for name, obj in OBJECTIVES.items():
        assert obj.needs <= set(losses.INPUT_KEYS), name
        assert set(losses.REFERENCE_OF) <= losses.THETA_INPUTS
        # β changes exactly the objectives whose forget term is parametrised by it
        b1, b2 = get_objective(name, beta=0.3), get_objective(name, beta=3.0)
        changed = not torch.isclose(b1(x).forget, b2(x).forget)
        assert changed == obj.uses_beta == ("beta" in obj.hyper), name
        # so do the other declared hyperparameters, and only those
        for hp, (v1, v2) in {"gamma": (0.5, 4.0), "beta2": (0.5, 3.0)}.items():
            o1, o2 = get_objective(name, **{hp: v1}), get_objective(name, **{hp: v2})
            moved = not torch.isclose(o1(x).forget, o2(x).forget)
            # RMU's γ scales the control vector, which the setting supplies (so the term itself ignores it)
            assert moved == (hp in obj.hyper and obj.forget != "rmu"), (name, hp)
        assert obj.label and obj.color.startswith("#")
        assert obj.family in {"ga", "npo", "idk", "dpo", "weighted", "distill", "representation", "kto"}
        assert obj.law in {"linear", "log", "converges", "n/a"}
        # sequence-level terms compared with a reference or normalised by length take the summed likelihood
        term = losses.FORGET_TERMS[obj.forget]
        if "logp" in term.needs:
            assert (obj.sequence_reduction == "sum") == bool(term.needs & {"logp_ref", "idk_logp_ref", "length"}), name
    # the NPO paper's Table 1 (§4): GA, GA+RT, IDK+RT, NPO, NPO+RT, DPO+RT, in that order
    assert losses.paper_table1() == ("ga", "ga_rt", "idk_rt", "npo", "npo_rt", "dpo_rt")
    assert losses.methods(retain_free=True) == tuple(n for n, o in OBJECTIVES.items() if not o.retain)
    assert set(losses.methods(family="npo")) == {"npo", "npo_rt", "npo_kl", "simnpo", "simnpo_rt", "tnpo"}
    # a setting runs what it can supply, and names what it skips with the missing inputs
    per_example = {"logp", "logp_ref", "idk_logp", "idk_logp_ref", "length"}
    assert losses.methods(supplies=per_example) == ("ga", "npo", "simnpo", "dpo", "kto")
    assert losses.skipped(per_example, ["ga", "wga"]) == {"wga": ("token_logp", "token_mask")}
    assert losses.skip_note("lab", per_example, ["ga", "wga"]) == "lab skips wga (no token_logp, token_mask)"
    assert losses.label("npo_rt") == "NPO+RT" and losses.label("unknown") == "unknown"
    assert len({o.color for o in OBJECTIVES.values()}) == len(OBJECTIVES)
