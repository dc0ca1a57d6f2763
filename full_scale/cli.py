"""``npo-tofu``: TOFU fine-tuning, unlearning, evaluation and reports. ``npo-tofu COMMAND --help``.

All of npo-tofu's argument parsing lives here: each command has an ``add_<command>_arguments`` and a
``<command>_main``, which turns the parsed flags into frozen records (:mod:`full_scale.config`,
:class:`full_scale.study.StudyConfig`) and hands them to the code that runs them. Bad input is one
line on stderr and exit 2; a diverged training run (non-finite loss) exit 3.
"""

from __future__ import annotations

import argparse
import json
import sys

from npo_sim._cliutil import OneLineParser, add_debug_flag, guarded
from npo_sim._cliutil import split_commas as comma_list
from npo_sim.runio import UserError, write_json

from . import config as C
from .data import PROMPT_FORMATS


# --------------------------------------------------------------------------------------------------
# finetune / unlearn
# --------------------------------------------------------------------------------------------------
def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF id, local dir, run dir, or tiny-llama[:1m|5m|20m]")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--data-dir", default=None, help="TOFU JSON-lines directory (default $NPO_TOFU_DIR)")
    p.add_argument("--preset", choices=tuple(C.PRESETS), default="tofu",
                   help="tofu: the real splits; mini: tofu-mini (the 20 authors of forget10)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per-device micro-batch")
    p.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps")
    p.add_argument("--optimizer", choices=C.OPTIMIZERS, default="adamw",
                   help="adamw (default) or sgd: plain gradient steps (torch SGD, no momentum, --weight-decay as "
                        "L2), the setting of the divergence law")
    p.add_argument("--lr-schedule", choices=C.LR_SCHEDULES, default="linear",
                   help="linear: warm-up, then linear decay to 0 (default); constant: warm-up, then --lr for every "
                        "step (add --warmup-epochs 0 for a constant step size from the first step)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up, under either --lr-schedule")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    _dialect_argument(p)
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the dialect's, 512)")
    p.add_argument("--ga-reduction", choices=C.GA_REDUCTIONS, default=None,
                   help="reduction of plain likelihood terms (ga, idk, retain nll, fine-tuning): per-example "
                        "token mean (default), pooled token mean over the micro-batch (HF's outputs.loss, "
                        "open-unlearning), or sum over answer tokens; default: the dialect's")
    p.add_argument("--save-every", type=int, default=1, help="checkpoint every N epochs")
    p.add_argument("--keep-checkpoints", type=int, default=1, help="keep the last N epoch checkpoints")
    p.add_argument("--dtype", choices=C.DTYPES, default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--prompt-format", choices=tuple(PROMPT_FORMATS), default=None,
                   help="override the model family's prompt format")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (refused when --out holds no run)")
    p.add_argument("--allow-pickle-weights", action="store_true",
                   help="load a local --model that holds only pickle weights (pytorch_model.bin), still with "
                        "torch's weights_only=True; by default local weights are read from safetensors only")
    p.add_argument("--stop-after-epoch", type=int, default=None,
                   help="stop (as if killed) after checkpointing this epoch; for resume tests")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (benchmarks)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--cpu", action="store_true", help="force CPU even when a GPU is present")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    # collapse detector (logged for finetune too, where it rarely fires)
    p.add_argument("--collapse-k", type=float, default=5.0,
                   help="flag collapse when the retain NLL exceeds k x its initial value")
    p.add_argument("--collapse-questions", type=int, default=4,
                   help="retain questions answered greedily after every epoch to detect degenerate output")
    p.add_argument("--stop-on-collapse", action="store_true")
    _lora_arguments(p)


def _lora_arguments(p: argparse.ArgumentParser) -> None:
    """LoRA (peft) and activation checkpointing: shared by finetune, unlearn and study."""
    g = p.add_argument_group("LoRA and memory")
    g.add_argument("--lora-r", type=int, default=None,
                   help="train LoRA adapters of this rank (peft) instead of every weight; the reference is the "
                        "model with its adapters disabled (no copy of the weights)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (update scaled by alpha/r); default 2*r")
    g.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input (default 0)")
    g.add_argument("--lora-targets", default=None,
                   help=f"comma list of module names that get adapters (default {','.join(C.LORA_TARGETS)}, the "
                        "attention projections of Llama-family models), or all-linear")
    g.add_argument("--merge-lora", action="store_true",
                   help="write the final model/ merged (a plain HF model) instead of the adapter directory")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (non-reentrant): less memory, same losses")


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", required=True,
                   help="full or retainYY (with --preset mini also 'retain' = the complement of --forget)")
    p.add_argument("--forget", default="forget10", help="with --split retain: whose complement to fit")
    _common_arguments(p)


