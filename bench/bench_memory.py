"""Benchmark: peak memory and throughput of npo / npo_rt / npo_kl, full fine-tuning vs LoRA, vs ``npo-tofu plan``.

An 84M-parameter tiny-llama (:data:`BENCH_SIZE`, fresh init, the TOFU BPE tokenizer) is saved to a
directory once; every row is one ``npo-tofu unlearn --preset mini ... --max-steps K`` in its own
subprocess, so its peak RSS (``timing.json``'s ``ru_maxrss``, the process high-water mark) is its own.
The planner (:mod:`full_scale.plan`) is run for the same model, batch, length and reference, on device
``cpu`` in fp32, with the runtime overhead set to the measured RSS of a process that has imported
torch, transformers, accelerate and npo-tofu's training modules and loaded nothing (``overhead_mb``).

Rows: full fine-tuning npo (ref cached and ref model), npo_rt (cached), npo_kl (model: the retain KL needs
reference logits); LoRA (``--lora-r``) npo, npo_rt, npo_kl with the adapter-disabled reference
(``--ref-mode model``). LoRA rows run only when ``npo-tofu unlearn --help`` lists ``--lora-r``.

Goals (recorded in the JSON with whether each is met):

* ``lora_vs_full``: npo_kl LoRA peak RSS ≤ 0.6 × npo_kl full (frozen copy) peak RSS;
* ``planner_within_20pct``: |planned_mb − peak_rss_mb| ≤ 0.2 × peak_rss_mb on every row;
* ``cached_flop_bound``: cached-reference npo reaches ≥ 95 % of its FLOP bound, i.e.
  ``(tokens/s cached ÷ tokens/s model) ≥ 0.95 × (FLOPs/token model ÷ FLOPs/token cached)``: the
  speed-up from dropping the reference forward is at least 95 % of what the FLOP count predicts.
  With the planner's formulas (one forget stream with gradients; npo reads no retain input, so no retain
  batch is forwarded) the FLOP ratio is ``(6N + 2N)/6N`` plus attention.

Writes bench/results/memory.json. Standalone:  .venv/bin/python bench/bench_memory.py [--steps 3]
(``--reuse`` keeps the measured rows of a previous run under --work and only re-plans.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "memory.json"
#: the bench model: LlamaConfig fields (with the 4096-token TOFU vocabulary: 84,165,888 parameters; = tiny-llama:80m)
BENCH_SIZE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=11, num_attention_heads=12)
#: (method, mode, ref) rows; ref is the value of --ref-mode for full rows, "adapter-disabled" for LoRA
ROWS = (("npo", "full", "cached"), ("npo", "full", "model"), ("npo_rt", "full", "cached"),
        ("npo_kl", "full", "model"),
        ("npo", "lora", "adapter-disabled"), ("npo_rt", "lora", "adapter-disabled"),
        ("npo_kl", "lora", "adapter-disabled"))
LORA_R, LORA_TARGETS = 8, ("q_proj", "k_proj", "v_proj", "o_proj")  # npo-tofu's default targets
GOALS = {"lora_vs_full": 0.6, "planner_within": 0.2, "cached_flop_bound": 0.95}


def _data_dir() -> str:
    return os.environ.get("NPO_TOFU_DIR") or str(REPO.parent / "shared" / "tofu" / "data")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MPLBACKEND": "Agg"}


def make_model(path: Path) -> None:
    """Save the :data:`BENCH_SIZE` tiny-llama (seed 0) with the TOFU tokenizer to ``path``."""
    if (path / "config.json").is_file():
        return
    code = (
        "import sys, json, torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from full_scale.models import train_tokenizer, save_checkpoint, TINY_MAX_POSITIONS\n"
        "tok = train_tokenizer(sys.argv[2])\n"
        "cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=TINY_MAX_POSITIONS,\n"
        "                  tie_word_embeddings=False, bos_token_id=tok.bos_token_id,\n"
        "                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,\n"
        "                  **json.loads(sys.argv[3]))\n"
        "torch.manual_seed(0)\n"
        "save_checkpoint(LlamaForCausalLM(cfg), tok, sys.argv[1], {'prompt_format': 'plain'})\n")
    subprocess.run([sys.executable, "-c", code, str(path), _data_dir(), json.dumps(BENCH_SIZE)], check=True,
                   cwd=REPO, env=_env())


def measure_overhead() -> float:
    """Peak RSS (MB) of a process that imported torch, transformers, accelerate and the training code."""
    code = ("import resource, torch, transformers, accelerate\n"
            "from transformers import LlamaForCausalLM\n"
            "import full_scale.cli, full_scale.train, full_scale.tasks\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=_env(), capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def unlearn_help() -> str:
    return subprocess.run([sys.executable, "-m", "full_scale.cli", "unlearn", "--help"], cwd=REPO, env=_env(),
                          capture_output=True, text=True).stdout


def run_row(model: Path, out: Path, method: str, mode: str, ref: str, args, help_text: str) -> dict:
    """One unlearning run in its own process; its peak RSS and steady tokens/s (first step excluded)."""
    import pandas as pd

    cmd = [sys.executable, "-m", "full_scale.cli", "unlearn", "--preset", "mini", "--forget", "forget10",
           "--data-dir", _data_dir(), "--model", str(model), "--method", method,
           "--ref-mode", "model" if ref in ("model", "adapter-disabled") else "cached",
           "--out", str(out), "--epochs", "1", "--batch-size", str(args.batch_size), "--grad-accum", "1",
           "--max-length", str(args.max_length), "--max-steps", str(args.steps), "--threads", str(args.threads),
           "--dtype", "float32", "--no-progress", "--collapse-questions", "0", "--cpu"]
    if mode == "lora":
        cmd += ["--lora-r", str(LORA_R)]
        if "--lora-targets" in help_text:
            cmd += ["--lora-targets", ",".join(LORA_TARGETS)]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL)
    timing = json.loads((out / "timing.json").read_text())
    run = json.loads((out / "run.json").read_text())
    log = pd.read_csv(out / "train_log.csv")
    secs = timing["step_seconds"][1:] or timing["step_seconds"]
    toks = list(log["tokens"])[1:] or list(log["tokens"])
    return {"method": method, "mode": mode, "ref": ref, "peak_rss_mb": timing["peak_rss_mb"],
            "tokens_per_s": sum(toks) / sum(secs), "steps": int(run["steps_done"]),
            "trainable_parameters": int(run["n_parameters"]), "reference_model_loaded": run["reference_model_loaded"],
            "wall_seconds": round(time.time() - t0, 1)}


def planned(model: Path, row: dict, args, overhead_mb: float) -> dict:
    from full_scale import plan as P

    req = P.PlanRequest(model=str(model), method=row["method"], batch_size=args.batch_size, grad_accum=1,
                        seq_len=args.max_length, lora=row["mode"] == "lora", lora_r=LORA_R,
                        lora_targets=LORA_TARGETS, dtype="fp32",
                        ref_mode="cached" if row["ref"] == "cached" else "model",
                        accelerate="single_gpu", device="cpu", overhead_mb=overhead_mb, preset="mini",
                        forget="forget10")
    p = P.make_plan(req)
    return {"planned_mb": p.memory.total / P.MB,
            "planned_breakdown_mb": {k: v / P.MB for k, v in p.memory.parts.items()},
            "planned_flops_per_token": p.flops.per_token, "model_params": p.arch_params}


_WORKER = r"""
import json, statistics, sys, time, tempfile
from pathlib import Path
import torch
from accelerate import Accelerator
from full_scale.cli import parser, unlearn_job
from full_scale.models import load_model
from full_scale.tasks import UnlearnTask
from full_scale.train import epoch_steps

