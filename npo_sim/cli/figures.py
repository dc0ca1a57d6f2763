"""``npo-sim figures``: argument parsing; the work is :func:`npo_sim.report.run_figures`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .. import claims as C
from .._cliutil import comma_list
from ..report import count_verdicts, planned_runs, run_figures


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="figures", help="figures directory (PNGs and REPORT.md)")
    p.add_argument("--runs", default="runs/figures", help="where each study's run directory goes")
    p.add_argument("--quick", action="store_true", help="smoke-test settings (seconds per study)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild REPORT.md from the claims already in --runs (no simulation)")
    p.add_argument("--only", type=comma_list(), default=None,
                   help="comma-separated subset of: " + ", ".join(r.name for r in planned_runs(False)))


def main(args) -> int:
    only = list(args.only) if args.only else None
    t0 = time.perf_counter()
    res = run_figures(Path(args.out), Path(args.runs), smoke=args.quick, only=only, report_only=args.report_only)
    n = count_verdicts(res["claims"])
    print(f"wrote {res['report']} ({len(res['claims'])} claims: {n[C.HOLDS]} hold, {n[C.PARTLY]} "
          f"partly, {n[C.FAILS]} do not hold, {n[C.NA]} not measured, {n[C.VACUOUS]} vacuous) "
          f"in {time.perf_counter() - t0:.0f} s")
    for k, v in res["timings"].items():
        print(f"  {k:32s} {v:6.1f} s")
    return 0
