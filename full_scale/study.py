"""``npo-tofu study``: the tofu-mini study (or the full TOFU one) from fine-tuning to the report.

Fine-tunes the target (``--split full``) and one oracle per forget split (``retainYY``), evaluates both
(the oracle's log is the reference for forget quality, the target's MU the baseline), unlearns every
forget split × method with ``--eval-every-epoch``, then runs the report (:mod:`full_scale.report`) and
the side-by-side figure. Each stage runs as a subprocess (``launcher`` prefixes the training stages,
e.g. ``accelerate launch --config_file ...``) and is skipped when its finished outputs exist, so a
killed study resumes. Stages of one dependency group (fine-tunes, oracle evals, target evals,
unlearning runs) run up to ``jobs`` at a time.

**Stage directories are named by what they compute**: ``finetuned/target-KEY``, ``finetuned/oracle-F-KEY``,
``eval/WHO-F-KEY``, ``unlearn/F/[seed-S/]METHOD-KEY``, where KEY hashes the stage's command without
where and how fast it runs (``--out``, ``--threads``, ``--data-dir``, ``--no-progress``, the launcher,
the study's own path). Its inputs are paths to other stages' directories, so a changed fine-tuning
setting gives a new target, new evals and new unlearning runs, while an added method or seed reuses the
fine-tuned target and the oracles. A finished stage is never recomputed, and never reused for a
different setting.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from npo_sim.losses import OBJECTIVES, label
from npo_sim.runio import UserError, check_out_dir, write_bytes, write_csv, write_json, write_text

from .data import retain_of
from .dialects import get_dialect
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
                "results.md", "timings.json")
#: the divergence law Theorem 2 predicts for the side-by-side fits (a claim about these two methods)
LAW = {"ga": "linear", "npo": "log"}
#: declared model-selection rules (the report shows the selected epoch of every run)
SELECTIONS = {"last": "the last epoch of every run (nothing is picked on the test set)"}
#: per preset: default model, forget splits, output directory, eval questions and answer tokens
PRESET_DEFAULTS = {
    # 5M, 30 epochs at lr 2e-3: forget ROUGE-L 0.861 and MU 0.886 at epochs 25 and 30, train loss 0.05 -> 0.03
    # (measured on the 617-QA corpus; README "the tofu-mini study")
    "mini": {"model": "tiny-llama:5m", "forget": ("mini-forget10", "mini-forget50"), "out": "runs/tofu-mini",
             "eval_ds_size": 40, "eval_max_new_tokens": 32, "finetune_epochs": 30, "finetune_lr": 2e-3},
    "tofu": {"forget": ("forget10",), "out": "runs/tofu", "eval_ds_size": 300, "eval_max_new_tokens": 128},
}


@dataclass(frozen=True)
class StudyConfig:
    """The resolved study settings. ``None`` training settings keep the stages' preset defaults."""

    preset: str
    model: str
    forget: tuple[str, ...]
    retain: tuple[str, ...]
    methods: tuple[str, ...]
    out: str
    eval_ds_size: int
    eval_max_new_tokens: int
    eval_batch_size: int = 16
    epochs: int | None = None
    finetune_epochs: int | None = None
    lr: float | None = None
    finetune_lr: float | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    seed: int = 0
    figures: str = "figures"          #: copy the small outputs into FIGURES/tofu_<preset> ('' = don't)
    data_dir: str | None = None
    threads: int | None = None        #: torch threads of each stage (also OMP_NUM_THREADS)
    launcher: str | None = None       #: prefix of training stages
    theory_dir: str = "runs/figures/theory"
    markov_dir: str = "runs/figures/markov_divergence"
    train_args: str = ""              #: extra flags for every finetune/unlearn stage
    jobs: int = 1
    seeds: tuple[int, ...] = ()       #: unlearning seeds (default: (seed,)); the report gives mean and CI across them
    select: str = "last"              #: the declared model selection: the last epoch of every run
    holdout_file: str | None = None   #: non-member QA of the MIAs/privleak (tofu-mini: its own holdout)
    dialect: str = "npo-sim"          #: every stage's conventions (full_scale.dialects)
    #: LoRA and activation checkpointing of every finetune/unlearn stage (passed through; the stages validate them)
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_targets: str | None = None   #: comma list, as --lora-targets
    merge_lora: bool = False
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        mini = self.preset == "mini"
        if len(self.retain) != len(self.forget):
            raise UserError(f"retain has {len(self.retain)} entries, forget {len(self.forget)}")
        for f in self.forget:
            if mini != f.startswith("mini-"):
                raise UserError(f"forget split {f}: use mini-forgetXX with preset mini and forgetXX with preset tofu")
        unknown = [m for m in self.methods if m not in OBJECTIVES]
        if not self.methods or unknown:
            raise UserError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(OBJECTIVES)}")
        get_dialect(self.dialect)
        if self.select not in SELECTIONS:
            raise UserError(f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds must be distinct, got {', '.join(map(str, self.seeds))}")
        for name in ("epochs", "finetune_epochs", "batch_size", "grad_accum", "eval_ds_size", "eval_max_new_tokens",
                     "eval_batch_size", "threads", "jobs"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"{name} must be ≥ 1, got {v}")
        self.train_flags()  # bad LoRA settings: one line now, not in every stage
    def settings(self) -> dict:
        """What ``summary.json`` and ``results.md`` record of the study."""
        return {"preset": self.preset, "model": self.model, "forget": list(self.forget), "retain": list(self.retain),
                "methods": list(self.methods), "eval_ds_size": self.eval_ds_size,
                "eval_max_new_tokens": self.eval_max_new_tokens, "eval_batch_size": self.eval_batch_size,
                "out": self.out, "seeds": list(self.unlearn_seeds), "select": self.select,
                "select_rule": SELECTIONS[self.select], "holdout_file": self.holdout_file, "dialect": self.dialect,
                "judge": "the oracle of each forget split",
                **({"lora_flags": self.train_flags()} if self.train_flags() else {})}

    def train_flags(self) -> list[str]:
        """The LoRA / checkpointing flags of every finetune and unlearn stage (checked as the stages will)."""
        flags = _flags((("--lora-r", self.lora_r), ("--lora-alpha", self.lora_alpha),
                        ("--lora-dropout", self.lora_dropout), ("--lora-targets", self.lora_targets)))
        flags += ["--merge-lora"] * self.merge_lora + ["--gradient-checkpointing"] * self.gradient_checkpointing
        if flags:
            from .config import RunConfig

            targets = tuple(x.strip() for x in self.lora_targets.split(",") if x.strip()) \
                if self.lora_targets is not None else None
            RunConfig(model="x", out="x", epochs=1, lr=1.0, batch_size=1, grad_accum=1, lora_r=self.lora_r,
                      lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout or 0.0,
                      lora_targets=targets if self.lora_r is not None or targets else None,
                      merge_lora=self.merge_lora)
        return flags

    @property
    def unlearn_seeds(self) -> tuple[int, ...]:
        return tuple(self.seeds) or (self.seed,)


def study_config(preset: str, forget=(), retain=(), **settings) -> StudyConfig:
    """A :class:`StudyConfig` with the preset's defaults for unset (``None`` or empty) settings;
    ``retain`` defaults to the complements of ``forget``."""
    if preset not in PRESET_DEFAULTS:
        raise UserError(f"preset must be one of {', '.join(PRESET_DEFAULTS)}, got {preset!r}")
    given = {k: v for k, v in settings.items() if v is not None}
    resolved = {**PRESET_DEFAULTS[preset], **given, "forget": tuple(forget) or PRESET_DEFAULTS[preset]["forget"]}
    if "model" not in resolved:
        raise UserError("model is required with preset tofu (an HF id such as meta-llama/Llama-2-7b-chat-hf)")
    resolved["retain"] = tuple(retain) or tuple(retain_of(f) for f in resolved["forget"])
    return StudyConfig(preset=preset, **resolved)


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    name: str
    kind: str              #: finetune | eval | unlearn
    group: int             #: dependency group; groups run in order
    out: Path
    cmd: tuple[str, ...]
    done: bool             #: finished outputs exist (skipped)
    resume: bool = False   #: a started run directory (resumed with --resume)
    threads: int | None = None
    seed: int | None = None  #: unlearning seed (unlearn stages)


def _flags(pairs) -> list[str]:
    return [x for flag, v in pairs if v is not None for x in (flag, str(v))]


#: flags that say where or how fast a stage runs, not what it computes (left out of its key)
UNKEYED_FLAGS = {"--out": 1, "--threads": 1, "--data-dir": 1, "--no-progress": 0}


def stage_key(args, out: Path) -> str:
    """12 hex digits naming what ``args`` (a ``npo-tofu`` command after the launcher) computes: the
    arguments without :data:`UNKEYED_FLAGS`, with the study directory written as ``<study>``."""
    kept, it = [], iter(args)
    for a in it:
        if a in UNKEYED_FLAGS:
            for _ in range(UNKEYED_FLAGS[a]):
                next(it, None)
            continue
        kept.append(str(a).replace(str(out), "<study>"))
    return hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:12]


