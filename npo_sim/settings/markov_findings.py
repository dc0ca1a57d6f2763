"""What the Markov presets measure, and the claim each one settles.

Each preset has a :class:`Finding`:

* ``analyse(cfg, curves, summary)`` turns the curves into the numbers the claim is judged on (the
  ``findings`` block of ``summary.json``, with a ``verdict`` line that spells out the per-method result);
* ``claim(findings, cfg)`` builds the finished :class:`~npo_sim.claims.Claim` record. Its verdict is
  decided there and only there, from the numbers ``analyse`` kept;
* ``reads``: the methods the claim is about (a smoke run keeps exactly these).

The ``length`` claim is judged along the whole path: NPO's and SimNPO's |KL short − long| to the oracle
compared at matched forget progress (:func:`imbalance_path`, :func:`matched_share`), and over a declared
β × lr grid when the config has one. The ``memorization`` claim reads the change unlearning causes at NPO's
*best* step (the record step where the forget KL to the oracle, Forget1 and Forget2 pooled, is smallest),
measured from the target, not the step-0 split. The ``divergence`` preset fits linear and logarithmic laws
to ‖θ_t − θ_0‖ and to the forget NLL. Every criterion is also run on the null method's curves
(``markov.findings``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import claims as C
from ..metrics import linear_fit, log_fit

FORGET_SETS = ("forget1", "forget2")
#: the length and memorization claims compare NPO (summed log-likelihood) with SimNPO (length-normalised)
BALANCE_METHODS = ("npo", "simnpo")
#: the divergence claim: each method's law, and the law it must beat
DIVERGENCE_LAWS = {"ga": ("linear", "log"), "npo": ("log", "linear")}
#: a law holds when its fit reaches this R² (and beats the other law) for both quantities
LAW_R2 = 0.98


def figure_name(cfg) -> str:
    """The preset's figure file: ``markov_<preset>_<model>.png``."""
    return f"markov_{cfg.preset}_{cfg.model}.png"


def method_summary(df: pd.DataFrame) -> dict:
    """Final row, and the row where the forget KL to the oracle (test prefixes, F1 and F2 pooled) is smallest."""
    forget_kl = (df["kl_forget1_oracle"] + df["kl_forget2_oracle"]) / 2
    cols = [c for c in df.columns if c not in ("preset", "model", "method")]
    return {"final": df.iloc[-1][cols].astype(float).to_dict(),
            "best": df.loc[forget_kl.idxmin(), cols].astype(float).to_dict()}


# ==================================================================================================
# length and memorization: where each forget set ends up relative to the oracle
# ==================================================================================================
def _balance(summary: dict, at: str) -> dict:
    """Per method, at its ``best`` or ``final`` row: KLs and the test log-lik gap to the oracle per forget set."""
    orc = summary["reference"]["oracle"]
    out = {}
    for m, s in summary["methods"].items():
        row = s[at]
        out[m] = {"step": int(row["step"]), "kl_retain_true": row["kl_retain_true"],
                  "kl_retain_oracle": row["kl_retain_oracle"]}
        for f in FORGET_SETS:
            gap = row[f"ll_{f}_test"] - orc[f"ll_{f}_test"]  # < 0: below the oracle = over-unlearned
            out[m][f] = {"kl_true": row[f"kl_{f}_true"], "kl_oracle": row[f"kl_{f}_oracle"], "ll_gap_vs_oracle": gap,
                         "state": "over-unlearned" if gap < 0 else "under-unlearned"}
    return out


#: the length criterion compares NPO's and SimNPO's |KL short − KL long| at this many matched points
MATCH_POINTS = 50
#: share of the matched range on which NPO's imbalance must exceed SimNPO's (holds / partly)
LENGTH_HOLDS, LENGTH_PARTLY = 0.8, 0.5


