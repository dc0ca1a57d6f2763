"""``npo-tofu report``: tables and figures from run directories, and the TOFU claims of ``figures/REPORT.md``.

From any set of ``npo-tofu unlearn --eval-every-epoch`` run directories (each holding
``config.json``, ``train_log.csv`` and ``eval_curve.csv``) and, optionally, the target model's
``npo-tofu eval`` summaries (``--target-eval``, one per forget split), it writes into ``--out``:

* ``fq_mu_trajectories.png``: the paper-style figure, one panel per forget split, forget quality (log
  scale) against model utility, one line per method through the epochs, starting at the target;
* ``best_fq.csv`` / ``best_fq.md``: per split and method, the best FQ over the epochs whose MU is at
  least ``--mu-fraction`` (0.9) × the target's MU, with its epoch and MU (and the last epoch's values);
* ``eval_curves.csv``: every run's eval curve, tidy, with ``split`` and ``method``;
* ``lm_curves.csv``: ``(split, method, step, param_distance, forget_logp_sum, forget_logp_token)``
  from ``train_log.csv``. Row ``step`` holds ‖θ_step − θ_0‖ after update ``step`` and the forget
  batch log-likelihood computed in that step (at the weights before the update);
* ``last_epoch.csv`` / ``last_epoch.md``: per split and method, the **last** epoch's metrics with their
  95% bootstrap CIs over questions (FQ, MU, exact memorization, extraction strength, Min-K%++ MIA AUC
  and privleak against the oracle, repetition, distinct-2, judge log-likelihood), the target first;
  the declared model selection is the last epoch, so this table picks nothing on the test set;
* ``summary.json``: the inputs, the tables and the target points.

The best-FQ table picks, per run, the epoch with the best FQ *on the test (forget) set* among those
above the MU threshold; its header says so.

:mod:`full_scale.tofu_claims` turns the committed outputs of the tofu-mini study (``figures/tofu_mini/``,
written by ``npo-tofu study``, :mod:`full_scale.study`) into the TOFU rows of ``figures/REPORT.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from npo_sim.losses import OBJECTIVES, color, label
from npo_sim.runio import UserError, check_out_dir, save_figure, write_csv, write_json, write_text

from .data import eval_split

LM_COLUMNS = ("split", "method", "step", "param_distance", "forget_logp_sum", "forget_logp_token")
TABLE_COLUMNS = ("split", "method", "target_mu", "mu_threshold", "best_fq", "best_epoch", "mu_at_best",
                 "last_epoch", "fq_last", "mu_last", "max_fq_any_mu")


# --------------------------------------------------------------------------------------------------
# reading run directories
# --------------------------------------------------------------------------------------------------
def load_run(run_dir) -> dict:
    """``{dir, config, split, method, train_log, eval_curve}`` of one unlearning run directory."""
    d = Path(run_dir)
    if not d.is_dir():
        raise UserError(f"run directory not found: {d}")
    for name in ("config.json", "train_log.csv", "eval_curve.csv"):
        if not (d / name).is_file():
            hint = " (run npo-tofu unlearn with --eval-every-epoch)" if name == "eval_curve.csv" else ""
            raise UserError(f"{d}: missing {name}{hint}")
    cfg = json.loads((d / "config.json").read_text())
    if cfg.get("command") != "unlearn" or not cfg.get("method"):
        raise UserError(f"{d}: config.json is not an unlearning run")
    log, curve = pd.read_csv(d / "train_log.csv"), pd.read_csv(d / "eval_curve.csv")
    for frame, cols, name in ((log, ("step", "param_dist", "forget_logp", "forget_logp_per_token"), "train_log.csv"),
                              (curve, ("epoch", "forget_quality", "model_utility"), "eval_curve.csv")):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise UserError(f"{d / name}: missing column(s) {', '.join(missing)}")
    if curve.empty:
        raise UserError(f"{d / 'eval_curve.csv'}: no evaluated epochs")
    return {"dir": str(d), "config": cfg, "split": eval_split(cfg.get("forget") or "", cfg.get("preset")),
            "method": cfg["method"],
            "train_log": log, "eval_curve": curve.sort_values("epoch").reset_index(drop=True)}


def load_target_evals(paths) -> dict[str, dict]:
    """forget split -> the target's ``npo-tofu eval`` summary (a summary.json or its directory)."""
    out = {}
    for p in paths or []:
        p = Path(p)
        p = p / "summary.json" if p.is_dir() else p
        if not p.is_file():
            raise UserError(f"target eval summary not found: {p}")
        s = json.loads(p.read_text())
        if "model_utility" not in s or "forget_split" not in s:
            raise UserError(f"{p}: not an npo-tofu eval summary (needs model_utility and forget_split)")
        out[s["forget_split"]] = {**s, "path": str(p)}
    return out


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------
def best_fq_row(curve: pd.DataFrame, target_mu: float | None, mu_fraction: float = 0.9) -> dict:
    """Best FQ over the epochs with MU >= mu_fraction × target MU (NaN when none, or no target)."""
    thr = mu_fraction * target_mu if target_mu is not None else math.nan
    ok = curve[curve["model_utility"] >= thr] if target_mu is not None else curve.iloc[0:0]
    last = curve.iloc[-1]
    row = {"target_mu": target_mu if target_mu is not None else math.nan, "mu_threshold": thr,
           "best_fq": math.nan, "best_epoch": math.nan, "mu_at_best": math.nan,
           "last_epoch": int(last["epoch"]), "fq_last": float(last["forget_quality"]),
           "mu_last": float(last["model_utility"]), "max_fq_any_mu": float(curve["forget_quality"].max())}
    if not ok.empty:
        best = ok.loc[ok["forget_quality"].idxmax()]
        row.update(best_fq=float(best["forget_quality"]), best_epoch=int(best["epoch"]),
                   mu_at_best=float(best["model_utility"]))
    return row


