"""Model-agnostic metrics: KL between categoricals, KS p-value, harmonic mean, growth-rate fits, and
membership-inference, memorization and privacy metrics with bootstrap CIs.

Everything here is a pure function of numbers a setting already has (probabilities, per-token
log-probs, teacher-forced hit masks, texts), so the Markov setting and the LM share them.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch


def _stats():
    """scipy.stats, imported on first use (it costs ~0.5 s, and most settings only need the fits)."""
    from scipy import stats

    return stats


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
    return float(_stats().ks_2samp(a, b).pvalue)


def harmonic_mean(values) -> float:
    """Harmonic mean (``scipy.stats.hmean``, as TOFU's model utility). Values must be ≥ 0; any 0 gives 0."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0 or not np.isfinite(v).all() or (v < 0).any():
        raise ValueError(f"harmonic_mean: need finite non-negative values, got {v.tolist()}")
    if (v == 0).any():
        return 0.0
    return float(_stats().hmean(v))


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
    # a constant curve has nothing to explain: R² = 0, so that no law "fits" a run that never moves
    # (a null method); any fit of it is as good as the mean
    r2 = 1.0 - float(np.sum(resid ** 2)) / ss_tot if ss_tot > 1e-24 * max(1.0, float(np.sum(y ** 2))) else 0.0
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


def power_fit(t, y) -> Fit:
    """``y ≈ A·t^p`` fitted as a line in log-log (``slope`` = p, ``intercept`` = log A), with ``r2`` the
    coefficient of determination of ``A·t^p`` on ``y`` itself (comparable to :func:`log_fit`'s and
    :func:`linear_fit`'s). Needs t > 0 and y > 0; a curve that is not positive gets R² = 0."""
    t, y = np.asarray(t, dtype=float), np.asarray(y, dtype=float)
    if (t <= 0).any():
        raise ValueError("power_fit: t must be > 0")
    if (y <= 0).any():
        return Fit(float("nan"), float("nan"), 0.0)
    f = _ols(np.log(t), np.log(y))
    pred = np.exp(f.intercept) * t ** f.slope
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot if ss_tot > 1e-24 * max(1.0, float(np.sum(y ** 2))) else 0.0
    return Fit(f.slope, f.intercept, r2)


def exponents(X: dict, y, level: float = 0.95) -> dict:
    """Power-law exponents ``y ∝ Π_k x_k^{e_k}``, fitted jointly by least squares in logs (with an intercept).

    ``X`` maps a regressor's name to its positive values. Returns ``{name: {"exponent", "ci"}}`` (a
    ``level`` t-interval from the OLS standard errors), plus ``"r2"`` and ``"dof"``. A regressor that
    does not vary, or too few points for an interval (dof < 1), gives ``None`` where the number would be.
    """
    y = np.asarray(y, dtype=float)
    names = list(X)
    cols = [np.log(np.asarray(X[k], dtype=float)) for k in names]
    varied = [k for k, c in zip(names, cols) if c.size and np.ptp(c) > 0]
    out: dict = {k: {"exponent": None, "ci": None} for k in names}
    if not varied or (y <= 0).any() or not np.isfinite(y).all():
        return {**out, "r2": None, "dof": 0}
    A = np.column_stack([cols[names.index(k)] for k in varied] + [np.ones_like(y)])
    ly = np.log(y)
    coef, *_ = np.linalg.lstsq(A, ly, rcond=None)
    resid = ly - A @ coef
    dof = len(y) - A.shape[1]
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid ** 2)) / ss_tot if ss_tot > 0 else 0.0
    se = None
    if dof >= 1:
        s2 = float(np.sum(resid ** 2)) / dof
        cov = s2 * np.linalg.pinv(A.T @ A)
        se = np.sqrt(np.maximum(np.diag(cov), 0.0))
        q = float(_stats().t.ppf(0.5 + level / 2, dof))
    for i, k in enumerate(varied):
        out[k] = {"exponent": float(coef[i]),
                  "ci": None if se is None else [float(coef[i] - q * se[i]), float(coef[i] + q * se[i])]}
    return {**out, "r2": r2, "dof": int(dof)}