def add_unlearn_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--forget", default="forget10", help="forgetXX")
    p.add_argument("--retain", default=None, help="retainYY (default: the complement of --forget)")
    p.add_argument("--method", required=True, help="an npo_sim.losses.OBJECTIVES name (ga, npo_rt, ...)")
    p.add_argument("--beta", type=float, default=None, help="default: the objective's (0.1; 2.5 for simnpo)")
    p.add_argument("--gamma", type=float, default=None)
    p.add_argument("--retain-weight", type=float, default=None)
    p.add_argument("--ref-mode", choices=C.REF_MODES, default="cached",
                   help="cached: reference log-probs computed once before training; model: a frozen copy")
    # per-epoch evaluation hook, implemented in full_scale.evaluate.evaluate_epoch
    p.add_argument("--eval-every-epoch", action="store_true",
                   help="evaluate (full_scale.evaluate.evaluate_epoch) after every epoch")
    p.add_argument("--eval-ds-size", type=int, default=None, help="questions per eval set (default: TOFU's 300)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="per-epoch eval batch (default 16)")
    p.add_argument("--eval-gen-batch-size", type=int, default=None,
                   help="per-epoch eval: batch of the greedy answers (default: --eval-batch-size)")
    p.add_argument("--eval-max-new-tokens", type=int, default=None,
                   help="greedy answer length for the per-epoch ROUGE (default 128)")
    p.add_argument("--retain-log", default=None,
                   help="retain model's TOFU-format eval log, for forget quality in the per-epoch eval")
    p.add_argument("--allow-mismatched-logs", action="store_true",
                   help="per-epoch eval: accept a retain log whose forget set has another sample count")
    p.add_argument("--eval-holdout-file", default=None,
                   help="per-epoch eval: non-member QA (JSON/JSONL) for the MIA AUCs and privleak "
                        "(tofu-mini has its own)")
    p.add_argument("--eval-judge-model", default=None,
                   help="per-epoch eval: checkpoint that scores the greedy forget answers (fluency), e.g. the oracle")
    p.add_argument("--eval-questions", choices=("all", "val", "test"), default=None,
                   help="per-epoch eval: all questions (default), or only the val/test questions of every eval set "
                        "(full_scale.data: positions 0,5,10,15 of each author are val); the --retain-log must match")
    p.add_argument("--eval-epochs", choices=("every", "last"), default=None,
                   help="with --eval-every-epoch: evaluate after every epoch (default) or after the last one only")
    _common_arguments(p)


_RUN_FLAGS = ("model", "out", "data_dir", "epochs", "lr", "batch_size", "grad_accum", "optimizer", "lr_schedule",
              "warmup_epochs", "weight_decay", "seed", "max_length", "ga_reduction", "save_every", "keep_checkpoints",
              "collapse_k", "collapse_questions", "stop_on_collapse", "dtype", "prompt_format", "lora_r", "lora_alpha",
              "lora_dropout", "merge_lora")


def _dialect_argument(p: argparse.ArgumentParser) -> None:
    from .dialects import DEFAULT, DIALECTS

    p.add_argument("--dialect", choices=tuple(DIALECTS), default=DEFAULT,
                   help="whose conventions to follow: tokenisation, max length, generation budget, CE precision, "
                        "reductions, KL positions, truth ratio, SimNPO parameterisation, IDK sampling "
                        "(README: Dialects)")


def _run_config(command: str, args) -> C.RunConfig:
    from .dialects import get_dialect

    d = get_dialect(args.dialect)
    flags = {k: getattr(args, k) for k in _RUN_FLAGS}
    flags["max_length"] = d.max_length if flags["max_length"] is None else flags["max_length"]
    flags["ga_reduction"] = d.nll_reduction if flags["ga_reduction"] is None else flags["ga_reduction"]
    if args.lora_targets is not None:
        flags["lora_targets"] = comma_list(args.lora_targets)
        if not flags["lora_targets"]:
            raise UserError("--lora-targets is empty: give module names (e.g. q_proj,v_proj) or all-linear")
    return C.run_config(command, args.preset, dialect=d.name, **flags)


def _launch(args) -> C.Launch:
    return C.Launch(resume=args.resume, stop_after_epoch=args.stop_after_epoch, max_steps=args.max_steps,
                    threads=args.threads, cpu=args.cpu, progress=not args.no_progress,
                    allow_pickle_weights=args.allow_pickle_weights, gradient_checkpointing=args.gradient_checkpointing)


def finetune_job(args) -> C.TrainJob:
    return C.TrainJob(_run_config("finetune", args), C.finetune_spec(args.split, args.forget))


def unlearn_job(args) -> C.TrainJob:
    run = _run_config("unlearn", args)
    spec = C.unlearn_spec(args.forget, args.retain, args.method, beta=args.beta, gamma=args.gamma,
                          retain_weight=args.retain_weight, ref_mode=args.ref_mode)
    ev = None
    if args.eval_every_epoch:
        ev = C.epoch_eval_spec(run, spec, args.retain_log, ds_size=args.eval_ds_size,
                               batch_size=args.eval_batch_size, max_new_tokens=args.eval_max_new_tokens,
                               gen_batch_size=args.eval_gen_batch_size,
                               allow_mismatched_logs=args.allow_mismatched_logs or None,
                               holdout_file=args.eval_holdout_file, judge_model=args.eval_judge_model,
                               questions=args.eval_questions, epochs=args.eval_epochs)
    return C.TrainJob(run, spec, ev)


def finetune_main(args) -> int:
    from .train import run

    return run(finetune_job(args), _launch(args))


def unlearn_main(args) -> int:
    from .train import run

    return run(unlearn_job(args), _launch(args))


# --------------------------------------------------------------------------------------------------
# eval / aggregate
# --------------------------------------------------------------------------------------------------
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint directory, run directory, adapter directory (LoRA), HF id, or tiny-llama[:SIZE]")
    p.add_argument("--base-model", default=None,
                   help="the base of an adapter --model (default: base_model_name_or_path of its adapter_config.json)")
    p.add_argument("--forget-split", required=True,
                   help="forget01/05/10/20/30/50/90, or mini-forget10/20/50/90 for tofu-mini")
    p.add_argument("--out", required=True, help="output directory: eval_log_aggregated.json and summary.json")
    p.add_argument("--retain-log", default=None,
                   help="the retain model's eval_log_aggregated.json: adds forget quality")
    p.add_argument("--data-dir", default=None, help="TOFU data directory (default: $NPO_TOFU_DIR)")
    p.add_argument("--ds-size", type=int, default=300, help="questions per eval set (TOFU: 300)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of NLL and generation")
    p.add_argument("--gen-batch-size", type=int, default=None,
                   help="batch of the greedy answers (default: --batch-size); the answers do not depend on it, "
                        "and on CPU small models decode fastest with all questions in one batch")
    p.add_argument("--max-new-tokens", type=int, default=128, help="greedy generation length for ROUGE")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--allow-mismatched-logs", action="store_true",
                   help="accept a --retain-log whose forget set has another sample count than this eval "
                        "(a note in summary.json instead of an error)")
    p.add_argument("--allow-pickle-weights", action="store_true",
                   help="load a local --model that holds only pickle weights (pytorch_model.bin), still with "
                        "torch's weights_only=True; by default local weights are read from safetensors only")
    p.add_argument("--holdout-file", default=None,
                   help="non-member QA rows (JSON list or JSON lines with question/answer, e.g. open-unlearning's "
                        "holdout01/05/10) for the MIA AUCs and privleak; tofu-mini splits default to the mini holdout "
                        "(full.json authors 170-179); without one they are reported absent")
    p.add_argument("--judge-model", default=None,
                   help="checkpoint that scores the greedy forget answers (mean per-token log-likelihood, fluency), "
                        "e.g. the retain/oracle model; without one that number is omitted")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of every CI")
    p.add_argument("--no-extra-metrics", action="store_true",
                   help="TOFU's metrics only (no memorization, MIA, privleak, fluency or CIs)")
    _dialect_argument(p)
    p.add_argument("--allow-mixed-dialects", action="store_true",
                   help="accept a --retain-log computed in another dialect")
    p.add_argument("--questions", choices=("all", "val", "test"), default="all",
                   help="evaluate all questions (default), or only the val or test questions of every eval set, "
                        "taken before --ds-size (full_scale.data: positions 0,5,10,15 of each author's 20 are val, "
                        "every 5th row of real authors/world facts); a --retain-log must have the same subset")


