"""Time the batched TOFU evaluation (what ``npo-tofu eval`` runs) against a naive per-sample loop.

One run, same tiny-llama checkpoint, same tofu-mini eval sets: the naive loop scores every
(question, answer) pair on its own (batch 1, no de-duplication, no length sorting) and generates one
answer at a time; the batched path sorts by length, pads per batch (right for NLL, left for greedy
generation) and scores each distinct pair once. Both logs go through ``aggregate`` and must give the
same metrics. Writes bench/results/eval.json. Goal: >= 3x faster with equal metrics.

The default checkpoint is tiny-llama 1M briefly fine-tuned on the tofu-mini corpus (so greedy answers
end in EOS at different lengths, as a real model's do); ``--model DIR`` times an existing checkpoint.
About 1-2 minutes on 2 idle cores.

    .venv/bin/python bench/bench_eval.py [--model DIR] [--ds-size 60] [--threads 1]
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

import numpy as np
import torch

from full_scale import aggregate as A
from full_scale import evaluate as E
from full_scale.data import encode_qa, mini_finetune_corpus, pad_batch, resolve_data_dir
from full_scale.generate import greedy_generate
from full_scale.models import count_parameters, load_model, save_checkpoint
from npo_sim.runio import write_json

OUT = Path(__file__).resolve().parent / "results" / "eval.json"
SPLIT = "mini-forget10"


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_checkpoint(out: Path, data_dir, steps: int, seed: int = 0) -> Path:
    """tiny-llama 1M, ``steps`` AdamW steps (batch 32) on the tofu-mini fine-tuning corpus."""
    torch.manual_seed(seed)
    model, tok, fmt = load_model("tiny-llama:1m", device="cpu", data_dir=data_dir, seed=seed)
    rows = mini_finetune_corpus("full", data_dir)
    enc = [encode_qa(tok, r["question"], r["answer"], fmt) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(enc), (32,), generator=g).tolist()
        loss = model(**pad_batch([enc[i] for i in idx], tok.pad_token_id)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(model, tok, out, {"prompt_format": fmt, "bench_steps": steps, "final_loss": loss.item()})
    return out


def naive_log(model, tok, fmt, sets, max_new_tokens: int) -> dict:
    """The per-sample baseline: every NLL and every generation at batch size 1, in data order."""
    log = {}
    for key, items in sets.items():
        t = {k: {} for k in ("avg_gt_loss", "avg_paraphrased_loss", "average_perturb_loss", "rougeL_recall",
                             "generated_text")}
        for i, it in enumerate(items):

            def avg(a, q=it.question):
                loss, n = E.answer_nll(model, tok, fmt, [(q, a)], batch_size=1)
                return float(loss[0] / n[0])

            t["avg_gt_loss"][str(i)] = avg(it.answer)
            t["avg_paraphrased_loss"][str(i)] = avg(it.base)
            t["average_perturb_loss"][str(i)] = [avg(a) for a in it.perturbed]
            gen = greedy_generate(model, tok, fmt, [it.question], batch_size=1, max_new_tokens=max_new_tokens)[0]
            t["generated_text"][str(i)] = gen
            t["rougeL_recall"][str(i)] = E.rouge_recall([gen], [it.answer])[1][0]
        log[key] = t
    return log


def _timed(fn):
    w, c = time.perf_counter(), _cpu_s()
    out = fn()
    return out, time.perf_counter() - w, _cpu_s() - c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="checkpoint directory (default: a fresh tiny-llama 1M, briefly fine-tuned)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--ds-size", type=int, default=60, help="questions per eval set")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir = resolve_data_dir(args.data_dir or os.environ.get("NPO_TOFU_DIR")
                                or Path(__file__).resolve().parents[2] / "shared" / "tofu" / "data")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.model) if args.model else None
        setup_s = 0.0
        if ckpt is None:
            _, setup_s, _ = _timed(lambda: make_checkpoint(Path(tmp) / "ckpt", data_dir, args.finetune_steps))
            ckpt = Path(tmp) / "ckpt"
        model, tok, fmt = load_model(str(ckpt), device="cpu")
    sets, sources, notes = E.eval_sets(SPLIT, data_dir, args.ds_size)
    n_q = sum(len(v) for v in sets.values())
    n_seq = sum(len(v) * (2 + len(v[0].perturbed)) for v in sets.values())
    E.evaluate_model(model, tok, fmt, {k: v[:1] for k, v in sets.items()}, max_new_tokens=4)  # warm-up

    batched, b_wall, b_cpu = _timed(lambda: E.evaluate_model(model, tok, fmt, sets, batch_size=args.batch_size,
                                                              max_new_tokens=args.max_new_tokens))
    naive, n_wall, n_cpu = _timed(lambda: naive_log(model, tok, fmt, sets, args.max_new_tokens))

    a, b = A.aggregate(batched, batched), A.aggregate(naive, naive)
    keys = ("model_utility", *A.UTILITY_KEYS, *A.FORGET_KEYS)
    metric_diff = max(abs(a[k] - b[k]) for k in keys)
    loss_diff = 0.0
    for key in sets:
        for m in ("avg_gt_loss", "avg_paraphrased_loss", "average_perturb_loss"):
            x = np.array(list(batched[key][m].values()))
            y = np.array(list(naive[key][m].values()))
            loss_diff = max(loss_diff, float(np.abs(x - y).max()))
    gens_equal = all(batched[k]["generated_text"][i][1] == naive[k]["generated_text"][i]
                     for k in sets for i in naive[k]["generated_text"])
    mean_gen_tokens = float(np.mean([len(tok(batched[k]["generated_text"][i][1])["input_ids"])
                                     for k in sets for i in batched[k]["generated_text"]]))
    result = {
        "what": "TOFU eval (all four sets) of a tiny-llama checkpoint on tofu-mini: batched vs naive per-sample loop",
        "model": str(args.model or f"tiny-llama:1m fine-tuned {args.finetune_steps} steps"),
        "parameters": count_parameters(model),
        "forget_split": SPLIT,
        "ds_size": args.ds_size,
        "questions": n_q,
        "scored_sequences_naive": n_seq,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "mean_generated_tokens": mean_gen_tokens,
        "batched": {"wall_s": b_wall, "cpu_s": b_cpu},
        "naive": {"wall_s": n_wall, "cpu_s": n_cpu},
        "speedup_wall": n_wall / b_wall,
        "speedup_cpu": n_cpu / b_cpu,
        "goal_speedup": 3.0,
        "max_abs_metric_diff": metric_diff,
        "max_abs_avg_loss_diff": loss_diff,
        "generations_equal": gens_equal,
        "metrics_batched": {k: a[k] for k in keys},
        "checkpoint_setup_s": setup_s,
        "threads": args.threads,
        "load_avg_1min": os.getloadavg()[0],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "config": vars(args),
    }
    write_json(args.out, result)
    print(f"batched {b_wall:.1f} s wall / {b_cpu:.1f} s cpu, naive {n_wall:.1f} s / {n_cpu:.1f} s: "
          f"speedup {result['speedup_wall']:.1f}x wall, {result['speedup_cpu']:.1f}x cpu; "
          f"max metric diff {metric_diff:.2e}, generations equal: {gens_equal} -> {args.out}")
    return 0 if gens_equal and metric_diff < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
