"""The TOFU rows of ``figures/REPORT.md``, judged on the committed tofu-mini study (``figures/tofu_mini/``).

Each row states a claim of the NPO paper (Zhang et al., 2024) as the paper states it, and is judged on
the study's *test* questions at the configuration its declared tuning protocol selected
(:mod:`full_scale.study`). Uncertainty comes from the seeds: a metric's interval is the 95%
t-interval across the unlearning seeds (``seeds.csv``); with one seed, the 95% bootstrap interval over
test questions. A claim **holds** only when those intervals support it:

* *better balance*: on every split, the best NPO-family method that keeps MU has an FQ interval above
  the target's and above the best GA-family method that keeps MU (or no GA-family method keeps MU);
* *50% or more*: on the largest forget split, an NPO-family method keeps MU with an FQ interval above
  0.05 (the oracle's answers not told apart at the 5% level), and no GA-family method does;
* the *divergence law* rows read the SGD constant-lr runs (``law.csv``, :mod:`full_scale.laws`);
* *privleak* and *fluency* compare intervals with the target's.

"Keeps MU" is mean MU ≥ ``mu_fraction`` (0.9) × the target's MU on the same split. The untouched
target (FQ at its own level) and a do-nothing method (the target's numbers) fail every row.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from npo_sim.claims import FAILS, HOLDS, NA, PARTLY, Claim, all_any
from npo_sim.losses import label, methods

from .report import LAST_COLUMNS

#: FQ (a KS p-value) above which the unlearned model's forget answers are not told apart from the oracle's at 5%
REASONABLE_FQ = 0.05
#: how far below the target's judge log-likelihood per token NPO's may sit and still count as fluent
FLUENT_TOLERANCE = 1.0


class Intervals:
    """``get(split, method, metric) -> (mean, lo, hi)``: across seeds when there are several, else the
    bootstrap CI of the reported run; the target's from its own eval (bootstrap)."""

    def __init__(self, summary: dict):
        self.last = pd.DataFrame(summary.get("last_epoch") or [], columns=list(LAST_COLUMNS))
        seeds = (summary.get("seeds") or {}).get("across_seeds") or []
        self.seeds = pd.DataFrame(seeds)
        self.n_seeds = len((summary.get("seeds") or {}).get("seeds") or []) or 1
        self.source = f"95% t-interval over {self.n_seeds} seeds" if self.n_seeds > 1 else \
            "95% bootstrap CI over test questions (one seed)"

    def get(self, split: str, method: str, metric: str) -> tuple[float, float, float]:
        if method != "target" and not self.seeds.empty:
            r = self.seeds[(self.seeds.split == split) & (self.seeds.method == method) & (self.seeds.metric == metric)]
            if len(r) and r.n_seeds.iloc[0] > 1:
                return float(r["mean"].iloc[0]), float(r.lo.iloc[0]), float(r.hi.iloc[0])
        r = self.last[(self.last.split == split) & (self.last.method == method)]
        if not len(r) or metric not in r:
            return math.nan, math.nan, math.nan
        r = r.iloc[0]
        return float(r[metric]), float(r[f"{metric}_lo"]), float(r[f"{metric}_hi"])

    def splits(self) -> list[str]:
        return list(dict.fromkeys(self.last.split))

    def methods_on(self, split: str) -> list[str]:
        return [m for m in self.last[self.last.split == split].method if m != "target"]


def _fmt(v: tuple[float, float, float], f: str = ".2g") -> str:
    m, lo, hi = v
    if not math.isfinite(m):
        return "—"
    return f"{m:{f}} [{lo:{f}}, {hi:{f}}]" if math.isfinite(lo) and math.isfinite(hi) else f"{m:{f}}"


