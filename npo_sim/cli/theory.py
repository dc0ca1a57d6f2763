"""``npo-sim theory``: argument parsing for the Theorem-2 lab (:mod:`npo_sim.settings.logistic`)."""

from __future__ import annotations

import argparse

from .._cliutil import comma_list
from ..settings.logistic import INITS, METHODS, QUICK, STUDY, TheoryConfig, make_config
from ..study import run_study


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quick", action="store_true", help="small grid, 10^4 steps (< 30 s); used by tests and figures")
    p.add_argument("--steps", type=int, default=None, help="GD steps T (default 10^5, or 10^4 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="base data seed")
    p.add_argument("--methods", type=comma_list(), default=None,
                   help=f"comma list from {','.join(METHODS)} (default ga,npo)")
    p.add_argument("--law-methods", type=comma_list(), default=None,
                   help="more methods, run at the base point only, for their divergence law (or 'all')")
    p.add_argument("--etas", type=comma_list(float), default=None, help="comma list of step sizes eta")
    p.add_argument("--betas", type=comma_list(float), default=None, help="comma list of beta for the main grid")
    p.add_argument("--n-f", dest="n_fs", type=comma_list(int), default=None, help="comma list of forget-set sizes")
    p.add_argument("--d", dest="ds", type=comma_list(int), default=None, help="comma list of dimensions")
    p.add_argument("--init", choices=INITS, default=None, help="how theta_init is drawn (default margins)")
    p.add_argument("--check-orthogonality", action="store_true",
                   help="error unless every n_f <= d and C0 = n_f*max|<x_i,x_j>| <= --max-c0")
    p.add_argument("--max-c0", type=float, default=None)
    p.add_argument("--workers", type=int, default=1,
                   help="processes: 1 (default) trains every method in one batched program; "
                        "more: one program per method, each on its own process")
    p.add_argument("--figures", default="figures", help="also copy figures here ('' to skip; default figures/)")


def config_from_args(args) -> TheoryConfig:
    """The quick or default config with the given options (the base point follows a narrowed grid)."""
    law = args.law_methods
    if law == ["all"] or law == ("all",):
        law = [m for m in METHODS if m not in (args.methods or TheoryConfig.methods)]
    over = {k: v for k, v in {"steps": args.steps, "seed": args.seed, "methods": args.methods,
                              "law_methods": tuple(law) if law is not None else None,
                              "etas": args.etas, "betas": args.betas, "n_fs": args.n_fs, "ds": args.ds,
                              "init": args.init, "max_c0": args.max_c0}.items() if v is not None}
    return make_config(QUICK if args.quick else TheoryConfig(), **over,
                       check_orthogonality=bool(args.check_orthogonality), workers=args.workers)


def main(args) -> int:
    from .. import losses
    from ..settings.logistic_config import SUPPLIES

    cfg = config_from_args(args)
    skipped = losses.skip_note("the logistic lab", SUPPLIES, losses.methods(retain_free=True))
    print(f"note: the logistic lab runs the retain-free objectives it can feed ({', '.join(METHODS)}); it skips "
          "every objective with a retain term, RMU included (no retain set, no activations)"
          + (f"; {skipped}" if skipped else ""))
    run = run_study(STUDY, cfg, args.out, args.figures or None, progress=True)
    print(STUDY.describe(run.results, cfg))
    print(f"wrote {args.out}/summary.json, trajectories.csv, figures ({run.seconds:.1f}s)")
    return 0
