"""Benchmark: ``npo-sim theory --quick`` against its FLOP floor and a hand-vectorised GD skeleton.

    .venv/bin/python bench/bench_floor_theory.py [--repeats 1] [--out bench/results/floor_theory.json]

All in one process, so machine load affects every number alike; times are process CPU seconds
(``time.process_time``) at one thread:

* **FLOP floor**: the matrix products the quick grid's gradient descent really needs: per config and
  step, the forward margins ``m = B z`` and the backward ``Bᵀ c``, each ``2·n_f·k`` FLOPs with
  ``k = min(n_f, d)`` (unpadded, dummy replicas excluded), times ``steps``; divided by this machine's
  measured float64 matmul rate (a 1536² matmul, best of 3).
* **Skeleton**: the same batched GD written by hand in torch (one program for every config, the
  gradient in closed form: GA weight 1, NPO weight ``W = 2σ(β(logp − logp_ref))``), no loop machinery.
* **Study**: ``npo_sim.study.run_study`` on the quick config, as ``npo-sim theory --quick`` runs it
  (imports excluded: they are timed apart, in a fresh interpreter), and its GD programs alone.

``--before PATH`` times the study of an older checkout (``PYTHONPATH=PATH``) in a subprocess too.
Not a test: numbers depend on the machine and its load (recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or str(ROOT))

from npo_sim.runio import write_json  # noqa: E402
from npo_sim.settings import logistic  # noqa: E402
from npo_sim.settings.logistic_data import make_data  # noqa: E402


def matmul_gflops(n: int = 1536, repeats: int = 3) -> float:
    """This process's float64 matmul rate (GFLOP/s, best of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=torch.float64), torch.randn(n, n, dtype=torch.float64)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        a @ b
        best = min(best, time.process_time() - t0)
    return 2 * n ** 3 / best / 1e9


def gd_flops(runs, steps: int) -> int:
    """Matmul FLOPs the GD needs: forward ``B z`` and backward ``Bᵀ c`` per config and step."""
    return sum(2 * 2 * r.n_f * min(r.n_f, r.d) for r in runs) * steps


def skeleton(runs, data, steps: int, record_at) -> tuple[float, torch.Tensor]:
    """Hand-vectorised GD of every config in one program -> (CPU seconds, final z).

    GA and NPO share one update: ``∂L/∂z = (w·σ(−m)/n_f) Bᵀ`` with ``w = 1`` (GA) or the NPO weight.
    Padded samples have zero feature columns, so they need no mask. Records ``‖B z‖`` at ``record_at``.
    """
    n_max = max(r.n_f for r in runs)
    k_max = max(data[(r.n_f, r.d, r.seed)].k for r in runs)
    C = len(runs)
    Bt = torch.zeros(C, k_max, n_max, dtype=torch.float64)
    m0 = torch.zeros(C, 1, n_max, dtype=torch.float64)
    lr = torch.zeros(C, 1, 1, dtype=torch.float64)
    beta = torch.ones(C, 1, 1, dtype=torch.float64)
    is_npo = torch.zeros(C, 1, 1, dtype=torch.bool)
    for i, r in enumerate(runs):
        d = data[(r.n_f, r.d, r.seed)]
        Bt[i, : d.k, : r.n_f] = torch.as_tensor(d.B.T)
        m0[i, 0, : r.n_f] = torch.as_tensor(d.m0)
        lr[i] = r.eta / r.n_f
        is_npo[i] = r.method == "npo"
        beta[i] = r.beta if r.method == "npo" else 1.0
    logp_ref = F.logsigmoid(m0)
    Btt = Bt.transpose(1, 2).contiguous()
    z = torch.zeros(C, 1, k_max, dtype=torch.float64)
    record, rec = set(record_at), []
    t0 = time.process_time()
    for step in range(steps + 1):
        m = torch.baddbmm(m0, z, Bt)
        if step in record:
            rec.append(torch.bmm(z, Bt).norm(dim=-1))
        if step == steps:
            break
        w = torch.where(is_npo, 2 * torch.sigmoid(beta * (F.logsigmoid(m) - logp_ref)), 1.0)
        z -= lr * torch.bmm(w * torch.sigmoid(-m), Btt)
    return time.process_time() - t0, z