def _best_keeping_mu(iv: Intervals, split: str, family: str, mu_fraction: float):
    """The family's method with the highest mean FQ among those whose mean MU ≥ the floor (or None)."""
    floor = mu_fraction * iv.get(split, "target", "model_utility")[0]
    fam = set(methods(family=family))
    kept = [(iv.get(split, m, "forget_quality"), m) for m in iv.methods_on(split)
            if m in fam and iv.get(split, m, "model_utility")[0] >= floor]
    kept = [(fq, m) for fq, m in kept if math.isfinite(fq[0])]
    return max(kept, key=lambda x: x[0][0]) if kept else None


def _balance(iv: Intervals, tag: str, mu_fraction: float) -> Claim:
    parts, oks = [], []
    for split in iv.splits():
        t = iv.get(split, "target", "forget_quality")
        npo, ga = _best_keeping_mu(iv, split, "npo", mu_fraction), _best_keeping_mu(iv, split, "ga", mu_fraction)
        if npo is None:
            oks.append(False)
            parts.append(f"{split}: no NPO-family method keeps MU")
            continue
        (fq, m) = npo
        above_target = fq[1] > t[2] if math.isfinite(t[2]) else fq[1] > t[0]
        above_ga = ga is None or fq[1] > ga[0][2]
        oks.append(bool(above_target and above_ga))
        parts.append(f"{split}: {label(m)} FQ {_fmt(fq)} vs "
                     + (f"{label(ga[1])} {_fmt(ga[0])}" if ga else "no GA-family method keeping MU")
                     + f" (target {_fmt(t)})")
    return Claim(f"{tag}: NPO-based methods strike a better balance between forgetting and utility than GA-based "
                 "ones", "; ".join(parts) + f"; {iv.source}", all_any(oks), "tofu_mini/seeds.md",
                 f"holds when on every split the best NPO-family method with mean MU ≥ {mu_fraction:g} × target MU has "
                 "its FQ interval above the target's FQ interval and above the best GA-family method keeping MU (or no "
                 "GA-family method keeps MU); partly when on some splits")


def _forget50(iv: Intervals, tag: str, mu_fraction: float) -> Claim:
    big = [s for s in iv.splits() if s.endswith(("forget50", "forget90"))]
    if not big:
        return Claim(f"{tag}: NPO-based methods are the first to reach reasonable results when forgetting 50% or "
                     "more", "no 50% or larger forget split in the study", NA, "tofu_mini/seeds.md",
                     "needs mini-forget50 or mini-forget90")
    split = big[-1]
    floor = mu_fraction * iv.get(split, "target", "model_utility")[0]

    def reasonable(family):
        out = []
        for m in iv.methods_on(split):
            if m in set(methods(family=family)) and iv.get(split, m, "model_utility")[0] >= floor:
                fq = iv.get(split, m, "forget_quality")
                out.append((m, fq, fq[1] > REASONABLE_FQ, fq[0] > REASONABLE_FQ))
        return out

    npo, ga = reasonable("npo"), reasonable("ga")
    npo_ci = [m for m, _, ci, _ in npo if ci]
    npo_mean = [m for m, _, _, mean in npo if mean]
    ga_any = [m for m, _, _, mean in ga if mean]
    ok = HOLDS if npo_ci and not ga_any else PARTLY if npo_mean and not ga_any else FAILS
    best = max(npo, key=lambda x: x[1][0]) if npo else None
    meas = (f"{split}: " + (f"best NPO-family method keeping MU {label(best[0])} FQ {_fmt(best[1])}" if best
                            else "no NPO-family method keeps MU")
            + (f"; GA-family keeping MU with mean FQ > {REASONABLE_FQ:g}: {', '.join(map(label, ga_any))}" if ga_any
               else f"; no GA-family method keeps MU with mean FQ > {REASONABLE_FQ:g}") + f"; {iv.source}")
    return Claim(f"{tag}: NPO-based methods are the first to reach reasonable results when forgetting 50% or more",
                 meas, ok, "tofu_mini/seeds.md",
                 f"holds when on the largest forget split an NPO-family method with mean MU ≥ {mu_fraction:g} × target "
                 f"MU has its FQ interval above {REASONABLE_FQ:g} and no GA-family method keeping MU has mean FQ above "
                 f"{REASONABLE_FQ:g}; partly when only the NPO method's mean is above it")


