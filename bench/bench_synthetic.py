"""Time the whole §4 mixture experiment: both α, 5 seeds, all methods, pretraining (Newton + the GD
comparison) and figures included. Goal: under 30 s on 2 cores.

    .venv/bin/python bench/bench_synthetic.py [--seeds 5] [--pretrain newton]

Prints a line per α and writes bench/results/synthetic.json. Wall time on a shared machine is noisy;
the CPU time (process_time) and the load average are recorded next to it.
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

from npo_sim.mixture import ALPHAS, SyntheticConfig, run_synthetic  # noqa: E402
from npo_sim.runio import write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--pretrain", default="newton")
    args = p.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    per_alpha = {}
    with tempfile.TemporaryDirectory() as tmp:
        for alpha in ALPHAS:
            cfg = SyntheticConfig(alpha=alpha, seeds=args.seeds, pretrain=args.pretrain)
            s = run_synthetic(cfg, Path(tmp) / f"alpha{alpha:g}")
            per_alpha[f"{alpha:g}"] = {"timing_s": s["timing_s"], "methods": len(cfg.methods),
                                       "steps": cfg.steps, "seeds": cfg.seeds}
            t = s["timing_s"]
            print(f"alpha={alpha:g}: {t['total']:.1f} s wall, {t['cpu_total']:.1f} s CPU "
                  f"(pretraining {t['pretraining']:.1f} s, unlearning {t['unlearning']:.1f} s, "
                  f"{len(cfg.methods)} methods x {cfg.seeds} seeds x {cfg.steps} steps)")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    result = {
        "benchmark": "npo-sim synthetic, both alpha, all methods, pretraining + GD comparison + figures",
        "goal_s": 30.0, "wall_s": wall, "cpu_s": cpu, "per_alpha": per_alpha,
        "seeds": args.seeds, "pretrain": args.pretrain,
        "machine": {"cpus": os.cpu_count(), "torch_threads": 1, "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_before": load0, "loadavg_after": os.getloadavg()},
    }
    out = Path(__file__).resolve().parent / "results" / "synthetic.json"
    write_json(out, result)
    print(f"both alpha: {wall:.1f} s wall, {cpu:.1f} s CPU (goal < 30 s); load {load0[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f}; wrote {out}")


if __name__ == "__main__":
    main()
