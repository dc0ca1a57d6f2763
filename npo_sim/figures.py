"""``npo-sim figures``: regenerate every synthetic figure and ``figures/REPORT.md`` from scratch.

Runs each study (loss-level claims, the Theorem-2 lab, the §4 mixture experiment for α = 1 and 0,
the Markov presets) into a run directory, copies the figures into ``--out``, and writes a claims
table: one row per claim of the paper, with the measured numbers, a verdict and the figure. Verdicts
are computed from the numbers by the criteria printed in the table — nothing is hard-coded.

Default settings are each study's ``--quick`` configuration (a few minutes on 2 cores); ``--quick``
here shrinks them further to a smoke test (used by the test suite). The tofu-mini study
(``npo-tofu study``) is separate; when its committed outputs (``<out>/tofu_mini/``) exist, their
numbers and the side-by-side figure are included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from . import runio

HOLDS, PARTLY, FAILS, NA = "holds", "partly", "does not hold", "not measured"


@dataclass(frozen=True)
class Study:
    name: str
    figure: str                       # main figure file name (in the figures dir)
    run: Callable[[Path, Path, bool], dict]


def _theory(run_dir: Path, fig_dir: Path, smoke: bool) -> dict:
    from .logistic import QUICK, run_theory

    cfg = dataclasses.replace(QUICK, steps=2000, betas=(0.5, 1.0, 2.0), beta_sweep=(0.001, 0.1, 1.0, 10.0)) \
        if smoke else QUICK
    return run_theory(cfg, run_dir, fig_dir, progress=lambda *a, **k: None)


def _synthetic(alpha: float) -> Callable[[Path, Path, bool], dict]:
    def run(run_dir: Path, fig_dir: Path, smoke: bool) -> dict:
        from .mixture import SyntheticConfig, run_synthetic

        cfg = SyntheticConfig(alpha=alpha, seeds=1, steps=400, compare_pretrain=False) if smoke \
            else SyntheticConfig(alpha=alpha)
        return run_synthetic(cfg, run_dir, fig_dir)
    return run


#: smoke-test overrides of the Markov quick presets (few steps, the methods the claims read)
MARKOV_SMOKE = {"tabular": dict(steps=100, methods=("ga", "npo", "simnpo")),
                "transformer": dict(steps=20, methods=("ga", "npo"))}


def _markov(preset: str, model: str = "tabular") -> Callable[[Path, Path, bool], dict]:
    def run(run_dir: Path, fig_dir: Path, smoke: bool) -> dict:
        from .markov import run_markov

        return run_markov(preset, model, quick=True, out_dir=run_dir, figures_dir=fig_dir,
                          **(MARKOV_SMOKE[model] if smoke else {}))
    return run


def _core(run_dir: Path, fig_dir: Path, smoke: bool) -> dict:
    from .claims import run_core

    return run_core(run_dir, fig_dir)


STUDIES = [
    Study("core", "core_claims.png", _core),
    Study("theory", "theory_divergence.png", _theory),
    Study("synthetic_alpha1", "synthetic_tradeoff_alpha1.png", _synthetic(1.0)),
    Study("synthetic_alpha0", "synthetic_tradeoff_alpha0.png", _synthetic(0.0)),
    Study("markov_length", "markov_length_tabular.png", _markov("length")),
    Study("markov_memorization", "markov_memorization_tabular.png", _markov("memorization")),
    Study("markov_divergence", "markov_divergence_tabular.png", _markov("divergence")),
    Study("markov_divergence_transformer", "markov_divergence_transformer.png", _markov("divergence", "transformer")),
]


# --------------------------------------------------------------------------------------------------
# claims: one row each, computed from the study summaries
# --------------------------------------------------------------------------------------------------
@dataclass
class Claim:
    claim: str
    measured: str
    verdict: str
    figure: str


def _g(x, fmt=".3g") -> str:
    return "n/a" if x is None else format(x, fmt)


def _verdict(ok) -> str:
    return NA if ok is None else (HOLDS if ok else FAILS)


def _core_claims(s: dict) -> list[Claim]:
    p, w, b = s["prop1"], s["weight"], s["bounded_below"]
    r0, r1 = p["rows"][0], p["rows"][-1]
    return [
        Claim("Prop. 1: NPO → GA as β → 0 (loss gap [L_NPO − (2/β)log 2] − [L_GA − E log π_ref] and gradient gap → 0)",
              f"β={r0['beta']:g}→{r1['beta']:g}: loss gap {r0['loss_gap']:.2e}→{r1['loss_gap']:.2e} "
              f"(≈β·E[r²]/4: {r1['leading_order']:.2e}), grad gap {r0['grad_gap']:.2e}→{r1['grad_gap']:.2e}; "
              f"monotone: {p['loss_gap_monotone'] and p['grad_gap_monotone']}",
              _verdict(p["loss_gap_monotone"] and p["grad_gap_monotone"] and r1["loss_gap"] < 1e-3),
              "core_claims.png"),
        Claim("NPO weight W = 2π_θ^β/(π_θ^β+π_ref^β) ∈ (0, 2), W = 1 at θ = ref",
              f"min {w['min']:.2e}, max {w['max']:.15g} over {w['range_checked']}; |W−1| at ref "
              f"{w['max_abs_dev_from_1_at_ref']:.1e}",
              _verdict(0 < w["min"] and w["max"] < 2 and w["max_abs_dev_from_1_at_ref"] < 1e-12), "core_claims.png"),
        Claim("NPO loss is bounded below (by 0), GA's is not",
              f"NPO(β=1) at log π_θ−log π_ref = −1, −10, −100: "
              + ", ".join(f"{v:.2g}" for v in list(b["npo_at_logp"].values())[:3])
              + f"; GA: {', '.join(f'{v:g}' for v in list(b['ga_at_logp'].values())[:3])}; "
              f"(2/β)log 2 at ref: {b['npo_at_ref']['1.0']:.4f}",
              _verdict(b["npo_min_seen"] >= 0), "core_claims.png"),
    ]


def _theory_claims(s: dict) -> list[Claim]:
    ga, npo, env = s["ga"], s["npo"], s["envelope"]
    ratio = s.get("npo_over_ga_distance_T")
    ga_ok = ga["linear_r2"] > 0.99 and ga["linear_r2"] > ga.get("log_r2", 0)
    npo_ok = npo["log_r2"] > 0.99 and npo["log_r2"] > npo.get("linear_r2", 0)
    gs, ns = ga["slope_scaling"], npo["log_slope_scaling"]
    scale_ok = abs(gs["exponent"] - 1) < 0.1 and abs(ns["exponent"] - 1) < 0.1
    last = env.get("last_decade_ratio")
    drift = env.get("per_sample_drift", [{}])[-1].get("max_abs_log_change")
    env_ok = None if last is None else (last < 10 and (drift is None or drift < 0.5))
    sweep = {round(r["beta"], 6): r for r in s["beta_sweep"]}
    small = sweep[min(sweep)]
    dev = small.get("max_rel_dev_from_ga_t_le_1e3")
    stt = [r for r in s["steps_to_reach"]["table"] if r["ga_steps"] is not None]
    reached = [r for r in stt if r["npo_steps"] is not None]
    beyond = [r for r in stt if r["npo_steps"] is None]
    slow = (f"R={reached[-1]['R']:g}: GA {reached[-1]['ga_steps']:.0f} vs NPO {reached[-1]['npo_steps']:.0f} steps; "
            if reached else "")
    slow += (f"R={beyond[-1]['R']:g}: GA {beyond[-1]['ga_steps']:.0f} steps, NPO not within T={s['config']['steps']} "
             f"(theory ≥ {beyond[-1]['npo_theory'][0]:.1e})" if beyond else "")
    fig = "theory_divergence.png"
    return [
        Claim("Thm 2 (GA): ‖θ_t−θ_init‖_{XᵀX} grows linearly in t",
              f"linear R² {ga['linear_r2']:.6f} (log-fit R² {ga.get('log_r2', float('nan')):.3f}), slope "
              f"{ga['slope']:.4g} at η={ga['eta']:g}, n_f={ga['n_f']}; min R² over grid {ga['linear_r2_min_over_grid']:.6f}",
              _verdict(ga_ok), fig),
        Claim("Thm 2 (NPO): ‖θ_t−θ_init‖_{XᵀX} grows like log t",
              f"log R² {npo['log_r2']:.4f} (linear R² {npo['linear_r2']:.3f}), log-slope {npo['log_slope']:.4g} at "
              f"β={npo['beta']:g}; R² for β=0.5/1/2: "
              + "/".join(f"{v:.4f}" for v in npo["log_r2_by_beta"].values())
              + (f"; distance at T: NPO/GA = {ratio:.3g}" if ratio is not None else ""),
              _verdict(npo_ok), fig),
        Claim("Thm 2 rates: GA slope ∝ η/√n_f, NPO log-slope ∝ √n_f/β",
              f"fitted exponents: GA {gs['exponent']:.3f} (R² {gs['r2']:.4f}, {gs['n_configs']} configs), "
              f"NPO {ns['exponent']:.3f} (R² {ns['r2']:.4f}, {ns['n_configs']} configs)",
              _verdict(scale_ok), "theory_beta_sweep.png"),
        Claim("Lemma 4 envelope: |b_i(t)| ∈ [(1/β)log(C_a η0 t+1), (1/β)log(C_b η0 t+1)] with bounded C_a, C_b",
              f"C_a={env['C_a']:.3g}, C_b={env['C_b']:.3g} over all t (ratio {env['ratio']:.3g}); last decade ratio "
              f"{_g(last)}; per-sample log C(t) drift in the last window {_g(drift)}",
              HOLDS if env_ok else (PARTLY if env_ok is not None else NA), "theory_logit_shifts.png"),
        Claim("NPO diverges exponentially slower: steps to reach RMS logit shift R", slow or "n/a",
              _verdict(bool(beyond) or bool(reached and reached[-1]["npo_steps"] > 2 * reached[-1]["ga_steps"])),
              "theory_steps_to_reach.png"),
        Claim("β → 0: the NPO trajectory approaches GA's (Prop. 1 on trajectories)",
              f"β={small['beta']:g}: max relative deviation from GA over t ≤ 10³: {_g(dev)}; distance at T "
              f"{small['distance_T']:.4g} vs GA {ga['distance_T']:.4g}",
              _verdict(None if dev is None else dev < 0.05), "theory_beta_sweep.png"),
    ]


def _finding_rows(s: dict, alpha: float) -> list[Claim]:
    fig = f"synthetic_tradeoff_alpha{alpha:g}.png"
    out = []
    for key, f in s["findings"].items():
        measured = _describe_finding(key, f)
        verdict = _verdict(f.get("holds"))
        if f.get("holds") is None and key == "start_point":
            verdict = "n/a (stated for α=1)"
        partial = PARTIAL_CHECKS.get(key, lambda f: False)(f)
        if f.get("holds") is False and partial:
            verdict = PARTLY
        out.append(Claim(f"§4 synthetic (α={alpha:g}): {f['claim']}", measured, verdict, fig))
    return out


#: when a finding fails as stated, the weaker reading under which it partly holds
PARTIAL_CHECKS = {
    # some (not all) of GA / GA+RT diverge
    "ga_retain_diverges": lambda f: any(v["diverges"] for v in f["measured"].values()),
    # like-for-like: NPO beats GA and NPO+RT beats GA+RT, though not all four strictly ordered
    "npo_better_tradeoff": lambda f: bool(f.get("paired_comparison")) and all(f["paired_comparison"].values()),
    # reached in some seeds by the horizon
    "forget_below_threshold": lambda f: any(not v.startswith("0/") for k, v in f.get("seeds_reaching_by_horizon", {}).items()
                                            if k != "idk_rt"),
}


def _describe_finding(key: str, f: dict) -> str:
    if key == "start_point":
        m = f["measured"]
        return f"start (forget {m['forget_distance']:.3f}, retain {m['retain_distance']:.3f}); paper (1.70, 0.02)"
    if key == "forget_below_threshold":
        steps = ", ".join(f"{k}:{'—' if v is None else v}" for k, v in f["first_step"].items())
        seeds = ", ".join(f"{k} {v}" for k, v in f.get("seeds_reaching_by_horizon", {}).items())
        return (f"first step < {f['threshold']:g} (seed mean): {steps}; seeds reaching it by step "
                f"{f['horizon']}: {seeds}")
    if key == "ga_retain_diverges":
        return "; ".join(f"{k}: retain {v['start']:.3g}→{v['half_way']:.3g}→{v['end']:.3g} "
                         f"({v['end'] / v['min']:.1f}× its minimum; criterion ≥ 10×)" for k, v in f["measured"].items())
    if key == "npo_better_tradeoff":
        if f.get("level") is None:
            return "no common forget level reached"
        r = f["retain_at_level"]
        paired = ", ".join(f"{k}: {v}" for k, v in f.get("paired_comparison", {}).items())
        return (f"retain distance when forget first < {f['level']:g}: "
                + ", ".join(f"{k} {v:.3g}" for k, v in r.items() if v is not None) + f"; pairwise {paired}")
    return json.dumps(f)[:200]


def _markov_claims(summaries: dict) -> list[Claim]:
    out = []
    if "markov_length" in summaries:
        f = summaries["markov_length"]["findings"]
        out.append(Claim("Markov length effect (SimNPO §5): NPO unlearns short and long forget data unevenly; "
                         "SimNPO's length normalisation evens it out", f["verdict"] or "n/a",
                         _length_verdict(f), "markov_length_tabular.png"))
    if "markov_memorization" in summaries:
        f = summaries["markov_memorization"]["findings"]
        v = f.get("npo_over_f2_under_f1")
        out.append(Claim("Markov memorization: NPO over-unlearns the unmemorized Forget2 and under-unlearns Forget1",
                         f["verdict"] or "n/a", _verdict(v), "markov_memorization_tabular.png"))
    for name, label in (("markov_divergence", "tabular"), ("markov_divergence_transformer", "transformer")):
        if name in summaries:
            f = summaries[name]["findings"]
            ok = [f.get("ga_linear_law_holds"), f.get("npo_log_law_holds")]
            verdict = NA if None in ok else HOLDS if all(ok) else PARTLY if any(ok) else FAILS
            out.append(Claim(f"Divergence law on sequences ({label} Markov model): GA linear, NPO logarithmic",
                             f["verdict"], verdict, f"markov_divergence_{label}.png"))
    return out


def _length_verdict(f: dict) -> str:
    best = f.get("at_best", {})
    if not {"npo", "simnpo"} <= set(best):
        return NA

    def gap(m):
        b = best[m]
        return abs(b["forget2"]["kl_oracle"] - b["forget1"]["kl_oracle"])
    # holds when NPO's short/long imbalance is larger than SimNPO's
    return HOLDS if gap("npo") > gap("simnpo") else FAILS


NPO_FAMILY = {"npo", "npo_rt", "npo_kl", "simnpo", "simnpo_rt"}
GA_FAMILY = {"ga", "ga_rt", "ga_kl"}


def _tofu_claims(fig_dir: Path) -> list[Claim]:
    """TOFU findings at mini scale, from the committed ``tofu_mini/`` study outputs (``npo-tofu study``)."""
    mini = fig_dir / "tofu_mini"
    if not (mini / "summary.json").exists():
        return [Claim("TOFU at mini scale: NPO-based methods reach better forget quality at kept model utility than "
                      "GA-based ones", "not run yet: `make tofu-mini`", NA, "tofu_mini/")]
    import numpy as np
    import pandas as pd

    from .metrics import linear_fit, log_fit

    s = json.loads((mini / "summary.json").read_text())
    model = s.get("settings", {}).get("model", "?")
    best = pd.DataFrame(s["best_fq"])
    tag = f"TOFU mini ({model})"
    fig = "tofu_mini/fq_mu_trajectories.png"
    rows = []

    ga = best[best.method == "ga"]
    rel = (ga.mu_last / ga.target_mu).tolist()
    rows.append(Claim(f"{tag}: GA without a retain term destroys model utility",
                      "; ".join(f"{r.split}: MU {r.target_mu:.3f}→{r.mu_last:.3f}" for r in ga.itertuples()),
                      _verdict(bool(rel) and max(rel) < 0.1) if rel else NA, fig))

    pairs = []
    for r in best.itertuples():
        for n, g in (("npo_rt", "ga_rt"), ("npo_kl", "ga_kl")):
            if r.method == n:
                other = best[(best.split == r.split) & (best.method == g)]
                if len(other):
                    pairs.append((r.split, n, r.fq_last, g, float(other.fq_last.iloc[0])))
    wins = [p[2] > p[4] for p in pairs]
    rows.append(Claim(f"{tag}: NPO+RT / NPO+KL end with higher forget quality than GA+RT / GA+KL",
                      "; ".join(f"{sp} {n} {a:.2g} vs {g} {b:.2g}" for sp, n, a, g, b in pairs) or "n/a",
                      NA if not wins else HOLDS if all(wins) else PARTLY if any(wins) else FAILS, fig))

    q = best.dropna(subset=["best_fq"])
    per_split = {sp: g.sort_values("best_fq").iloc[-1] for sp, g in q.groupby("split")}
    npo_best = [r.method in NPO_FAMILY for r in per_split.values()]
    missing = sorted(set(best.split) - set(per_split))
    rows.append(Claim(f"{tag}: the best FQ at MU ≥ {s.get('mu_fraction', 0.9):g} × target MU comes from an NPO-based "
                      "method",
                      "; ".join(f"{sp}: {r.method} FQ {r.best_fq:.2g} (MU {r.mu_at_best:.3f})"
                                for sp, r in per_split.items())
                      + "".join(f"; {sp}: no run kept MU above the threshold" for sp in missing),
                      NA if not npo_best else HOLDS if all(npo_best) and not missing else
                      PARTLY if any(npo_best) else FAILS, "tofu_mini/best_fq.md"))

    lm = pd.read_csv(mini / "lm_curves.csv")
    split = sorted(lm.split.unique())[-1]
    fits, ends = {}, {}
    for m in ("ga", "npo"):
        d = lm[(lm.split == split) & (lm.method == m)]
        if len(d) >= 3:
            t, y = d.step.to_numpy(float), d.param_distance.to_numpy()
            fits[m] = (linear_fit(t, y).r2, log_fit(t, y).r2)
            ends[m] = float(y[-1])
    if len(fits) == 2:
        laws = fits["ga"][0] > fits["ga"][1] and fits["npo"][1] > fits["npo"][0]
        ok = HOLDS if laws and ends["ga"] > 2 * ends["npo"] else PARTLY if ends["ga"] > 2 * ends["npo"] else FAILS
        meas = (f"{split}: final ‖θ−θ_0‖ GA {ends['ga']:.3g} vs NPO {ends['npo']:.3g}; R² linear/log: "
                f"GA {fits['ga'][0]:.3f}/{fits['ga'][1]:.3f}, NPO {fits['npo'][0]:.3f}/{fits['npo'][1]:.3f} "
                "(lr decays linearly to 0, which bends both curves)")
    else:
        ok, meas = NA, "lm_curves.csv lacks GA and NPO runs"
    rows.append(Claim(f"{tag}: divergence law on the LM (GA linear, NPO logarithmic in the step)", meas, ok,
                      "side_by_side.png"))
    return rows


CLAIM_BUILDERS = {
    "core": _core_claims,
    "theory": _theory_claims,
    "synthetic_alpha1": lambda s: _finding_rows(s, 1.0),
    "synthetic_alpha0": lambda s: _finding_rows(s, 0.0),
}


def build_claims(summaries: dict, fig_dir: Path) -> list[Claim]:
    rows: list[Claim] = []
    for name, builder in CLAIM_BUILDERS.items():
        if name in summaries:
            rows += builder(summaries[name])
    rows += _markov_claims(summaries)
    rows += _tofu_claims(fig_dir)
    return rows


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ") or "—"


def write_report(claims: list[Claim], fig_dir: Path, timings: dict, smoke: bool) -> Path:
    lines = ["# npo-sim: the paper's claims, measured", "",
             "Generated by `npo-sim figures`" + (" --quick (smoke settings)" if smoke else "")
             + ". Every number below comes from the run directories of this invocation (and, for the TOFU rows, "
             "from the committed `tofu_mini/` study outputs). Verdicts follow the criteria stated in each study's "
             "`summary.json`; a claim that does not reproduce says so.", "",
             "| # | claim | measured | verdict | figure |", "|---|---|---|---|---|"]
    for i, c in enumerate(claims, 1):
        lines.append(f"| {i} | {_cell(c.claim)} | {_cell(c.measured)} | **{_cell(c.verdict)}** | "
                     f"[{_cell(c.figure)}]({c.figure}) |")
    if timings:
        lines += ["", "## Timings (2-core CPU)", "", "| study | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    tofu_md = fig_dir / "tofu_mini" / "results.md"
    if tofu_md.exists():
        lines += ["", "## TOFU at mini scale", "", tofu_md.read_text().strip().replace("](", "](tofu_mini/")]
    lines.append("")
    return runio.write_text(fig_dir / "REPORT.md", "\n".join(lines))


def side_by_side(run_root: Path, fig_dir: Path) -> Path | None:
    """The GA-vs-NPO divergence figure across settings, when the LM curves exist."""
    lm = fig_dir / "tofu_mini" / "lm_curves.csv"
    theory = run_root / "theory" / "trajectories.csv"
    markov = run_root / "markov_divergence" / "curves.csv"
    if not (lm.exists() and theory.exists() and markov.exists()):
        return None
    import pandas as pd

    from .plots.side_by_side import plot_side_by_side

    return plot_side_by_side(pd.read_csv(theory), pd.read_csv(markov), pd.read_csv(lm),
                             fig_dir / "tofu_mini" / "side_by_side.png", figures_dir=fig_dir)


SUMMARY_FILE = {"core": "core_claims.json"}


def run_figures(out: Path, runs: Path, smoke: bool = False, only: list[str] | None = None,
                report_only: bool = False) -> dict:
    """Run the studies (or, with ``report_only``, reload their summaries) and write REPORT.md."""
    out, runs = Path(out), Path(runs)
    studies = [s for s in STUDIES if only is None or s.name in only]
    if only:
        unknown = set(only) - {s.name for s in STUDIES}
        if unknown:
            raise runio.UserError(f"unknown studies {sorted(unknown)}; choose from {[s.name for s in STUDIES]}")
    summaries, timings = {}, {}
    bar = tqdm(studies, desc="npo-sim figures", unit="study")
    for study in bar:
        bar.set_postfix_str(study.name)
        t0 = time.perf_counter()
        if report_only:
            path = runs / study.name / SUMMARY_FILE.get(study.name, "summary.json")
            if path.exists():
                summaries[study.name] = json.loads(path.read_text())
            continue
        summaries[study.name] = study.run(runs / study.name, out, smoke)
        timings[study.name] = time.perf_counter() - t0
    sbs = side_by_side(runs, out)
    claims = build_claims(summaries, out)
    report = write_report(claims, out, timings, smoke)
    runio.write_json(runs / "figures_summary.json",
                     {"claims": [dataclasses.asdict(c) for c in claims], "timings": timings, "smoke": smoke})
    return {"claims": claims, "timings": timings, "report": report, "side_by_side": sbs}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="figures", help="figures directory (PNGs and REPORT.md)")
    p.add_argument("--runs", default="runs/figures", help="where each study's run directory goes")
    p.add_argument("--quick", action="store_true", help="smoke-test settings (seconds per study)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild REPORT.md from the summaries already in --runs (no simulation)")
    p.add_argument("--only", default=None, help="comma-separated subset of: " + ", ".join(s.name for s in STUDIES))


def main(args) -> int:
    only = args.only.split(",") if args.only else None
    t0 = time.perf_counter()
    res = run_figures(Path(args.out), Path(args.runs), smoke=args.quick, only=only, report_only=args.report_only)
    verdicts = [c.verdict for c in res["claims"]]
    print(f"wrote {res['report']} ({len(verdicts)} claims: {verdicts.count(HOLDS)} hold, {verdicts.count(PARTLY)} "
          f"partly, {verdicts.count(FAILS)} do not hold, {verdicts.count(NA)} not measured) "
          f"in {time.perf_counter() - t0:.0f} s")
    for k, v in res["timings"].items():
        print(f"  {k:32s} {v:6.1f} s")
    return 0