model_dir, data_dir, batch, max_len, rounds, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
acc = Accelerator(cpu=True)
runs = {}
for mode in ("cached", "model"):
    out = Path(tempfile.mkdtemp()) / mode
    args = parser().parse_args(["unlearn", "--preset", "mini", "--forget", "forget10", "--data-dir", data_dir,
                                "--model", model_dir, "--method", "npo", "--ref-mode", mode, "--out", str(out),
                                "--batch-size", batch, "--max-length", max_len, "--dtype", "float32"])
    job = unlearn_job(args)
    rows = UnlearnTask.load(job)
    model, tok, fmt = load_model(model_dir, device="cpu", dtype=torch.float32, data_dir=data_dir)
    task = UnlearnTask(job, rows, tok, fmt)
    frozen = task.source.frozen_copy(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.01)
    ref = task.reference(acc, model, frozen, out, {}, resumed=False)
    runs[mode] = (task, model, opt, ref)
steps = epoch_steps(runs["cached"][0].n, int(batch), 0, 0)
times = {"cached": [], "model": []}
tokens = []
for r in range(int(rounds)):
    ids = steps[r % len(steps)]
    order = ("cached", "model") if r % 2 == 0 else ("model", "cached")
    for mode in order:
        task, model, opt, ref = runs[mode]
        model.train()
        t0 = time.perf_counter()
        loss, _, tok_count = task.micro(model, ref, ids, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times[mode].append(time.perf_counter() - t0)
    tokens.append(tok_count)
print(json.dumps({"times": times, "tokens": tokens}))
"""


def interleaved_throughput(model: Path, args) -> dict:
    """npo with a cached reference vs a frozen reference model, one process, steps alternating A/B (the order
    flips every round) on the same micro-batches: contention on a shared CPU hits both alike. Each timed step is
    ``UnlearnTask.micro`` + backward + AdamW step; the first round (warm-up) is dropped. The speed-up is the
    median over rounds of ``t_model / t_cached``."""
    out = subprocess.run([sys.executable, "-c", _WORKER, str(model), _data_dir(), str(args.batch_size),
                          str(args.max_length), str(args.rounds + 1), str(args.threads)],
                         check=True, cwd=REPO, env=_env(), capture_output=True, text=True)
    d = json.loads(out.stdout.strip().splitlines()[-1])
    tc, tm, tok = d["times"]["cached"][1:], d["times"]["model"][1:], d["tokens"][1:]
    import statistics

    return {"rounds": len(tc), "step_seconds_cached": tc, "step_seconds_model": tm,
            "tokens_per_s_cached": sum(tok) / sum(tc), "tokens_per_s_model": sum(tok) / sum(tm),
            "speedup_median": statistics.median(m / c for m, c in zip(tm, tc))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=96,
                    help="tokens per example (the longest tofu-mini prompt is 69 tokens; a batch of 8 pads to ~96)")
    ap.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))))
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_memory"))
    ap.add_argument("--reuse", action="store_true", help="keep measured rows already under --work")
    ap.add_argument("--rows", default=None, help="comma list of row indices to run (default all)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved cached/model step pairs (after a warm-up)")
    ap.add_argument("--throughput-repeats", type=int, default=0,
                    help="extra alternating runs of npo cached / npo model; tokens/s is the best run of each "
                         "(a shared, loaded CPU slows single runs at random)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    make_model(model)
    overhead = measure_overhead()
    help_text = unlearn_help()
    have_lora = "--lora-r" in help_text
    wanted = set(range(len(ROWS))) if args.rows is None else {int(x) for x in args.rows.split(",")}
    rows, skipped = [], []
    for k, (method, mode, ref) in enumerate(ROWS):
        tag = f"{method}-{mode}-{ref}"
        cache = work / f"{tag}.json"
        if mode == "lora" and not have_lora:
            skipped.append({"method": method, "mode": mode, "ref": ref,
                            "reason": "npo-tofu unlearn has no --lora-r yet"})
            continue
        if args.reuse and cache.is_file():
            row = json.loads(cache.read_text())
        elif k in wanted:
            out = work / "runs" / tag
            if out.exists():
                import shutil

                shutil.rmtree(out)
            print(f"[bench_memory] {tag} ...", flush=True)
            row = run_row(model, out, method, mode, ref, args, help_text)
            cache.write_text(json.dumps(row, indent=2))
        else:
            continue
        rows.append(row)
    pair = [r for r in rows if (r["method"], r["mode"]) == ("npo", "full") and r["ref"] in ("cached", "model")]
    for rep in range(args.throughput_repeats if len(pair) == 2 else 0):
        for row in pair:
            cache = work / f"tp-{row['ref']}-{rep}.json"
            if args.reuse and cache.is_file():
                extra = json.loads(cache.read_text())
            else:
                out = work / "runs" / f"tp-{row['ref']}-{rep}"
                if out.exists():
                    import shutil

                    shutil.rmtree(out)
                print(f"[bench_memory] throughput repeat {rep}: npo {row['ref']} ...", flush=True)
                extra = run_row(model, out, "npo", "full", row["ref"], args, help_text)
                cache.write_text(json.dumps(extra, indent=2))
            row.setdefault("tokens_per_s_runs", [row["tokens_per_s"]]).append(extra["tokens_per_s"])
    for row in pair:
        row["tokens_per_s"] = max(row.get("tokens_per_s_runs", [row["tokens_per_s"]]))
    for row in rows:
        tag = f"{row['method']}-{row['mode']}-{row['ref']}"
        row.update(planned(model, row, args, overhead))
        row["planned_error"] = row["planned_mb"] / row["peak_rss_mb"] - 1
        print(f"  {tag}: peak {row['peak_rss_mb']:.0f} MB, planned {row['planned_mb']:.0f} MB "
              f"({100 * row['planned_error']:+.1f}%), {row['tokens_per_s']:.0f} tok/s", flush=True)

    def find(method, mode, ref):
        return next((r for r in rows if (r["method"], r["mode"], r["ref"]) == (method, mode, ref)), None)

    goals = {}
    kl_full, kl_lora = find("npo_kl", "full", "model"), find("npo_kl", "lora", "adapter-disabled")
    goals["lora_vs_full"] = {"target": f"npo_kl LoRA peak <= {GOALS['lora_vs_full']} x npo_kl full (frozen copy)",
                             "ratio": kl_lora["peak_rss_mb"] / kl_full["peak_rss_mb"] if kl_lora and kl_full else None}
    goals["lora_vs_full"]["met"] = (None if goals["lora_vs_full"]["ratio"] is None
                                    else goals["lora_vs_full"]["ratio"] <= GOALS["lora_vs_full"])
    errs = {f"{r['method']}-{r['mode']}-{r['ref']}": r["planned_error"] for r in rows}
    goals["planner_within_20pct"] = {"target": "|planned_mb / peak_rss_mb - 1| <= 0.2 on every row",
                                     "errors": errs,
                                     "max_abs_error": max((abs(e) for e in errs.values()), default=None),
                                     "met": all(abs(e) <= GOALS["planner_within"] for e in errs.values())
                                     and not skipped}
    c, m = find("npo", "full", "cached"), find("npo", "full", "model")
    interleaved = None
    if c and m:
        cache = work / "interleaved.json"
        if args.reuse and cache.is_file():
            interleaved = json.loads(cache.read_text())
        else:
            print("[bench_memory] interleaved npo cached/model throughput ...", flush=True)
            interleaved = interleaved_throughput(model, args)
            cache.write_text(json.dumps(interleaved, indent=2))
        speed = interleaved["speedup_median"]
        flop = m["planned_flops_per_token"] / c["planned_flops_per_token"]
        goals["cached_flop_bound"] = {
            "target": "(tok/s cached / tok/s model) >= 0.95 x (FLOPs/token model / FLOPs/token cached), "
                      "measured interleaved in one process (see interleaved_throughput)",
            "speedup": speed, "flop_ratio": flop, "fraction_of_bound": speed / flop,
            "separate_process_speedup": c["tokens_per_s"] / m["tokens_per_s"],
            "met": speed / flop >= GOALS["cached_flop_bound"]}
    result = {
        "model_params": rows[0]["model_params"] if rows else None,
        "model_config": {**BENCH_SIZE, "vocab_size": 4096, "tie_word_embeddings": False},
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "grad_accum": 1, "max_length": args.max_length,
                     "threads": args.threads, "dtype": "float32", "device": "cpu", "preset": "mini",
                     "forget": "mini-forget10 (40 examples)", "lora_r": LORA_R, "lora_targets": list(LORA_TARGETS)},
        "overhead_mb": overhead,
        "rows": rows, "skipped_rows": skipped, "goals": goals, "interleaved_throughput": interleaved,
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": len(os.sched_getaffinity(0)), "loadavg_start": os.getloadavg()},
        "tokens_per_s_note": "forget + retain tokens (attention-mask sums) per second of the training loop, "
                             "the first (warm-up) step excluded; for the npo cached/model pair the best of "
                             "tokens_per_s_runs (alternating runs on a shared CPU)",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(goals, indent=2))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