# --------------------------------------------------------------------------------------------------
# membership inference, memorization, privacy (pure functions over per-token log-probs and hit masks)
# --------------------------------------------------------------------------------------------------
# Shapes: ``token_logp``, ``mask`` and ``hits`` are ``(*batch, T)``; ``mask`` marks the answer tokens
# (|y| = mask.sum(-1) ≥ 1). Every MIA score is per example, and higher means "more likely a member".


def _mask(mask, like: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(mask, device=like.device).bool()
    if m.shape != like.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} must equal {tuple(like.shape)}")
    if bool((m.sum(-1) == 0).any()):
        raise ValueError("every example needs at least one answer token in its mask")
    return m


def average_ranks(x) -> np.ndarray:
    """1-based ranks of ``x``, ties given their average rank (``scipy.stats.rankdata``'s default), in numpy:
    importing scipy.stats costs ~0.5 s, more than a quick Markov study's whole privacy table."""
    x = np.asarray(x, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts               # 0-based position of each distinct value's first copy
    return (first + (counts + 1) / 2.0)[inverse.reshape(-1)].reshape(x.shape)


def auc(member_scores, nonmember_scores) -> float:
    """``P(member score > non-member score)``, ties counted ½ (the ROC AUC of the score)."""
    a = np.asarray(member_scores, dtype=float).ravel()
    b = np.asarray(nonmember_scores, dtype=float).ravel()
    if a.size == 0 or b.size == 0 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("auc: both score sets must be non-empty and finite")
    ranks = average_ranks(np.concatenate([a, b]))       # a tie counts ½
    return float((ranks[: a.size].sum() - a.size * (a.size + 1) / 2) / (a.size * b.size))


def mia_loss(token_logp, mask) -> torch.Tensor:
    """Mean answer-token log-prob (the LOSS attack, Yeom et al. 2018)."""
    lp = torch.as_tensor(token_logp)
    m = _mask(mask, lp)
    return (lp * m).sum(-1) / m.sum(-1)


def _lowest_k_mean(values: torch.Tensor, m: torch.Tensor, k: float) -> torch.Tensor:
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    n = m.sum(-1)
    count = torch.clamp(torch.floor(k * n.to(torch.float64)).long(), min=1)
    ordered = torch.sort(torch.where(m, values, torch.full_like(values, math.inf)), dim=-1).values
    keep = torch.arange(values.shape[-1], device=values.device) < count.unsqueeze(-1)
    return torch.where(keep, ordered, torch.zeros_like(ordered)).sum(-1) / count


def mia_min_k(token_logp, mask, k: float = 0.4) -> torch.Tensor:
    """Mean of the lowest ⌊k·|y|⌋ answer-token log-probs, at least one (Min-K%, Shi et al., 2024)."""
    lp = torch.as_tensor(token_logp)
    return _lowest_k_mean(lp, _mask(mask, lp), k)


def mia_min_k_plus_plus(token_logp, mu, sigma, mask, k: float = 0.4) -> torch.Tensor:
    """Min-K%++ (Zhang et al., 2024): Min-K% over ``(log p − μ)/σ``.

    ``mu`` and ``sigma`` are, per position, the mean and standard deviation of the log-probs under the
    model's own next-token distribution (``μ = Σ_v p_v log p_v``, ``σ² = Σ_v p_v (log p_v − μ)²``).
    """
    lp = torch.as_tensor(token_logp)
    z = (lp - torch.as_tensor(mu)) / torch.as_tensor(sigma).clamp_min(1e-12)
    return _lowest_k_mean(z, _mask(mask, lp), k)


def mia_zlib(token_logp, mask, texts) -> torch.Tensor:
    """Summed answer log-prob divided by the zlib-compressed byte length of the text (Carlini et al., 2021)."""
    lp = torch.as_tensor(token_logp)
    m = _mask(mask, lp)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if len(texts) != lp.reshape(-1, lp.shape[-1]).shape[0]:
        raise ValueError(f"mia_zlib: {len(texts)} texts for {lp.reshape(-1, lp.shape[-1]).shape[0]} examples")
    zlen = torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=lp.dtype).reshape(lp.shape[:-1])
    return (lp * m).sum(-1) / zlen


