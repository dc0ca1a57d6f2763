"""Pretraining for the §4 mixture: ``π_ref`` on forget ∪ retain and the oracle ``π_retr`` on retain only.

Both fits minimise the mean NLL of a logistic model on the frozen features (no regulariser). They are
solved as the two columns of one batched problem, ``θ`` of shape ``(S, k, 2) = [θ_ref, θ_retr]`` over
the seed axis ``S``: by Newton's method to the exact optimum (:func:`pretrain_newton`, the default) or
by the paper's full-batch GD recipe (:func:`pretrain_gd`). All arithmetic here is numpy float64 unless
a caller asks GD for float32.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

#: the separable-data guard: a training logit beyond this (probability within 1e-13 of 0 or 1)
SEPARATED_LOGIT = 30


def _problem(data):
    """Features (S, n, k) of forget ∪ retain, labels (S, n), row weights (S, n, 2) for [ref, retr]."""
    phi = np.concatenate([data.phi_forget, data.phi_retain], axis=1)
    y = np.concatenate([data.y_forget, data.y_retain], axis=1)
    n_f, n_r = data.phi_forget.shape[1], data.phi_retain.shape[1]
    w = np.zeros(y.shape + (2,))
    w[..., 0] = 1.0 / (n_f + n_r)
    w[:, n_f:, 1] = 1.0 / n_r
    return phi, y, w


def _nll_grad(phi, phiT, y, w, theta):
    """Mean NLL (S, 2) and its gradient (S, k, 2) at theta (S, k, 2)."""
    z = phi @ theta                                   # (S, n, 2)
    s = (2.0 * y - 1.0)[..., None]
    loss = (w * np.logaddexp(0.0, -s * z)).sum(1)
    r = w * (expit(z) - y[..., None])
    return loss, phiT @ r, z


def _diagnostics(phi, w, theta, seeds) -> dict:
    """Per-seed ‖θ‖ and max |training logit| of [ref, retr]; flags (quasi-)separated fits.

    A training logit beyond ±30 (probability within 1e-13 of 0 or 1) means the data are (quasi-)separable
    for that model: no finite maximum-likelihood θ exists, and Newton stops somewhere along a ray of
    diverging ‖θ‖ once the gradient is below tolerance, while GD's finite budget keeps θ moderate.
    """
    z = np.abs(phi @ theta) * (w > 0)                  # (S, n, 2), only each model's own training rows
    out = {}
    for col, model in enumerate(("ref", "retr")):
        zmax = z[..., col].max(1)
        out[model] = {"theta_norm_per_seed": np.linalg.norm(theta[..., col], axis=1).round(4).tolist(),
                      "max_abs_train_logit_per_seed": zmax.round(3).tolist(),
                      "quasi_separated_seeds": [int(sd) for sd, v in zip(seeds, zmax) if v > SEPARATED_LOGIT]}
    return out


def _newton_step(phi, phiT, w, z, g):
    """The Newton direction (S, k, 2) of both models from their logits z and gradient g.

    Each model's Hessian is the weighted Gram matrix ``Φᵀ D Φ`` with ``D = diag(w·p(1−p))``: one batched
    ``(S, k, n) @ (S, n, k)`` product per model.
    """
    p = expit(z)
    curv = w * p * (1.0 - p)                                                       # (S, n, 2)
    H = np.stack([phiT @ (curv[..., c, None] * phi) for c in range(curv.shape[-1])], axis=1)  # (S, 2, k, k)
    step = np.linalg.solve(H, np.swapaxes(g, 1, 2)[..., None])[..., 0]            # (S, 2, k)
    return np.swapaxes(step, 1, 2)


def pretrain_newton(data, tol: float = 1e-10, max_iter: int = 100) -> tuple[np.ndarray, dict]:
    """Newton's method with backtracking, float64, to ‖∇‖ < tol. Returns θ (S, k, 2) = [θ_ref, θ_retr]."""
    phi, y, w = _problem(data)
    phiT = np.ascontiguousarray(np.swapaxes(phi, 1, 2))
    S, _, k = phi.shape
    theta = np.zeros((S, k, 2))
    loss, g, z = _nll_grad(phi, phiT, y, w, theta)
    iterations = 0
    while iterations < max_iter and np.linalg.norm(g, axis=1).max() >= tol:
        step = _newton_step(phi, phiT, w, z, g)
        t = np.ones((S, 1, 2))
        for _ in range(30):                            # backtracking (pure Newton steps near the optimum)
            new_loss, new_g, new_z = _nll_grad(phi, phiT, y, w, theta - t * step)
            bad = new_loss > loss + 1e-12 * np.abs(loss)
            if not bad.any():
                break
            t = np.where(bad[:, None, :], t * 0.5, t)
        theta = theta - t * step
        loss, g, z = new_loss, new_g, new_z
        iterations += 1
    gnorm = np.linalg.norm(g, axis=1)
    if gnorm.max() >= tol:
        raise RuntimeError(f"Newton pretraining did not reach ‖∇‖ < {tol:g} (got {gnorm.max():.3g}); "
                           "is the training set separable?")
    return theta, {"iterations": iterations, "grad_norm_max": float(gnorm.max()), "loss": loss,
                   **_diagnostics(phi, w, theta, data.seeds)}


def pretrain_gd(data, steps: int = 20000, lr: float = 0.05, dtype=np.float64) -> tuple[np.ndarray, dict]:
    """The paper's recipe: full-batch GD from 0 on the mean NLL, vectorised over seeds and both models.

    ``dtype`` is the arithmetic of the GD loop (the result and its reported gradient are float64).
    """
    phi, y, w = _problem(data)
    phi_ = phi.astype(dtype)
    phiT = np.ascontiguousarray(np.swapaxes(phi_, 1, 2))
    thetaT = np.zeros((phi.shape[0], 2, phi.shape[2]), dtype)   # (S, 2, k): row layout keeps matmuls fast
    yT = y[:, None, :].astype(dtype)
    wT = np.swapaxes(w, 1, 2).astype(dtype)
    lw = dtype(lr) * wT                                # step size folded into the row weights
    lwy = lw * yT
    z = np.empty(wT.shape, dtype)
    for _ in range(steps):
        np.matmul(thetaT, phiT, out=z)                 # (S, 2, n)
        expit(z, out=z)
        z *= lw
        z -= lwy
        thetaT -= z @ phi_
    theta = np.swapaxes(thetaT, 1, 2).astype(np.float64)
    loss, g, _ = _nll_grad(phi, np.ascontiguousarray(np.swapaxes(phi, 1, 2)), y, w, theta)
    return theta, {"steps": steps, "lr": lr, "arithmetic": np.dtype(dtype).name,
                   "grad_norm_max": float(np.linalg.norm(g, axis=1).max()), "loss": loss,
                   **_diagnostics(phi, w, theta, data.seeds)}


#: name -> (data, config, comparison_only) -> (θ (S, k, 2), info). The comparison-only GD run (when
#: Newton is the chosen recipe) uses float32 arithmetic: 3x faster, and float32 rounding moves θ far
#: less than the recipe's own distance from the optimum (see tests).
PRETRAINERS = {
    "newton": lambda data, cfg, compare=False: pretrain_newton(data),
    "gd": lambda data, cfg, compare=False: pretrain_gd(data, cfg.gd_steps, cfg.gd_lr,
                                                       np.float32 if compare else np.float64),
}
