"""Time the Markov presets; write bench/results/markov.json.

Default (about 2–3 minutes on 2 cores): the three ``--quick`` tabular presets (budget: < 20 s each)
and the ``--quick`` transformer presets. ``--full`` adds the full tabular presets and the full
transformer presets (budget: < 5 min each), which takes up to ~15 minutes. ``--runs`` / ``--presets``
pick a subset (e.g. to time groups in parallel, each pinned to its own cores with ``taskset``).
Each row also keeps the run's ``findings`` block, so the bench doubles as a record of the numbers.

    .venv/bin/python bench/bench_markov.py [--full] [--threads N] [--runs tabular:quick,transformer:full]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from npo_sim.runio import write_json
from npo_sim.settings.markov import PRESETS, STUDY, make_config
from npo_sim.study import run_study

OUT = Path(__file__).resolve().parent / "results" / "markov.json"
BUDGET_S = {("tabular", True): 20.0, ("transformer", False): 300.0}


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also time the full presets")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default=None, help="comma list of MODEL:quick|full (overrides --full)")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [(m, True) for m in ("tabular", "transformer")]
    if args.full:
        runs += [(m, False) for m in ("tabular", "transformer")]
    if args.runs:
        runs = [(r.split(":")[0], r.split(":")[1] == "quick") for r in args.runs.split(",")]
    rows = []

    def save() -> None:  # after every run, so a long --full bench keeps what it measured
        machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                   "threads": args.threads, "python": sys.version.split()[0]}
        write_json(args.out, {"machine": machine,
                              "note": "wall time (and study_s, the run's own timing.json) includes data sampling, "
                                      "pretraining, unlearning every method, and writing curves/summary/claims/"
                                      "figure; the machine was shared with other jobs (see loadavg), so wall time "
                                      "is inflated and cpu_s (this process's user+sys) is the better proxy",
                              "runs": rows})

    with tempfile.TemporaryDirectory() as tmp:
        for model, quick in runs:
            for preset in args.presets.split(","):
                w0, c0 = time.perf_counter(), _cpu_s()
                run = run_study(STUDY, make_config(preset, model, quick), Path(tmp) / f"{preset}-{model}-{quick}")
                summary = run.results.summary
                wall, cpu = time.perf_counter() - w0, _cpu_s() - c0
                budget = BUDGET_S.get((model, quick))
                row = {"preset": preset, "model": model, "quick": quick, "wall_s": round(wall, 2),
                       "cpu_s": round(cpu, 2), "budget_s": budget,
                       "within_budget": None if budget is None else wall < budget,
                       "within_budget_cpu": None if budget is None else cpu < budget,
                       "loadavg_1min_after": round(os.getloadavg()[0], 2),
                       "study_s": round(run.seconds, 2),
                       "diverged_at_step": summary["diverged_at_step"], "findings": summary["findings"]}
                rows.append(row)
                print(f"{preset:13s} {model:11s} quick={quick!s:5s} wall {wall:7.1f}s cpu {cpu:7.1f}s"
                      + (f"  (budget {budget:.0f}s)" if budget else ""), flush=True)
                save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