def mia_reference(token_logp, ref_token_logp, mask) -> torch.Tensor:
    """Mean answer-token log-prob minus the reference model's (the reference attack)."""
    return mia_loss(token_logp, mask) - mia_loss(ref_token_logp, mask)


def exact_memorization(hits, mask) -> torch.Tensor:
    """Share of answer tokens where the teacher-forced argmax equals the label (Tirumala et al., 2022)."""
    h = torch.as_tensor(hits).bool()
    m = _mask(mask, h)
    return (h & m).sum(-1).double() / m.sum(-1)


def extraction_strength(hits, mask) -> torch.Tensor:
    """``1 − k/|y|``, k the smallest prefix length after which every teacher-forced prediction hits
    (Carlini et al., 2021; as open-unlearning reports it). All hits give 1; a miss on the last token 0."""
    h = torch.as_tensor(hits).bool()
    m = _mask(mask, h)
    miss = m & ~h
    pos = torch.cumsum(m.long(), -1)               # 1-based position of each answer token
    k = torch.where(miss, pos, torch.zeros_like(pos)).amax(-1)   # answer position of the last miss
    return 1.0 - k.double() / m.sum(-1)


def privleak(auc_model: float, auc_retain: float) -> float:
    """``(AUC_model − AUC_retain)/AUC_retain × 100``, as MUSE reports it (0 = like the retain model)."""
    if not (0 < auc_retain <= 1 and 0 <= auc_model <= 1):
        raise ValueError(f"privleak: AUCs must be in [0, 1] (retain > 0), got {auc_model}, {auc_retain}")
    return (auc_model - auc_retain) / auc_retain * 100.0


class CI(NamedTuple):
    lo: float
    hi: float
    estimate: float   #: the statistic on the full sample
    std: float        #: the bootstrap standard deviation


