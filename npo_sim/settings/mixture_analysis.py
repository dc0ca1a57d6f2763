"""The §4 mixture's analysis: per-method summaries, the paper's four findings, and their claim records.

Each finding is one :class:`Finding`: ``measure`` computes its numbers from the curves table (the record
saved under ``summary.json["findings"]``, with the strict criterion's ``holds``), ``describe`` writes the
report's "measured" cell, and ``partly`` is the weaker reading under which a claim that fails as
stated partly holds. :func:`claims` turns the records into :class:`~npo_sim.claims.Claim` rows; the
verdict is decided there and nowhere else.
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
LEVELS = (0.1, 0.05, 0.02)


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
def _start_point(curves, means, cfg) -> dict:
    first = next(iter(means.values())).iloc[0]
    start = {"forget_distance": float(first["forget_distance"]), "retain_distance": float(first["retain_distance"])}
    return {
        "claim": "for alpha=1 the trade-off curves start near (forget 1.70, retain 0.02)",
        "criterion": "forget distance at step 0 within 20% of 1.70 and retain distance <= 0.05 (alpha=1 only)",
        "measured": start, "paper": {"forget_distance": 1.70, "retain_distance": 0.02},
        "holds": (abs(start["forget_distance"] - 1.70) <= 0.34 and start["retain_distance"] <= 0.05)
        if cfg.alpha == 1.0 else None,
    }


def _forget_below_threshold(curves, means, cfg) -> dict:
    first_below = {m: _first_below(mean.index.to_numpy(), mean["forget_distance"].to_numpy(), cfg.threshold)
                   for m, mean in means.items()}
    paper = paper_table1()
    reach = {m: (s is not None and s <= HORIZON) for m, s in first_below.items()}
    holds = None
    if HORIZON <= cfg.steps and all(m in means for m in paper):
        holds = all(reach[m] for m in paper if m != "idk_rt") and not reach["idk_rt"]
    seeds_reached = {}
    for m in means:
        per_seed = _per_seed_first_below(curves[curves["method"] == m], cfg.threshold)
        seeds_reached[m] = f"{sum(s is not None and s <= HORIZON for s in per_seed)}/{len(per_seed)}"
    return {
        "claim": f"every method except IDK+RT gets the forget distance below {cfg.threshold} within {HORIZON} steps",
        "criterion": "first record step where the seed-mean forget distance < threshold; paper methods only; "
                     "holds if every paper method but idk_rt reaches it by the horizon and idk_rt does not",
        "threshold": cfg.threshold, "horizon": HORIZON, "first_step": first_below,
        "reached_by_horizon": reach, "seeds_reaching_by_horizon": seeds_reached,
        "min_forget_distance_per_seed": {m: curves[curves["method"] == m].groupby("seed")["forget_distance"].min()
                                         .round(6).to_dict() for m in means},
        "holds": holds,
    }


def _ga_retain_diverges(curves, means, cfg) -> dict:
    pair, div = ("ga", "ga_rt"), {}
    for m in pair:
        if m in means:
            r = means[m]["retain_distance"]
            half = r.index[np.searchsorted(r.index, cfg.steps // 2)]
            div[m] = {"start": float(r.iloc[0]), "half_way": float(r.loc[half]), "end": float(r.iloc[-1]),
                      "min": float(r.min()),
                      "diverges": bool(r.iloc[-1] > r.loc[half] and r.iloc[-1] >= 10 * r.min())}
    return {
        "claim": "the retain distance of GA and GA+RT diverges",
        "criterion": "seed-mean retain distance still increasing over the second half (end > half-way) "
                     "and end >= 10 x its minimum along the run",
        "measured": div, "holds": all(v["diverges"] for v in div.values()) if all(m in means for m in pair) else None,
    }


def _retain_at_forget_level(mean: pd.DataFrame, level: float):
    """Retain distance (mean curve) at the first record step whose forget distance is below ``level``."""
    step = _first_below(mean.index.to_numpy(), mean["forget_distance"].to_numpy(), level)
    return (None, None) if step is None else (step, float(mean.loc[step, "retain_distance"]))


def _npo_better_tradeoff(curves, means, cfg) -> dict:
    levels = sorted({*LEVELS, cfg.threshold}, reverse=True)
    table = {m: {f"{lv:g}": dict(zip(("step", "retain_distance"), _retain_at_forget_level(mean, lv)))
                 for lv in levels} for m, mean in means.items()}
    pair = ("npo", "npo_rt", "ga", "ga_rt")
    have = all(m in means for m in pair)
    common = [lv for lv in levels if have and all(table[m][f"{lv:g}"]["step"] is not None for m in pair)]
    level = common[-1] if common else None
    holds, r_at, ranked, paired = None, {}, [], {}
    if level is not None:
        r_at = {m: table[m][f"{level:g}"]["retain_distance"] for m in table}
        holds = max(r_at["npo"], r_at["npo_rt"]) < min(r_at["ga"], r_at["ga_rt"])
        paired = {"npo<ga": r_at["npo"] < r_at["ga"], "npo_rt<ga_rt": r_at["npo_rt"] < r_at["ga_rt"]}
        ranked = sorted((m for m in r_at if r_at[m] is not None), key=lambda m: r_at[m])
    return {
        "claim": "NPO and NPO+RT reach a better forget/retain trade-off (than GA and GA+RT)",
        "criterion": "on the seed-mean curves, the retain distance when the forget distance first drops below "
                     "the smallest level of {0.1, 0.05, 0.02, threshold} that NPO, NPO+RT, GA and GA+RT all "
                     "reach: both NPO and NPO+RT below both GA and GA+RT",
        "level": level, "retain_at_level": r_at, "ranking_at_level": ranked,
        "paired_comparison": paired,   # the like-for-like reading: NPO vs GA, NPO+RT vs GA+RT
        "retain_at_forget_level": table, "holds": holds,
    }


# --------------------------------------------------------------------------------------------------
# the paper's four findings: report cells
# --------------------------------------------------------------------------------------------------
def _describe_start(f: dict) -> str:
    m = f["measured"]
    return f"start (forget {m['forget_distance']:.3f}, retain {m['retain_distance']:.3f}); paper (1.70, 0.02)"


def _describe_below(f: dict) -> str:
    steps = ", ".join(f"{k}:{'—' if v is None else v}" for k, v in f["first_step"].items())
    seeds = ", ".join(f"{k} {v}" for k, v in f["seeds_reaching_by_horizon"].items())
    return f"first step < {f['threshold']:g} (seed mean): {steps}; seeds reaching it by step {f['horizon']}: {seeds}"


def _describe_divergence(f: dict) -> str:
    return "; ".join(f"{k}: retain {v['start']:.3g}→{v['half_way']:.3g}→{v['end']:.3g} "
                     f"({v['end'] / v['min']:.1f}× its minimum; criterion ≥ 10×)" for k, v in f["measured"].items())


def _describe_tradeoff(f: dict) -> str:
    if f["level"] is None:
        return "no common forget level reached"
    paired = ", ".join(f"{k}: {v}" for k, v in f["paired_comparison"].items())
    return (f"retain distance when forget first < {f['level']:g}: "
            + ", ".join(f"{k} {v:.3g}" for k, v in f["retain_at_level"].items() if v is not None)
            + f"; pairwise {paired}")


@dataclass(frozen=True)
class Finding:
    """One of the paper's §4 claims: how it is measured, reported, and (when it fails) partly read."""

    key: str
    measure: Callable[[pd.DataFrame, dict, SyntheticConfig], dict]
    describe: Callable[[dict], str]
    #: the weaker reading under which a claim that fails as stated partly holds, and that rule in words
    partly: Callable[[dict], bool] = lambda f: False
    partly_rule: str = ""
    #: the verdict when the strict criterion could not be evaluated
    unmeasured: str = C.NA


