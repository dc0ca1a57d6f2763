"""Benchmark: the full default Theorem-2 grid (>= 100 configs x 10^5 GD steps) vs a naive per-config loop.

    .venv/bin/python bench/bench_theory.py [--steps 100000] [--workers 1] [--before PATH] [--out PATH]

The batched run is what ``npo-sim theory`` does (``--workers 1``: every method in one batched tensor
program, reduced to the span of the forget features, gradients through the closed-form chain rule;
``--workers 2``: one program per method, on one core each). ``--before PATH`` times the same grid with
an older checkout (its ``npo_sim`` first on the path, in a subprocess, one worker) for a before/after
pair; both are process CPU seconds as well as wall seconds. The naive
baseline runs :func:`npo_sim.unlearn.run` once per config on the full d-dimensional θ; it is timed on a
stratified subset for ``--naive-steps`` steps and extrapolated linearly to every config x ``--steps``
(GD cost per step is constant in t). A "per-config, reduced" loop separates the gain from batching from
the gain from the exact reduction. Not a test: numbers depend on the machine and its load (recorded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npo_sim.runio import write_json  # noqa: E402
from npo_sim.settings.logistic import TheoryConfig, expand_grid, simulate_grid, simulate_group  # noqa: E402
from npo_sim.settings.logistic_data import make_data  # noqa: E402
from npo_sim.unlearn import log_steps  # noqa: E402


def _per_config(subset, cfg, steps: int, full: bool) -> list[dict]:
    out = []
    warm = subset[0]                                   # warm-up: first-call costs are not per-step costs
    dat = make_data(warm.n_f, warm.d, warm.seed, cfg, keep_features=full)
    simulate_group(warm.method, [dataclasses.replace(warm, config_id=0)], {(warm.n_f, warm.d, warm.seed): dat},
                   50, [50], full_dim={(warm.n_f, warm.d, warm.seed): dat.A} if full else None)
    for r in subset:
        key = (r.n_f, r.d, r.seed)
        dat = make_data(*key, cfg, keep_features=full)
        one = dataclasses.replace(r, config_id=0)
        t0 = time.perf_counter()
        simulate_group(r.method, [one], {key: dat}, steps, log_steps(steps, cfg.record_points),
                       full_dim={key: dat.A} if full else None)
        dt = time.perf_counter() - t0
        out.append({"method": r.method, "beta": r.beta, "eta": r.eta, "n_f": r.n_f, "d": r.d,
                    "seconds": dt, "per_step_s": dt / steps})
    return out


#: run by ``--before`` in a subprocess: the grid's CPU and wall seconds with whichever npo_sim is first on the path
_TIME_GRID = """
import json, sys, time, torch
torch.set_num_threads(1)
from npo_sim.settings.logistic import TheoryConfig, simulate_grid
c0, w0 = time.process_time(), time.perf_counter()
traj, _, timing = simulate_grid(TheoryConfig(steps=int(sys.argv[1]), workers=1))
print(json.dumps({"cpu_seconds": time.process_time() - c0, "wall_seconds": time.perf_counter() - w0,
                  "gd_programs": timing, "rows": len(traj)}))
