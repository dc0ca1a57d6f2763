"""``npo-tofu study``: the tofu-mini study (or the full TOFU one) from fine-tuning to the report.

Fine-tunes the target (``--split full``) and one oracle per forget split (``retainYY``) and evaluates
both (the oracle's log is the reference for forget quality, the target's MU the baseline). Under the
declared tuning protocol (``select="val"``, :data:`SELECTIONS`) it then runs the grid on the tune split's
validation questions (``tune/``) and the SGD law runs (``law/``), selects one configuration per method
(:func:`select_configs`, written to ``tune/``), and runs that configuration for every seed and forget
split on the test questions (``unlearn/``); ``select="last"`` runs one setting per method instead.
:mod:`full_scale.study_report` writes the report. Each stage runs as a subprocess (``launcher``
prefixes the training stages, e.g. ``accelerate launch --config_file ...``) and is skipped when its
finished outputs exist, so a killed study resumes. Stages of one dependency group (fine-tunes, oracle
evals, target evals, tuning and law runs, final runs) run up to ``jobs`` at a time.

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
from npo_sim.runio import UserError, check_out_dir, write_csv, write_json, write_text

from .data import retain_of
from .dialects import get_dialect
from .report import table_markdown

#: declared model-selection rules (the report shows the selected epoch of every run)
SELECTIONS = {
    "last": "one run per method at --lr and --epochs, reported at its last epoch (nothing is picked on the test set)",
    "val": "per method, the grid point (lr, β, epoch) of the tuning runs with the highest forget quality on the "
           "validation questions among those whose validation MU is at least mu_fraction × the target's (none: the "
           "highest validation MU); ties (FQ on few questions takes few values): the lower validation forget "
           "ROUGE-L (more forgotten), then higher MU, the lower lr, smaller β, earlier epoch; every seed and "
           "forget split is then run for that many epochs at that lr and β and reported on the test questions",
}
#: per preset: default model, forget splits, output directory, eval questions and answer tokens
PRESET_DEFAULTS = {
    # 5M, 30 epochs at lr 2e-3: forget ROUGE-L 0.861 and MU 0.886 at epochs 25 and 30, train loss 0.05 -> 0.03
    # (measured on the 617-QA corpus; README "the tofu-mini study")
    # grid lrs: a first grid {3e-4, 1e-3, 3e-3} left validation MU below 0.3 at every epoch of lr 3e-3 for the
    # first five methods (GA, GA+RT, GA+KL, NPO, NPO+RT), so it moved one step down (validation data only).
    # unlearning: AdamW at a constant lr after one warm-up epoch, so epoch k of a run *is* a k-epoch run and the
    # grid's epoch axis is read off each run's per-epoch evaluation; the law runs: plain SGD, constant lr 0.02,
    # no weight decay, 50 steps on mini-forget10 (measured on the 5M target: GA at 0.02 is finite at step 61 and
    # at 0.05 turns non-finite at step 40; NPO at 0.05 plateaus within 20 steps)
    "mini": {"model": "tiny-llama:5m", "forget": ("mini-forget10", "mini-forget50"), "out": "runs/tofu-mini",
             "methods": tuple(OBJECTIVES),
             "eval_ds_size": 40, "eval_max_new_tokens": 32, "eval_batch_size": 64, "finetune_epochs": 30,
             "finetune_lr": 2e-3, "epochs": 5, "lr_schedule": "constant", "select": "val",
             "grid_lrs": (1e-4, 3e-4, 1e-3), "grid_betas": (1.0, 5.0), "seeds": (0, 1, 2),
             "law_lr": 0.02, "law_epochs": 10},
    "tofu": {"forget": ("forget10",), "out": "runs/tofu", "eval_ds_size": 300, "eval_max_new_tokens": 128,
             "methods": tuple(OBJECTIVES),
             "epochs": 10, "lr_schedule": "constant", "select": "val", "grid_lrs": (5e-6, 1e-5, 2e-5),
             "grid_betas": (1.0, 5.0), "seeds": (0, 1, 2)},
}
#: ``--quick``: a smoke-sized mini study (CI): one split, two methods, two seeds, tiny-llama 1M, 1-epoch runs
QUICK = {"model": "tiny-llama:1m", "forget": ("mini-forget10",), "methods": ("ga", "npo"), "finetune_epochs": 1,
         "epochs": 1, "eval_ds_size": 8, "eval_max_new_tokens": 4, "grid_lrs": (1e-3,), "grid_betas": (1.0,),
         "seeds": (0, 1), "law_epochs": 1, "law_methods": ("ga",)}


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
    select: str = "last"              #: the declared model selection (:data:`SELECTIONS`)
    lr_schedule: str | None = None    #: of the unlearning runs (None: the stage's default, linear decay)
    #: the tuning grid of ``select="val"``: lrs, and factors × each NPO-family method's registry β
    grid_lrs: tuple[float, ...] = ()
    grid_betas: tuple[float, ...] = (1.0,)
    tune_split: str | None = None     #: where the grid runs, on its validation questions (default: forget[0])
    mu_fraction: float = 0.9          #: the MU floor of the selection and of the best-FQ table, × the target's
    #: the divergence-law runs: plain SGD at this constant lr, no weight decay, on the tune split (None or 0: none)
    law_lr: float | None = None
    law_epochs: int = 10
    law_methods: tuple[str, ...] = ()  #: default: every method of the study
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
        if self.select == "val" and not self.grid_lrs:
            raise UserError("select val needs a tuning grid (--grid-lrs)")
        if self.tune_split is not None and self.tune_split not in self.forget:
            raise UserError(f"tune split {self.tune_split} is not one of the forget splits ({', '.join(self.forget)})")
        for name in ("grid_lrs", "grid_betas"):
            if any(not (v > 0) for v in getattr(self, name)):
                raise UserError(f"{name} must be positive, got {', '.join(map(str, getattr(self, name)))}")
        if self.law_lr is not None and not self.law_lr >= 0:
            raise UserError(f"law_lr must be ≥ 0 (0: no law runs), got {self.law_lr}")
        bad = [m for m in self.law_methods if m not in OBJECTIVES]
        if bad:
            raise UserError(f"unknown law method(s) {', '.join(bad)}; valid: {', '.join(OBJECTIVES)}")
        if not 0 < self.mu_fraction <= 1:
            raise UserError(f"mu_fraction must be in (0, 1], got {self.mu_fraction}")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds must be distinct, got {', '.join(map(str, self.seeds))}")
        for name in ("epochs", "finetune_epochs", "batch_size", "grad_accum", "eval_ds_size", "eval_max_new_tokens",
                     "eval_batch_size", "threads", "jobs", "law_epochs"):
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
                "finetune_epochs": self.finetune_epochs, "finetune_lr": self.finetune_lr,
                "epochs": self.epochs, "lr": self.lr, "lr_schedule": self.lr_schedule, "mu_fraction": self.mu_fraction,
                **({"tuning": {"split": self.tuned_on, "lrs": list(self.grid_lrs),
                               "beta_factors": list(self.grid_betas), "beta_family": "npo",
                               "epochs": list(range(1, (self.epochs or 0) + 1)),
                               "questions": "val", "reported_on": "test"}} if self.select == "val" else {}),
                **({"law_runs": {"optimizer": "sgd", "lr": self.law_lr, "lr_schedule": "constant", "warmup_epochs": 0,
                                 "weight_decay": 0.0, "epochs": self.law_epochs, "split": self.tuned_on,
                                 "methods": list(self.law_methods or self.methods)}} if self.law_lr else {}),
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

    @property
    def tuned_on(self) -> str:
        return self.tune_split or self.forget[0]

    def betas(self, method: str) -> tuple[float | None, ...]:
        """The grid's β values of ``method`` (None: its registry default, not varied): factors × the
        registry β for the NPO family (registry family ``npo``), the default alone for the others."""
        o = OBJECTIVES[method]
        if o.family != "npo" or not o.uses_beta:
            return (None,)
        return tuple(None if f == 1.0 else round(f * float(o.beta), 10) for f in self.grid_betas)


def study_config(preset: str, forget=(), retain=(), **settings) -> StudyConfig:
    """A :class:`StudyConfig` with the preset's defaults for unset (``None`` or empty) settings;
    ``retain`` defaults to the complements of ``forget``."""
    if preset not in PRESET_DEFAULTS:
        raise UserError(f"preset must be one of {', '.join(PRESET_DEFAULTS)}, got {preset!r}")
    quick = settings.pop("quick", False)
    if quick and preset != "mini":
        raise UserError("--quick is a mini-preset smoke test")
    given = {k: v for k, v in settings.items() if v is not None and v != ()}
    base = {**PRESET_DEFAULTS[preset], **(QUICK if quick else {})}
    resolved = {**base, **given, "forget": tuple(forget) or base["forget"]}
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
    point: tuple = ()        #: a tuning run's grid point (method, lr, β or None for the registry's)


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


def plan(cfg: StudyConfig, selection: dict | None = None) -> list[Stage]:
    """Every stage of the study, in order; each stage's directory is named by its :func:`stage_key`.

    With ``select="val"`` the tuning runs (``tune/``) and the law runs (``law/``) come before the final
    runs (``unlearn/``), which need the grid's ``selection`` (:func:`select_configs`: method -> its lr,
    β and epochs); without it they are left out (``run_study`` plans again after selecting)."""
    out, py = Path(cfg.out), (sys.executable,)
    launcher = tuple(shlex.split(cfg.launcher)) if cfg.launcher else py
    common = ["--preset", cfg.preset, "--seed", str(cfg.seed), "--no-progress", "--dialect", cfg.dialect,
              *_flags((("--data-dir", cfg.data_dir), ("--batch-size", cfg.batch_size),
                       ("--grad-accum", cfg.grad_accum), ("--threads", cfg.threads))),
              *cfg.train_flags(), *shlex.split(cfg.train_args or "")]
    ft = common + _flags((("--epochs", cfg.finetune_epochs), ("--lr", cfg.finetune_lr)))
    ul = common + _flags((("--lr-schedule", cfg.lr_schedule),))
    ev = ["--ds-size", str(cfg.eval_ds_size), "--max-new-tokens", str(cfg.eval_max_new_tokens),
          "--batch-size", str(cfg.eval_batch_size), "--dialect", cfg.dialect] + _flags((("--data-dir", cfg.data_dir),))
    tofu = ("-m", "full_scale.cli")
    tuned = cfg.select == "val"
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
    # the question subsets each split is evaluated on: the grid selects on val, the finals report on test
    subsets = {f: (("val", "test") if f == cfg.tuned_on else ("test",)) if tuned else ("all",) for f in cfg.forget}
    oracle_log: dict[tuple[str, str], Path] = {}
    for f in cfg.forget:
        judge = ["--judge-model", str(oracle[f] / "model")]  # the oracle judges fluency
        for q in subsets[f]:
            qflag = ["--questions", q] if q != "all" else []
            for who, d in (("oracle", oracle[f]), ("target", target)):
                retain_log = [] if who == "oracle" else ["--retain-log", str(oracle_log[f, q])]
                args = ("eval", "--model", str(d / "model"), "--forget-split", f, *retain_log, *ev, *holdout, *judge,
                        *qflag)
                e = out / "eval" / f"{who}-{f}{'-' + q if qflag else ''}-{stage_key(args, out)}"
                if who == "oracle":
                    oracle_log[f, q] = e / "eval_log_aggregated.json"
                stages.append(Stage(f"eval {who} on {f}" + (f" ({q})" if qflag else ""), "eval",
                                    1 if who == "oracle" else 2, e, (*py, *tofu, *args, "--out", str(e)),
                                    done=(e / "summary.json").is_file(), threads=cfg.threads))

    def unlearn(name, kind, group, d_parent, slug, f, r, m, q, extra, seed, eval_every=True, base=ul,
                eval_last=False, point=()) -> None:
        evals = ("--eval-every-epoch", *(["--eval-epochs", "last"] if eval_last else []),
                 "--eval-batch-size", str(cfg.eval_batch_size), "--eval-max-new-tokens",
                 str(cfg.eval_max_new_tokens), "--eval-ds-size", str(cfg.eval_ds_size),
                 "--retain-log", str(oracle_log[f, q]), "--eval-judge-model", str(oracle[f] / "model"),
                 *_flags((("--eval-holdout-file", cfg.holdout_file),)),
                 *(["--eval-questions", q] if q != "all" else [])) if eval_every else ()
        args = ("unlearn", "--model", str(target / "model"), "--forget", f, "--retain", r, "--method", m, *evals,
                *base, *extra, "--seed", str(seed))
        d = d_parent / f"{slug}-{stage_key(args, out)}"
        stages.append(Stage(name, kind, group, d, (*launcher, *tofu, *args, "--out", str(d)),
                            done=(d / "run.json").is_file(), resume=(d / "config.json").is_file(),
                            threads=cfg.threads, seed=seed, point=point))

    retain = dict(zip(cfg.forget, cfg.retain))
    if tuned:
        f = cfg.tuned_on
        for m in cfg.methods:
            for lr in cfg.grid_lrs:
                for beta in cfg.betas(m):
                    extra = ["--epochs", str(cfg.epochs), "--lr", f"{lr:g}", *_flags((("--beta", beta),))]
                    tag = f"lr {lr:g}" + (f" beta {beta:g}" if beta is not None else "")
                    unlearn(f"tune {f} {m} {tag}", "tune", 3, out / "tune" / f, f"{m}-{tag.replace(' ', '')}",
                            f, retain[f], m, "val", extra, cfg.seed, point=(m, lr, beta))
    if cfg.law_lr:
        f = cfg.tuned_on
        law = ["--optimizer", "sgd", "--lr-schedule", "constant", "--warmup-epochs", "0", "--weight-decay", "0",
               "--lr", f"{cfg.law_lr:g}", "--epochs", str(cfg.law_epochs)]
        for m in cfg.law_methods or cfg.methods:
            unlearn(f"law {f} {m}", "law", 3, out / "law" / f, m, f, retain[f], m, "all", law, cfg.seed,
                    eval_every=False, base=common)
    if tuned and selection is None:
        return stages
    several = len(cfg.unlearn_seeds) > 1
    for f, r in zip(cfg.forget, cfg.retain):
        q = "test" if tuned else "all"
        for seed in cfg.unlearn_seeds:
            for m in cfg.methods:
                if tuned:
                    hp = selection[m]
                    extra = ["--epochs", str(hp["epochs"]), "--lr", f"{hp['lr']:g}",
                             *_flags((("--beta", hp.get("beta")),))]
                else:
                    extra = _flags((("--epochs", cfg.epochs), ("--lr", cfg.lr)))
                # the first seed draws the trajectories (every epoch); the others are read at their last epoch
                unlearn(f"unlearn {f} {m}" + (f" seed {seed}" if several else ""), "unlearn", 4 if tuned else 3,
                        out / "unlearn" / f / (f"seed-{seed}" if several else ""), m, f, r, m, q, extra, seed,
                        eval_last=tuned and seed != cfg.unlearn_seeds[0])
    return stages


# --------------------------------------------------------------------------------------------------
# the declared selection
# --------------------------------------------------------------------------------------------------
GRID_COLUMNS = ("method", "lr", "beta", "epoch", "val_fq", "val_mu", "val_forget_rouge", "mu_floor", "kept_mu")


def select_configs(cfg: StudyConfig, stages: list[Stage]) -> tuple[dict, pd.DataFrame]:
    """The declared selection (:data:`SELECTIONS` ``val``) from the finished tuning runs: method -> its
    ``{lr, beta, epochs, val_fq, val_mu, kept_mu}``, and the whole grid (:data:`GRID_COLUMNS`). A method
    with no finished tuning run is left out (its final runs are not planned)."""
    tgt = [st for st in stages if st.name == f"eval target on {cfg.tuned_on} (val)"][0]
    target_mu = float(json.loads((tgt.out / "summary.json").read_text())["model_utility"])
    floor = cfg.mu_fraction * target_mu
    rows = []
    for st in stages:
        if st.kind != "tune" or not (st.out / "eval_curve.csv").is_file() or not (st.out / "run.json").is_file():
            continue
        method, lr, beta = st.point
        beta = float(beta) if beta is not None else float(OBJECTIVES[method].beta)
        for e in pd.read_csv(st.out / "eval_curve.csv").itertuples():
            rows.append({"method": method, "lr": lr, "beta": beta, "epoch": int(e.epoch),
                         "val_fq": float(e.forget_quality), "val_mu": float(e.model_utility),
                         "val_forget_rouge": float(e.forget_rouge), "mu_floor": floor,
                         "kept_mu": bool(e.model_utility >= floor)})
    grid = pd.DataFrame(rows, columns=list(GRID_COLUMNS))
    chosen = {}
    for m, g in grid.groupby("method", sort=False):
        kept = g[g.kept_mu]
        if len(kept):
            pool, key, desc = kept, ["val_fq", "val_forget_rouge", "val_mu"], [False, True, False]
        else:
            pool, key, desc = g, ["val_mu", "val_fq"], [False, False]
        best = pool.sort_values([*key, "lr", "beta", "epoch"], ascending=[*desc, True, True, True]).iloc[0]
        default_beta = float(OBJECTIVES[m].beta)
        chosen[m] = {"lr": float(best.lr), "beta": None if best.beta == default_beta else float(best.beta),
                     "beta_value": float(best.beta), "epochs": int(best.epoch), "val_fq": float(best.val_fq),
                     "val_mu": float(best.val_mu), "kept_mu": bool(best.kept_mu), "mu_floor": floor,
                     "target_val_mu": target_mu}
    return chosen, grid


def selection_markdown(chosen: dict, cfg: StudyConfig) -> str:
    lines = [f"| method | lr | β | epochs | val FQ | val MU | MU ≥ {cfg.mu_fraction:g} × target |",
             "|---|---|---|---|---|---|---|"]
    for m in (m for m in OBJECTIVES if m in chosen):
        c = chosen[m]
        beta = f"{c['beta_value']:g}" if OBJECTIVES[m].uses_beta else "—"
        lines.append(f"| {label(m)} | {c['lr']:g} | {beta} | {c['epochs']} | {c['val_fq']:.3g} | "
                     f"{c['val_mu']:.3f} | {'yes' if c['kept_mu'] else 'no (highest MU taken)'} |")
    return "\n".join(lines) + "\n"


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
STAGE_KINDS = ("finetune", "eval", "tune", "unlearn")


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
                    if st.kind not in ("unlearn", "tune", "law"):  # later stages depend on it
                        raise
                    failed.append(st.name)
                    print(f"[fail] {exc}", flush=True)
                else:
                    print(f"[done] {st.name}: {timings[st.name]:.0f} s", flush=True)
                    write_json(timings_path, timings)
                bar.update(1)
    bar.close()
    return failed


def _side_inputs(cfg: StudyConfig, out: Path) -> tuple[Path | None, Path | None]:
    """The logistic-lab trajectories and Markov divergence curves, computed at --quick when absent (an
    empty ``theory_dir`` / ``markov_dir``: that panel is left out)."""
    th, mk = (Path(cfg.theory_dir) if cfg.theory_dir else None), (Path(cfg.markov_dir) if cfg.markov_dir else None)
    for d, name, cmd in ((th, "trajectories.csv", ["theory", "--quick"]),
                         (mk, "curves.csv", ["markov", "--preset", "divergence", "--quick"])):
        if d is not None and not (d / name).is_file():
            st = Stage(f"npo-sim {cmd[0]}", "side", -1, d,
                       (sys.executable, "-m", "npo_sim.cli", *cmd, "--out", str(d), "--figures", ""), done=False)
            _run_stage(st, _stage_log(out, st.name))
    return (th / "trajectories.csv" if th else None), (mk / "curves.csv" if mk else None)


def _select(cfg: StudyConfig, stages: list[Stage]) -> dict:
    """Select on the grid, write ``tune/grid.csv``, ``selection.csv``, ``selection.md`` and
    ``selection.json``, and return the selection."""
    chosen, grid = select_configs(cfg, stages)
    d = Path(cfg.out) / "tune"
    write_csv(d / "grid.csv", grid)
    write_csv(d / "selection.csv", pd.DataFrame([{"method": m, **c} for m, c in chosen.items()]))
    write_text(d / "selection.md", selection_markdown(chosen, cfg))
    write_json(d / "selection.json", chosen)
    missing = [m for m in cfg.methods if m not in chosen]
    print(f"selected on {cfg.tuned_on} (val): " + ", ".join(f"{m} lr {c['lr']:g} β {c['beta_value']:g} "
                                                            f"{c['epochs']} ep" for m, c in chosen.items())
          + (f"; no finished tuning run: {', '.join(missing)}" if missing else ""), flush=True)
    return chosen


def run_study(cfg: StudyConfig, dry_run: bool = False, report_only: bool = False, until: str | None = None) -> int:
    """Plan, run (unless ``report_only``) and report the study; with ``dry_run`` only print the stages; with
    ``until`` (a :data:`STAGE_KINDS` entry) run the stages up to that kind's and stop before the report.

    With ``select="val"`` it runs in two passes: the stages up to the tuning and law runs, then the
    selection (:func:`select_configs`, written to ``tune/``), then the final runs it picks."""
    if until is not None and until not in STAGE_KINDS:
        raise UserError(f"until must be one of {', '.join(STAGE_KINDS)}, got {until!r}")
    tuned = cfg.select == "val"
    sel_path = Path(cfg.out) / "tune" / "selection.json"
    stages = plan(cfg, json.loads(sel_path.read_text()) if tuned and sel_path.is_file() else None)
    if dry_run:
        for st in stages:
            print(("[done] " if st.done else "") + shlex.join(st.cmd))
        if tuned and not sel_path.is_file():
            n = len(cfg.forget) * len(cfg.unlearn_seeds) * len(cfg.methods)
            print(f"# then {n} final runs (forget splits × seeds × methods) at the configurations the grid selects")
        return 0
    out = check_out_dir(cfg.out)  # before any stage runs
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    t_all = time.time()
    print(f"study: {cfg.model}, fine-tuned {cfg.finetune_epochs or 'preset'} epochs at lr "
          f"{cfg.finetune_lr or 'preset'}; {len(cfg.methods)} methods on {', '.join(cfg.forget)}; select {cfg.select}"
          + (f" (grid lr {', '.join(f'{x:g}' for x in cfg.grid_lrs)} x epochs 1..{cfg.epochs} x NPO-family beta "
             f"factors {', '.join(f'{x:g}' for x in cfg.grid_betas)} on {cfg.tuned_on} val)" if cfg.select == "val"
             else "") + f"; seeds {', '.join(map(str, cfg.unlearn_seeds))}", flush=True)
    print(f"study: {len(stages)} stages ({sum(st.done for st in stages)} done), jobs={cfg.jobs}, "
          f"stage logs in {out / 'logs'}", flush=True)
    if until is not None:
        kinds = STAGE_KINDS[:STAGE_KINDS.index(until) + 1]
        last = max(st.group for st in stages if st.kind in kinds or (until == "tune" and st.kind == "law"))
        run_stages([st for st in stages if st.group <= last], out, cfg.jobs, timings, timings_path)
        if until == "unlearn" and tuned:
            stages = plan(cfg, _select(cfg, stages))
            run_stages([st for st in stages if st.kind == "unlearn"], out, cfg.jobs, timings, timings_path)
        timings["study wall, all invocations"] = timings.get("study wall, all invocations", 0.0) + time.time() - t_all
        write_json(timings_path, timings)
        print(f"stages up to {until} done in {time.time() - t_all:.0f} s (no report: --until)")
        return 0
    if not report_only:
        if tuned:
            run_stages([st for st in stages if st.kind != "unlearn"], out, cfg.jobs, timings, timings_path)
            stages = plan(cfg, _select(cfg, stages))
        run_stages(stages, out, cfg.jobs, timings, timings_path)
    elif tuned and not sel_path.is_file():
        raise UserError(f"{sel_path}: no selection yet (run the study first)")
    from .study_report import report

    table = report(cfg, stages, timings, timings_path, t_all, side=_side_inputs(cfg, out))
    print(table_markdown(table))
    print(f"study done in {time.time() - t_all:.0f} s -> {out / 'report'}")
    return 0