def eval_job(args) -> C.EvalJob:
    spec = C.EvalSpec(forget_split=args.forget_split, retain_log=args.retain_log, data_dir=args.data_dir,
                      ds_size=args.ds_size, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      allow_mismatched_logs=args.allow_mismatched_logs, gen_batch_size=args.gen_batch_size,
                      holdout_file=args.holdout_file, judge_model=args.judge_model, n_boot=args.n_boot,
                      extra_metrics=not args.no_extra_metrics, dialect=args.dialect,
                      allow_mixed_dialects=args.allow_mixed_dialects, questions=args.questions)
    return C.EvalJob(model=args.model, out=args.out, eval=spec, device=args.device,
                     allow_pickle_weights=args.allow_pickle_weights, threads=args.threads, base_model=args.base_model)


def eval_main(args) -> int:
    from .evaluate import evaluate_checkpoint

    summary = evaluate_checkpoint(eval_job(args))
    for note in summary["notes"]:
        print(f"note: {note}")
    fq = f"FQ {summary['forget_quality']:.4g}  " if "forget_quality" in summary else ""
    print(f"{fq}MU {summary['model_utility']:.4f}  forget ROUGE {summary['forget_rouge']:.4f}  "
          f"({summary['eval_seconds']:.1f} s) -> {args.out}")
    if "ci" in summary:
        from .extra_metrics import format_line

        n = summary["n_boot"]
        print(f"95% bootstrap CIs over questions ({n} resamples):")
        for line in format_line(summary):
            print(f"  {line}")
    return 0


