"""Closed forms from the NPO paper (Zhang, Lin, Bai, Mei, 2024), used as test oracles and overlays.

Everything here is plain numpy/scipy on numbers, not models. Notation:

* ``r = log π_θ(y|x) − log π_ref(y|x)`` is the per-example log-ratio;
* for binary logistic regression ``π_θ(y|x) = σ(m)`` with margin ``m = s⟨x, θ⟩``, ``s = ±1``;
* ``b(t) = ⟨x, θ_t − θ_init⟩·s = m(t) − m(0)`` is the logit (margin) shift of a forget sample;
* gradient descent with step ``η`` on the empirical loss over ``n_f`` samples moves each (nearly
  orthogonal) sample with effective step ``η0 = η/n_f`` and curvature ``c = ‖x‖²``.
"""

from __future__ import annotations

import numpy as np
from scipy import integrate, optimize, special

LOG2 = float(np.log(2.0))


# --------------------------------------------------------------------------------------------------
# the NPO weight and Proposition 1
# --------------------------------------------------------------------------------------------------
def npo_weight(log_ratio, beta: float):
    """``W = 2π_θ^β / (π_θ^β + π_ref^β) = 2σ(β·r)`` (NPO paper, eq. 3).

    ``W ∈ (0, 2)`` for every finite ``r``; ``W = 1`` at ``r = 0``; ``W → 1`` as ``β → 0``.
    """
    return 2.0 * special.expit(beta * np.asarray(log_ratio, dtype=float))


def npo_loss(log_ratio, beta: float) -> float:
    """``L_NPO,β = (2/β)·E[log(1 + e^{β r})]``; ``> 0`` always and ``= (2/β)·log 2`` at ``θ = ref``."""
    r = np.asarray(log_ratio, dtype=float)
    return float(np.mean(2.0 / beta * np.logaddexp(0.0, beta * r)))


def prop1_gap(log_ratio, beta: float) -> float:
    """Proposition 1: ``[L_NPO,β − (2/β)log 2] − [L_GA − E log π_ref] → 0`` as ``β → 0``.

    With ``L_GA = E log π_θ`` the right bracket is ``E[r]``. Expanding the softplus,
    ``(2/β)·log(1 + e^{βr}) = (2/β)·log 2 + r + β r²/4 + O(β³r⁴)``, so the gap is
    ``β·E[r²]/4 + O(β³)`` (see :func:`prop1_gap_leading_order`); the gradients converge likewise,
    since ``W → 1``.
    """
    r = np.asarray(log_ratio, dtype=float)
    return npo_loss(r, beta) - 2.0 / beta * LOG2 - float(np.mean(r))


def prop1_gap_leading_order(log_ratio, beta: float) -> float:
    """Leading-order term ``β·E[r²]/4`` of :func:`prop1_gap`."""
    r = np.asarray(log_ratio, dtype=float)
    return float(beta * np.mean(r ** 2) / 4.0)


# --------------------------------------------------------------------------------------------------
# Theorem 2: logit-shift trajectories (Lemmas 3 and 4)
# --------------------------------------------------------------------------------------------------
def ga_logit_shift(t, c: float, eta0: float):
    """GA (Lemma 3): ``b(t) = −c·η0·t``, linear in t (the regime ``π_θ → 0`` where ``σ(−m) ≈ 1``)."""
    return -c * eta0 * np.asarray(t, dtype=float)


def npo_logit_shift(t, c: float, eta0: float, beta: float):
    """NPO (Lemma 4): the exact solution of ``b' = −c·η0·e^{βb}``, ``b(0) = 0``:

    ``b(t) = −(1/β)·log(1 + β·c·η0·t)`` — logarithmic in t. As ``β → 0`` it tends to GA's ``−c·η0·t``.
    """
    return -np.log1p(beta * c * eta0 * np.asarray(t, dtype=float)) / beta


def npo_envelope(t, eta0: float, beta: float, C_a: float, C_b: float):
    """Lemma-4 envelope ``|b(t)| ∈ [(1/β)·log(C_a η0 t + 1), (1/β)·log(C_b η0 t + 1)]``."""
    t = np.asarray(t, dtype=float)
    return np.log1p(C_a * eta0 * t) / beta, np.log1p(C_b * eta0 * t) / beta


def envelope_constants(t, abs_shift, eta0: float, beta: float) -> tuple[float, float]:
    """Tightest ``(C_a, C_b)`` with ``(1/β)log(C_a η0 t+1) ≤ |b(t)| ≤ (1/β)log(C_b η0 t+1)`` at every t > 0.

    Inverting the envelope gives ``C(t) = (e^{β|b(t)|} − 1)/(η0 t)``; ``C_a = min_t C(t)``,
    ``C_b = max_t C(t)``. Bounded ``C(t)`` over a long horizon is the lemma's content.
    """
    c_t = implied_rate(t, abs_shift, eta0, beta)
    return float(np.min(c_t)), float(np.max(c_t))


