"""``npo-tofu report`` (tables and figures from run directories) and ``npo-tofu study`` (the tofu-mini study).

**report.** From any set of ``npo-tofu unlearn --eval-every-epoch`` run directories (each holding
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
* ``summary.json``: the inputs, the table and the target points.

**study.** Fine-tunes the target (``--split full``) and one oracle per forget split (``retainYY``),
evaluates both (the oracle's log is the reference for FQ, the target's MU the baseline), unlearns
every forget split × method with ``--eval-every-epoch``, then runs the report and the side-by-side
figure. Each stage runs as a subprocess (``--launcher`` prefixes training stages, e.g. ``accelerate
launch --config_file ...``) and is skipped when its finished outputs exist, so a killed study resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from npo_sim.runio import UserError, save_figure, write_bytes, write_csv, write_json, write_text

MINI_METHODS = ("ga", "ga_rt", "ga_kl", "idk_rt", "npo", "npo_rt", "npo_kl", "simnpo")
LM_COLUMNS = ("split", "method", "step", "param_distance", "forget_logp_sum", "forget_logp_token")
TABLE_COLUMNS = ("split", "method", "target_mu", "mu_threshold", "best_fq", "best_epoch", "mu_at_best",
                 "last_epoch", "fq_last", "mu_last", "max_fq_any_mu")
#: a hand-written section of figures/<study>/results.md that a re-run keeps
NOTES_HEADING = "## Reading these results"
#: small report files copied into figures/<study>/
REPORT_FILES = ("fq_mu_trajectories.png", "best_fq.csv", "best_fq.md", "eval_curves.csv", "lm_curves.csv",
                "summary.json", "side_by_side.png", "results.md", "timings.json")


# --------------------------------------------------------------------------------------------------
# reading run directories
# --------------------------------------------------------------------------------------------------
def eval_split_of(cfg: dict) -> str:
    """The eval split name of an unlearning run (``mini-`` prefixed under the mini preset)."""
    split = cfg.get("forget") or ""
    if cfg.get("preset") == "mini" and not split.startswith("mini-"):
        split = f"mini-{split}"
    return split


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
    return {"dir": str(d), "config": cfg, "split": eval_split_of(cfg), "method": cfg["method"],
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
    order = {m: i for i, m in enumerate(MINI_METHODS)}
    df = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    return df.sort_values(["split", "method"], key=lambda s: s.map(order).fillna(99) if s.name == "method" else s,
                          kind="stable").reset_index(drop=True)


def table_markdown(df: pd.DataFrame) -> str:
    from npo_sim.plots import label

    head = "| split | method | best FQ (MU ≥ thr) | epoch | MU there | MU thr | last FQ | last MU |\n|---|---|---|---|---|---|---|---|\n"
    f = lambda v, fmt: "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)  # noqa: E731
    lines = [f"| {r.split} | {label(r.method)} | {f(r.best_fq, '.3g')} | {f(r.best_epoch, '.0f')} | "
             f"{f(r.mu_at_best, '.3f')} | {f(r.mu_threshold, '.3f')} | {f(r.fq_last, '.3g')} | {f(r.mu_last, '.3f')} |"
             for r in df.itertuples()]
    return head + "\n".join(lines) + "\n"


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
    from npo_sim.plots import color, label, new_figure

    splits = list(dict.fromkeys(curves["split"]))
    fig, axes = new_figure(ncols=len(splits), width=4.8, height=3.8)
    floor = 1e-30
    for ax, split in zip(axes[0], splits):
        d = curves[curves["split"] == split]
        for m, g in d.groupby("method", sort=False):
            g = g.sort_values("epoch")
            ax.plot(g["model_utility"], g["forget_quality"].clip(lower=floor), marker="o", ms=3, lw=1.3,
                    color=color(m), label=label(m))
            last = g.iloc[-1]
            ax.plot(last["model_utility"], max(last["forget_quality"], floor), marker="s", ms=5, color=color(m))
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
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, out_path)


# --------------------------------------------------------------------------------------------------
# npo-tofu report
# --------------------------------------------------------------------------------------------------
def build_report(run_dirs, out, target_evals=(), mu_fraction: float = 0.9) -> dict:
    """Validate every input, then write the table, curves, figure and summary into ``out``."""
    if not run_dirs:
        raise UserError("no run directories given")
    if not 0 < mu_fraction <= 1:
        raise UserError(f"--mu-fraction must be in (0, 1], got {mu_fraction}")
    runs = [load_run(d) for d in run_dirs]
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
    write_csv(out / "best_fq.csv", table)
    write_text(out / "best_fq.md", table_markdown(table))
    write_csv(out / "eval_curves.csv", curves)
    write_csv(out / "lm_curves.csv", lm)
    plot_trajectories(curves, targets, out / "fq_mu_trajectories.png", mu_fraction)
    summary = {
        "runs": [{"dir": r["dir"], "split": r["split"], "method": r["method"], "epochs": int(r["eval_curve"]["epoch"].max()),
                  "steps": int(r["train_log"]["step"].max()), "config": r["config"]} for r in runs],
        "targets": {s: {k: t.get(k) for k in ("path", "model_utility", "forget_quality", "forget_rouge", "n_forget")}
                    for s, t in targets.items()},
        "mu_fraction": mu_fraction,
        "best_fq": table.to_dict("records"),
        "missing_targets": sorted({r["split"] for r in runs} - set(targets)),
    }
    write_json(out / "summary.json", summary)
    return summary


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="*", help="npo-tofu unlearn --eval-every-epoch run directories")
    p.add_argument("--out", default="runs/report", help="output directory")
    p.add_argument("--target-eval", action="append", default=[],
                   help="the target's npo-tofu eval summary.json (or its directory), one per forget split; repeatable")
    p.add_argument("--mu-fraction", type=float, default=0.9, help="MU floor for the best-FQ table, × target MU")


def report_main(args) -> int:
    s = build_report(args.run_dirs, args.out, args.target_eval, args.mu_fraction)
    print(table_markdown(pd.DataFrame(s["best_fq"], columns=list(TABLE_COLUMNS))))
    if s["missing_targets"]:
        print(f"note: no --target-eval for {', '.join(s['missing_targets'])}: no MU threshold, best FQ left empty")
    print(f"wrote {args.out}/best_fq.csv, best_fq.md, eval_curves.csv, lm_curves.csv, fq_mu_trajectories.png, summary.json")
    return 0


# --------------------------------------------------------------------------------------------------
# npo-tofu study
# --------------------------------------------------------------------------------------------------
def add_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=("mini", "tofu"), default="mini",
                   help="mini: tofu-mini on CPU with tiny-llama; tofu: the real splits (GPU)")
    p.add_argument("--model", default=None, help="tiny-llama[:1m|5m|20m] (mini default 5m) or an HF id")
    p.add_argument("--forget", default=None,
                   help="comma list (mini default mini-forget10,mini-forget50; tofu default forget10)")
    p.add_argument("--retain", default=None, help="comma list aligned with --forget (default: the complements)")
    p.add_argument("--methods", default=",".join(MINI_METHODS), help="comma list of npo_sim.losses objectives")
    p.add_argument("--epochs", type=int, default=None, help="unlearning epochs (preset default: 10)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs (preset default)")
    p.add_argument("--lr", type=float, default=None, help="unlearning lr (preset default)")
    p.add_argument("--finetune-lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per-device batch, fine-tuning and unlearning")
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="study directory (default runs/tofu-mini or runs/tofu)")
    p.add_argument("--figures", default="figures", help="copy the small outputs into FIGURES/tofu_<preset>; '' = don't")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--eval-ds-size", type=int, default=None, help="questions per eval set (mini 40, tofu 300)")
    p.add_argument("--eval-max-new-tokens", type=int, default=None, help="greedy tokens for ROUGE (mini 32, tofu 128)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads of each stage")
    p.add_argument("--launcher", default=None,
                   help="prefix of training stages, e.g. 'accelerate launch --config_file full_scale/accelerate/multi_gpu.yaml'")
    p.add_argument("--theory-dir", default="runs/figures/theory", help="logistic lab run (computed --quick if absent)")
    p.add_argument("--markov-dir", default="runs/figures/markov_divergence",
                   help="Markov divergence run (computed --quick if absent)")
    p.add_argument("--train-args", default="",
                   help="extra flags for every finetune/unlearn stage, e.g. '--dtype float32' under FSDP")
    p.add_argument("--jobs", type=int, default=1, help="stages run at once within a group (CPU: 1-2)")
    p.add_argument("--dry-run", action="store_true", help="print the stages and exit")
    p.add_argument("--report-only", action="store_true", help="run no stage; report the finished runs")


def _split_list(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def plan_study(args) -> tuple[list[dict], dict]:
    """The study's stages ``{name, kind, cmd, out, done}`` and the resolved settings."""
    from npo_sim.losses import OBJECTIVES

    from .train import _retain_of

    mini = args.preset == "mini"
    model = args.model or ("tiny-llama:5m" if mini else None)
    if model is None:
        raise UserError("--model is required with --preset tofu (an HF id such as meta-llama/Llama-2-7b-chat-hf)")
    forgets = _split_list(args.forget) or (["mini-forget10", "mini-forget50"] if mini else ["forget10"])
    retains = _split_list(args.retain) or [_retain_of(f) for f in forgets]
    if len(retains) != len(forgets):
        raise UserError(f"--retain has {len(retains)} entries, --forget {len(forgets)}")
    for f in forgets:
        if mini != f.startswith("mini-"):
            raise UserError(f"--forget {f}: use mini-forgetXX with --preset mini and forgetXX with --preset tofu")
    methods = _split_list(args.methods)
    unknown = [m for m in methods if m not in OBJECTIVES]
    if not methods or unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(OBJECTIVES)}")
    for name in ("epochs", "finetune_epochs", "batch_size", "grad_accum", "eval_ds_size", "eval_max_new_tokens",
                 "eval_batch_size", "threads", "jobs"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    out = Path(args.out or ("runs/tofu-mini" if mini else "runs/tofu"))
    settings = {"preset": args.preset, "model": model, "forget": forgets, "retain": retains, "methods": methods,
                "eval_ds_size": args.eval_ds_size or (40 if mini else 300),
                "eval_max_new_tokens": args.eval_max_new_tokens or (32 if mini else 128),
                "eval_batch_size": args.eval_batch_size, "out": str(out)}

    py = [sys.executable]
    launcher = shlex.split(args.launcher) if args.launcher else py
    common = ["--preset", args.preset, "--seed", str(args.seed), "--no-progress"]
    for flag, v in (("--data-dir", args.data_dir), ("--batch-size", args.batch_size),
                    ("--grad-accum", args.grad_accum), ("--threads", args.threads)):
        if v is not None:
            common += [flag, str(v)]
    common += shlex.split(args.train_args or "")
    ft = list(common)
    for flag, v in (("--epochs", args.finetune_epochs), ("--lr", args.finetune_lr)):
        if v is not None:
            ft += [flag, str(v)]
    ul = list(common)
    for flag, v in (("--epochs", args.epochs), ("--lr", args.lr)):
        if v is not None:
            ul += [flag, str(v)]
    ev = ["--ds-size", str(settings["eval_ds_size"]), "--max-new-tokens", str(settings["eval_max_new_tokens"]),
          "--batch-size", str(args.eval_batch_size)] + (["--data-dir", args.data_dir] if args.data_dir else [])
    done_model = lambda d: (d / "run.json").is_file() and (d / "model").is_dir()  # noqa: E731
    stages = []

    def finetune(name, split, d, extra=()):
        stages.append({"name": name, "kind": "finetune", "group": 0, "out": d, "done": done_model(d),
                       "cmd": launcher + ["-m", "full_scale.cli", "finetune", "--split", split, "--model", model,
                                          "--out", str(d), *extra, *ft]})

    target = out / "target"
    finetune("finetune target (full)", "full", target)
    for f, r in zip(forgets, retains):
        finetune(f"finetune oracle ({r})", r, out / f"oracle-{f}", ["--forget", f])
    for f, r in zip(forgets, retains):
        for who, d in (("oracle", out / f"oracle-{f}"), ("target", target)):
            e = out / "eval" / f"{who}-{f}"
            retain_log = [] if who == "oracle" else ["--retain-log", str(out / "eval" / f"oracle-{f}" / "eval_log_aggregated.json")]
            stages.append({"name": f"eval {who} on {f}", "kind": "eval", "group": 1 if who == "oracle" else 2, "out": e,
                           "done": (e / "summary.json").is_file(),
                           "cmd": py + ["-m", "full_scale.cli", "eval", "--model", str(d / "model"), "--forget-split", f,
                                        "--out", str(e), *retain_log, *ev]})
    for f, r in zip(forgets, retains):
        oracle_log = out / "eval" / f"oracle-{f}" / "eval_log_aggregated.json"
        for m in methods:
            d = out / "unlearn" / f / m
            stages.append({
                "name": f"unlearn {f} {m}", "kind": "unlearn", "group": 3, "out": d, "done": (d / "run.json").is_file(),
                "resume": (d / "config.json").is_file(),
                "cmd": launcher + ["-m", "full_scale.cli", "unlearn", "--eval-batch-size", str(args.eval_batch_size),
                                   "--eval-max-new-tokens", str(settings["eval_max_new_tokens"]),
                                   "--model", str(target / "model"), "--forget", f, "--retain", r, "--method", m,
                                   "--out", str(d), "--eval-every-epoch", "--eval-ds-size", str(settings["eval_ds_size"]),
                                   "--retain-log", str(oracle_log), *ul]})
    for st in stages:  # also caps the threads of eval stages (no --threads flag) via OMP_NUM_THREADS
        st["threads"] = args.threads
    return stages, settings


def _run_stage(st: dict, log_path: Path) -> float:
    """Run one stage as a subprocess, its output appended to ``log_path``; returns its wall seconds."""
    cmd = st["cmd"] + (["--resume"] if st.get("resume") else [])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        t0 = time.time()
        env = {**os.environ, **({"OMP_NUM_THREADS": str(st["threads"])} if st.get("threads") else {})}
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise UserError(f"stage '{st['name']}' failed (exit {proc.returncode}); see {log_path}")
    return time.time() - t0


def _stage_log(out: Path, st: dict) -> Path:
    return out / "logs" / (st["name"].replace(" ", "_").replace("(", "").replace(")", "") + ".log")


def run_stages(stages: list[dict], out: Path, jobs: int, timings: dict, timings_path: Path) -> list[str]:
    """Run the stages in dependency groups (fine-tunes, oracle evals, target evals, unlearning runs),
    up to ``jobs`` at a time within a group, in list order; skip finished ones. A failed unlearning
    run is reported and skipped; returns the names of the failed stages."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    groups = [[s for s in stages if s["group"] == g] for g in sorted({s["group"] for s in stages})]
    bar = tqdm(total=len(stages), desc="npo-tofu study", unit="stage", dynamic_ncols=True)
    failed: list[str] = []
    for group in groups:
        todo = []
        for st in group:
            if st["done"]:
                print(f"[skip] {st['name']} (done)", flush=True)
                bar.update(1)
            else:
                todo.append(st)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {}
            for st in todo:
                futures[pool.submit(_run_stage, st, _stage_log(out, st))] = st
            for fut in as_completed(futures):
                st = futures[fut]
                try:
                    timings[st["name"]] = fut.result()
                except UserError as exc:
                    if st["kind"] != "unlearn":  # later stages depend on it
                        raise
                    failed.append(st["name"])
                    print(f"[fail] {exc}", flush=True)
                else:
                    print(f"[done] {st['name']}: {timings[st['name']]:.0f} s", flush=True)
                    write_json(timings_path, timings)
                bar.update(1)
    bar.close()
    return failed


def _side_inputs(args, out: Path) -> tuple[Path, Path]:
    """The logistic-lab trajectories and Markov divergence curves, computed at --quick when absent."""
    th, mk = Path(args.theory_dir), Path(args.markov_dir)
    for d, name, cmd in ((th, "trajectories.csv", ["theory", "--quick"]),
                         (mk, "curves.csv", ["markov", "--preset", "divergence", "--quick"])):
        if not (d / name).is_file():
            st = {"name": f"npo-sim {cmd[0]}", "cmd": [sys.executable, "-m", "npo_sim.cli", *cmd, "--out", str(d),
                                                         "--figures", ""]}
            _run_stage(st, _stage_log(out, st))
    return th / "trajectories.csv", mk / "curves.csv"


def results_markdown(settings: dict, timings: dict, table: pd.DataFrame, targets: dict, side_fits: dict) -> str:
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
    lines += ["", "## Best forget quality at MU ≥ 0.9 × target MU", "", table_markdown(table),
              "— : no evaluated epoch kept MU above the threshold.", "",
              "![FQ vs MU](fq_mu_trajectories.png)", "", "## Side by side", "", "![side by side](side_by_side.png)", ""]
    for setting, per in side_fits.items():
        for m, f in per.items():
            if "dist" in f:
                lines.append(f"- {setting}, {m.upper()}: ‖θ_t−θ_0‖ {'linear' if m == 'ga' else 'log'} fit "
                             f"slope {f['dist']['slope']:.3g}, R² {f['dist']['r2']:.3f}")
    if settings.get("unfinished_runs"):
        lines += ["", f"**Not finished, not in the table:** {', '.join(settings['unfinished_runs'])}."]
    lines += ["", "## Stage wall times (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


def study_main(args) -> int:
    stages, settings = plan_study(args)
    if args.dry_run:
        for st in stages:
            print(("[done] " if st["done"] else "") + shlex.join(st["cmd"]))
        return 0
    out = Path(settings["out"])
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    t_all = time.time()
    print(f"study: {len(stages)} stages ({sum(st['done'] for st in stages)} done), jobs={args.jobs}, "
          f"stage logs in {out / 'logs'}", flush=True)
    failed = [] if args.report_only else run_stages(stages, out, args.jobs, timings, timings_path)
    t0 = time.time()
    th, mk = _side_inputs(args, out)
    report_dir = out / "report"
    # finished runs only (with --report-only, whatever has finished so far)
    runs = [str(st["out"]) for st in stages if st["kind"] == "unlearn" and (st["out"] / "run.json").is_file()
            and (st["out"] / "eval_curve.csv").is_file()]
    missing = [st["name"] for st in stages if st["kind"] == "unlearn" and str(st["out"]) not in runs]
    targets = [str(out / "eval" / f"target-{f}" / "summary.json") for f in settings["forget"]
               if (out / "eval" / f"target-{f}" / "summary.json").is_file()]
    settings["unfinished_runs"] = missing
    summary = build_report(runs, report_dir, targets)
    from npo_sim.plots.side_by_side import plot_side_by_side

    fits = plot_side_by_side(th, mk, report_dir / "lm_curves.csv", report_dir / "side_by_side.png")
    timings["report"] = time.time() - t0
    # wall time summed over invocations (a resumed study adds to it)
    timings["study wall, all invocations"] = (timings.pop("total (this invocation)", 0.0)
                                             + timings.get("study wall, all invocations", 0.0) + time.time() - t_all)
    write_json(timings_path, timings)
    table = pd.DataFrame(summary["best_fq"], columns=list(TABLE_COLUMNS))
    tsum = load_target_evals(targets)
    write_json(report_dir / "summary.json", {**summary, "settings": settings, "side_by_side_fits": fits,
                                             "timings": timings})
    write_text(report_dir / "results.md", results_markdown(settings, timings, table, tsum, fits))
    write_json(report_dir / "timings.json", timings)
    if args.figures:
        dest = Path(args.figures) / f"tofu_{args.preset}"
        for name in REPORT_FILES:
            if (report_dir / name).is_file():
                data = (report_dir / name).read_bytes()
                old = dest / name
                if name == "results.md" and old.is_file() and NOTES_HEADING in old.read_text():
                    # keep the hand-written notes of a committed results.md
                    data += ("\n" + NOTES_HEADING + old.read_text().split(NOTES_HEADING, 1)[1]).encode()
                write_bytes(dest / name, data)
        print(f"copied the report into {dest}")
    print(table_markdown(table))
    print(f"study done in {time.time() - t_all:.0f} s -> {report_dir}")
    return 0