def best_fq_table(runs: list[dict], targets: dict[str, dict], mu_fraction: float = 0.9) -> pd.DataFrame:
    rows = []
    for r in runs:
        t = targets.get(r["split"])
        rows.append({"split": r["split"], "method": r["method"],
                     **best_fq_row(r["eval_curve"], t["model_utility"] if t else None, mu_fraction)})
    order = {m: i for i, m in enumerate(OBJECTIVES)}  # registry (display) order
    df = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    return df.sort_values(["split", "method"], key=lambda s: s.map(order).fillna(99) if s.name == "method" else s,
                          kind="stable").reset_index(drop=True)


def table_markdown(df: pd.DataFrame) -> str:
    head = ("| split | method | best FQ (MU ≥ thr; epoch picked on the test set) | epoch | MU there | MU thr | "
            "last FQ | last MU |\n"
            "|---|---|---|---|---|---|---|---|\n")
    f = lambda v, fmt: "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)  # noqa: E731
    lines = [f"| {r.split} | {label(r.method)} | {f(r.best_fq, '.3g')} | {f(r.best_epoch, '.0f')} | "
             f"{f(r.mu_at_best, '.3f')} | {f(r.mu_threshold, '.3f')} | {f(r.fq_last, '.3g')} | {f(r.mu_last, '.3f')} |"
             for r in df.itertuples()]
    return head + "\n".join(lines) + "\n"


#: (column, label, format) of the last-epoch table; each column has _lo and _hi in eval_curve.csv
LAST_METRICS = (("forget_quality", "FQ", ".2g"), ("model_utility", "MU", ".3f"),
                ("exact_memorization", "exact mem.", ".3f"), ("extraction_strength", "extraction", ".3f"),
                ("mia_auc_min_k_plus_plus", "MIA AUC (Min-K%++)", ".3f"),
                ("privleak_min_k_plus_plus", "privleak (Min-K%++)", ".1f"),
                ("fluency_repetition", "repetition", ".3f"), ("fluency_distinct_2", "distinct-2", ".3f"),
                ("fluency_judge_logp", "judge log-lik/token", ".2f"))
LAST_COLUMNS = ("split", "method", "epoch", *(c for k, _, _ in LAST_METRICS for c in (k, f"{k}_lo", f"{k}_hi")))


def _target_row(split: str, t: dict) -> dict:
    ci = t.get("ci", {})
    row = {"split": split, "method": "target", "epoch": 0}
    for k, _, _ in LAST_METRICS:
        c = ci.get(k, {})
        row[k] = t.get(k, c.get("estimate", math.nan))
        row[f"{k}_lo"], row[f"{k}_hi"] = c.get("lo", math.nan), c.get("hi", math.nan)
    return row


def last_epoch_table(runs: list[dict], targets: dict[str, dict]) -> pd.DataFrame:
    """Per split: the target, then every run's last epoch, with the CI bounds (NaN where not measured)."""
    rows = []
    for split in dict.fromkeys(r["split"] for r in runs):
        if split in targets:
            rows.append(_target_row(split, targets[split]))
        for r in runs:
            if r["split"] == split:
                last = r["eval_curve"].iloc[-1]
                rows.append({"split": split, "method": r["method"], "epoch": int(last["epoch"]),
                             **{c: float(last[c]) if c in last.index else math.nan for c in LAST_COLUMNS[3:]}})
    order = {m: i for i, m in enumerate(("target", *OBJECTIVES))}
    df = pd.DataFrame(rows, columns=list(LAST_COLUMNS))
    return df.sort_values(["split", "method"], key=lambda s: s.map(order).fillna(99) if s.name == "method" else s,
                          kind="stable").reset_index(drop=True)