def add_aggregate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt-log", required=True,
                   help="eval_log_aggregated.json of the evaluated model (or its directory)")
    p.add_argument("--retain-log", required=True, help="eval_log_aggregated.json of the retain (oracle) model")
    p.add_argument("--out", default=None, help="also write the JSON object to this file")
    p.add_argument("--allow-mismatched-logs", action="store_true",
                   help="compare forget sets of different sizes (a note instead of an error)")
    p.add_argument("--dialect", default=None,
                   help="whose truth-ratio formula MU uses (default: the logs' own dialect; tofu's for published logs)")
    p.add_argument("--allow-mixed-dialects", action="store_true", help="compare logs of different dialects")


def aggregate_main(args) -> int:
    from .aggregate import aggregate
    from .dialects import get_dialect

    if args.out:
        C.check_out_file(args.out)  # before any work
    formula = get_dialect(args.dialect).truth_ratio if args.dialect is not None else None
    result = aggregate(args.ckpt_log, args.retain_log, allow_mismatched=args.allow_mismatched_logs,
                       truth_ratio=formula, allow_mixed_dialects=args.allow_mixed_dialects)
    result = {**result, "ckpt_log": str(args.ckpt_log), "retain_log": str(args.retain_log)}
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


# --------------------------------------------------------------------------------------------------
# report / study
# --------------------------------------------------------------------------------------------------
def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="*", help="npo-tofu unlearn --eval-every-epoch run directories")
    p.add_argument("--out", default="runs/report", help="output directory")
    p.add_argument("--target-eval", action="append", default=[],
                   help="the target's npo-tofu eval summary.json (or its directory), one per forget split; repeatable")
    p.add_argument("--mu-fraction", type=float, default=0.9, help="MU floor for the best-FQ table, × target MU")
    p.add_argument("--allow-mixed-dialects", action="store_true", help="report runs of different dialects together")


