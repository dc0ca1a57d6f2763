"""``npo-sim synthetic``: the paper's §4 random-features Gaussian-mixture experiment, one α per run."""

from __future__ import annotations

import argparse
import time

from .. import losses
from .._cliutil import comma_list
from ..settings.mixture import METHODS, STUDY, SUPPLIES, SUPPORTED, SyntheticConfig
from ..study import run_study


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=float, default=1.0, help="mixture separation: 1 or 0 (default 1)")
    p.add_argument("--seeds", type=int, default=SyntheticConfig.seeds,
                   help=f"number of seeds (default {SyntheticConfig.seeds})")
    p.add_argument("--seed0", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--pretrain", default="newton", help="newton (exact optimum, default) or gd (paper's recipe)")
    p.add_argument("--compare-pretrain", action=argparse.BooleanOptionalAction, default=False,
                   help="also run the other pretraining recipe and report the difference (default off)")
    p.add_argument("--methods", type=comma_list(), default=METHODS,
                   help=f"comma-separated (default: {','.join(METHODS)}; 'all': every supported method)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--record-every", type=int, default=25)
    p.add_argument("--dtype", default="float32", help="unlearning-loop dtype: float32 (default) or float64; "
                   "pretraining and metrics are always float64")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--figures", default="figures", help="also copy the figures here (default figures/; '' = no copy)")


def format_table(summary: dict) -> str:
    """A per-method text table of the summary (mean over seeds)."""
    cfg = summary["config"]
    thr = cfg["threshold"]
    head = (f"alpha={cfg['alpha']:g}  seeds={cfg['seeds']}  steps={cfg['steps']}  pretrain={cfg['pretrain']}  "
            f"DPO scale={cfg['dpo_scale']}\n"
            f"{'method':8} {'lr':>7} {'beta':>5} | {'forget@0':>8} {'forget@end':>10} {'retain@end':>10} | "
            f"{'best forget':>11} {'(retain)':>9} | first step<{thr:g} (seeds)")
    lines = [head, "-" * len(head.splitlines()[-1])]
    for m, s in summary["methods"].items():
        hp, fs = s["hyperparameters"], s["first_step_below"]
        first = "never" if fs["mean"] is None else f"{fs['mean']:.0f}±{fs['std']:.0f}"
        beta = "-" if hp["beta"] is None else f"{hp['beta']:g}"
        lines.append(
            f"{m:8} {hp['lr']:7.0e} {beta:>5} | {s['step0']['forget_distance']['mean']:8.3f} "
            f"{s['end']['forget_distance']['mean']:10.4f} {s['end']['retain_distance']['mean']:10.4f} | "
            f"{s['best_forget']['forget_distance']['mean']:11.4f} {s['best_forget']['retain_distance']['mean']:9.4f} | "
            f"{first} ({fs['n_seeds_reached']}/{len(fs['per_seed'])})")
    fnd = summary["findings"]
    lines.append("findings: " + ", ".join(f"{k}={'n/a' if v['holds'] is None else v['holds']}" for k, v in fnd.items()))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    methods = SUPPORTED if list(args.methods) == ["all"] else tuple(args.methods)
    skip = losses.skip_note("the §4 mixture", SUPPLIES)
    if skip:
        print(f"note: {skip}")
    cfg = SyntheticConfig(alpha=args.alpha, seeds=args.seeds, seed0=args.seed0, pretrain=args.pretrain,
                          compare_pretrain=args.compare_pretrain, methods=methods, steps=args.steps,
                          record_every=args.record_every, dtype=args.dtype)
    c0 = time.process_time()
    run = run_study(STUDY, cfg, args.out, args.figures or None, progress=True)
    print(format_table(run.results.summary))
    print(f"wrote {args.out}/curves.csv, summary.json and figures in {run.seconds:.1f} s wall, "
          f"{time.process_time() - c0:.1f} s CPU")
    return 0