def imbalance_path(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Along one method's path: (forget progress so far, |KL-to-oracle short − long|).

    Progress is how far the mean forget KL to the oracle (Forget1 and Forget2 test prefixes) has come down from
    the target's, as a running maximum (non-decreasing: a method that over-shoots keeps the progress it made);
    the imbalance is |KL(Forget2) − KL(Forget1)| to the oracle, Forget2 being the short set in the length
    preset. (The retain KL is no progress axis here: on the tabular model it first falls as the leaked
    forget mass leaves the retain rows.)"""
    df = df.sort_values("step")
    pooled = (df["kl_forget1_oracle"].to_numpy(float) + df["kl_forget2_oracle"].to_numpy(float)) / 2
    x = np.maximum.accumulate(pooled[0] - pooled)
    y = np.abs(df["kl_forget2_oracle"].to_numpy(float) - df["kl_forget1_oracle"].to_numpy(float))
    return x, y


def matched_share(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> dict:
    """Share of the common progress range on which path ``a``'s imbalance is larger than ``b``'s, each read
    where it first reached that progress (:func:`imbalance_path`). When one path never gets closer to the
    oracle (no common range: e.g. NPO's forget KL rises from step 0), the paths are compared record by
    record over the whole run instead (``matched`` = "record"; the methods must share their record steps),
    step 0 excluded. A path that never moves (the null method) ties with the other at step 0 and fails."""
    lo, hi = max(a[0][0], b[0][0]), min(a[0][-1], b[0][-1])
    if hi <= lo:
        n = min(len(a[1]), len(b[1]))
        ya, yb = a[1][1:n], b[1][1:n]
        if not len(ya):
            ya, yb = a[1][:1], b[1][:1]
        return {"share": float(np.mean(ya > yb)), "progress_range": [float(lo), float(hi)],
                "mean_gap": float(np.mean(ya - yb)), "matched": "record"}
    grid = np.linspace(lo, hi, MATCH_POINTS)

    def at(path):   # the value where each progress level was first reached (the running maximum has plateaus)
        x, y = path
        keep = np.append(True, x[1:] > x[:-1])
        return np.interp(grid, x[keep], y[keep])

    ya, yb = at(a), at(b)
    return {"share": float(np.mean(ya > yb)), "progress_range": [float(lo), float(hi)],
            "mean_gap": float(np.mean(ya - yb)), "matched": "progress"}


def _analyse_length(cfg, curves: pd.DataFrame, summary: dict) -> dict:
    res = {"at_best": _balance(summary, "best"), "final": _balance(summary, "final"),
           "note": f"forget1 long (L={cfg.length}), forget2 short (L={cfg.forget2_length}); 'best' = step "
                   "minimising the mean forget KL to the oracle; ll_gap = per-token test log-lik minus the oracle's "
                   "(<0 over-unlearned); 'path' compares |KL short − KL long| at matched forget progress"}
    npo, simnpo = BALANCE_METHODS
    if {npo, simnpo} <= set(curves.method):
        res["path"] = matched_share(imbalance_path(curves[curves.method == npo]),
                                    imbalance_path(curves[curves.method == simnpo]))
    parts = []
    if "path" in res:
        pth = res["path"]
        where = (f"of the matched forget-progress range [{pth['progress_range'][0]:.3g}, "
                 f"{pth['progress_range'][1]:.3g}] nats" if pth["matched"] == "progress" else
                 "of the record steps (no common forget progress: compared step by step)")
        parts.append(f"NPO's |KL short − long| above SimNPO's on {pth['share']:.0%} {where} (mean gap "
                     f"{pth['mean_gap']:+.3g})")
    for m in [m for m in BALANCE_METHODS if m in res["at_best"]]:
        b = res["at_best"][m]
        parts.append(f"{m}: at its best step {b['step']} KL-to-oracle short={b['forget2']['kl_oracle']:.4f} vs "
                     f"long={b['forget1']['kl_oracle']:.4f}")
    res["verdict"] = "; ".join(parts)
    return res


def length_verdict(f: dict) -> str:
    """The length criterion on one findings block (the path comparison)."""
    path = f.get("path")
    if path is None:
        return C.NA
    return C.HOLDS if path["share"] >= LENGTH_HOLDS else C.PARTLY if path["share"] >= LENGTH_PARTLY else C.FAILS


def _length_claim(f: dict, cfg) -> C.Claim:
    grid = f.get("robustness")
    verdict = length_verdict(f)
    measured = f["verdict"] or "n/a"
    if grid:
        verdict = C.robust({k: v["verdict"] for k, v in grid.items()}, verdict)
        measured += "; over the β × lr grid: " + ", ".join(f"{k} {v['share']:.0%}" for k, v in grid.items())
    return C.Claim("Markov length effect (SimNPO §5): NPO unlearns short and long forget data unevenly; "
                   "SimNPO's length normalisation evens it out", measured, verdict, figure_name(cfg),
                   criterion=f"along the path, at matched forget progress (the fall of the mean forget KL to the "
                             f"oracle so far; step by step when one method makes none): holds when NPO's "
                             f"|KL-to-oracle short − long| is above SimNPO's on ≥ {LENGTH_HOLDS:.0%} of the range "
                             f"both reach, partly on ≥ {LENGTH_PARTLY:.0%}; with a β × lr grid, 'holds' needs every "
                             "grid setting to hold")


#: how far (nats/token) unlearning must push Forget2's test log-lik below the target's to count as over-unlearning
#: it (the target already matches the oracle on Forget2, which it never saw)
OVER_UNLEARN = 0.05


def _change(summary: dict, m: str, at: str = "best") -> dict:
    """Per forget set, at the method's ``at`` row: its test log-lik change from the target (step 0) and its
    gap to the oracle."""
    row, tgt, orc = summary["methods"][m][at], summary["reference"]["target"], summary["reference"]["oracle"]
    return {f: {"change": row[f"ll_{f}_test"] - tgt[f"ll_{f}_test"],
                "gap_vs_oracle": row[f"ll_{f}_test"] - orc[f"ll_{f}_test"],
                "target_gap": tgt[f"ll_{f}_test"] - orc[f"ll_{f}_test"]} for f in FORGET_SETS} | {
        "step": int(row["step"])}


def _over_f2_under_f1(c: dict) -> bool:
    """Unlearning pushed Forget2 (never learned) more than OVER_UNLEARN below the target, while Forget1
    (memorized) is still above the oracle."""
    return c["forget2"]["change"] < -OVER_UNLEARN and c["forget1"]["gap_vs_oracle"] > 0


def _analyse_memorization(cfg, curves: pd.DataFrame, summary: dict) -> dict:
    res = {"at_best": _balance(summary, "best"), "final": _balance(summary, "final"),
           "note": "forget2 left out of pretraining; change = per-token test log-lik at the best step minus the "
                   "target's (step 0); gap = minus the oracle's"}
    parts = []
    for m in [m for m in BALANCE_METHODS if m in summary["methods"]]:
        c = _change(summary, m)
        res.setdefault("change", {})[m] = c
        yes = _over_f2_under_f1(c)
        res[f"{m}_over_f2_under_f1"] = bool(yes)
        parts.append(f"{m} at its best step {c['step']}: forget2 change {c['forget2']['change']:+.4f} (gap "
                     f"{c['forget2']['target_gap']:+.4f}→{c['forget2']['gap_vs_oracle']:+.4f}), forget1 gap "
                     f"{c['forget1']['target_gap']:+.4f}→{c['forget1']['gap_vs_oracle']:+.4f} nats/token -> "
                     f"{'yes' if yes else 'no'}")
    res["verdict"] = "; ".join(parts)
    return res


def _memorization_claim(f: dict, cfg) -> C.Claim:
    npo = BALANCE_METHODS[0]
    return C.Claim("Markov memorization: NPO over-unlearns the unmemorized Forget2 and under-unlearns Forget1",
                   f["verdict"] or "n/a", C.verdict(f.get(f"{npo}_over_f2_under_f1")), figure_name(cfg),
                   criterion=f"holds when, at NPO's best step, unlearning has lowered its per-token Forget2 test "
                             f"log-lik by > {OVER_UNLEARN:g} nats/token from the target's (the change unlearning "
                             "causes, not the step-0 split) and its Forget1 test log-lik is still above the oracle's")


# ==================================================================================================
# divergence: linear (GA) versus logarithmic (NPO) growth
# ==================================================================================================
def divergence_fits(curves: pd.DataFrame, fit_from: int) -> dict:
    """Linear and log fits of ‖θ_t−θ_0‖ and of the forget NLL (−mean summed log-lik) against t, per method."""
    out = {}
    for m, df in curves.groupby("method", sort=False):
        df = df[(df.step >= max(fit_from, 1)) & np.isfinite(df.param_dist) & np.isfinite(df.logp_forget)]
        if len(df) < 3:
            continue  # diverged too early to fit
        t = df.step.to_numpy(float)
        out[m] = {f"{name}_{kind}": fit(t, y).as_dict()
                  for name, y in (("norm", df.param_dist.to_numpy()), ("forget_nll", -df.logp_forget.to_numpy()))
                  for kind, fit in (("linear", linear_fit), ("log", log_fit))}
        # growth exponent p of ‖θ_t−θ_0‖ ∝ t^p over the window: 1 for linear growth, → 0 for logarithmic
        out[m]["norm_loglog"] = linear_fit(np.log(t), np.log(np.maximum(df.param_dist.to_numpy(), 1e-300))).as_dict()
    return out


def _law_holds(fits: dict, law: str, other: str) -> bool:
    """The ``law`` fit has R² > LAW_R2 and at least the ``other`` fit's R², for the norm and the forget NLL."""
    return all(fits[f"{q}_{law}"]["r2"] > LAW_R2 and fits[f"{q}_{law}"]["r2"] >= fits[f"{q}_{other}"]["r2"]
               for q in ("norm", "forget_nll"))


def _r2_by_window(curves: pd.DataFrame, cfg, fit_from: int) -> dict:
    """The fits' R² (and the log-log slope of the norm) from several first steps."""
    windows = {f"from_{w}": divergence_fits(curves, w)
               for w in sorted({1, fit_from, cfg.steps // 30, cfg.steps // 10})}
    return {w: {m: {**{k: v["r2"] for k, v in f.items() if k != "norm_loglog"},
                    "norm_loglog_slope": f["norm_loglog"]["slope"]} for m, f in fw.items()}
            for w, fw in windows.items()}


def _analyse_divergence(cfg, curves: pd.DataFrame, summary: dict) -> dict:
    fit_from = cfg.fit_from or max(1, cfg.steps // 100)
    fits = divergence_fits(curves, fit_from)
    res = {"fits": fits, "fit_range": [fit_from, cfg.steps], "r2_by_window": _r2_by_window(curves, cfg, fit_from),
           "note": "fits over record steps >= fit_from (default 1% of the run: the laws are asymptotic); "
                   "r2_by_window repeats them from other first steps"}
    parts = []
    for m, (law, other) in DIVERGENCE_LAWS.items():
        if m in fits:
            f = fits[m]
            ok = _law_holds(f, law, other)
            res[f"{m}_{law}_law_holds"] = bool(ok)
            parts.append(f"{m}: norm R² {law} {f[f'norm_{law}']['r2']:.4f} vs {other} {f[f'norm_{other}']['r2']:.4f}, "
                         f"forget NLL R² {law} {f[f'forget_nll_{law}']['r2']:.4f} vs {other} "
                         f"{f[f'forget_nll_{other}']['r2']:.4f} -> {C.verdict(ok)}")
    res["verdict"] = "; ".join(parts)
    return res


def _divergence_claim(f: dict, cfg) -> C.Claim:
    oks = [f.get(f"{m}_{law}_law_holds") for m, (law, _) in DIVERGENCE_LAWS.items()]
    return C.Claim(f"Divergence law on sequences ({cfg.model} Markov model): GA linear, NPO logarithmic",
                   f["verdict"], C.all_any(oks), figure_name(cfg),
                   criterion=f"a method's law holds when its fit has R² > {LAW_R2} and ≥ the other law's, for both "
                             "‖θ_t−θ_0‖ and the forget NLL; holds if GA's linear and NPO's log law both do, "
                             "partly if one does")


# ==================================================================================================
# per-preset dispatch
# ==================================================================================================
@dataclass(frozen=True)
class Finding:
    analyse: Callable[..., dict]          #: (cfg, curves, summary) -> the summary's ``findings`` block
    claim: Callable[[dict, object], C.Claim]  #: (findings, cfg) -> the finished claim record
    reads: tuple[str, ...]                #: the methods the claim is about


FINDINGS = {
    "length": Finding(_analyse_length, _length_claim, BALANCE_METHODS),
    "memorization": Finding(_analyse_memorization, _memorization_claim, BALANCE_METHODS),
    "divergence": Finding(_analyse_divergence, _divergence_claim, tuple(DIVERGENCE_LAWS)),
}