def study_times() -> dict:
    """CPU seconds of ``run_study`` on the quick config in this process, and of its GD programs alone
    (``logistic.run`` wrapped). Works on older checkouts too (``--before``)."""
    import npo_sim.settings.logistic as lg
    from npo_sim.study import run_study

    gd = [0.0]
    inner = lg.run

    def timed_run(*a, **k):
        t0 = time.process_time()
        try:
            return inner(*a, **k)
        finally:
            gd[0] += time.process_time() - t0

    lg.run = timed_run
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.process_time()
        run_study(lg.STUDY, lg.QUICK, Path(tmp) / "theory", None)
        total = time.process_time() - t0
    lg.run = inner
    return {"study_cpu_s": total, "gd_cpu_s": gd[0]}


def process_cpu(cmd: list[str], env: dict) -> float:
    """Whole-process CPU seconds (user + system) of a child command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cli_times(root: Path, out: Path) -> dict:
    """``npo-sim theory --quick`` and ``--help`` as whole processes, with ``root`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    base = [sys.executable, "-m", "npo_sim.cli", "theory"]
    return {"cli_quick_cpu_s": process_cpu(base + ["--quick", "--out", str(out), "--figures", ""], env),
            "cli_help_cpu_s": process_cpu(base + ["--help"], env),
            "import_torch_cpu_s": process_cpu([sys.executable, "-c", "import torch"], env)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default=None, help="an older checkout to time as well (its npo_sim first on the path)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "floor_theory.json"))
    p.add_argument("--study-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.study_only:
        print(json.dumps(study_times()))
        return 0
    load0 = os.getloadavg()
    cfg = logistic.QUICK
    runs = logistic.expand_grid(cfg)
    data = {}
    for r in runs:
        data.setdefault((r.n_f, r.d, r.seed), make_data(r.n_f, r.d, r.seed, cfg))
    record = logistic.log_steps(cfg.steps, cfg.record_points)
    flops = gd_flops(runs, cfg.steps)
    gflops = matmul_gflops()
    floor_s = flops / (gflops * 1e9)
    skel_s, z = skeleton(runs, data, cfg.steps, record)
    # the skeleton computes the same GD: its final ‖z‖ equals the study's dist_l2 at step T
    raw = logistic.simulate_batch(runs, data, cfg.steps, [cfg.steps])
    ids = [r.config_id for r in runs]
    ours = {int(c): v for c, v in zip(raw["config_id"], raw["dist_l2"])}
    skel_err = max(abs(float(z[i].norm()) - ours[c]) / max(1.0, ours[c]) for i, c in enumerate(ids))
    after = study_times()
    with tempfile.TemporaryDirectory() as tmp:
        after.update(cli_times(ROOT, Path(tmp) / "a"))
        before = None
        if args.before:
            env = {**os.environ, "PYTHONPATH": args.before, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
            got = subprocess.run([sys.executable, __file__, "--study-only"], env=env, check=True,
                                 capture_output=True, text=True).stdout
            before = {**json.loads(got.strip().splitlines()[-1]), **cli_times(Path(args.before), Path(tmp) / "b")}

    def ratios(t: dict) -> dict:
        return {k.replace("_cpu_s", "_over_floor"): v / floor_s for k, v in t.items() if k != "cli_help_cpu_s"} | {
            "gd_over_skeleton": t["gd_cpu_s"] / skel_s, "cli_quick_over_skeleton": t["cli_quick_cpu_s"] / skel_s}

    result = {
        "benchmark": "npo-sim theory --quick vs its FLOP floor and a hand-vectorised GD skeleton",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "torch_threads": 1, "loadavg_at_start": load0,
                    "loadavg_at_end": os.getloadavg(),
                    "note": "shared machine (2 cores, other jobs running): ratios are measured in the same "
                            "run so load affects both sides; times are process CPU seconds"},
        "grid": {"configs": len(runs), "steps": cfg.steps, "methods": list(cfg.methods)},
        "floor": {"gd_matmul_flops": flops,
                  "flop_count": "sum over configs of 2 matmuls (B z forward, B^T c backward) x 2*n_f*k FLOPs "
                                "(k = min(n_f, d)), unpadded, x steps",
                  "matmul_gflops": gflops, "matmul": "1536x1536 float64, 1 thread, best of 3, this process",
                  "floor_cpu_s": floor_s},
        "skeleton": {"cpu_s": skel_s, "over_floor": skel_s / floor_s, "max_rel_err_vs_study_final_norm": skel_err,
                     "what": "same batched GD by hand in torch: one program, closed-form gradient, records"},
        "after": {**after, **ratios(after)},
        "before": {**before, **ratios(before)} if before else None,
        "goal": "npo-sim theory --quick <= 20x its FLOP floor",
    }
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("floor", "skeleton", "after", "before")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