def implied_rate(t, abs_shift, eta0: float, beta: float):
    """``C(t) = (e^{β|b(t)|} − 1)/(η0 t)`` for t > 0 (broadcasts over trailing sample axes)."""
    t = np.asarray(t, dtype=float)
    b = np.asarray(abs_shift, dtype=float)
    keep = t > 0
    tt = t[keep].reshape((-1,) + (1,) * (b.ndim - 1))
    return np.expm1(beta * b[keep]) / (eta0 * tt)


def ga_distance_bounds(t, eta: float, n_f: int, C1: float, C2: float):
    """Theorem 2 (GA): ``‖θ_t − θ_init‖_{XᵀX} ∈ [C1, C2]·n_f^{-1/2}·η·t``."""
    t = np.asarray(t, dtype=float)
    return C1 * eta * t / np.sqrt(n_f), C2 * eta * t / np.sqrt(n_f)


def npo_distance_bounds(t, eta: float, n_f: int, C1: float, C2: float, C3: float):
    """Theorem 2 (NPO, η ≤ 1): ``‖θ_t − θ_init‖_{XᵀX} ∈ C1·√n_f·[log(C2 η0 t+1), log(C3 η0 t+1)]``."""
    t = np.asarray(t, dtype=float)
    eta0 = eta / n_f
    return C1 * np.sqrt(n_f) * np.log1p(C2 * eta0 * t), C1 * np.sqrt(n_f) * np.log1p(C3 * eta0 * t)


def steps_to_reach_ga(R, c: float, eta0: float):
    """Steps for GA's logit shift to reach ``|b| = R``: ``R / (c η0)`` (linear in R)."""
    return np.asarray(R, dtype=float) / (c * eta0)


def steps_to_reach_npo(R, c: float, eta0: float, beta: float):
    """Steps for NPO's logit shift to reach ``|b| = R``: ``(e^{βR} − 1)/(β c η0)``.

    Exponentially many more than GA's — the paper's "exponentially slower" divergence.
    """
    return np.expm1(beta * np.asarray(R, dtype=float)) / (beta * c * eta0)


# --------------------------------------------------------------------------------------------------
# exact single-sample gradient flow
# --------------------------------------------------------------------------------------------------
def ga_flow_margin(t, m0: float, c: float, eta: float):
    """Exact gradient flow of GA on one logistic sample: ``m' = −η·c·σ(−m)``.

    Separable: ``(1 + e^m) dm = −η c dt`` gives ``m + e^m = m0 + e^{m0} − η c t``, solved in closed
    form with the Lambert W function: ``m = K − W(e^K)``, ``K = m0 + e^{m0} − η c t``.
    For large t this tends to GA's linear law ``m ≈ m0 − η c t``.
    """
    K = m0 + np.exp(m0) - eta * c * np.asarray(t, dtype=float)
    # W(e^K) computed as the root of w + log w = K, stable for large |K|
    w = np.real(special.lambertw(np.exp(np.minimum(K, 700.0))))
    big = K > 700.0
    if np.any(big):  # W(e^K) ≈ K − log K for huge K (never reached in practice)
        kk = K[big]
        w = np.where(big, kk - np.log(kk), w)
    return K - w


def _npo_flow_density(m: float, m0: float, beta: float) -> float:
    # dt/dm (up to −1/(η c)): (1 + e^m)/W(m) with W = 2σ(β(log σ(m) − log σ(m0)))
    log_ratio = -np.logaddexp(0.0, -m) + np.logaddexp(0.0, -m0)
    return (1.0 + np.exp(m)) * 0.5 * (1.0 + np.exp(-beta * log_ratio))


def npo_flow_time(m, m0: float, c: float, eta: float, beta: float):
    """Time for the exact NPO gradient flow on one logistic sample to reach margin ``m ≤ m0``.

    The flow is ``m' = −η c · W(m) · σ(−m)`` with ``W(m) = 2σ(β(log σ(m) − log σ(m0)))``; it is
    separable, so ``t(m) = (1/(η c)) ∫_m^{m0} (1 + e^u) / W(u) du``, evaluated by quadrature.
    """
    m = np.atleast_1d(np.asarray(m, dtype=float))
    out = np.empty_like(m)
    for i, mi in enumerate(m):
        val, _ = integrate.quad(_npo_flow_density, mi, m0, args=(m0, beta), epsabs=1e-12, epsrel=1e-10,
                                limit=200)
        out[i] = val / (eta * c)
    return out