def report_main(args) -> int:
    import pandas as pd

    from .report import LAST_COLUMNS, TABLE_COLUMNS, build_report, last_markdown, table_markdown

    s = build_report(args.run_dirs, args.out, args.target_eval, args.mu_fraction,
                     allow_mixed_dialects=args.allow_mixed_dialects)
    print(last_markdown(pd.DataFrame(s["last_epoch"], columns=list(LAST_COLUMNS))))
    print(table_markdown(pd.DataFrame(s["best_fq"], columns=list(TABLE_COLUMNS))))
    if s["missing_targets"]:
        print(f"note: no --target-eval for {', '.join(s['missing_targets'])}: no MU threshold, best FQ left empty")
    print(f"wrote {args.out}/best_fq.csv, best_fq.md, last_epoch.csv, last_epoch.md, eval_curves.csv, lm_curves.csv, "
          "fq_mu_trajectories.png, summary.json")
    return 0


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    from npo_sim.losses import methods

    p.add_argument("--preset", choices=("mini", "tofu"), default="mini",
                   help="mini: tofu-mini on CPU with tiny-llama; tofu: the real splits (GPU)")
    p.add_argument("--model", default=None, help="tiny-llama[:1m|5m|20m] (mini default 5m) or an HF id")
    p.add_argument("--forget", default=None,
                   help="comma list (mini default mini-forget10,mini-forget50; tofu default forget10)")
    p.add_argument("--retain", default=None, help="comma list aligned with --forget (default: the complements)")
    p.add_argument("--methods", default=None, help="comma list of npo_sim.losses objectives (default: all "
                   f"{len(methods())})")
    p.add_argument("--epochs", type=int, default=None,
                   help="unlearning epochs: the grid's epoch axis, 1..EPOCHS (mini 5, tofu 10)")
    p.add_argument("--quick", action="store_true",
                   help="smoke-sized mini study: tiny-llama 1M, mini-forget10, ga and npo, 2 seeds, 1-epoch runs")
    p.add_argument("--lr-schedule", default=None, choices=("linear", "constant"),
                   help="of the unlearning runs (preset default constant, so epoch k of a run is a k-epoch run)")
    p.add_argument("--grid-lrs", default=None, help="comma list: the tuning grid's lrs (mini 1e-4,3e-4,1e-3)")
    p.add_argument("--grid-betas", default=None,
                   help="comma list of factors x the registry beta of NPO-family methods (default 1,5)")
    p.add_argument("--tune-split", default=None, help="forget split of the grid (default: the first)")
    p.add_argument("--mu-fraction", type=float, default=None, help="MU floor of the selection, x target MU (0.9)")
    p.add_argument("--law-lr", type=float, default=None,
                   help="lr of the SGD constant-step divergence-law runs (mini 0.02; tofu: none; 0: none)")
    p.add_argument("--law-epochs", type=int, default=None, help="epochs of the law runs (10)")
    p.add_argument("--law-methods", default=None, help="comma list (default: the study's methods)")
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
    p.add_argument("--eval-batch-size", type=int, default=None, help="eval batch (mini 64: all questions at once; 16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each stage")
    p.add_argument("--launcher", default=None,
                   help="prefix of training stages, e.g. "
                        "'accelerate launch --config_file full_scale/accelerate/multi_gpu.yaml'")
    p.add_argument("--theory-dir", default="runs/figures/theory",
                   help="logistic lab run (computed --quick if absent; '' = no such panel)")
    p.add_argument("--markov-dir", default="runs/figures/markov_divergence",
                   help="Markov divergence run (computed --quick if absent; '' = no such panel)")
    p.add_argument("--train-args", default="",
                   help="extra flags for every finetune/unlearn stage, e.g. '--dtype float32' under FSDP")
    p.add_argument("--jobs", type=int, default=1, help="stages run at once within a group (CPU: 1-2)")
    p.add_argument("--seeds", default=None,
                   help="comma list of unlearning seeds, e.g. 0,1,2 (default: --seed); the report adds the mean and "
                        "95%% t-interval across them (seeds.md)")
    p.add_argument("--select", default=None, choices=("last", "val"),
                   help="the declared model selection, recorded in the outputs (preset default val: the grid on the "
                        "validation questions; last: one run per method at --lr, its last epoch)")
    p.add_argument("--holdout-file", default=None,
                   help="non-member QA for the MIA AUCs/privleak of every eval (tofu-mini: its own holdout)")
    _dialect_argument(p)
    _lora_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the stages and exit")
    p.add_argument("--report-only", action="store_true", help="run no stage; report the finished runs")
    p.add_argument("--until", default=None, choices=("finetune", "eval", "tune", "unlearn"),
                   help="run the stages up to this kind (and those it needs), then stop without the report")


_STUDY_FLAGS = ("preset", "model", "epochs", "finetune_epochs", "lr", "finetune_lr", "batch_size", "grad_accum",
                "seed", "out", "figures", "data_dir", "eval_ds_size", "eval_max_new_tokens", "eval_batch_size",
                "threads", "launcher", "theory_dir", "markov_dir", "train_args", "jobs", "select", "holdout_file",
                "lr_schedule", "tune_split", "mu_fraction", "law_lr", "law_epochs", "quick",
                "dialect", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "merge_lora",
                "gradient_checkpointing")


