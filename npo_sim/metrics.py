"""Model-agnostic metrics: KL between categoricals, KS p-value, harmonic mean, growth-rate fits."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


def mean_kl(p, q, axis: int = -1, eps: float = 0.0) -> float:
    """``mean_i KL(p_i ‖ q_i)`` for categorical distributions given as probabilities along ``axis``.

    Terms with ``p = 0`` contribute 0. ``q = 0`` where ``p > 0`` gives ``inf`` unless ``eps`` > 0.
    """
    p = np.asarray(p, dtype=float)
    q = np.asarray(q, dtype=float)
    if p.shape != q.shape:
        raise ValueError(f"mean_kl: shapes {p.shape} and {q.shape} differ")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q + eps)), 0.0)
    return float(np.mean(np.sum(terms, axis=axis)))


def kl_from_logprobs(logp, logq, axis: int = -1) -> np.ndarray:
    """Per-row ``KL(p ‖ q)`` from log-probabilities (numerically safe for tiny probabilities)."""
    logp = np.asarray(logp, dtype=float)
    logq = np.asarray(logq, dtype=float)
    return np.sum(np.exp(logp) * (logp - logq), axis=axis)


def ks_pvalue(a, b) -> float:
    """Two-sample Kolmogorov–Smirnov p-value (``scipy.stats.ks_2samp``), as TOFU's forget quality.

    Raises ``ValueError`` for empty or non-finite samples instead of returning ``None``/NaN.
    """
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("ks_pvalue: both samples must be non-empty")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("ks_pvalue: samples contain NaN or inf")
    return float(stats.ks_2samp(a, b).pvalue)


def harmonic_mean(values) -> float:
    """Harmonic mean (``scipy.stats.hmean``, as TOFU's model utility). Values must be ≥ 0; any 0 gives 0."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0 or not np.isfinite(v).all() or (v < 0).any():
        raise ValueError(f"harmonic_mean: need finite non-negative values, got {v.tolist()}")
    if (v == 0).any():
        return 0.0
    return float(stats.hmean(v))


@dataclass(frozen=True)
class Fit:
    """``y ≈ slope·f(t) + intercept`` with coefficient of determination ``r2``."""

    slope: float
    intercept: float
    r2: float

    def as_dict(self) -> dict:
        return asdict(self)


def _ols(x, y) -> Fit:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.size < 3:
        raise ValueError("fit: need matching 1-D arrays with at least 3 points")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("fit: non-finite values")
    A = np.stack([x, np.ones_like(x)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - (slope * x + intercept)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid ** 2)) / ss_tot if ss_tot > 0 else 1.0
    return Fit(float(slope), float(intercept), r2)


def linear_fit(t, y) -> Fit:
    """Least-squares ``y ≈ slope·t + intercept`` (GA's divergence law)."""
    return _ols(t, y)


def log_fit(t, y, offset: float = 1.0) -> Fit:
    """Least-squares ``y ≈ slope·log(t + offset) + intercept`` (NPO's divergence law)."""
    t = np.asarray(t, dtype=float)
    if (t + offset <= 0).any():
        raise ValueError("log_fit: t + offset must be > 0")
    return _ols(np.log(t + offset), y)