def _invert_flow(time_of, t, m0: float):
    """``m(t)`` for a monotone flow whose time to reach ``m ≤ m0`` is ``time_of(m)``: bracket, then brentq."""
    t = np.atleast_1d(np.asarray(t, dtype=float))
    out = np.empty_like(t)
    for i, ti in enumerate(t):
        if ti <= 0:
            out[i] = m0
            continue
        lo = m0 - 1.0
        while time_of(lo) < ti:
            lo = m0 - 2.0 * (m0 - lo)
        out[i] = optimize.brentq(lambda m, ti=ti: time_of(m) - ti, lo, m0, xtol=1e-12, rtol=1e-12)
    return out


def npo_flow_margin(t, m0: float, c: float, eta: float, beta: float):
    """Exact NPO gradient-flow margin ``m(t)``, by inverting :func:`npo_flow_time` (monotone) with brentq.

    For large t, ``m(t) − m0 ≈ −(1/β)·log t + const`` — the logarithmic law of Lemma 4.
    """
    return _invert_flow(lambda m: npo_flow_time(m, m0, c, eta, beta)[0], t, m0)


# --------------------------------------------------------------------------------------------------
# the general law of a weighted ascent term: W(p) ~ c·p^a as p → 0
# --------------------------------------------------------------------------------------------------
def weighted_ascent_shift(t, a: float, c: float, eta: float):
    """Logit shift ``b(t)`` of one logistic sample under a forget term with gradient weight ``W ~ c·p^a``.

    With ``p ≈ e^b`` near collapse, ``db/dt = −c η e^{ab}`` (b(0) = 0; ``c`` absorbs the feature norm
    and the start: ``c = c_W·‖x‖²·e^{a·m0}``). Solved: ``b = −c η t`` for a = 0 (GA: linear), and
    ``b = −(1/a)·log(1 + a c η t)`` for a > 0 (logarithmic with rate 1/a; NPO has a = β, Theorem 2).
    """
    t = np.asarray(t, dtype=float)
    if a < 0:
        raise ValueError(f"tail exponent a must be >= 0, got {a}")
    return -c * eta * t if a == 0 else -np.log1p(a * c * eta * t) / a


def steps_to_reach(R, a: float, c: float, eta: float):
    """Steps for :func:`weighted_ascent_shift` to reach ``|b| = R``: ``R/(cη)`` (a = 0) or
    ``(e^{aR} − 1)/(a c η)`` (a > 0) — exponentially many in R once a > 0."""
    R = np.asarray(R, dtype=float)
    return R / (c * eta) if a == 0 else np.expm1(a * R) / (a * c * eta)


def weighted_flow_time(weight, m, m0: float, c: float, eta: float):
    """Time for the exact gradient flow ``m' = −η c·W(m)·σ(−m)`` of one logistic sample to reach ``m ≤ m0``.

    ``weight(logp, logp0)`` is the term's gradient weight as a function of the current and starting
    log-likelihood ``log σ(m)``, ``log σ(m0)`` (e.g. NPO: ``2σ(β(logp − logp0))``, WGA: ``e^{β·logp}``).
    Separable: ``t(m) = (1/(ηc)) ∫_m^{m0} (1 + e^u)/W(u) du``, by quadrature. Generalises the GA/NPO flows.
    """
    lp0 = -np.logaddexp(0.0, -m0)

    def density(u: float) -> float:
        return (1.0 + np.exp(u)) / weight(-np.logaddexp(0.0, -u), lp0)

    m = np.atleast_1d(np.asarray(m, dtype=float))
    return np.array([integrate.quad(density, mi, m0, epsabs=1e-12, epsrel=1e-10, limit=200)[0] / (eta * c)
                     for mi in m])


def weighted_flow_margin(weight, t, m0: float, c: float, eta: float):
    """The exact flow's margin ``m(t)`` for a gradient weight ``weight(logp, logp0)``, by inverting
    :func:`weighted_flow_time` with brentq."""
    return _invert_flow(lambda m: weighted_flow_time(weight, m, m0, c, eta)[0], t, m0)


def weighted_flow_solve(weight, t, m0: float, c: float, eta: float):
    """The same flow as :func:`weighted_flow_margin`, ``m' = −η c·W(m)·σ(−m)``, by ODE integration
    (``scipy.integrate.solve_ivp``, LSODA, rtol 1e-10): one integration for every t, for many record times."""
    t = np.atleast_1d(np.asarray(t, dtype=float))
    lp0 = -np.logaddexp(0.0, -m0)

    def rhs(_, m):
        return -eta * c * weight(-np.logaddexp(0.0, -m), lp0) * special.expit(-m)

    order = np.argsort(t)
    sol = integrate.solve_ivp(rhs, (0.0, float(t.max())), [m0], method="LSODA", t_eval=t[order],
                              rtol=1e-10, atol=1e-12)
    out = np.empty_like(t)
    out[order] = sol.y[0]
    return out