def study_main(args) -> int:
    from .study import run_study, study_config

    try:
        seeds = tuple(int(x) for x in comma_list(args.seeds))
    except ValueError:
        raise UserError(f"--seeds must be a comma list of integers, got {args.seeds!r}") from None
    floats = {}
    for name in ("grid_lrs", "grid_betas"):
        try:
            floats[name] = tuple(float(x) for x in comma_list(getattr(args, name)))
        except ValueError:
            raise UserError(f"--{name.replace('_', '-')} must be a comma list of numbers, "
                            f"got {getattr(args, name)!r}") from None
    cfg = study_config(forget=comma_list(args.forget), retain=comma_list(args.retain),
                       methods=tuple(comma_list(args.methods)), law_methods=tuple(comma_list(args.law_methods)),
                       seeds=seeds, **floats, **{k: getattr(args, k) for k in _STUDY_FLAGS})
    return run_study(cfg, dry_run=args.dry_run, report_only=args.report_only, until=args.until)


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="eval_log_aggregated.json or TOFU_EVAL.json (or a directory holding one)")
    p.add_argument("--to", required=True, choices=("tofu", "open-unlearning"), help="layout to write")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--retain-log", default=None, help="the retain model's log (either layout): adds forget quality")


def convert_main(args) -> int:
    from .convert import convert

    for path in convert(args.src, args.to, args.out, args.retain_log):
        print(f"wrote {path}")
    return 0


def add_compare_dialects_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("studies", nargs="+", metavar="DIALECT=DIR",
                   help="one study per dialect (its directory, report/ or summary.json); the first is the baseline")
    p.add_argument("--out", required=True, help="output directory: dialects.csv and dialects.md")


def compare_dialects_main(args) -> int:
    from .dialect_report import write

    studies = {}
    for item in args.studies:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"expected DIALECT=DIR, got {item!r}")
        studies[name] = path
    df = write(studies, args.out)
    print(f"wrote {args.out}/dialects.csv and dialects.md ({len(df)} rows)")
    return 0


