"""Theorem-2 lab, the verdicts: the paper's claims judged on the summary, and the CLI's short table.

Each claim is one :class:`_Rule`: its statement, its figure, the criterion in words, the summary
entries it reads, and a ``judge`` that turns those entries into the measured text and the verdict (the
one place the verdict is decided). A rule whose entries a run did not produce (e.g. ``--methods ga``
has no NPO) is reported as not measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .. import claims as C
from ..losses import label
from ..study import Results

FIG_DIVERGENCE = "theory_divergence.png"
FIG_SWEEP = "theory_beta_sweep.png"
FIG_LAWS = "theory_laws.png"


@dataclass(frozen=True)
class _Rule:
    claim: str
    figure: str
    criterion: str
    needs: tuple[str, ...]                     #: summary entries (non-empty) the judge reads
    judge: Callable[[dict], tuple[str, str]]   #: summary -> (measured, verdict)

    def __call__(self, s: dict) -> C.Claim:
        measured, verdict = self.judge(s) if all(s.get(k) for k in self.needs) else ("n/a", C.NA)
        return C.Claim(self.claim, measured, verdict, self.figure, self.criterion)


def _ga_linear(s: dict) -> tuple[str, str]:
    ga = s["ga"]
    ok = ga["linear_r2"] > 0.99 and ga["linear_r2"] > ga.get("log_r2", 0)
    return (f"linear R² {ga['linear_r2']:.6f} (log-fit R² {ga.get('log_r2', float('nan')):.3f}), slope "
            f"{ga['slope']:.4g} at η={ga['eta']:g}, n_f={ga['n_f']}; min R² over grid "
            f"{ga['linear_r2_min_over_grid']:.6f}", C.verdict(ok))


def _npo_log(s: dict) -> tuple[str, str]:
    npo, ratio = s["npo"], s.get("npo_over_ga_distance_T")
    ok = npo["log_r2"] > 0.99 and npo["log_r2"] > npo.get("linear_r2", 0)
    return (f"log R² {npo['log_r2']:.4f} (linear R² {npo['linear_r2']:.3f}), log-slope {npo['log_slope']:.4g} at "
            f"β={npo['beta']:g}; R² for β=0.5/1/2: "
            + "/".join(f"{v:.4f}" for v in npo["log_r2_by_beta"].values())
            + (f"; distance at T: NPO/GA = {ratio:.3g}" if ratio is not None else ""), C.verdict(ok))


def _rates(s: dict) -> tuple[str, str]:
    gs, ns = s["ga"]["slope_scaling"], s["npo"]["log_slope_scaling"]
    if "exponent" not in gs or "exponent" not in ns:
        return (f"n/a (scaling fits need >= 3 configs with distinct rates: GA {gs['n_configs']}, "
                f"NPO {ns['n_configs']})", C.NA)
    ok = abs(gs["exponent"] - 1) < 0.1 and abs(ns["exponent"] - 1) < 0.1
    return (f"fitted exponents: GA {gs['exponent']:.3f} (R² {gs['r2']:.4f}, {gs['n_configs']} configs), "
            f"NPO {ns['exponent']:.3f} (R² {ns['r2']:.4f}, {ns['n_configs']} configs)", C.verdict(ok))


def _envelope(s: dict) -> tuple[str, str]:
    env = s["envelope"]
    last = env.get("last_decade_ratio")
    drift = env.get("per_sample_drift", [{}])[-1].get("max_abs_log_change")
    ok = None if last is None else (last < 10 and (drift is None or drift < 0.5))
    return (f"C_a={env['C_a']:.3g}, C_b={env['C_b']:.3g} over all t (ratio {env['ratio']:.3g}); last decade ratio "
            f"{C.fmt(last)}; per-sample log C(t) drift in the last window {C.fmt(drift)}",
            C.HOLDS if ok else (C.PARTLY if ok is not None else C.NA))


def _slower(s: dict) -> tuple[str, str]:
    stt = [r for r in s["steps_to_reach"]["table"] if r["ga_steps"] is not None]
    reached = [r for r in stt if r["npo_steps"] is not None]
    beyond = [r for r in stt if r["npo_steps"] is None]
    slow = (f"R={reached[-1]['R']:g}: GA {reached[-1]['ga_steps']:.0f} vs NPO {reached[-1]['npo_steps']:.0f} steps; "
            if reached else "")
    slow += (f"R={beyond[-1]['R']:g}: GA {beyond[-1]['ga_steps']:.0f} steps, NPO not within T={s['config']['steps']} "
             f"(theory ≥ {beyond[-1]['npo_theory'][0]:.1e})" if beyond else "")
    ok = bool(beyond) or bool(reached and reached[-1]["npo_steps"] > 2 * reached[-1]["ga_steps"])
    return slow or "n/a", C.verdict(ok)


def _beta_to_zero(s: dict) -> tuple[str, str]:
    sweep = {round(r["beta"], 6): r for r in s["beta_sweep"]}
    small = sweep[min(sweep)]
    dev = small.get("max_rel_dev_from_ga_t_le_1e3")
    return (f"β={small['beta']:g}: max relative deviation from GA over t ≤ 10³: {C.fmt(dev)}; distance at T "
            f"{small['distance_T']:.4g} vs GA {s['ga']['distance_T']:.4g}",
            C.verdict(None if dev is None else dev < 0.05))


RULES = (
    _Rule("Thm 2 (GA): ‖θ_t−θ_init‖_{XᵀX} grows linearly in t", FIG_DIVERGENCE,
          "holds when GA's linear-fit R² at the base point is > 0.99 and above its log-fit R²", ("ga",), _ga_linear),
    _Rule("Thm 2 (NPO): ‖θ_t−θ_init‖_{XᵀX} grows like log t", FIG_DIVERGENCE,
          "holds when NPO's log-fit R² at the base point (β = base β) is > 0.99 and above its linear-fit R²",
          ("npo",), _npo_log),
    _Rule("Thm 2 rates: GA slope ∝ η/√n_f, NPO log-slope ∝ √n_f/β", FIG_SWEEP,
          "holds when both fitted log-log exponents (GA slope vs η/√n_f, NPO log-slope vs √n_f/β) are within 0.1 of 1",
          ("ga", "npo"), _rates),
    _Rule("Lemma 4 envelope: |b_i(t)| ∈ [(1/β)log(C_a η0 t+1), (1/β)log(C_b η0 t+1)] with bounded C_a, C_b",
          "theory_logit_shifts.png",
          "holds when C_b/C_a over the last decade is < 10 and the per-sample change of log C(t) over the last "
          "decade is < 0.5; partly otherwise", ("envelope",), _envelope),
    _Rule("NPO diverges exponentially slower: steps to reach RMS logit shift R", "theory_steps_to_reach.png",
          "holds when NPO does not reach, within T, some R that GA reaches, or needs > 2× GA's steps at the "
          "largest R both reach", ("steps_to_reach",), _slower),
    _Rule("β → 0: the NPO trajectory approaches GA's (Prop. 1 on trajectories)", FIG_SWEEP,
          "holds when, at the smallest β of the sweep, NPO's distance deviates from GA's by < 5% (relative) "
          "at every t ≤ 10³", ("beta_sweep", "ga"), _beta_to_zero),
)


# --------------------------------------------------------------------------------------------------
# one row per objective: the divergence law its weight's tail predicts
# --------------------------------------------------------------------------------------------------
#: relative tolerances of the law verdicts (see :func:`law_verdict`)
LAW_TOL = {"linear": 0.10, "log": 0.15, "converges": 0.05}
LAW_FLOW_TOL = 0.05

LAW_CRITERION = {
    "linear": "holds when the RMS logit shift's line fit (R² > 0.99, above the log fit) has a slope within 10% of "
              "the predicted η0·RMS(AAᵀ1) (c̄·η0 for orthogonal features)",
    "log": "holds when the log t slope of the RMS logit shift over the last decade (log R² above linear R², log "
           "regime reached) is within 15% of 1/a; partly when it is not but agrees within 5% with the exact "
           "single-sample flow's slope on the same decade (a finite-horizon transient); fails otherwise",
    "converges": "holds when the RMS logit shift at T is within 5% of the limit the fixed target sets and moved by "
                 "less than 1% of it over the last decade",
}


def law_verdict(e: dict) -> str:
    """The verdict on one method's law entry of the summary (``summary["laws"][method]``)."""
    rel = e.get("rel_err")
    if rel is None or e["fitted"] is None or e["fitted"] != e["fitted"]:
        return C.NA
    if e["law"] == "linear":
        return C.verdict(rel <= LAW_TOL["linear"] and e["r2"] > 0.99 and e["r2"] > e["other_r2"])
    if e["law"] == "log":
        shape = e["r2"] > e["other_r2"] and e["in_regime"]
        if shape and rel <= LAW_TOL["log"]:
            return C.HOLDS
        flow = e.get("flow_slope")
        near_flow = flow is not None and abs(e["fitted"] / flow - 1) <= LAW_FLOW_TOL
        return C.PARTLY if shape and near_flow else C.FAILS
    return C.verdict(rel <= LAW_TOL["converges"] and abs(e["shift_last_decade"]) <= 0.01 * e["predicted"])