def bootstrap_ci(statistic, samples, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> CI:
    """Percentile bootstrap CI of ``statistic`` over the first axis of ``samples``.

    ``samples`` is an array, or a tuple of arrays with the same first-axis length that are resampled
    with the *same* indices (paired, e.g. two models' scores on the same forget questions); then
    ``statistic(*arrays)``. Returns ``CI(lo, hi, estimate, std)``.
    """
    arrays = tuple(np.asarray(s) for s in (samples if isinstance(samples, tuple) else (samples,)))
    n = arrays[0].shape[0]
    if n == 0 or any(a.shape[0] != n for a in arrays):
        raise ValueError("bootstrap_ci: samples must be non-empty with a common first axis")
    if not (0 < alpha < 1) or n_boot < 1:
        raise ValueError(f"bootstrap_ci: need 0 < alpha < 1 and n_boot >= 1, got {alpha}, {n_boot}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boots = np.array([statistic(*(a[i] for a in arrays)) for i in idx], dtype=float)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return CI(float(lo), float(hi), float(statistic(*arrays)), float(boots.std(ddof=1)) if n_boot > 1 else 0.0)


def _ks_witness(n: int, m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples of sizes n = m whose two-sample KS statistic is exactly k/n: k of y first, then x and y
    alternate, then the remaining x."""
    order = ["y"] * k + [s for _ in range(n - k) for s in ("x", "y")] + ["x"] * k
    xs = np.array([i for i, s in enumerate(order) if s == "x"], dtype=float)
    ys = np.array([i for i, s in enumerate(order) if s == "y"], dtype=float)
    return xs, ys


def _ks_statistics_brute(n: int, m: int) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Every attainable KS statistic for sizes (n, m), with a witness, by enumerating orderings."""
    found = {}
    for xs_pos in itertools.combinations(range(n + m), n):
        xs = np.array(xs_pos, dtype=float)
        ys = np.array(sorted(set(range(n + m)) - set(xs_pos)), dtype=float)
        d = round(float(_stats().ks_2samp(xs, ys).statistic), 12)
        found.setdefault(d, (xs, ys))
    return found


def ks_attainable_pvalues(n: int, m: int) -> np.ndarray:
    """Every p-value ``scipy.stats.ks_2samp`` (as TOFU calls it) can return for sizes n and m, ascending.

    Forget quality is such a p-value, so it lives on this lattice; show it next to FQ to make its
    coarseness visible. For n = m (TOFU compares two models on the same questions) the statistic takes
    exactly the values k/n, k = 1..n; other sizes are enumerated (only for ``C(n+m, n) ≤ 2·10⁵``).
    """
    if n < 1 or m < 1:
        raise ValueError(f"ks_attainable_pvalues: sizes must be >= 1, got {n}, {m}")
    if n == m:
        witnesses = [_ks_witness(n, m, k) for k in range(1, n + 1)]
    elif math.comb(n + m, n) <= 200_000:
        witnesses = list(_ks_statistics_brute(n, m).values())
    else:
        raise ValueError(f"ks_attainable_pvalues: sizes {n} != {m} too large to enumerate")
    return np.unique([_stats().ks_2samp(x, y).pvalue for x, y in witnesses])


def bootstrap_ci_strata(statistic, groups, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> CI:
    """Percentile bootstrap CI of ``statistic(*groups)`` where each group is resampled on its own.

    For statistics of several independent samples of different sizes: an AUC between members and
    non-members, or model utility over three eval sets. Each group is an array whose first axis is
    resampled (its other axes travel along, e.g. two models' scores of the same question). Resamples
    where the statistic is NaN (undefined) are left out. With one group this is :func:`bootstrap_ci`
    (the same draws for the same seed).
    """
    arrays = tuple(np.asarray(g) for g in groups)
    if not arrays or any(a.shape[0] == 0 for a in arrays):
        raise ValueError("bootstrap_ci_strata: need at least one group, each non-empty")
    if not (0 < alpha < 1) or n_boot < 1:
        raise ValueError(f"bootstrap_ci_strata: need 0 < alpha < 1 and n_boot >= 1, got {alpha}, {n_boot}")
    rng = np.random.default_rng(seed)
    idx = [rng.integers(0, a.shape[0], size=(n_boot, a.shape[0])) for a in arrays]
    boots = np.array([statistic(*(a[i[b]] for a, i in zip(arrays, idx))) for b in range(n_boot)], dtype=float)
    boots = boots[~np.isnan(boots)]   # resamples where the statistic is undefined (e.g. privleak at AUC 0)
    if boots.size == 0:
        return CI(math.nan, math.nan, float(statistic(*arrays)), math.nan)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return CI(float(lo), float(hi), float(statistic(*arrays)), float(boots.std(ddof=1)) if boots.size > 1 else 0.0)


# --------------------------------------------------------------------------------------------------
# fluency of generated text (over token or word sequences)
# --------------------------------------------------------------------------------------------------
def _ngrams(tokens, n: int) -> list[tuple]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    t = list(tokens)
    return [tuple(t[i:i + n]) for i in range(len(t) - n + 1)]


def repetition(tokens, n: int = 3) -> float:
    """Share of repeated n-grams in one sequence, ``1 − |distinct n-grams| / |n-grams|`` (rep-n of
    Welleck et al., 2019). 0 for a sequence with no repeated n-gram, or shorter than n; → 1 as a loop."""
    grams = _ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(sequences, n: int = 2) -> float:
    """distinct-n (Li et al., 2016): distinct n-grams over all n-grams of a set of sequences (pooled,
    so the same answer to every question scores low). 0 when no sequence has n tokens."""
    grams = [g for s in sequences for g in _ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0
