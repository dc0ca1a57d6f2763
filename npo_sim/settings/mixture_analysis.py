"""The §4 mixture's analysis: per-method summaries, the paper's four findings, and their claim records.

Each finding is one :class:`Finding`: ``measure`` computes its numbers from the curves table (the record
saved under ``summary.json["findings"]``, with the strict criterion's ``holds``), ``describe`` writes the
report's "measured" cell, and ``partly`` is the weaker reading under which a claim that fails as
stated partly holds. :func:`claims` turns the records into :class:`~npo_sim.claims.Claim` rows; the
verdict is decided there and nowhere else.

Seed CIs: outcomes are heavy-tailed across seeds, so every finding's statistic (computed on the seed-mean
curves) also gets a 95% percentile-bootstrap interval over seeds (:class:`Bootstrap`: seeds resampled
with replacement, the statistic recomputed on each resample's mean curves), and the strict criteria
(``holds``) are judged on those intervals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .. import claims as C
from ..losses import paper_table1

if TYPE_CHECKING:
    from ..study import Results
    from .mixture import SyntheticConfig

#: where the paper's "below the threshold" finding is read (its Figure 3 runs to about this step)
HORIZON = 1200
#: forget levels at which the trade-off is compared (and the config's threshold)
#: (0.5 and 0.2 only matter when a heavy-tailed seed keeps a seed mean above the smaller levels)
LEVELS = (0.5, 0.2, 0.1, 0.05, 0.02)
#: bootstrap resamples over seeds, the interval's coverage, and the resampling RNG's seed
BOOTSTRAP, COVERAGE, BOOTSTRAP_SEED = 2000, 0.95, 0
CI_NOTE = (f"{COVERAGE:.0%} percentile-bootstrap CI over seeds ({BOOTSTRAP} resamples of the seeds, the "
           "statistic recomputed on each resample's seed-mean curves)")


def ms(x) -> dict:
    """Mean and sample std (0 for one value) of an array."""
    x = np.asarray(x, dtype=float)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0}


def _mean_curve(curves: pd.DataFrame, method: str) -> pd.DataFrame:
    return curves[curves["method"] == method].groupby("step")[
        ["forget_distance", "retain_distance", "param_distance"]].mean()


def _first_below(steps: np.ndarray, values: np.ndarray, threshold: float):
    hit = np.nonzero(values < threshold)[0]
    return int(steps[hit[0]]) if hit.size else None


def _per_seed_first_below(c: pd.DataFrame, threshold: float) -> list:
    return [_first_below(g["step"].to_numpy(), g["forget_distance"].to_numpy(), threshold)
            for _, g in c.groupby("seed")]


# --------------------------------------------------------------------------------------------------
# seed bootstrap
# --------------------------------------------------------------------------------------------------
class Bootstrap:
    """Seed-mean forget/retain curves, ``(B+1, M, T)``: row 0 is the actual seed mean (the point
    estimate), rows 1..B are the means over seeds resampled with replacement (fixed RNG seed)."""

    def __init__(self, curves: pd.DataFrame, methods, B: int = BOOTSTRAP):
        self.methods = {m: i for i, m in enumerate(methods)}
        cube = {col: np.stack([curves[curves["method"] == m].pivot(index="seed", columns="step", values=col)
                               .to_numpy() for m in methods]) for col in ("forget_distance", "retain_distance")}
        M, S, T = cube["forget_distance"].shape
        self.steps = np.asarray(sorted(curves["step"].unique()))
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        w = np.vstack([np.full((1, S), 1.0 / S), rng.multinomial(S, np.full(S, 1.0 / S), size=B) / S])
        self.forget, self.retain = (np.einsum("bs,mst->bmt", w, cube[c]) for c in cube)

    def first_below(self, method: str, level: float) -> np.ndarray:
        """(B+1,) first record step whose mean forget distance < level (inf: never)."""
        hit = self.forget[:, self.methods[method]] < level
        return np.where(hit.any(-1), self.steps[hit.argmax(-1)], np.inf)

    def retain_at_level(self, method: str, level: float) -> np.ndarray:
        """(B+1,) mean retain distance at that first step (nan: the level is never reached)."""
        m = self.methods[method]
        hit = self.forget[:, m] < level
        r = np.take_along_axis(self.retain[:, m], hit.argmax(-1)[:, None], -1)[:, 0]
        return np.where(hit.any(-1), r, np.nan)


def _nan_fails(x: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(x), -np.inf, x)


def ci(x: np.ndarray) -> dict:
    """``{"estimate", "ci"}`` of a bootstrap statistic (row 0 = the estimate); ±inf/nan become None."""
    tail = (1 - COVERAGE) / 2
    lo, hi = np.quantile(_nan_fails(x[1:]), [tail, 1 - tail], method="inverted_cdf")
    num = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731
    return {"estimate": num(x[0]), "ci": [num(lo), num(hi)]}


def _lo(x: np.ndarray) -> float:
    """The CI's lower end (nan counts as −inf: a resample where the statistic is undefined fails)."""
    return float(np.quantile(_nan_fails(x[1:]), (1 - COVERAGE) / 2, method="inverted_cdf"))