def _law_claim(method: str, e: dict) -> C.Claim:
    name = label(method)
    if e["law"] == "linear":
        claim = f"{name} (tail a = 0): ‖θ_t−θ_init‖ grows linearly in t"
        measured = f"slope {e['fitted']:.4g} vs predicted η0·RMS(AAᵀ1) = {e['predicted']:.4g} (R² {e['r2']:.5f})"
    elif e["law"] == "log":
        claim = f"{name} (tail a = {e['tail']:g}): ‖θ_t−θ_init‖ grows like (1/a)·log t"
        flow = e.get("flow_slope")
        measured = (f"rate {e['fitted']:.3f} vs predicted 1/a = {e['predicted']:.3g}"
                    + (f"; exact flow on the same decade {flow:.3f}" if flow is not None else "")
                    + f"; log R² {e['r2']:.4f} vs linear {e['other_r2']:.3f}"
                    + ("" if e["in_regime"] else "; log regime not reached"))
    else:
        claim = f"{name} (fixed target): the logit shift converges instead of diverging"
        measured = (f"RMS shift at T {e['fitted']:.4g} vs limit {e['predicted']:.4g}; change over the last decade "
                    f"{e['shift_last_decade']:.2g}")
    return C.Claim(claim, measured, law_verdict(e), FIG_LAWS, LAW_CRITERION[e["law"]])