"""


def time_before(path: str, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _TIME_GRID, str(steps)], env=env, check=True,
                         capture_output=True, text=True, cwd=path).stdout
    return {"checkout": path, **json.loads(out.strip().splitlines()[-1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--before", default=None, help="older checkout to time on the same grid (one worker)")
    p.add_argument("--naive-steps", type=int, default=2000)
    p.add_argument("--naive-configs", type=int, default=6)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "theory.json"))
    p.add_argument("--label", default="", help="free text recorded with the results (e.g. the machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load0 = os.getloadavg()

    cfg = TheoryConfig(steps=args.steps, workers=args.workers)
    runs = expand_grid(cfg)
    n_configs, n_grid = len(runs), sum(r.role == "grid" for r in runs)
    print(f"grid: {n_configs} configs ({n_grid} grid + {n_configs - n_grid} flow-check) x {args.steps} steps, "
          f"methods {cfg.methods}, workers {args.workers}")

    c0, t0 = time.process_time(), time.perf_counter()
    traj, _, timing = simulate_grid(cfg, progress=print)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    gd = sum(v["seconds"] for v in timing.values())
    print(f"batched: {wall:.1f}s wall, {cpu:.1f}s CPU in this process ({gd:.1f}s CPU in the {len(timing)} GD programs)")
    before = time_before(args.before, args.steps) if args.before else None
    if before:
        print(f"before ({args.before}): {before['wall_seconds']:.1f}s wall, {before['cpu_seconds']:.1f}s CPU")

    rng = np.random.default_rng(0)
    grid = [r for r in runs if r.role == "grid"]
    by_method = {m: [r for r in grid if r.method == m] for m in cfg.methods}
    k = max(1, args.naive_configs // len(by_method))
    subset = [g[i] for g in by_method.values() for i in sorted(rng.choice(len(g), min(k, len(g)), replace=False))]
    naive = _per_config(subset, cfg, args.naive_steps, full=True)
    reduced = _per_config(subset, cfg, args.naive_steps, full=False)
    naive_step = float(np.mean([x["per_step_s"] for x in naive]))
    reduced_step = float(np.mean([x["per_step_s"] for x in reduced]))
    naive_total = naive_step * n_configs * args.steps
    reduced_total = reduced_step * n_configs * args.steps
    print(f"naive per-config loop (full d): {naive_step * 1e6:.0f} us/step -> {naive_total:.0f}s extrapolated; "
          f"per-config reduced: {reduced_total:.0f}s; speedup {naive_total / wall:.0f}x")

    result = {
        "benchmark": "npo-sim theory: full default grid",
        "label": args.label,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(),
                    "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "torch_threads_per_process": 1, "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg(),
                    "note": "shared machine (2 cores, other jobs running); before and after ran in the same "
                            "session, CPU seconds are the fairer comparison (gd_programs seconds are CPU "
                            "seconds after, wall seconds before)"},
        "grid": {"configs": n_configs, "grid_configs": n_grid, "steps": args.steps, "methods": list(cfg.methods),
                 "record_points": cfg.record_points, "n_fs": cfg.n_fs, "ds": cfg.ds, "etas": cfg.etas,
                 "betas": cfg.betas, "beta_sweep": cfg.beta_sweep, "n_seeds": cfg.n_seeds},
        "batched": {"workers": args.workers, "wall_seconds": wall, "cpu_seconds": cpu, "gd_programs": timing,
                    "configs_per_s": n_configs / wall, "config_steps_per_s": n_configs * args.steps / wall,
                    "gd_iterations_per_s": len(timing) * args.steps / wall,
                    "includes": "data generation, all GD programs, and tidying into tables (not analysis/figures)",
                    "rows": int(len(traj))},
        "naive_per_config_full_d": {
            "what": "unlearn.run once per config on the full d-dimensional theta, no batching, no reduction",
            "timed": naive, "timed_steps": args.naive_steps, "mean_per_step_s": naive_step,
            "extrapolated_seconds": naive_total,
            "extrapolation": f"mean per-step time of {len(naive)} configs (random, stratified by method) x "
                             f"{n_configs} configs x {args.steps} steps"},
        "per_config_reduced": {"what": "same loop on the exact reduced parameters (batching gain only)",
                               "timed": reduced, "mean_per_step_s": reduced_step,
                               "extrapolated_seconds": reduced_total},
        "before": before,
        "speedup_vs_before_cpu": before["cpu_seconds"] / cpu if before else None,
        "speedup_vs_naive": naive_total / wall,
        "speedup_vs_per_config_reduced": reduced_total / wall,
        "goal": "full default grid (>= 100 configs x 1e5 steps) under 60 s on 2 cores",
        "goal_met": bool(wall < 60 and n_configs >= 100 and args.steps >= 100_000),
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
