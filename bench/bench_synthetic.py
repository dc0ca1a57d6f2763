"""Time the whole §4 mixture experiment: both α, the default 20 seeds, all methods, pretraining (Newton;
the GD comparison only with --compare-pretrain, off by default as in ``npo-sim synthetic``) and figures
included. Goal (set at 5 seeds): under 30 s on 2 cores. The ratio to a hand-vectorised floor program is
measured by bench/bench_floor.py.

    .venv/bin/python bench/bench_synthetic.py [--seeds 20] [--pretrain newton] [--compare-pretrain]

Prints a line per α and writes bench/results/synthetic.json. Each α is one ``run_study`` (the same call
``npo-sim synthetic`` makes), which prints its phase times (pretraining, unlearning) as it runs. The
unlearning loop is single-threaded (its matrices are tiny), so on 2 cores the two α run best as two
processes: the headline number runs them concurrently; the sequential one-process time is measured in the
same run. Wall time on a shared machine is noisy; the CPU time (process_time) and the load average are
recorded next to it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npo_sim.runio import write_json  # noqa: E402
from npo_sim.settings.mixture import ALPHAS, STUDY, SyntheticConfig  # noqa: E402
from npo_sim.study import run_study  # noqa: E402


def _one(alpha: float, seeds: int, pretrain: str, tmp: str, compare: bool = False) -> dict:
    """One α through run_study (figures included): wall and CPU seconds, and the run's size."""
    torch.set_num_threads(1)
    cfg = SyntheticConfig(alpha=alpha, seeds=seeds, pretrain=pretrain, compare_pretrain=compare)
    t0, c0 = time.perf_counter(), time.process_time()
    run_study(STUDY, cfg, Path(tmp) / f"alpha{alpha:g}", progress=True)
    return {"timing_s": {"total": time.perf_counter() - t0, "cpu_total": time.process_time() - c0},
            "methods": len(cfg.methods), "steps": cfg.steps, "seeds": cfg.seeds}


def _parallel(seeds: int, pretrain: str, compare: bool) -> float:
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    n = len(ALPHAS)
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(n) as pool:
        list(pool.map(_one, ALPHAS, [seeds] * n, [pretrain] * n, [tmp] * n, [compare] * n))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=SyntheticConfig.seeds)
    p.add_argument("--pretrain", default="newton")
    p.add_argument("--compare-pretrain", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    wall_parallel = _parallel(args.seeds, args.pretrain, args.compare_pretrain)
    print(f"both alpha as 2 concurrent processes: {wall_parallel:.1f} s wall (goal < 30 s)")
    t0, c0 = time.perf_counter(), time.process_time()
    per_alpha = {}
    with tempfile.TemporaryDirectory() as tmp:
        for alpha in ALPHAS:
            one = per_alpha[f"{alpha:g}"] = _one(alpha, args.seeds, args.pretrain, tmp, args.compare_pretrain)
            t = one["timing_s"]
            print(f"alpha={alpha:g}: {t['total']:.1f} s wall, {t['cpu_total']:.1f} s CPU "
                  f"({one['methods']} methods x {one['seeds']} seeds x {one['steps']} steps)")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    result = {
        "benchmark": "npo-sim synthetic, both alpha, all methods, pretraining + figures"
                     + (" + the pretraining comparison" if args.compare_pretrain else " (no pretraining comparison)"),
        "shared_machine": True, "compare_pretrain": args.compare_pretrain,
        "goal_s": 30.0, "wall_s_two_processes": wall_parallel, "wall_s_sequential": wall, "cpu_s_sequential": cpu,
        "per_alpha": per_alpha,
        "seeds": args.seeds, "pretrain": args.pretrain,
        "machine": {"cpus": os.cpu_count(), "torch_threads": 1, "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_before": load0, "loadavg_after": os.getloadavg()},
    }
    out = Path(__file__).resolve().parent / "results" / "synthetic.json"
    write_json(out, result)
    print(f"both alpha, sequential in one process: {wall:.1f} s wall, {cpu:.1f} s CPU; load {load0[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f}; wrote {out}")


if __name__ == "__main__":
    main()