def _with_ci(v, lo, hi, fmt: str) -> str:
    ok = lambda x: x is not None and isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
    if not ok(v):
        return "—"
    return f"{v:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if ok(lo) and ok(hi) else f"{v:{fmt}}"


def last_markdown(df: pd.DataFrame) -> str:
    head = ("| split | method | epoch | " + " | ".join(lab for _, lab, _ in LAST_METRICS) + " |\n|"
            + "---|" * (3 + len(LAST_METRICS)) + "\n")
    lines = []
    for r in df.to_dict("records"):
        cells = [_with_ci(r[k], r[f"{k}_lo"], r[f"{k}_hi"], fmt) for k, _, fmt in LAST_METRICS]
        name = "target" if r["method"] == "target" else label(r["method"])
        lines.append(f"| {r['split']} | {name} | {r['epoch']} | " + " | ".join(cells) + " |")
    return (head + "\n".join(lines) + "\n\nLast epoch of every run (the declared model selection), 95% bootstrap "
            "CIs over questions in brackets; privleak against the oracle; — : not measured.\n")


SEED_COLUMNS = ("split", "method", "metric", "n_seeds", "mean", "lo", "hi", "values")


def across_seeds(tables: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """Mean and 95% t-interval across seeds of every last-epoch metric, per split and method (the
    per-seed values listed; the target is the same model in every seed, so it is left out)."""
    from scipy import stats

    rows = []
    frames = [t.assign(seed=s) for s, t in tables.items()]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*LAST_COLUMNS, "seed"])
    df = df[df.method != "target"]
    for (split, method), g in df.groupby(["split", "method"], sort=False):
        for k, _, _ in LAST_METRICS:
            v = g[k].to_numpy(float)
            v = v[np.isfinite(v)]
            n = v.size
            mean = float(v.mean()) if n else math.nan
            half = float(stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
            rows.append({"split": split, "method": method, "metric": k, "n_seeds": n, "mean": mean,
                         "lo": mean - half, "hi": mean + half, "values": " ".join(f"{x:.4g}" for x in v)})
    return pd.DataFrame(rows, columns=list(SEED_COLUMNS))


def seeds_markdown(df: pd.DataFrame, seeds) -> str:
    fmt = {k: f for k, _, f in LAST_METRICS}
    labels = {k: lab for k, lab, _ in LAST_METRICS}
    head = ("| split | method | metric | mean [95% t-interval across seeds] | per seed |\n|---|---|---|---|---|\n")
    lines = [f"| {r.split} | {label(r.method)} | {labels[r.metric]} | {_with_ci(r.mean, r.lo, r.hi, fmt[r.metric])} | "
             f"{r.values} |" for r in df.itertuples()]
    return (head + "\n".join(lines) + f"\n\nLast epoch of every run, seeds {', '.join(map(str, seeds))} of "
            "unlearning (the target and oracle are shared).\n")


def lm_curves(runs: list[dict]) -> pd.DataFrame:
    frames = []
    for r in runs:
        log = r["train_log"]
        frames.append(pd.DataFrame({"split": r["split"], "method": r["method"], "step": log["step"].astype(int),
                                    "param_distance": log["param_dist"], "forget_logp_sum": log["forget_logp"],
                                    "forget_logp_token": log["forget_logp_per_token"]}))
    return pd.concat(frames, ignore_index=True)[list(LM_COLUMNS)]


def eval_curves(runs: list[dict], targets: dict[str, dict]) -> pd.DataFrame:
    """All eval curves, tidy; epoch 0 is the target (when its eval is given)."""
    frames = []
    for r in runs:
        c = r["eval_curve"].copy()
        t = targets.get(r["split"])
        if t is not None and "forget_quality" in t:
            c = pd.concat([pd.DataFrame([{k: t.get(k, np.nan) for k in c.columns} | {"epoch": 0}]), c],
                          ignore_index=True)
        c.insert(0, "method", r["method"])
        c.insert(0, "split", r["split"])
        frames.append(c)
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------
def plot_trajectories(curves: pd.DataFrame, targets: dict[str, dict], out_path, mu_fraction: float = 0.9):
    """FQ (log) vs MU per split, one line per method through the epochs, the target as a star."""
    from npo_sim.plots import new_figure

    splits = list(dict.fromkeys(curves["split"]))
    many = curves["method"].nunique() > 10
    fig, axes = new_figure(ncols=len(splits), width=6.4 if many else 4.8, height=5.6 if many else 3.8)
    floor = 1e-30
    for ax, split in zip(axes[0], splits):
        d = curves[curves["split"] == split]
        for m, g in d.groupby("method", sort=False):
            g = g.sort_values("epoch")
            ax.plot(g["model_utility"], g["forget_quality"].clip(lower=floor), marker="o", ms=3, lw=1.3,
                    color=color(m), label=label(m))
            last = g.iloc[-1]
            ax.plot(last["model_utility"], max(last["forget_quality"], floor), marker="s", ms=5, color=color(m))
            if {"forget_quality_lo", "forget_quality_hi", "model_utility_lo", "model_utility_hi"} <= set(g.columns):
                e = g[g["epoch"] > 0]  # 95% bootstrap CIs over questions (the target's point has none here)
                fq = e["forget_quality"].clip(lower=floor)
                ax.errorbar(e["model_utility"], fq,
                            xerr=[(e["model_utility"] - e["model_utility_lo"]).clip(lower=0).fillna(0),
                                  (e["model_utility_hi"] - e["model_utility"]).clip(lower=0).fillna(0)],
                            yerr=[(fq - e["forget_quality_lo"].clip(lower=floor)).clip(lower=0).fillna(0),
                                  (e["forget_quality_hi"].clip(lower=floor) - fq).clip(lower=0).fillna(0)],
                            fmt="none", ecolor=color(m), elinewidth=0.6, alpha=0.45, capsize=0)
        t = targets.get(split)
        if t is not None:
            if "forget_quality" in t:
                ax.plot(t["model_utility"], max(t["forget_quality"], floor), marker="*", ms=14, color="k",
                        ls="none", label="target", zorder=5)
            ax.axvline(mu_fraction * t["model_utility"], color="k", ls=":", lw=0.8,
                       label=f"{mu_fraction:g}× target MU")
        ax.set_yscale("log")
        ax.set_xlabel("model utility")
        ax.set_ylabel("forget quality (KS p-value)")
        ax.set_title(split)
        ax.legend(fontsize=6 if d["method"].nunique() > 10 else 7, ncol=3 if d["method"].nunique() > 10 else 2)
    fig.tight_layout()
    save_figure(fig, out_path)


# --------------------------------------------------------------------------------------------------
# npo-tofu report
# --------------------------------------------------------------------------------------------------
def build_report(run_dirs, out, target_evals=(), mu_fraction: float = 0.9, allow_mixed_dialects: bool = False) -> dict:
    """Validate every input, then write the table, curves, figure and summary into ``out``. Runs of
    different dialects (``config.json``'s ``dialect``) are refused unless ``allow_mixed_dialects``."""
    if not run_dirs:
        raise UserError("no run directories given")
    if not 0 < mu_fraction <= 1:
        raise UserError(f"--mu-fraction must be in (0, 1], got {mu_fraction}")
    check_out_dir(out)
    runs = [load_run(d) for d in run_dirs]
    from .dialects import check_same

    check_same({r["dir"]: r["config"].get("dialect") for r in runs}, allow_mixed_dialects)
    seen = {}
    for r in runs:
        key = (r["split"], r["method"])
        if key in seen:
            raise UserError(f"two runs for {key[0]} / {key[1]}: {seen[key]} and {r['dir']}")
        seen[key] = r["dir"]
    targets = load_target_evals(target_evals)
    out = Path(out)
    table = best_fq_table(runs, targets, mu_fraction)
    curves = eval_curves(runs, targets)
    lm = lm_curves(runs)
    last = last_epoch_table(runs, targets)
    write_csv(out / "best_fq.csv", table)
    write_text(out / "best_fq.md", table_markdown(table))
    write_csv(out / "last_epoch.csv", last)
    write_text(out / "last_epoch.md", last_markdown(last))
    write_csv(out / "eval_curves.csv", curves)
    write_csv(out / "lm_curves.csv", lm)
    plot_trajectories(curves, targets, out / "fq_mu_trajectories.png", mu_fraction)
    summary = {
        "runs": [{"dir": r["dir"], "split": r["split"], "method": r["method"],
                  "epochs": int(r["eval_curve"]["epoch"].max()),
                  "steps": int(r["train_log"]["step"].max()), "config": r["config"]} for r in runs],
        "targets": {s: {k: t.get(k) for k in ("path", "model_utility", "forget_quality", "forget_rouge", "n_forget")}
                    for s, t in targets.items()},
        "mu_fraction": mu_fraction,
        "best_fq": table.to_dict("records"),
        "best_fq_selection": "best FQ among the epochs above the MU threshold, picked on the test (forget) set",
        "last_epoch": last.to_dict("records"),
        "missing_targets": sorted({r["split"] for r in runs} - set(targets)),
    }
    write_json(out / "summary.json", summary)
    return summary