def _hi(x: np.ndarray) -> float:
    """The CI's upper end (nan counts as +inf)."""
    tail = (1 - COVERAGE) / 2
    return float(np.quantile(np.where(np.isnan(x[1:]), np.inf, x[1:]), 1 - tail, method="inverted_cdf"))


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    """Wilson score interval (95%) of a proportion k/n."""
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [float(max(0.0, mid - half)), float(min(1.0, mid + half))]


# --------------------------------------------------------------------------------------------------
# per-method summary
# --------------------------------------------------------------------------------------------------
def summarize(curves: pd.DataFrame, cfg: SyntheticConfig) -> dict[str, dict]:
    """Per method: hyperparameters, start and end values, the best forget point, first step below threshold."""
    metrics = ["forget_distance", "retain_distance", "param_distance", "forget_loss", "forget_nll"]
    out = {}
    for m in cfg.methods:
        c = curves[curves["method"] == m]
        first, last = c["step"].min(), c["step"].max()
        mean = _mean_curve(curves, m)
        best_step = int(mean["forget_distance"].idxmin())
        at_best = c[c["step"] == best_step]
        per_seed = _per_seed_first_below(c, cfg.threshold)
        reached = [s for s in per_seed if s is not None]
        out[m] = {
            "hyperparameters": dataclasses.asdict(cfg.specs[m]),
            "step0": {k: ms(c.loc[c["step"] == first, k]) for k in metrics},
            "end": {"step": int(last), **{k: ms(c.loc[c["step"] == last, k]) for k in metrics}},
            "best_forget": {"step": best_step, "forget_distance": ms(at_best["forget_distance"]),
                            "retain_distance": ms(at_best["retain_distance"])},
            "first_step_below": {
                "threshold": cfg.threshold, "per_seed": per_seed, "n_seeds_reached": len(reached),
                "mean": float(np.mean(reached)) if reached else None,
                "std": float(np.std(reached, ddof=1)) if len(reached) > 1 else (0.0 if reached else None),
                "mean_curve": _first_below(mean.index.to_numpy(), mean["forget_distance"].to_numpy(), cfg.threshold),
            },
        }
    return out


# --------------------------------------------------------------------------------------------------
# the paper's four findings: numbers (what summary.json keeps)
# --------------------------------------------------------------------------------------------------
def _start_point(curves, means, cfg, boot) -> dict:
    first = next(iter(means.values())).iloc[0]
    start = {"forget_distance": float(first["forget_distance"]), "retain_distance": float(first["retain_distance"])}
    f0, r0 = boot.forget[:, 0, 0], boot.retain[:, 0, 0]
    return {
        "claim": "for alpha=1 the trade-off curves start near (forget 1.70, retain 0.02)",
        "criterion": "the seed-mean forget distance at step 0 within 20% of 1.70 and the retain distance <= 0.05, "
                     f"both over the whole {CI_NOTE} (alpha=1 only)",
        "measured": start, "ci": {"forget_distance": ci(f0), "retain_distance": ci(r0), "method": CI_NOTE},
        "paper": {"forget_distance": 1.70, "retain_distance": 0.02},
        "holds": (1.36 <= _lo(f0) and _hi(f0) <= 2.04 and _hi(r0) <= 0.05) if cfg.alpha == 1.0 else None,
    }