def findings(results: Results, cfg=None) -> list[C.Claim]:
    """The six Theorem-2 claims, then one divergence-law row per method, judged on ``results.summary``."""
    return [rule(results.summary) for rule in RULES] + [
        _law_claim(m, e) for m, e in results.summary.get("laws", {}).items()]


# --------------------------------------------------------------------------------------------------
# the CLI's short table
# --------------------------------------------------------------------------------------------------
#: the two methods Theorem 2 compares: their rows come from the summary's headline entries
_HEADLINE = ("ga", "npo")
_LAW_TEXT = {"linear": "D ~ t", "log": "D ~ log t", "converges": "converges"}


def _rate_lines(s: dict) -> list[str]:
    lines = [f"{'method':<8}{'beta':>7}{'eta':>6}{'n_f':>5}  {'law':<11}{'slope':>10}{'R2':>9}{'dist@T':>11}"]
    if "ga" in s:
        g = s["ga"]
        lines.append(f"{'ga':<8}{'-':>7}{g['eta']:>6g}{g['n_f']:>5}  {'D ~ t':<11}{g['slope']:>10.4g}"
                     f"{g['linear_r2']:>9.5f}{g['distance_T']:>11.4g}")
    for e in s.get("beta_sweep", []):
        mark = "" if e["in_log_regime"] else " (log regime not reached by T)"
        lines.append(f"{'npo':<8}{e['beta']:>7g}{s['npo']['eta']:>6g}{s['npo']['n_f']:>5}  "
                     f"{'D ~ log t':<11}{e['log_slope']:>10.4g}{e['log_r2']:>9.5f}{e['distance_T']:>11.4g}{mark}")
    for method, e in s.get("by_method", {}).items():
        if method not in _HEADLINE:
            law = s.get("laws", {}).get(method, {}).get("law", "log")
            linear = law == "linear"
            beta = "-" if e["beta"] != e["beta"] else format(e["beta"], "g")   # NaN: β-free
            lines.append(f"{method:<8}{beta:>7}{'':>6}{'':>5}  {_LAW_TEXT.get(law, law):<11}"
                         f"{e['linear_slope' if linear else 'log_slope']:>10.4g}"
                         f"{e['linear_r2' if linear else 'log_r2']:>9.5f}{e['distance_T']:>11.4g}")
    return lines


def describe(results: Results, cfg=None) -> str:
    """A short table of the fitted rates, the scaling exponents, the data, the envelope and the flow check."""
    s = results.summary
    lines = _rate_lines(s)
    for key, name in (("ga", "slope_scaling"), ("npo", "log_slope_scaling")):
        sc = s.get(key, {}).get(name, {})
        if "exponent" in sc:
            lines.append(f"{key} {sc['law']}: fitted exponent {sc['exponent']:.3f} (R2 {sc['r2']:.4f}, "
                         f"{sc['n_configs']} configs)")
    if "data" in s:
        c0 = [e["C0"] for e in s["data"]["C0_max_by_nf_d"]]
        lines.append(f"data: C0 = n_f*max|<x_i,x_j>| in [{min(c0):.2f}, {max(c0):.2f}] over (n_f, d); "
                     f"|theta_init| = {s['data']['theta_init_norm'][1]:.3g}")
    if "envelope" in s:
        e = s["envelope"]
        lines.append(f"NPO envelope: C_a={e['C_a']:.3g} C_b={e['C_b']:.3g} (last decade "
                     f"{e['by_decade'][-1]['C_a']:.3g}..{e['by_decade'][-1]['C_b']:.3g})")
    if "flow_check" in s:
        lines.append("single-sample flow check, max rel. error: " + ", ".join(
            f"{k} {v['max_rel_err']:.2%}" for k, v in s["flow_check"].items()))
    if s.get("laws"):
        lines.append("divergence law per method (base point; RMS logit shift; predicted from the weight's tail a):")
        lines.append(f"  {'method':<8}{'law':<10}{'a':>5}{'predicted':>11}{'fitted':>9}{'exact flow':>12}  verdict")
        for m, e in s["laws"].items():
            what = {"linear": "slope", "log": "rate 1/a", "converges": "limit"}[e["law"]]
            flow = e.get("flow_slope")
            lines.append(f"  {m:<8}{e['law']:<10}{'-' if e['tail'] is None else format(e['tail'], 'g'):>5}"
                         f"{e['predicted']:>11.4g}{e['fitted']:>9.4g}{'' if flow is None else format(flow, '.4g'):>12}"
                         f"  {law_verdict(e)} ({what})")
    return "\n".join(lines)
