"""Benchmark: NPO+RT unlearning with cached reference log-probs vs a frozen reference model.

tiny-llama 5M (fresh init, saved to a temp dir) on tofu-mini forget10; each mode runs in its own
subprocess so its peak RSS is its own. Reports training tokens/s (forget + retain tokens through the
policy per second of the training loop; the cached mode's one-off reference pass is reported
separately and folded into an amortised rate), peak RSS, and whether the per-step losses agree.
Writes bench/results/unlearn.json. Standalone:  .venv/bin/python bench/bench_unlearn.py [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "unlearn.json"


def _data_dir() -> str:
    return os.environ.get("NPO_TOFU_DIR") or str(REPO.parent / "shared" / "tofu" / "data")


def _make_model(path: Path, size: str) -> None:
    code = ("import sys; from full_scale.models import load_model, save_checkpoint; "
            f"m, t, f = load_model('tiny-llama:{size}', device='cpu', data_dir=sys.argv[2]); "
            "save_checkpoint(m, t, sys.argv[1], {'prompt_format': f})")
    subprocess.run([sys.executable, "-c", code, str(path), _data_dir()], check=True, cwd=REPO)


def _run(model: Path, out: Path, mode: str, args) -> dict:
    cmd = [sys.executable, "-m", "full_scale.cli", "unlearn", "--preset", "mini", "--forget", "forget10",
           "--data-dir", _data_dir(), "--model", str(model), "--method", "npo_rt", "--ref-mode", mode,
           "--out", str(out), "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
           "--threads", str(args.threads), "--no-progress", "--collapse-questions", "0", "--cpu"]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    info = {**json.loads((out / "run.json").read_text()), **json.loads((out / "timing.json").read_text())}
    info["wall_seconds"] = time.time() - t0
    import pandas as pd
    info["log"] = pd.read_csv(out / "train_log.csv")
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", default="5m")
    args = ap.parse_args()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _make_model(tmp / "base", args.size)
        res = {m: _run(tmp / "base", tmp / m, m, args) for m in ("cached", "model")}
    c, m = res["cached"], res["model"]
    cols = ["loss", "forget_loss", "retain_loss", "forget_logp", "npo_weight"]
    max_diff = float((c["log"][cols] - m["log"][cols]).abs().max().max())
    amortised = c["tokens"] / (c["train_seconds"] + (c.get("ref_cache_seconds") or 0.0))
    summary = {
        "benchmark": "npo_rt unlearning, --ref-mode cached vs model",
        "model": f"tiny-llama:{args.size}", "n_parameters": c["n_parameters"], "data": "tofu-mini forget10 (40 QA)",
        "steps": args.steps, "effective_batch": c["effective_batch"], "threads_per_process": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_at_start": load0},
        "modes": {k: {"tokens_per_second": v["tokens_per_second"], "train_seconds": v["train_seconds"],
                      "tokens": v["tokens"], "peak_rss_mb": v["peak_rss_mb"],
                      "ref_cache_seconds": v.get("ref_cache_seconds"),
                      "reference_model_loaded": v["reference_model_loaded"], "wall_seconds": v["wall_seconds"]}
                  for k, v in res.items()},
        "cached_tokens_per_second_incl_ref_pass": amortised,
        "speedup_tokens_per_second": c["tokens_per_second"] / m["tokens_per_second"],
        "speedup_incl_ref_pass": amortised / m["tokens_per_second"],
        "peak_rss_ratio": c["peak_rss_mb"] / m["peak_rss_mb"],
        "max_abs_loss_diff": max_diff,
        "identical_losses": max_diff < 1e-4,
        "goal": {"speedup_ge_1.5": c["tokens_per_second"] / m["tokens_per_second"] >= 1.5,
                 "rss_ratio_le_0.6": c["peak_rss_mb"] / m["peak_rss_mb"] <= 0.6},
        "note": ("Peak RSS includes the Python/torch/transformers runtime (~0.5-0.7 GB), which dwarfs a 5M model "
                 "(21 MB in fp32), so the RSS ratio cannot approach the 0.6 goal at this scale; the saved memory is "
                 "one model copy (plus its activations), which dominates only for large models. Timings are noisy "
                 "when other jobs share the CPU (see loadavg_at_start)."),
    }
    sys.path.insert(0, str(REPO))
    from npo_sim.runio import write_json
    write_json(OUT, summary)
    print(json.dumps({k: summary[k] for k in ("speedup_tokens_per_second", "speedup_incl_ref_pass",
                                              "peak_rss_ratio", "max_abs_loss_diff")}, indent=1))
    for k, v in summary["modes"].items():
        print(f"{k:7s} {v['tokens_per_second']:8.0f} tok/s  peak RSS {v['peak_rss_mb']:.0f} MB")
    print(f"-> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