FINDINGS = (
    Finding("start_point", _start_point, _describe_start, unmeasured="n/a (stated for α=1)"),
    Finding("forget_below_threshold", _forget_below_threshold, _describe_below,
            partly=lambda f: any(not v.startswith("0/") for k, v in f["seeds_reaching_by_horizon"].items()
                                 if k != "idk_rt"),
            partly_rule="some seeds of a method other than idk_rt reach it by the horizon"),
    Finding("ga_retain_diverges", _ga_retain_diverges, _describe_divergence,
            partly=lambda f: any(v["diverges"] for v in f["measured"].values()),
            partly_rule="one of GA, GA+RT diverges"),
    Finding("npo_better_tradeoff", _npo_better_tradeoff, _describe_tradeoff,
            partly=lambda f: bool(f["paired_comparison"]) and all(f["paired_comparison"].values()),
            partly_rule="like for like, NPO below GA and NPO+RT below GA+RT"),
)


def measure(curves: pd.DataFrame, cfg: SyntheticConfig) -> dict[str, dict]:
    """The four findings' records (``summary.json["findings"]``), measured on the seed-mean curves."""
    means = {m: _mean_curve(curves, m) for m in cfg.methods}
    return {f.key: f.measure(curves, means, cfg) for f in FINDINGS}


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