# --------------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------------
def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``npo-tofu plan`` (:mod:`full_scale.plan`)."""
    from .dialects import DEFAULT, DIALECTS
    from .plan import A100_BF16_PEAK, BUILTIN_CONFIGS, DEFAULT_MFU, OPTIMIZERS, PRECISIONS, RECIPES

    p.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                   help="start from a known recipe (paper-llama2-7b: Llama-2-7b-chat, forget10, 4x8, 500 tokens, bf16, "
                        "10 epochs) and print the fits table; other flags override it")
    p.add_argument("--model", default=None,
                   help="config.json, model or run directory, tiny-llama[:SIZE], or one of "
                        + ", ".join(BUILTIN_CONFIGS))
    p.add_argument("--method", required=True, help="an npo_sim.losses.OBJECTIVES name (npo, npo_rt, npo_kl, ...)")
    p.add_argument("--dialect", choices=tuple(DIALECTS), default=DEFAULT, help="default max length comes from it")
    p.add_argument("--forget", default=None, help="forget split: examples per epoch (forget10 = 400; default forget10)")
    p.add_argument("--preset", choices=("tofu", "mini"), default=None, help="mini: tofu-mini's forget sets (40/80/200)")
    p.add_argument("--batch-size", type=int, default=None, help="per-device micro-batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps (default 8)")
    p.add_argument("--seq-len", "--max-length", dest="seq_len", type=int, default=None,
                   help="tokens per example, padded (default: the dialect's max length)")
    p.add_argument("--epochs", type=int, default=None, help="default 10")
    p.add_argument("--lora-r", type=int, default=None, help="plan LoRA of this rank (default: full fine-tuning)")
    p.add_argument("--lora-targets", default=None, help="comma list of module names, or all-linear "
                                                        "(default: npo-tofu's, q/k/v/o_proj)")
    p.add_argument("--dtype", choices=tuple(PRECISIONS), default=None,
                   help="bf16: mixed (fp32 master + fp32 AdamW moments; default); fp32; bf16-pure: bf16 weights, "
                        "grads and moments (npo-tofu --dtype bfloat16 on one device)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="adamw (default: two moments per trainable parameter) or sgd (no momentum: no moments)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--ref-mode", choices=("cached", "model"), default="cached")
    p.add_argument("--stop-on-collapse", action="store_true",
                   help="the run forwards the retain batch every step for its NLL (methods without a retain term)")
    p.add_argument("--accelerate", default=None,
                   help="accelerate yaml path or a name in full_scale/accelerate "
                        "(single_gpu, ddp, fsdp, deepspeed_zero3; default single_gpu)")
    p.add_argument("--processes", type=int, default=None, help="override the config's num_processes")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="selects the runtime overhead")
    p.add_argument("--tflops", type=float, default=None,
                   help=f"sustained TFLOP/s per device (default {DEFAULT_MFU} x {A100_BF16_PEAK:g}, "
                        "an A100's dense bf16 peak)")
    p.add_argument("--overhead-mb", type=float, default=None, help="runtime overhead per device, MB (default: stated)")
    p.add_argument("--fits", action="store_true", help="print the fits table (1x80, 2x40, 8x24 GB) too")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def plan_request(args):
    """The :class:`~full_scale.plan.PlanRequest` of parsed flags: explicit flags, then the recipe, then
    :data:`~full_scale.plan.PLAN_DEFAULTS`."""
    from .dialects import get_dialect
    from .plan import PLAN_DEFAULTS, RECIPES, PlanRequest

    base = dict(RECIPES[args.recipe]) if args.recipe else {}
    if args.model is None and "model" not in base:
        raise UserError("--model is required (or --recipe)")

    def pick(name):
        v = getattr(args, name, None)
        return v if v is not None else base.get(name, PLAN_DEFAULTS.get(name))

    seq = pick("seq_len") or get_dialect(args.dialect).max_length
    lora = args.lora_r is not None
    return PlanRequest(model=pick("model"), method=args.method, batch_size=pick("batch_size"),
                       grad_accum=pick("grad_accum"), seq_len=seq, lora=lora, lora_r=args.lora_r if lora else 8,
                       lora_targets=args.lora_targets, dtype=pick("dtype"), optimizer=pick("optimizer"),
                       gradient_checkpointing=args.gradient_checkpointing, ref_mode=args.ref_mode,
                       stop_on_collapse=args.stop_on_collapse,
                       accelerate=pick("accelerate"), processes=args.processes, device=args.device,
                       dialect=args.dialect, forget=pick("forget"), preset=pick("preset"), epochs=pick("epochs"),
                       tflops=args.tflops, overhead_mb=args.overhead_mb)


def plan_main(args) -> int:
    from .plan import fits_table, format_plan, make_plan, plan_dict

    req = plan_request(args)
    if args.lora_r is not None and args.lora_r < 1:
        raise UserError(f"lora-r must be >= 1, got {args.lora_r}")
    p = make_plan(req)
    fits = fits_table(req) if (args.fits or args.recipe) else None
    print(json.dumps(plan_dict(p, fits), indent=2) if args.json else format_plan(p, fits))
    return 0


#: command -> (help, add arguments, main)
COMMANDS = {
    "finetune": ("fine-tune a target (full) or oracle (retainYY) model on TOFU", add_finetune_arguments, finetune_main),
    "unlearn": ("unlearn forgetXX with any npo_sim objective", add_unlearn_arguments, unlearn_main),
    "eval": ("evaluate a checkpoint with TOFU's exact metrics", add_eval_arguments, eval_main),
    "aggregate": ("forget quality and model utility from TOFU-format logs (no model)", add_aggregate_arguments,
                  aggregate_main),
    "report": ("tables and figures from run directories", add_report_arguments, report_main),
    "study": ("the tofu-mini study (fine-tune, unlearn, evaluate, report)", add_study_arguments, study_main),
    "convert": ("convert eval output between TOFU's and open-unlearning's layouts", add_convert_arguments,
                convert_main),
    "compare-dialects": ("how far FQ and MU move between dialects: one study per dialect",
                         add_compare_dialects_arguments, compare_dialects_main),
    "plan": ("peak memory per device, FLOPs and time of an unlearning run, before running it", add_plan_arguments,
             plan_main),
}


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="npo-tofu", description=__doc__.splitlines()[0])  # usage errors: one line too
    add_debug_flag(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 0
    return guarded("npo-tofu", args, COMMANDS[args.command][2], errors=_expected_errors())


def _expected_errors() -> dict[type[BaseException], int]:
    """Failures of the model stack that are bad input, not bugs (a truncated safetensors file, ...)."""
    from safetensors import SafetensorError

    return {SafetensorError: 2}


if __name__ == "__main__":  # also the torchrun / accelerate launch entry: python -m full_scale.cli unlearn ...
    sys.exit(main())