def _law_ga_npo(law: pd.DataFrame, tag: str, settings: dict) -> Claim:
    rows = {r.method: r for r in law.itertuples()} if len(law) else {}
    if "ga" not in rows or "npo" not in rows:
        return Claim(f"{tag}: divergence law on the LM (GA linear, NPO logarithmic in the step)",
                     "no SGD law runs of GA and NPO", NA, "tofu_mini/law.md", "needs the study's law runs")
    ga, npo = rows["ga"], rows["npo"]
    ok_ga = ga.follows is True
    ok_npo = npo.follows is True
    apart = ga.final_distance > 2 * npo.final_distance
    s = settings or {}
    meas = (f"SGD lr {s.get('lr', '?')}, {ga.steps} steps on {s.get('split', '?')}: ‖θ−θ_0‖ GA "
            f"{ga.final_distance:.3g} (growth exponent p {ga.growth_exponent:.2f}) vs NPO {npo.final_distance:.3g} "
            f"(p {npo.growth_exponent:.2f})")
    return Claim(f"{tag}: divergence law on the LM (GA linear, NPO logarithmic in the step)", meas,
                 HOLDS if ok_ga and ok_npo and apart else PARTLY if apart else FAILS, "tofu_mini/law_curves.png",
                 "plain SGD at a constant lr, no weight decay: holds when GA's growth exponent 0.8 ≤ p ≤ 1.25, NPO's "
                 "p < 0.5 and GA ends more than 2× farther from θ_0; partly when only the last holds")


def _law_all(law: pd.DataFrame, tag: str) -> Claim:
    judged = law[law.follows.notna()] if len(law) else law
    if not len(judged):
        return Claim(f"{tag}: every method's divergence follows the law its gradient weight's tail predicts",
                     "no law runs", NA, "tofu_mini/law.md", "needs the study's law runs")
    ok = [bool(f) for f in judged.follows]
    yes = [label(m) for m, f in zip(judged.method, ok) if f]
    no = [f"{label(r.method)} ({r.predicted}, p {r.growth_exponent:.2f})" for r, f in zip(judged.itertuples(), ok)
          if not f]
    return Claim(f"{tag}: every method's divergence follows the law its gradient weight's tail predicts",
                 f"{len(yes)} of {len(ok)} follow" + (f"; not: {', '.join(no)}" if no else ""), all_any(ok),
                 "tofu_mini/law.md",
                 "per method with a law (linear, log, converges), the SGD run's growth exponent p of ‖θ−θ_0‖ over the "
                 "second half: linear 0.8 ≤ p ≤ 1.25, log p < 0.5, converges p < 0.1; holds when all follow, partly "
                 "when some")


def _privleak(iv: Intervals, tag: str) -> Claim:
    key = "privleak_min_k_plus_plus"
    fam = set(methods(family="npo"))
    parts, oks = [], []
    for split in iv.splits():
        t = iv.get(split, "target", key)[0]
        if not math.isfinite(t):
            continue
        cells = []
        for m in iv.methods_on(split):
            if m in fam:
                v = iv.get(split, m, key)
                oks.append(bool(-abs(t) < v[1] and v[2] < abs(t)) if math.isfinite(v[1]) else None)
                cells.append(f"{label(m)} {_fmt(v, '.1f')}")
        parts.append(f"{split}: target {t:.1f}; " + ", ".join(cells))
    return Claim(f"{tag}: NPO-based unlearning moves privleak (Min-K%++ MIA, forget vs holdout, against the oracle) "
                 "toward 0", "; ".join(parts) + f"; {iv.source}" if parts else "n/a", all_any(oks),
                 "tofu_mini/seeds.md",
                 "holds when every NPO-family method's privleak interval lies strictly inside (−|target|, |target|) on "
                 "every split; partly when some do")


