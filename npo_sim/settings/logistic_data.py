"""Theorem-2 lab, the model side: forget data (reduced to the span of its features) and the adapter.

:func:`make_data` draws one dataset of the setting (see :mod:`.logistic` for the reduction
``A = B Q^T``); :class:`LogisticAdapter` turns the reduced parameters ``z`` of a batch of configs into the
per-example log-likelihoods every objective of :mod:`npo_sim.losses` reads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..runio import UserError

if TYPE_CHECKING:
    from .logistic_config import TheoryConfig


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForgetData:
    """One draw of the Theorem-2 setting, already reduced to the span of the forget features."""

    n_f: int
    d: int
    seed: int
    B: np.ndarray          # (n_f, k): logit shifts are b = B z, k = min(n_f, d)
    m0: np.ndarray         # (n_f,): margins s_i⟨x_i, θ_init⟩ (> 0: the labels θ_init predicts)
    c: np.ndarray          # (n_f,): ‖x_i‖²
    C0: float              # n_f · max_{i≠j} |⟨x_i, x_j⟩|
    theta_norm: float      # ‖θ_init‖
    A: np.ndarray | None = dataclasses.field(default=None, repr=False)  # (n_f, d) signed features, if kept

    @property
    def k(self) -> int:
        return self.B.shape[1]


def _fit_retain(Xr: np.ndarray, yr: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge-regularised logistic regression on the retain set (L-BFGS, float64)."""
    from scipy import optimize, special

    def f(theta):
        m = yr * (Xr @ theta)
        loss = np.mean(np.logaddexp(0.0, -m)) + 0.5 * ridge * theta @ theta
        grad = -(Xr.T @ (yr * special.expit(-m))) / len(yr) + ridge * theta
        return loss, grad

    res = optimize.minimize(f, np.zeros(Xr.shape[1]), jac=True, method="L-BFGS-B")
    return res.x


def _reduce(A: np.ndarray) -> np.ndarray:
    """``B`` (n × k, k = rank) with ``A = B Q^T`` for an orthonormal ``Q``: the Cholesky factor of the
    Gram matrix when ``A`` has full row rank, else ``R^T`` from a QR of ``A^T``."""
    if A.shape[0] <= A.shape[1]:
        try:
            return np.linalg.cholesky(A @ A.T)
        except np.linalg.LinAlgError:
            pass
    return np.linalg.qr(A.T)[1].T.copy()


def _theta_margins(rng, X: np.ndarray, cfg: TheoryConfig) -> np.ndarray:
    """θ_init of norm B_θ whose forget margins are ``m_i ~ U[margin_min, margin_max]`` (needs n_f <= d)."""
    n_f, d = X.shape
    if n_f > d:
        raise UserError(f"init 'margins' needs n_f <= d (got n_f={n_f}, d={d}); use init 'random'")
    s = rng.choice([-1.0, 1.0], n_f)
    target = rng.uniform(cfg.margin_min, cfg.margin_max, n_f)
    A = s[:, None] * X
    G = A @ A.T
    theta_min = A.T @ np.linalg.solve(G, target)            # min-norm θ with A θ = target
    if np.linalg.norm(theta_min) > cfg.theta_norm:
        raise UserError(f"theta_norm={cfg.theta_norm} is too small for the requested margins "
                        f"(needs >= {np.linalg.norm(theta_min):.2f} at n_f={n_f}, d={d})")
    v = rng.standard_normal(d)
    v -= A.T @ np.linalg.solve(G, A @ v)                    # project out span{a_i}
    nv = np.linalg.norm(v)
    extra = math.sqrt(max(cfg.theta_norm ** 2 - theta_min @ theta_min, 0.0))
    return theta_min + (extra / nv * v if nv > 0 else 0.0)


def _theta_random(rng, X: np.ndarray, cfg: TheoryConfig) -> np.ndarray:
    """θ_init in a uniform direction, of norm B_θ."""
    g = rng.standard_normal(X.shape[1])
    return cfg.theta_norm * g / np.linalg.norm(g)


def _theta_retain(rng, X: np.ndarray, cfg: TheoryConfig) -> np.ndarray:
    """Ridge logistic regression on a retain set labelled by a random teacher (10% label noise),
    projected onto ‖θ‖ <= B_θ."""
    d = X.shape[1]
    teacher = rng.standard_normal(d)
    Ur = rng.standard_normal((cfg.retain_n, d))
    Xr = Ur / np.linalg.norm(Ur, axis=1, keepdims=True) * rng.uniform(cfg.x_norm_min, cfg.x_norm_max,
                                                                      (cfg.retain_n, 1))
    yr = np.sign(Xr @ teacher) * np.where(rng.random(cfg.retain_n) < 0.1, -1.0, 1.0)
    theta = _fit_retain(Xr, yr, ridge=1e-3)
    norm = np.linalg.norm(theta)
    return theta * min(1.0, cfg.theta_norm / norm) if norm > 0 else theta


#: how θ_init is drawn, by ``TheoryConfig.init`` (each reads the rng after the forget features)
THETA_INIT = {"margins": _theta_margins, "random": _theta_random, "retain": _theta_retain}