def plan(cfg: StudyConfig) -> list[Stage]:
    """Every stage of the study, in order; each stage's directory is named by its :func:`stage_key`."""
    out, py = Path(cfg.out), (sys.executable,)
    launcher = tuple(shlex.split(cfg.launcher)) if cfg.launcher else py
    common = ["--preset", cfg.preset, "--seed", str(cfg.seed), "--no-progress", "--dialect", cfg.dialect,
              *_flags((("--data-dir", cfg.data_dir), ("--batch-size", cfg.batch_size),
                       ("--grad-accum", cfg.grad_accum), ("--threads", cfg.threads))),
              *cfg.train_flags(), *shlex.split(cfg.train_args or "")]
    ft = common + _flags((("--epochs", cfg.finetune_epochs), ("--lr", cfg.finetune_lr)))
    ul = common + _flags((("--epochs", cfg.epochs), ("--lr", cfg.lr)))
    ev = ["--ds-size", str(cfg.eval_ds_size), "--max-new-tokens", str(cfg.eval_max_new_tokens),
          "--batch-size", str(cfg.eval_batch_size), "--dialect", cfg.dialect] + _flags((("--data-dir", cfg.data_dir),))
    tofu = ("-m", "full_scale.cli")
    stages = []

    def finetune(name, slug, split, extra=()) -> Path:
        args = ("finetune", "--split", split, "--model", cfg.model, *extra, *ft)
        d = out / "finetuned" / f"{slug}-{stage_key(args, out)}"
        stages.append(Stage(name, "finetune", 0, d, (*launcher, *tofu, *args, "--out", str(d)),
                            done=(d / "run.json").is_file() and (d / "model").is_dir(), threads=cfg.threads))
        return d

    target = finetune("finetune target (full)", "target", "full")
    oracle = {f: finetune(f"finetune oracle ({r})", f"oracle-{f}", r, ["--forget", f])
              for f, r in zip(cfg.forget, cfg.retain)}
    holdout = _flags((("--holdout-file", cfg.holdout_file),))
    oracle_log: dict[str, Path] = {}
    for f in cfg.forget:
        judge = ["--judge-model", str(oracle[f] / "model")]  # the oracle judges fluency
        for who, d in (("oracle", oracle[f]), ("target", target)):
            retain_log = [] if who == "oracle" else ["--retain-log", str(oracle_log[f])]
            args = ("eval", "--model", str(d / "model"), "--forget-split", f, *retain_log, *ev, *holdout, *judge)
            e = out / "eval" / f"{who}-{f}-{stage_key(args, out)}"
            if who == "oracle":
                oracle_log[f] = e / "eval_log_aggregated.json"
            stages.append(Stage(f"eval {who} on {f}", "eval", 1 if who == "oracle" else 2, e,
                                (*py, *tofu, *args, "--out", str(e)), done=(e / "summary.json").is_file(),
                                threads=cfg.threads))
    several = len(cfg.unlearn_seeds) > 1
    for f, r in zip(cfg.forget, cfg.retain):
        for seed in cfg.unlearn_seeds:
            for m in cfg.methods:
                args = ("unlearn", "--eval-batch-size", str(cfg.eval_batch_size),
                        "--eval-max-new-tokens", str(cfg.eval_max_new_tokens), "--model", str(target / "model"),
                        "--forget", f, "--retain", r, "--method", m, "--eval-every-epoch",
                        "--eval-ds-size", str(cfg.eval_ds_size), "--retain-log", str(oracle_log[f]),
                        "--eval-judge-model", str(oracle[f] / "model"),
                        *_flags((("--eval-holdout-file", cfg.holdout_file),)), *ul, "--seed", str(seed))
                d = out / "unlearn" / f / (f"seed-{seed}" if several else "") / f"{m}-{stage_key(args, out)}"
                name = f"unlearn {f} {m}" + (f" seed {seed}" if several else "")
                stages.append(Stage(name, "unlearn", 3, d, (*launcher, *tofu, *args, "--out", str(d)),
                                    done=(d / "run.json").is_file(), resume=(d / "config.json").is_file(),
                                    threads=cfg.threads, seed=seed))
    return stages