def _forget_below_threshold(curves, means, cfg, boot) -> dict:
    first_below = {m: _first_below(mean.index.to_numpy(), mean["forget_distance"].to_numpy(), cfg.threshold)
                   for m, mean in means.items()}
    paper = paper_table1()
    reach = {m: (s is not None and s <= HORIZON) for m, s in first_below.items()}
    first_boot = {m: boot.first_below(m, cfg.threshold) for m in means}
    holds = None
    if HORIZON <= cfg.steps and all(m in means for m in paper):
        holds = (all(_hi(first_boot[m]) <= HORIZON for m in paper if m != "idk_rt")
                 and _lo(first_boot["idk_rt"]) > HORIZON)
    seeds_reached, wilson_ci = {}, {}
    for m in means:
        per_seed = _per_seed_first_below(curves[curves["method"] == m], cfg.threshold)
        k = sum(s is not None and s <= HORIZON for s in per_seed)
        seeds_reached[m], wilson_ci[m] = f"{k}/{len(per_seed)}", wilson(k, len(per_seed))
    return {
        "claim": f"every method except IDK+RT gets the forget distance below {cfg.threshold} within {HORIZON} steps",
        "criterion": "first record step where the seed-mean forget distance < threshold, with its "
                     f"{CI_NOTE} (never = ∞); paper methods only; holds if for every paper method but idk_rt the "
                     "CI's upper end is <= the horizon and for idk_rt the CI's lower end is beyond it",
        "threshold": cfg.threshold, "horizon": HORIZON, "first_step": first_below,
        "first_step_ci": {m: ci(v)["ci"] for m, v in first_boot.items()},
        "seeds_reaching_wilson95": wilson_ci,
        "reached_by_horizon": reach, "seeds_reaching_by_horizon": seeds_reached,
        "min_forget_distance_per_seed": {m: curves[curves["method"] == m].groupby("seed")["forget_distance"].min()
                                         .round(6).to_dict() for m in means},
        "holds": holds,
    }


