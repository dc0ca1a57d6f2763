"""The tofu-mini study's report (:func:`report`): the tables and figures of its finished runs, the
selection and law tables, ``results.md``, and the copy into ``figures/tofu_<preset>/``.

Called by :func:`full_scale.study.run_study` after the stages, with its ``StudyConfig`` and ``Stage`` list
(duck-typed here, so this module imports nothing from the study); ``npo-tofu study --report-only`` runs it
alone on whatever has finished.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from npo_sim.losses import OBJECTIVES, label
from npo_sim.runio import write_bytes, write_csv, write_json, write_text

from .report import (
    LAST_COLUMNS,
    TABLE_COLUMNS,
    across_seeds,
    build_report,
    load_target_evals,
    seeds_markdown,
    table_markdown,
)

#: a hand-written section of figures/<study>/results.md that a re-run keeps
NOTES_HEADING = "## Reading these results"
#: small report files copied into figures/<study>/
REPORT_FILES = ("fq_mu_trajectories.png", "best_fq.csv", "best_fq.md", "eval_curves.csv", "lm_curves.csv",
                "last_epoch.csv", "last_epoch.md", "seeds.csv", "seeds.md", "summary.json", "side_by_side.png",
                "results.md", "timings.json", "best_fq_ci.md", "grid.csv", "selection.csv", "selection.md", "law.csv",
                "law.md", "law_curves.csv", "law_curves.png")

# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------
def best_fq_ci_markdown(seed_table: pd.DataFrame, targets: dict, mu_fraction: float, n_seeds: int) -> str:
    """Per split: the methods whose mean MU across seeds keeps ≥ mu_fraction × the target's, by mean FQ,
    with the 95% t-intervals of FQ and MU; then those that do not keep MU."""
    from .report import _with_ci

    lines = []
    for split, g in seed_table.groupby("split", sort=False):
        t = targets.get(split, {})
        floor = mu_fraction * t["model_utility"] if "model_utility" in t else float("nan")
        stat = {m: {r.metric: r for r in h.itertuples()} for m, h in g.groupby("method", sort=False)}
        rows = sorted(stat.items(), key=lambda kv: -kv[1]["forget_quality"].mean)
        lines += [f"**{split}** (target MU {t.get('model_utility', float('nan')):.3f}, FQ "
                  f"{t.get('forget_quality', float('nan')):.2g}; MU floor {floor:.3f})", "",
                  "| method | FQ | MU | keeps MU |", "|---|---|---|---|"]
        for keep in (True, False):
            for m, st in rows:
                fq, mu = st["forget_quality"], st["model_utility"]
                if (mu.mean >= floor) == keep:
                    lines.append(f"| {label(m)} | {_with_ci(fq.mean, fq.lo, fq.hi, '.2g')} | "
                                 f"{_with_ci(mu.mean, mu.lo, mu.hi, '.3f')} | {'yes' if keep else 'no'} |")
        lines.append("")
    return "\n".join(lines) + ("Test questions, the selected configuration of every method; mean and 95% t-interval "
                               f"over {n_seeds} seeds; methods that keep MU first, by mean FQ.\n")


def _law_report(cfg, stages: list, report_dir: Path) -> list[dict]:
    """law.csv, law.md, law_curves.csv and law_curves.png from the law runs (none: nothing written)."""
    from .laws import law_markdown, law_table, load_law_runs, plot_laws
    from .report import LM_COLUMNS

    law_runs = load_law_runs(st.out for st in stages if st.kind == "law")
    if not law_runs:
        return []
    table = law_table(law_runs)
    write_csv(report_dir / "law.csv", table)
    write_text(report_dir / "law.md", law_markdown(table, cfg.settings().get("law_runs", {})))
    split = cfg.tuned_on
    frames = [pd.DataFrame({"split": split, "method": m, "step": log["step"].astype(int),
                            "param_distance": log["param_dist"], "forget_logp_sum": log["forget_logp"],
                            "forget_logp_token": log["forget_logp_per_token"]})
              for m, (log, _) in law_runs.items() if log is not None]
    write_csv(report_dir / "law_curves.csv", pd.concat(frames, ignore_index=True)[list(LM_COLUMNS)] if frames
              else pd.DataFrame(columns=list(LM_COLUMNS)))
    practice = {}
    if (report_dir / "lm_curves.csv").is_file():
        lm = pd.read_csv(report_dir / "lm_curves.csv")
        practice = {m: g for m, g in lm[lm.split == split].groupby("method")}
    plot_laws(law_runs, practice, report_dir / "law_curves.png")
    return table.to_dict("records")


def results_markdown(settings: dict, timings: dict, table: pd.DataFrame, targets: dict, side_fits: dict,
                     last_md: str = "", seeds_md: str = "", selection_md: str = "", law_md: str = "",
                     best_ci_md: str = "") -> str:
    lines = [f"# tofu-{settings['preset']} study", "",
             f"Model `{settings['model']}`; forget splits {', '.join(settings['forget'])}; methods "
             f"{', '.join(settings['methods'])}.",
             f"Evaluation on the first {settings['eval_ds_size']} questions of each eval set, greedy answers of at "
             f"most {settings['eval_max_new_tokens']} tokens for ROUGE (TOFU: 300 questions, longer answers): forget "
             "quality is a KS p-value over that many forget questions, so it is coarse.", "",
             "## Targets", "", "| split | target MU | target FQ | target forget ROUGE |", "|---|---|---|---|"]
    for s, t in targets.items():
        lines.append(f"| {s} | {t['model_utility']:.3f} | {t.get('forget_quality', float('nan')):.3g} | "
                     f"{t.get('forget_rouge', float('nan')):.3f} |")
    sel = settings.get("select", "last")
    lines += ["", f"Model selection, declared before the run: `--select {sel}`, "
              f"{settings['select_rule']}. The tofu-mini holdout (non-members of the MIAs) is "
              "full.json authors 170-179; the oracle of each split judges fluency."]
    tuning = settings.get("tuning")
    if tuning and selection_md:
        lines += ["", "## The selected configuration of every method", "",
                  f"Grid on {tuning['split']}'s validation questions (positions 0, 5, 10, 15 of each author's 20; "
                  "every 5th row of real_authors and world_facts): lr ∈ "
                  f"{{{', '.join(f'{x:g}' for x in tuning['lrs'])}}}"
                  f" × epochs 1..{max(tuning['epochs'])} (AdamW, constant lr after one warm-up epoch, so epoch k of "
                  f"a run is a k-epoch run) × β ∈ {{{', '.join(f'{x:g}' for x in tuning['beta_factors'])}}} × the "
                  "registry β for the NPO family. Every number below this table is on the test questions.", "",
                  selection_md]
    if last_md:
        lines += ["", "## Selected epoch (seed " + str(settings["seeds"][0]) + "), with 95% bootstrap CIs over "
                  "test questions" if tuning else "## Last epoch, with 95% bootstrap CIs over questions", "", last_md]
    if seeds_md:
        if best_ci_md:
            lines += ["", f"## Best forget quality at MU ≥ {settings.get('mu_fraction', 0.9):g} × target MU, across "
                      "seeds", "", best_ci_md]
        lines += ["", "## Across seeds", "", seeds_md]
    lines += ["", "## Best forget quality at MU ≥ 0.9 × target MU (epoch picked on the test set)", "",
              table_markdown(table), "— : no evaluated epoch kept MU above the threshold. This table picks each "
              "run's best epoch on the test (forget) set, so it is optimistic; the declared selection is above.", "",
              "![FQ vs MU](fq_mu_trajectories.png)", "", "## Side by side", "", "![side by side](side_by_side.png)", ""]
    if law_md:
        lines += ["## Divergence laws on the LM (SGD, constant lr)", "", law_md, "![laws](law_curves.png)", ""]
    for setting, per in side_fits.items():
        for m, f in per.items():
            if "dist" in f:
                lines.append(f"- {setting}, {label(m)}: ‖θ_t−θ_0‖ {OBJECTIVES[m].law} fit "
                             f"slope {f['dist']['slope']:.3g}, R² {f['dist']['r2']:.3f}")
    if settings.get("unfinished_runs"):
        lines += ["", f"**Not finished, not in the table:** {', '.join(settings['unfinished_runs'])}."]
    lines += ["", "## Stage wall times (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


def _copy_to_figures(report_dir: Path, dest: Path) -> None:
    """The small report files into ``dest``, keeping the hand-written notes of a committed results.md."""
    for name in REPORT_FILES:
        if (report_dir / name).is_file():
            data = (report_dir / name).read_bytes()
            old = dest / name
            if name == "results.md" and old.is_file() and NOTES_HEADING in old.read_text():
                data += ("\n" + NOTES_HEADING + old.read_text().split(NOTES_HEADING, 1)[1]).encode()
            write_bytes(dest / name, data)


def report(cfg, stages: list, timings: dict, timings_path: Path, t_all: float,
           side: tuple[Path | None, Path | None] = (None, None)) -> pd.DataFrame:
    """The report of the finished runs (with report_only, whatever has finished so far), the side-by-side
    figure, results.md and timings; copied into ``cfg.figures`` when set. Returns the best-FQ table."""
    from npo_sim.plots.side_by_side import plot_side_by_side

    out = Path(cfg.out)
    t0 = time.time()
    th, mk = side  # the logistic-lab trajectories and Markov curves (study._side_inputs)
    report_dir = out / "report"
    unlearn = [st for st in stages if st.kind == "unlearn"]
    done = {str(st.out) for st in unlearn if (st.out / "run.json").is_file() and (st.out / "eval_curve.csv").is_file()}
    settings = {**cfg.settings(), "unfinished_runs": [st.name for st in unlearn if str(st.out) not in done]}
    reported = " (test)" if cfg.select == "val" else ""  # the grid's val evals select; they are not reported
    targets = [str(p) for st in stages if st.kind == "eval" and st.name.startswith("eval target ")
               and st.name.endswith(reported) and "(" not in st.name.replace(reported, "")
               if (p := st.out / "summary.json").is_file()]
    seeds = cfg.unlearn_seeds
    by_seed = {s: [str(st.out) for st in unlearn if st.seed == s and str(st.out) in done] for s in seeds}
    summary = build_report(by_seed[seeds[0]], report_dir, targets)
    if len(seeds) > 1:
        tables = {seeds[0]: pd.DataFrame(summary["last_epoch"], columns=list(LAST_COLUMNS))}
        for s in seeds[1:]:
            if by_seed[s]:
                sub = build_report(by_seed[s], report_dir / f"seed-{s}", targets)
                tables[s] = pd.DataFrame(sub["last_epoch"], columns=list(LAST_COLUMNS))
        seed_table = across_seeds(tables)
        write_csv(report_dir / "seeds.csv", seed_table)
        write_text(report_dir / "seeds.md", seeds_markdown(seed_table, list(tables)))
        write_text(report_dir / "best_fq_ci.md", best_fq_ci_markdown(seed_table, load_target_evals(targets),
                                                                     cfg.mu_fraction, len(tables)))
        summary["seeds"] = {"seeds": list(tables), "across_seeds": seed_table.to_dict("records"),
                            "figures_and_tables_of_seed": seeds[0]}
    law_summary = _law_report(cfg, stages, report_dir)
    # the side-by-side LM panel: the constant-step law runs when there are any (the setting of the theorem)
    lm_side = report_dir / ("law_curves.csv" if law_summary else "lm_curves.csv")
    fits = plot_side_by_side(th, mk, lm_side, report_dir / "side_by_side.png")
    if cfg.select == "val":
        for name in ("grid.csv", "selection.csv", "selection.md"):
            if (out / "tune" / name).is_file():
                write_bytes(report_dir / name, (out / "tune" / name).read_bytes())
        summary["selection"] = json.loads((out / "tune" / "selection.json").read_text())
    if law_summary:
        summary["law"] = law_summary
    timings["report"] = time.time() - t0
    # wall time summed over invocations (a resumed study adds to it)
    timings["study wall, all invocations"] = (timings.pop("total (this invocation)", 0.0)
                                             + timings.get("study wall, all invocations", 0.0) + time.time() - t_all)
    write_json(timings_path, timings)
    table = pd.DataFrame(summary["best_fq"], columns=list(TABLE_COLUMNS))
    write_json(report_dir / "summary.json", {**summary, "settings": settings, "side_by_side_fits": fits,
                                             "timings": timings})
    read = lambda name: (report_dir / name).read_text() if (report_dir / name).is_file() else ""  # noqa: E731
    write_text(report_dir / "results.md", results_markdown(settings, timings, table, load_target_evals(targets), fits,
                                                           read("last_epoch.md"),
                                                           read("seeds.md") if len(seeds) > 1 else "",
                                                           read("selection.md"), read("law.md"),
                                                           read("best_fq_ci.md") if len(seeds) > 1 else ""))
    write_json(report_dir / "timings.json", timings)
    if cfg.figures:
        dest = Path(cfg.figures) / f"tofu_{cfg.preset}"
        _copy_to_figures(report_dir, dest)
        print(f"copied the report into {dest}")
    return table
