"""What the Markov presets measure, and the claim each one settles.

Each preset has a :class:`Finding`:

* ``analyse(cfg, curves, summary)`` turns the curves into the numbers the claim is judged on (the
  ``findings`` block of ``summary.json``, with a ``verdict`` line that spells out the per-method result);
* ``claim(findings, cfg)`` builds the finished :class:`~npo_sim.claims.Claim` record. Its verdict is
  decided there and only there, from the numbers ``analyse`` kept;
* ``reads``: the methods the claim is about (a smoke run keeps exactly these).

Balance presets (``length``, ``memorization``) are read at each method's *best* step: the record
step where the forget KL to the oracle (Forget1 and Forget2 test prefixes pooled) is smallest. The
``divergence`` preset fits linear and logarithmic laws to ‖θ_t − θ_0‖ and to the forget NLL.
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


def _analyse_length(cfg, curves: pd.DataFrame, summary: dict) -> dict:
    res = {"at_best": _balance(summary, "best"), "final": _balance(summary, "final"),
           "note": f"forget1 long (L={cfg.length}), forget2 short (L={cfg.forget2_length}); 'best' = step "
                   "minimising the mean forget KL to the oracle; ll_gap = per-token test log-lik minus the oracle's "
                   "(<0 over-unlearned)"}
    parts = []
    for m in [m for m in BALANCE_METHODS if m in res["at_best"]]:
        b = res["at_best"][m]
        parts.append(f"{m}: at its best step {b['step']} KL-to-oracle short={b['forget2']['kl_oracle']:.4f} vs "
                     f"long={b['forget1']['kl_oracle']:.4f} "
                     f"(short {b['forget2']['state']}, long {b['forget1']['state']})")
    res["verdict"] = "; ".join(parts)
    return res


def _length_imbalance(best_row: dict) -> float:
    """|KL to the oracle on short (Forget2) − long (Forget1)| test prefixes."""
    return abs(best_row["forget2"]["kl_oracle"] - best_row["forget1"]["kl_oracle"])


def _length_claim(f: dict, cfg) -> C.Claim:
    best = f.get("at_best", {})
    npo, simnpo = BALANCE_METHODS
    ok = _length_imbalance(best[npo]) > _length_imbalance(best[simnpo]) if {npo, simnpo} <= set(best) else None
    return C.Claim("Markov length effect (SimNPO §5): NPO unlearns short and long forget data unevenly; "
                   "SimNPO's length normalisation evens it out", f["verdict"] or "n/a", C.verdict(ok), figure_name(cfg),
                   criterion="holds when, at each method's best step, NPO's |KL-to-oracle short − long| is larger "
                             "than SimNPO's")


def _over_f2_under_f1(best_row: dict) -> bool:
    """Forget2 (left out of pretraining) ends below the oracle's test log-lik and Forget1 above it."""
    return best_row["forget2"]["ll_gap_vs_oracle"] < 0 and best_row["forget1"]["ll_gap_vs_oracle"] > 0


def _analyse_memorization(cfg, curves: pd.DataFrame, summary: dict) -> dict:
    res = {"at_best": _balance(summary, "best"), "final": _balance(summary, "final"),
           "note": "forget2 left out of pretraining; over-unlearned = test log-lik below the oracle's"}
    parts = []
    for m in [m for m in BALANCE_METHODS if m in res["at_best"]]:
        b = res["at_best"][m]
        yes = _over_f2_under_f1(b)
        res[f"{m}_over_f2_under_f1"] = bool(yes)
        parts.append(f"{m}: forget2 gap {b['forget2']['ll_gap_vs_oracle']:+.4f}, forget1 gap "
                     f"{b['forget1']['ll_gap_vs_oracle']:+.4f} nats/token -> {'yes' if yes else 'no'}")
    res["verdict"] = "; ".join(parts)
    return res


def _memorization_claim(f: dict, cfg) -> C.Claim:
    npo = BALANCE_METHODS[0]
    return C.Claim("Markov memorization: NPO over-unlearns the unmemorized Forget2 and under-unlearns Forget1",
                   f["verdict"] or "n/a", C.verdict(f.get(f"{npo}_over_f2_under_f1")), figure_name(cfg),
                   criterion="holds when, at NPO's best step, its per-token test log-lik is below the oracle's on "
                             "Forget2 and above it on Forget1")


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