# --------------------------------------------------------------------------------------------------
# running the stages
# --------------------------------------------------------------------------------------------------
def _run_stage(st: Stage, log_path: Path) -> float:
    """Run one stage as a subprocess, its output appended to ``log_path``; returns its wall seconds."""
    cmd = [*st.cmd, *(["--resume"] if st.resume else [])]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        t0 = time.time()
        env = {**os.environ, **({"OMP_NUM_THREADS": str(st.threads)} if st.threads else {})}
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise UserError(f"stage '{st.name}' failed (exit {proc.returncode}); see {log_path}")
    return time.time() - t0


def _stage_log(out: Path, name: str) -> Path:
    return out / "logs" / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".log")


#: ``--until KIND``: run the stages up to and including this kind's dependency group
STAGE_KINDS = ("finetune", "eval", "unlearn")


def run_stages(stages: list[Stage], out: Path, jobs: int, timings: dict, timings_path: Path) -> list[str]:
    """Run the stages group by group, up to ``jobs`` at a time within a group, in list order; skip
    finished ones. A failed unlearning run is reported and skipped (nothing depends on it); returns the
    names of the failed stages."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    bar = tqdm(total=len(stages), desc="npo-tofu study", unit="stage", dynamic_ncols=True)
    failed: list[str] = []
    for group in sorted({s.group for s in stages}):
        todo = []
        for st in (s for s in stages if s.group == group):
            if st.done:
                print(f"[skip] {st.name} (done)", flush=True)
                bar.update(1)
            else:
                todo.append(st)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {pool.submit(_run_stage, st, _stage_log(out, st.name)): st for st in todo}
            for fut in as_completed(futures):
                st = futures[fut]
                try:
                    timings[st.name] = fut.result()
                except UserError as exc:
                    if st.kind != "unlearn":  # later stages depend on it
                        raise
                    failed.append(st.name)
                    print(f"[fail] {exc}", flush=True)
                else:
                    print(f"[done] {st.name}: {timings[st.name]:.0f} s", flush=True)
                    write_json(timings_path, timings)
                bar.update(1)
    bar.close()
    return failed


def _side_inputs(cfg: StudyConfig, out: Path) -> tuple[Path, Path]:
    """The logistic-lab trajectories and Markov divergence curves, computed at --quick when absent."""
    th, mk = Path(cfg.theory_dir), Path(cfg.markov_dir)
    for d, name, cmd in ((th, "trajectories.csv", ["theory", "--quick"]),
                         (mk, "curves.csv", ["markov", "--preset", "divergence", "--quick"])):
        if not (d / name).is_file():
            st = Stage(f"npo-sim {cmd[0]}", "side", -1, d,
                       (sys.executable, "-m", "npo_sim.cli", *cmd, "--out", str(d), "--figures", ""), done=False)
            _run_stage(st, _stage_log(out, st.name))
    return th / "trajectories.csv", mk / "curves.csv"


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------
def results_markdown(settings: dict, timings: dict, table: pd.DataFrame, targets: dict, side_fits: dict,
                     last_md: str = "", seeds_md: str = "") -> str:
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
              f"{settings.get('select_rule', SELECTIONS[sel])}. The tofu-mini holdout (non-members of the MIAs) is "
              "full.json authors 170-179; the oracle of each split judges fluency."]
    if last_md:
        lines += ["", "## Last epoch, with 95% bootstrap CIs over questions", "", last_md]
    if seeds_md:
        lines += ["", "## Across seeds", "", seeds_md]
    lines += ["", "## Best forget quality at MU ≥ 0.9 × target MU (epoch picked on the test set)", "",
              table_markdown(table), "— : no evaluated epoch kept MU above the threshold. This table picks each "
              "run's best epoch on the test (forget) set, so it is optimistic; the declared selection is above.", "",
              "![FQ vs MU](fq_mu_trajectories.png)", "", "## Side by side", "", "![side by side](side_by_side.png)", ""]
    for setting, per in side_fits.items():
        for m, f in per.items():
            if "dist" in f:
                lines.append(f"- {setting}, {label(m)}: ‖θ_t−θ_0‖ {LAW.get(m, 'log')} fit "
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


def report(cfg: StudyConfig, stages: list[Stage], timings: dict, timings_path: Path, t_all: float) -> pd.DataFrame:
    """The report of the finished runs (with report_only, whatever has finished so far), the side-by-side
    figure, results.md and timings; copied into ``cfg.figures`` when set. Returns the best-FQ table."""
    from npo_sim.plots.side_by_side import plot_side_by_side

    out = Path(cfg.out)
    t0 = time.time()
    th, mk = _side_inputs(cfg, out)
    report_dir = out / "report"
    unlearn = [st for st in stages if st.kind == "unlearn"]
    done = {str(st.out) for st in unlearn if (st.out / "run.json").is_file() and (st.out / "eval_curve.csv").is_file()}
    settings = {**cfg.settings(), "unfinished_runs": [st.name for st in unlearn if str(st.out) not in done]}
    targets = [str(p) for st in stages if st.kind == "eval" and st.name.startswith("eval target ")
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
        summary["seeds"] = {"seeds": list(tables), "across_seeds": seed_table.to_dict("records"),
                            "figures_and_tables_of_seed": seeds[0]}
    fits = plot_side_by_side(th, mk, report_dir / "lm_curves.csv", report_dir / "side_by_side.png")
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
                                                           read("seeds.md") if len(seeds) > 1 else ""))
    write_json(report_dir / "timings.json", timings)
    if cfg.figures:
        dest = Path(cfg.figures) / f"tofu_{cfg.preset}"
        _copy_to_figures(report_dir, dest)
        print(f"copied the report into {dest}")
    return table


def run_study(cfg: StudyConfig, dry_run: bool = False, report_only: bool = False, until: str | None = None) -> int:
    """Plan, run (unless ``report_only``) and report the study; with ``dry_run`` only print the stages; with
    ``until`` (a :data:`STAGE_KINDS` entry) run the stages up to that kind's and stop before the report."""
    if until is not None and until not in STAGE_KINDS:
        raise UserError(f"until must be one of {', '.join(STAGE_KINDS)}, got {until!r}")
    stages = plan(cfg)
    if dry_run:
        for st in stages:
            print(("[done] " if st.done else "") + shlex.join(st.cmd))
        return 0
    out = check_out_dir(cfg.out)  # before any stage runs
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    t_all = time.time()
    print(f"study: {len(stages)} stages ({sum(st.done for st in stages)} done), jobs={cfg.jobs}, "
          f"stage logs in {out / 'logs'}", flush=True)
    if until is not None:
        last = max(st.group for st in stages if st.kind == until)
        run_stages([st for st in stages if st.group <= last], out, cfg.jobs, timings, timings_path)
        timings["study wall, all invocations"] = timings.get("study wall, all invocations", 0.0) + time.time() - t_all
        write_json(timings_path, timings)
        print(f"stages up to {until} done in {time.time() - t_all:.0f} s (no report: --until)")
        return 0
    if not report_only:
        run_stages(stages, out, cfg.jobs, timings, timings_path)
    table = report(cfg, stages, timings, timings_path, t_all)
    print(table_markdown(table))
    print(f"study done in {time.time() - t_all:.0f} s -> {out / 'report'}")
    return 0
