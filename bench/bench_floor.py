"""Settings against a hand-vectorised floor program, measured in the same run (process CPU seconds).

    .venv/bin/python bench/bench_floor.py [--seeds 20] [--before DIR] [--official-job]

Section ``synthetic`` (the only one here): ``npo-sim synthetic --alpha 1`` as a child process (its whole
CPU time: imports, data, Newton pretraining, unlearning, findings, figures; ``getrusage(RUSAGE_CHILDREN)``)
against :func:`skeleton`, a hand-written program doing the same unlearning work in this process: the
same shapes (9 methods × seeds replicas, k = 128 features, 200 forget / 1000 retain examples), 2000
full-batch steps with hand-written gradients, and the float64 eval (4 metrics on 2000 eval points + the
forget NLL) every 25 steps. ``--before DIR`` also times the same command from an older source tree
(``git archive <commit> npo_sim | tar -x -C DIR``) at its own defaults (5 seeds, with the pretraining
comparison), and this tree on that same job. ``--official-job`` times the job
the issue ran with the official NPO code (α=1, 5 seeds, the 6 Table-1 methods, 20 000-step GD
pretraining); the official code itself is not run here (its 350 s is the issue's measurement).
Writes bench/results/floor_synthetic.json. Everything is one thread; the machine may be shared, which
is why each ratio's two sides are measured in the same run.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from npo_sim.runio import write_json  # noqa: E402

#: the official NPO code on this machine (the issue's measurement, one thread; not repeated here)
OFFICIAL_S = {"total": 350.0, "pretraining": 228.0, "unlearning": 122.0}
TABLE1 = "ga,ga_rt,idk_rt,npo,npo_rt,dpo_rt"


def skeleton(seeds: int, steps: int = 2000, every: int = 25, methods: int = 9, k: int = 128, n_f: int = 200,
             n_r: int = 1000, n_eval: int = 1000, retain_methods: int = 6) -> float:
    """The §4 unlearning work written by hand; returns its process CPU seconds.

    Per step: forget logits for every replica, retain logits for the replicas of retain-using methods,
    a hand-written NPO-style forget coefficient and a retain NLL/KL coefficient, and the two gradient
    products Φᵀ(c). Every ``every`` steps: float64 logits on forget+retain eval points, the binary KL to
    the oracle, ‖θ − θ_retr‖ and the forget NLL.
    """
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    S, c, cr = seeds, methods, retain_methods
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    phi_f, phi_r = rnd(S, n_f, k).relu(), rnd(S, n_r, k).relu()
    phi_fT, phi_rT = phi_f.transpose(1, 2).contiguous(), phi_r.transpose(1, 2).contiguous()
    ev = rnd(S, k, 2 * n_eval).relu().double()
    s_f, s_r = torch.sign(rnd(S, 1, n_f)), torch.sign(rnd(S, 1, n_r))
    theta = 0.01 * rnd(S, c, k)
    retr = theta[:, :1].double().clone()
    lr, beta = torch.full((1, c, 1), 1e-3), 1.0
    c0 = time.process_time()
    zf_ref = theta @ phi_fT
    lref = torch.nn.functional.logsigmoid(s_f * zf_ref)
    zr_ref = theta[:, :cr] @ phi_rT
    p_ref = torch.sigmoid(zr_ref)
    with torch.no_grad():
        for step in range(steps + 1):
            zf = theta @ phi_fT                                    # (S, c, n_f)
            logp = torch.nn.functional.logsigmoid(s_f * zf)
            zr = theta[:, :cr] @ phi_rT                            # (S, cr, n_r)
            if step % every == 0 or step == steps:
                th = theta.double()
                zl, zq = retr @ ev, th @ ev
                lp, lq = torch.nn.functional.logsigmoid(zl), torch.nn.functional.logsigmoid(zq)
                lp_, lq_ = torch.nn.functional.logsigmoid(-zl), torch.nn.functional.logsigmoid(-zq)
                kl = lp.exp() * (lp - lq) + lp_.exp() * (lp_ - lq_)
                _ = (kl[..., :n_eval].mean(-1), kl[..., n_eval:].mean(-1), (th - retr).norm(dim=-1),
                     -torch.nn.functional.logsigmoid(s_f.double() * (th @ phi_fT.double())).mean(-1))
            if step == steps:
                break
            w = 2.0 * torch.sigmoid(beta * (logp - lref))           # NPO weight
            cf = w * s_f * torch.sigmoid(-s_f * zf) / n_f           # forget coefficient on z_f
            cr_ = (-s_r * torch.sigmoid(-s_r * zr) + torch.sigmoid(zr) - p_ref) / n_r   # retain NLL + KL
            grad = cf @ phi_f
            grad[:, :cr] += cr_ @ phi_r
            theta -= lr * grad
    return time.process_time() - c0


def _child(argv: list[str], pythonpath: str | None = None) -> dict:
    """Run ``npo-sim ARGV`` in a child process; its CPU (user + sys) and wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sys; from npo_sim.cli import main; sys.exit(main())", *argv],
                   check=True, env=env, cwd=pythonpath or ROOT, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu_s": cpu, "wall_s": time.perf_counter() - t0, "argv": "npo-sim " + " ".join(argv)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20, help="seeds of the default run (default 20, its default)")
    p.add_argument("--before", default=None, help="an older source tree to time at its own defaults (and "
                   "this tree on the same job)")
    p.add_argument("--official-job", action="store_true", help="also time the official-code comparison job")
    args = p.parse_args()
    load0 = os.getloadavg()
    out: dict = {"section": "synthetic", "shared_machine": True,
                 "note": "process CPU seconds, one thread; the machine was shared with other jobs, so each "
                         "ratio's two sides are measured in the same run"}
    with tempfile.TemporaryDirectory() as tmp:
        run = lambda name, extra, **kw: _child(["synthetic", "--alpha", "1", *extra, "--out",  # noqa: E731
                                                 str(Path(tmp) / name), "--figures", ""], **kw)
        floor = skeleton(args.seeds)
        after = run("after", ["--seeds", str(args.seeds)])
        out["after"] = {**after, "seeds": args.seeds, "floor_cpu_s": floor, "ratio": after["cpu_s"] / floor,
                        "goal_ratio": 4.0}
        print(f"after: {after['cpu_s']:.1f} s CPU vs skeleton {floor:.1f} s at {args.seeds} seeds: "
              f"{after['cpu_s'] / floor:.1f}x (goal <= 4x)")
        if args.before:
            floor5 = skeleton(5)
            before = run("before", [], pythonpath=args.before)
            out["before"] = {**before, "seeds": 5, "source": args.before, "floor_cpu_s": floor5,
                             "ratio": before["cpu_s"] / floor5}
            print(f"before (5 seeds, its defaults): {before['cpu_s']:.1f} s CPU vs skeleton {floor5:.1f} s: "
                  f"{before['cpu_s'] / floor5:.1f}x")
            same = run("after_old_job", ["--seeds", "5", "--compare-pretrain"])   # the old defaults' job
            out["after_old_job"] = {**same, "seeds": 5, "floor_cpu_s": floor5, "ratio": same["cpu_s"] / floor5}
            print(f"after, the old defaults' job (5 seeds, --compare-pretrain): {same['cpu_s']:.1f} s CPU: "
                  f"{same['cpu_s'] / floor5:.1f}x")
        if args.official_job:
            job = run("official_job", ["--pretrain", "gd", "--seeds", "5", "--methods", TABLE1])
            out["official_job"] = {**job, "official_code_s": OFFICIAL_S,
                                   "official_code_note": "the issue's measurement of the official NPO code on "
                                                         "this machine; not repeated in this session",
                                   "speedup_vs_official": OFFICIAL_S["total"] / job["cpu_s"], "goal_speedup": 50.0}
            print(f"official-code job: {job['cpu_s']:.1f} s CPU; the official code took {OFFICIAL_S['total']:.0f} s "
                  f"(not rerun): {OFFICIAL_S['total'] / job['cpu_s']:.1f}x faster (goal >= 50x)")
    out["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                      "loadavg_before": load0, "loadavg_after": os.getloadavg()}
    path = ROOT / "bench" / "results" / "floor_synthetic.json"
    write_json(path, out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
