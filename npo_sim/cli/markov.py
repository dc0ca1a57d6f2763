"""``npo-sim markov``: argument parsing and the one-screen summary; the work is the Markov Study
(:mod:`npo_sim.settings.markov`), run by :func:`npo_sim.study.run_study`.

Importing this module is light (no torch, pandas or matplotlib): the setting is imported by :func:`main`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .._cliutil import comma_list
from ..runio import UserError

if TYPE_CHECKING:
    from ..study import StudyRun

#: the preset names of :data:`npo_sim.settings.markov.PRESETS` (kept here so ``--help`` stays light;
#: a test checks they agree)
PRESET_NAMES = ("length", "memorization", "divergence")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESET_NAMES)}")
    p.add_argument("--model", default="tabular", help="tabular (default) or transformer")
    p.add_argument("--quick", action="store_true", help="smaller/faster version (used by `npo-sim figures`)")
    p.add_argument("--paper", action="store_true",
                   help="the SimNPO authors' setup (transformer, length/memorization: 4-layer width-128 post-LN GPT, "
                        "AdamW 5e-4, 4 forget sequences per step, 50 steps, beta 1)")
    p.add_argument("--out", required=True, help="run directory for curves.csv, summary.json, figure")
    p.add_argument("--figures", default="figures", help="directory that receives a copy of the figure ('' = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", type=comma_list(), default=None,
                   help="comma-separated objectives (default: the preset's)")
    p.add_argument("--eps", type=float, default=None, help="leakage ε in [0,1) (default 0.2)")
    p.add_argument("--length", type=int, default=None, help="sequence length (default 20)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the models are tiny)")


def main(args) -> int:
    import torch

    from ..settings.markov import STUDY, make_config
    from ..study import run_study

    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    methods = args.methods or None
    cfg = make_config(args.preset, args.model, args.quick, args.seed, paper=args.paper, methods=methods, eps=args.eps,
                      length=args.length, steps=args.steps, lr=args.lr, beta=args.beta)
    from .. import losses
    from ..settings.markov import SUPPLIES

    print(f"note: {losses.skip_note('the Markov setting', SUPPLIES)}")
    run = run_study(STUDY, cfg, args.out, args.figures or None, progress=True)
    print(format_summary(run))
    tables = ", ".join(f"{name}.csv" for name in run.results.tables)
    print(f"wrote {Path(args.out)}/: {tables}, summary.json, claims.json, {run.figures[0].name}")
    return 0


def _divergence_lines(f: dict, cfg) -> list[str]:
    lines = []
    for m, fits in f["fits"].items():
        for q in ("norm", "forget_nll"):
            lin, lg = fits[f"{q}_linear"], fits[f"{q}_log"]
            lines.append(f"  {m:4s} {q:10s} linear: slope {lin['slope']:.4g}/step R² {lin['r2']:.4f} | "
                         f"log: slope {lg['slope']:.4g}/ln-step R² {lg['r2']:.4f}")
        lines.append(f"  {m:4s} norm ∝ t^p: p = {fits['norm_loglog']['slope']:.3f}")
    return lines


def _balance_lines(f: dict, cfg) -> list[str]:
    lines = [f"  at each method's best step (min mean forget KL to oracle); F1 = forget1 (L={cfg.length}), "
             f"F2 = forget2 (L={cfg.forget2_length}); KL = next-state KL on test prefixes",
             f"  {'method':10s} {'step':>5s} {'F1 KL→true':>10s} {'F2 KL→true':>10s} {'F1 KL→orc':>10s} "
             f"{'F2 KL→orc':>10s} {'F1 llgap':>9s} {'F2 llgap':>9s} {'ret KL→true':>11s}"]
    for m, b in f["at_best"].items():
        lines.append(f"  {m:10s} {b['step']:5d} {b['forget1']['kl_true']:10.4f} {b['forget2']['kl_true']:10.4f} "
                     f"{b['forget1']['kl_oracle']:10.4f} {b['forget2']['kl_oracle']:10.4f} "
                     f"{b['forget1']['ll_gap_vs_oracle']:+9.4f} {b['forget2']['ll_gap_vs_oracle']:+9.4f} "
                     f"{b['kl_retain_true']:11.4f}")
    return lines


#: preset -> the table lines of its summary
_TABLES = {"divergence": _divergence_lines, "length": _balance_lines, "memorization": _balance_lines}


def format_summary(run: StudyRun) -> str:
    """Pretraining NLLs, the preset's table, divergences, and the verdict line with the claim's verdict."""
    s = run.results.summary
    cfg, f = s["config"], s["findings"]
    lines = [f"markov {cfg.preset} ({cfg.model}): pretrain token NLL target {s['pretrain']['target_token_nll']:.4f}, "
             f"oracle {s['pretrain']['oracle_token_nll']:.4f}; total {run.seconds:.1f}s"]
    lines += _TABLES[cfg.preset](f, cfg)
    for m, step in s["diverged_at_step"].items():
        lines.append(f"  {m}: loss became non-finite at step {step}; curves and fits stop there")
    lines.append(f"  verdict: {f['verdict']}")
    lines += [f"  claim: {c.claim} -> {c.verdict}" for c in run.claims]
    return "\n".join(lines)