def _fluency(iv: Intervals, tag: str) -> Claim:
    key = "fluency_judge_logp"
    parts, worse, fluent = [], [], []
    for split in iv.splits():
        ga, npo, t = iv.get(split, "ga", key), iv.get(split, "npo", key), iv.get(split, "target", key)
        if not (math.isfinite(ga[0]) and math.isfinite(npo[0])):
            continue
        worse.append(bool(ga[2] < npo[1]) if math.isfinite(ga[2]) and math.isfinite(npo[1]) else None)
        if math.isfinite(t[1]):
            fluent.append(bool(npo[2] >= t[1] - FLUENT_TOLERANCE))
        parts.append(f"{split}: judge log-lik/token GA {_fmt(ga, '.2f')} vs NPO {_fmt(npo, '.2f')} vs target "
                     f"{_fmt(t, '.2f')}")
    ok = all_any(worse)
    if ok == HOLDS and fluent and not all(fluent):
        ok = PARTLY
    return Claim(f"{tag}: NPO's answers stay fluent while GA's turn to gibberish",
                 "; ".join(parts) + f"; {iv.source}" if parts else "n/a", ok, "tofu_mini/seeds.md",
                 "holds when on every split GA's judge log-likelihood per token (under the oracle) has its interval "
                 f"entirely below NPO's and NPO's reaches within {FLUENT_TOLERANCE:g} nat/token of the target's "
                 "interval; partly when GA is worse but NPO is not fluent, or on some splits only")


def claims(fig_dir: Path) -> list[Claim]:
    """The TOFU rows of ``figures/REPORT.md``, from ``fig_dir/tofu_mini/`` (the committed outputs of
    ``npo-tofu study --preset mini``: ``summary.json`` and ``law.csv``)."""
    mini = Path(fig_dir) / "tofu_mini"
    if not (mini / "summary.json").exists():
        return [Claim("TOFU at mini scale: NPO-based methods reach better forget quality at kept model utility than "
                      "GA-based ones", "not run yet: `make tofu-mini`", NA, "tofu_mini/",
                      "measured by `npo-tofu study --preset mini` (make tofu-mini)")]
    s = json.loads((mini / "summary.json").read_text())
    settings = s.get("settings", {})
    tag = f"TOFU mini ({settings.get('model', '?')})"
    mu_fraction = float(s.get("mu_fraction", 0.9))
    iv = Intervals(s)
    law = pd.read_csv(mini / "law.csv") if (mini / "law.csv").is_file() else pd.DataFrame(
        columns=["method", "follows", "final_distance", "growth_exponent", "steps", "predicted"])
    if "follows" in law:
        law["follows"] = law["follows"].map(lambda v: None if pd.isna(v) else bool(v) if not isinstance(v, str)
                                            else v == "True")
    return [_balance(iv, tag, mu_fraction), _forget50(iv, tag, mu_fraction),
            _law_ga_npo(law, tag, settings.get("law_runs", {})), _law_all(law, tag), _privleak(iv, tag),
            _fluency(iv, tag)]


def sections(fig_dir: Path) -> list[tuple[str, str]]:
    """Extra ``figures/REPORT.md`` sections from full_scale's committed outputs, as ``(title, markdown)``:
    the dialect comparison (``tofu_mini/dialects.md``, written by ``npo-tofu compare-dialects``)."""
    path = Path(fig_dir) / "tofu_mini" / "dialects.md"
    if not path.is_file():
        return []
    intro = ("The tofu-mini study (mini-forget10) run end to end, fine-tuning included, in each dialect "
             "(`npo-tofu study --dialect NAME --select last`), with tiny-llama 1M; last-epoch FQ and MU per method. "
             "`max abs Δ` is the largest move from the first column's dialect. The dialects' conventions are "
             "the table in README.md (Dialects).")
    return [("How much do conventions move the numbers?", intro + "\n\n" + path.read_text().strip())]