def _ga_retain_diverges(curves, means, cfg, boot) -> dict:
    pair, div = ("ga", "ga_rt"), {}
    for m in pair:
        if m in means:
            r = means[m]["retain_distance"]
            half = r.index[np.searchsorted(r.index, cfg.steps // 2)]
            rb = boot.retain[:, boot.methods[m]]                          # (B+1, T)
            growth, spread = rb[:, -1] / rb[:, np.searchsorted(boot.steps, half)], rb[:, -1] / rb.min(-1)
            div[m] = {"start": float(r.iloc[0]), "half_way": float(r.loc[half]), "end": float(r.iloc[-1]),
                      "min": float(r.min()), "end_over_half_way": ci(growth), "end_over_min": ci(spread),
                      "diverges": bool(r.iloc[-1] > r.loc[half] and r.iloc[-1] >= 10 * r.min()),
                      "diverges_ci": bool(_lo(growth) > 1 and _lo(spread) >= 10)}
    return {
        "claim": "the retain distance of GA and GA+RT diverges",
        "criterion": "seed-mean retain distance still increasing over the second half (end/half-way > 1) "
                     f"and end >= 10 x its minimum along the run, both for the whole {CI_NOTE}",
        "measured": div,
        "holds": all(v["diverges_ci"] for v in div.values()) if all(m in means for m in pair) else None,
    }


def _retain_at_forget_level(mean: pd.DataFrame, level: float):
    """Retain distance (mean curve) at the first record step whose forget distance is below ``level``."""
    step = _first_below(mean.index.to_numpy(), mean["forget_distance"].to_numpy(), level)
    return (None, None) if step is None else (step, float(mean.loc[step, "retain_distance"]))


def _npo_better_tradeoff(curves, means, cfg, boot) -> dict:
    levels = sorted({*LEVELS, cfg.threshold}, reverse=True)
    table = {m: {f"{lv:g}": dict(zip(("step", "retain_distance"), _retain_at_forget_level(mean, lv)))
                 for lv in levels} for m, mean in means.items()}
    pair = ("npo", "npo_rt", "ga", "ga_rt")
    have = all(m in means for m in pair)
    common = [lv for lv in levels if have and all(table[m][f"{lv:g}"]["step"] is not None for m in pair)]
    level = common[-1] if common else None
    holds, r_at, ranked, paired, paired_ci, gaps = None, {}, [], {}, {}, {}
    if level is not None:
        r_at = {m: table[m][f"{level:g}"]["retain_distance"] for m in table}
        rb = {m: boot.retain_at_level(m, level) for m in pair}
        gap = {"ga,ga_rt - npo,npo_rt": np.minimum(rb["ga"], rb["ga_rt"]) - np.maximum(rb["npo"], rb["npo_rt"]),
               "ga - npo": rb["ga"] - rb["npo"], "ga_rt - npo_rt": rb["ga_rt"] - rb["npo_rt"]}
        gaps = {k: ci(v) for k, v in gap.items()}
        holds = _lo(gap["ga,ga_rt - npo,npo_rt"]) > 0
        paired = {"npo<ga": r_at["npo"] < r_at["ga"], "npo_rt<ga_rt": r_at["npo_rt"] < r_at["ga_rt"]}
        paired_ci = {"npo<ga": _lo(gap["ga - npo"]) > 0, "npo_rt<ga_rt": _lo(gap["ga_rt - npo_rt"]) > 0}
        ranked = sorted((m for m in r_at if r_at[m] is not None), key=lambda m: r_at[m])
    return {
        "claim": "NPO and NPO+RT reach a better forget/retain trade-off (than GA and GA+RT)",
        "criterion": "on the seed-mean curves, the retain distance when the forget distance first drops below "
                     "the smallest level of {0.5, 0.2, 0.1, 0.05, 0.02, threshold} that NPO, NPO+RT, GA and GA+RT all "
                     "reach: both NPO and NPO+RT below both GA and GA+RT, i.e. the lower end of the "
                     f"{CI_NOTE} of min(GA, GA+RT) - max(NPO, NPO+RT) at that level > 0 (a resample where a "
                     "method misses the level fails)",
        "level": level, "retain_at_level": r_at, "ranking_at_level": ranked, "retain_gap_ci": gaps,
        "paired_comparison": paired,        # like for like on the seed-mean curves: NPO vs GA, NPO+RT vs GA+RT
        "paired_comparison_ci": paired_ci,  # the same, judged on the gap's CI (lower end > 0)
        "retain_at_forget_level": table, "holds": holds,
    }


# --------------------------------------------------------------------------------------------------
# the paper's four findings: report cells
# --------------------------------------------------------------------------------------------------
def _describe_start(f: dict) -> str:
    m, c = f["measured"], f.get("ci")
    cis = ((f" {_fmt_ci(c['forget_distance']['ci'])}", f" {_fmt_ci(c['retain_distance']['ci'])}",
            f"; {COVERAGE:.0%} bootstrap CIs over seeds") if c else ("", "", ""))
    return (f"start (forget {m['forget_distance']:.3f}{cis[0]}, retain {m['retain_distance']:.3f}{cis[1]}); "
            f"paper (1.70, 0.02){cis[2]}")


def _fmt_ci(lohi, fmt: str = ".3g", low_inf: str = "∞") -> str:
    """``[lo, hi]``; an unbounded end (None) is ``low_inf`` below and ∞ above."""
    lo, hi = (format(v, fmt) if v is not None else inf for v, inf in zip(lohi, (low_inf, "∞")))
    return f"[{lo}, {hi}]"


def _describe_below(f: dict) -> str:
    def one(k: str, v) -> str:   # a seed mean that never gets there has no CI worth printing
        return f"{k}:—" if v is None else f"{k}:{v} {_fmt_ci(f['first_step_ci'][k], '.0f')}"
    steps = ", ".join(one(k, v) for k, v in f["first_step"].items())
    seeds = ", ".join(f"{k} {v}" for k, v in f["seeds_reaching_by_horizon"].items())
    return (f"first step < {f['threshold']:g} (seed mean, {COVERAGE:.0%} bootstrap CI over seeds; — never): {steps}; "
            f"seeds reaching it by step {f['horizon']}: {seeds}")


def _describe_divergence(f: dict) -> str:
    def one(k: str, v: dict) -> str:   # (records without CIs: the verdict tests' hand-made ones)
        cis = (f", CI {_fmt_ci(v['end_over_min']['ci'])}; criterion ≥ 10×; end/half-way CI "
               f"{_fmt_ci(v['end_over_half_way']['ci'])}" if "end_over_min" in v else "; criterion ≥ 10×")
        return (f"{k}: retain {v['start']:.3g}→{v['half_way']:.3g}→{v['end']:.3g} "
                f"({v['end'] / v['min']:.1f}× its minimum{cis})")
    return "; ".join(one(k, v) for k, v in f["measured"].items())


def _describe_tradeoff(f: dict) -> str:
    if f["level"] is None:
        return "no common forget level reached"
    paired = ", ".join(f"{k}: {v}" for k, v in f["paired_comparison"].items())
    paired_ci = ", ".join(f"{k}: {v}" for k, v in f.get("paired_comparison_ci", {}).items())
    return (f"retain distance when forget first < {f['level']:g}: "
            + ", ".join(f"{k} {v:.3g}" for k, v in f["retain_at_level"].items() if v is not None)
            + "; min(GA, GA+RT) − max(NPO, NPO+RT) CI "
            + _fmt_ci(f["retain_gap_ci"]["ga,ga_rt - npo,npo_rt"]["ci"], low_inf="−∞")
            + f"; pairwise (seed mean) {paired}; pairwise (CI > 0) {paired_ci}")


@dataclass(frozen=True)
class Finding:
    """One of the paper's §4 claims: how it is measured, reported, and (when it fails) partly read."""

    key: str
    measure: Callable[[pd.DataFrame, dict, SyntheticConfig, Bootstrap], dict]
    describe: Callable[[dict], str]
    #: the weaker reading under which a claim that fails as stated partly holds, and that rule in words
    partly: Callable[[dict], bool] = lambda f: False
    partly_rule: str = ""
    #: the verdict when the strict criterion could not be evaluated
    unmeasured: str = C.NA


FINDINGS = (
    Finding("start_point", _start_point, _describe_start, unmeasured="n/a (stated for α=1)",
            partly=lambda f: (abs(f["measured"]["forget_distance"] - 1.70) <= 0.34
                              and f["measured"]["retain_distance"] <= 0.05),
            partly_rule="the seed-mean point (not its whole CI) is within those bounds"),
    Finding("forget_below_threshold", _forget_below_threshold, _describe_below,
            partly=lambda f: any(not v.startswith("0/") for k, v in f["seeds_reaching_by_horizon"].items()
                                 if k != "idk_rt"),
            partly_rule="some seeds of a method other than idk_rt reach it by the horizon"),
    Finding("ga_retain_diverges", _ga_retain_diverges, _describe_divergence,
            partly=lambda f: any(v["diverges"] for v in f["measured"].values()),
            partly_rule="one of GA, GA+RT diverges on its seed-mean curve"),
    Finding("npo_better_tradeoff", _npo_better_tradeoff, _describe_tradeoff,
            partly=lambda f: bool(f["paired_comparison"]) and all(f["paired_comparison"].values()),
            partly_rule="like for like on the seed-mean curves, NPO below GA and NPO+RT below GA+RT"),
)


def measure(curves: pd.DataFrame, cfg: SyntheticConfig) -> dict[str, dict]:
    """The four findings' records (``summary.json["findings"]``), measured on the seed-mean curves, with
    their seed-bootstrap CIs."""
    means = {m: _mean_curve(curves, m) for m in cfg.methods}
    boot = Bootstrap(curves, cfg.methods)
    return {f.key: f.measure(curves, means, cfg, boot) for f in FINDINGS}


def _claim(finding: Finding, rec: dict, alpha: float) -> C.Claim:
    holds = rec["holds"]
    verdict = (finding.unmeasured if holds is None else C.HOLDS if holds
               else C.PARTLY if finding.partly(rec) else C.FAILS)
    criterion = rec["criterion"] + (f"; partly if not, but {finding.partly_rule}" if finding.partly_rule else "")
    return C.Claim(f"§4 synthetic (α={alpha:g}): {rec['claim']}", finding.describe(rec), verdict,
                   f"synthetic_tradeoff_alpha{alpha:g}.png", criterion)


def claims(results: Results, cfg: SyntheticConfig) -> list[C.Claim]:
    """The report rows of one α: one finished claim per finding."""
    recs = results.summary["findings"]
    return [_claim(f, recs[f.key], cfg.alpha) for f in FINDINGS]