def make_data(n_f: int, d: int, seed: int, cfg: TheoryConfig, keep_features: bool = False) -> ForgetData:
    """Draw forget features and θ_init, seeded by ``(cfg.seed, n_f, d, seed)``; label = θ_init's prediction.

    ``x_i = r_i·u_i`` with ``u_i`` uniform on the sphere and ``r_i ~ U[b_x, B_x]``; θ_init is drawn by
    :data:`THETA_INIT` ``[cfg.init]``. ``keep_features`` keeps the full label-signed ``(n_f, d)`` features
    (tests, the naive baseline).
    """
    if n_f > d and cfg.check_orthogonality:
        raise UserError(f"n_f={n_f} > d={d}: Theorem 2 needs n_f <= d (turn check_orthogonality off to run anyway)")
    rng = np.random.default_rng([cfg.seed, n_f, d, seed])
    U = rng.standard_normal((n_f, d))
    X = U / np.linalg.norm(U, axis=1, keepdims=True) * rng.uniform(cfg.x_norm_min, cfg.x_norm_max, (n_f, 1))
    theta = THETA_INIT[cfg.init](rng, X, cfg)
    raw = X @ theta
    s = np.where(raw >= 0, 1.0, -1.0)
    A = s[:, None] * X
    gram = X @ X.T
    off = np.abs(gram - np.diag(np.diag(gram)))
    C0 = float(n_f * off.max()) if n_f > 1 else 0.0
    if cfg.check_orthogonality and C0 > cfg.max_c0:
        raise UserError(f"near-orthogonality check failed: C0 = n_f*max|<x_i,x_j>| = {C0:.2f} > max_c0="
                        f"{cfg.max_c0} at n_f={n_f}, d={d} (increase d)")
    return ForgetData(n_f, d, seed, _reduce(A), np.abs(raw), np.diag(gram).copy(), C0,
                      float(np.linalg.norm(theta)), A if keep_features else None)


# --------------------------------------------------------------------------------------------------
# the adapter: per-example log-likelihoods from the reduced parameters
# --------------------------------------------------------------------------------------------------
#: θ-side inputs as functions of the margins ``m`` (shape ``(..., n)``); the references are the same at m0
MARGIN_INPUTS = {
    "logp": lambda m: F.logsigmoid(m),
    "idk_logp": lambda m: F.logsigmoid(-m),
    "length": lambda m: torch.ones_like(m),
    "token_logp": lambda m: F.logsigmoid(m).unsqueeze(-1),                      # (..., n, 1)
    "token_mask": lambda m: torch.ones(m.shape + (1,), dtype=m.dtype),
    "forget_logits": lambda m: torch.stack([torch.zeros_like(m), m], -1).unsqueeze(-2),  # (..., n, 1, 2)
    "forget_labels": lambda m: torch.ones(m.shape + (1,), dtype=torch.long),      # the forget label: class 1
}


def margin_inputs(m: torch.Tensor, m_ref: torch.Tensor, keys) -> dict[str, torch.Tensor]:
    """Every input in ``keys`` from margins ``m`` and reference margins ``m_ref`` (no model involved)."""
    from ..losses import REFERENCE_OF

    base_of = {ref: k for k, ref in REFERENCE_OF.items()}
    return {k: MARGIN_INPUTS[base_of[k]](m_ref) if k in base_of else MARGIN_INPUTS[k](m) for k in keys}


class LogisticAdapter:
    """Batched logistic forget set. Params: one tensor ``z`` of shape ``(D, R, k)`` (datasets × replicas).

    ``Bt`` has shape ``(D, k, n)`` and ``m0`` ``(D, 1, n)``; margins are ``m = m0 + z @ Bt``. Passing the
    full label-signed feature matrix as ``Bt`` (``k = d``) gives plain gradient descent on θ − θ_init.
    Inputs (:data:`MARGIN_INPUTS`): ``logp = log σ(m)`` (the forget label), ``idk_logp = log σ(−m)`` (the
    other label, DPO's winner), ``length = 1``, and the same example as one token: ``token_logp``, the
    two-class logits ``[0, m]`` with label 1, and a mask of ones.
    """

    def __init__(self, Bt: torch.Tensor, m0: torch.Tensor):
        self.Bt, self.m0 = Bt, m0

    def shifts(self, z: torch.Tensor) -> torch.Tensor:
        return torch.matmul(z, self.Bt)

    def inputs(self, params, keys):
        m = torch.baddbmm(self.m0, params[0], self.Bt)          # m0 + z @ Bt in one kernel
        return {k: MARGIN_INPUTS[k](m) for k in keys}

    def vjp(self, params, inputs, cotangents):
        """Closed-form chain rule (the model is linear in ``z``): ``∂L/∂z = c @ Btᵀ``.

        The margin cotangent is ``c = (ḡ_logp + ḡ_token)·σ(−m) − ḡ_idk·σ(m) + ḡ_logits[class 1]``, read
        off the inputs themselves: ``σ(−m) = −expm1(log σ(m))`` and ``σ(m) = −expm1(log σ(−m))``
        (accurate at both ends). One batched matrix product; autograd never sees the model.
        """
        c = None

        def add(term):
            nonlocal c
            c = term if c is None else c + term

        if "logp" in cotangents:
            add(-cotangents["logp"] * torch.expm1(inputs["logp"]))
        if "token_logp" in cotangents:
            add(-cotangents["token_logp"][..., 0] * torch.expm1(inputs["token_logp"][..., 0]))
        if "idk_logp" in cotangents:
            add(cotangents["idk_logp"] * torch.expm1(inputs["idk_logp"]))
        if "forget_logits" in cotangents:
            add(cotangents["forget_logits"][..., 0, 1])
        if c is None:
            return [torch.zeros_like(params[0])]
        return [torch.matmul(c, self.Bt.transpose(-1, -2))]

    def metrics(self, params):
        z = params[0]
        b = self.shifts(z)
        out = {"dist_xtx": b.norm(dim=-1), "dist_l2": z.norm(dim=-1)}
        for i in range(b.shape[-1]):
            out[f"b{i}"] = b[..., i]
        return out
