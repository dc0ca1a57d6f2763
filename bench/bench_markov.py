"""Time the Markov presets; write bench/results/markov.json.

Default (about 2–3 minutes on 2 cores): the three ``--quick`` tabular presets (budget: < 20 s each)
and the ``--quick`` transformer presets. ``--full`` adds the full tabular presets and the full
transformer presets (budget: < 5 min each), which takes up to ~15 minutes. ``--runs`` / ``--presets``
pick a subset (e.g. to time groups in parallel, each pinned to its own cores with ``taskset``).
Each row also keeps the run's ``findings`` block, so the bench doubles as a record of the numbers.

    .venv/bin/python bench/bench_markov.py [--full] [--threads N] [--runs tabular:quick,transformer:full]
        [--before /path/to/older/checkout]

``--before DIR`` also times each tabular ``--quick`` preset as a whole ``npo-sim markov`` process
(``PYTHONPATH=DIR`` for the older code, this checkout for the current one), interleaved so that machine
load affects both alike, with the import floor (``python -c "import torch"``) measured in the same loop;
process CPU time (children's user+sys) is the measure.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
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


def _child_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _process_cpu(cmd: list[str], pythonpath: str, tmp: str) -> float:
    """CPU seconds of one subprocess (user+sys), one intra-op thread."""
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    c0 = _child_cpu_s()
    subprocess.run(cmd, env=env, cwd=tmp, check=True, capture_output=True)
    return _child_cpu_s() - c0


#: one process: import the setting and run every tabular --quick preset (the issue's "16 s CPU" job)
_TABULAR_QUICK = ("import sys, torch; torch.set_num_threads(1)\n"
                  "from npo_sim.settings.markov import STUDY, make_config\n"
                  "from npo_sim.study import run_study\n"
                  "for p in sys.argv[2].split(','):\n"
                  "    run_study(STUDY, make_config(p, 'tabular', True), sys.argv[1] + '/' + p, None)\n")


def compare_processes(before: str, presets: list[str], repeats: int = 2) -> dict:
    """Whole-process CPU of one process running every tabular ``--quick`` preset (imports, data,
    pretraining, unlearning, files and figures), for the older and the current code, interleaved; the
    floor (``import torch`` alone) is measured in the same loop."""
    here = str(Path(__file__).resolve().parents[1])
    cpu: dict = {"before": [], "after": [], "import_torch_floor": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for tag, path in (("before", before), ("after", here)):
                cmd = [sys.executable, "-c", _TABULAR_QUICK, str(Path(tmp) / f"{tag}{i}"), ",".join(presets)]
                cpu[tag].append(round(_process_cpu(cmd, path, tmp), 2))
            cpu["import_torch_floor"].append(round(_process_cpu([sys.executable, "-c", "import torch"], here, tmp), 2))
    b, a, f = min(cpu["before"]), min(cpu["after"]), min(cpu["import_torch_floor"])
    print(f"tabular --quick ({','.join(presets)}), one process: before {b:.2f}s after {a:.2f}s CPU "
          f"({a / b:.2f}x); import-torch floor {f:.2f}s", flush=True)
    return {"job": f"one process: import npo_sim.settings.markov, run_study on the tabular --quick presets "
                   f"{presets} (no figure copy), one thread", "before_tree": before, "repeats": repeats,
            "before_cpu_s": b, "after_cpu_s": a, "after_over_before": round(a / b, 3),
            "import_torch_floor_cpu_s": f, "after_over_floor": round(a / f, 2), "all_runs_cpu_s": cpu,
            "note": "min over repeats; process CPU (user+sys of the child); the machine was shared with other "
                    "jobs, so before and after run interleaved in the same loop"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also time the full presets")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default=None, help="comma list of MODEL:quick|full (overrides --full)")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--before", default=None, help="older checkout to compare whole tabular --quick processes with")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [(m, True) for m in ("tabular", "transformer")]
    if args.full:
        runs += [(m, False) for m in ("tabular", "transformer")]
    if args.runs:
        runs = [(r.split(":")[0], r.split(":")[1] == "quick") for r in args.runs.split(",")]
    rows = []
    comparison = compare_processes(args.before, args.presets.split(",")) if args.before else None

    def save() -> None:  # after every run, so a long --full bench keeps what it measured
        machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                   "threads": args.threads, "python": sys.version.split()[0]}
        write_json(args.out, {"machine": machine,
                              "note": "wall time (and study_s, the run's own timing.json) includes data sampling, "
                                      "pretraining, unlearning every method, and writing curves/summary/claims/"
                                      "figure; the machine was shared with other jobs (see loadavg), so wall time "
                                      "is inflated and cpu_s (this process's user+sys) is the better proxy",
                              "runs": rows,
                              **({"before_after_processes": comparison} if comparison else {})})

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
