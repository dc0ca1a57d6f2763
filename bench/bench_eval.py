"""Time the TOFU evaluation of one checkpoint (what ``npo-tofu eval`` runs), split into the NLL passes and
greedy generation, against generation's FLOP floor measured in the same process.

Same tiny-llama checkpoint and tofu-mini eval sets as before. Recorded, all in process CPU seconds
(the 2 cores may be shared; CPU time and same-process ratios are what compare):
- ``eval_cpu_s``: ``evaluate_model`` on all four sets (one checkpoint);
- ``nll_cpu_s``: the one length-sorted NLL pass over the unique (question, answer) pairs;
- ``generation_cpu_s``: the greedy answers (sorted-length batches, KV cache, EOS);
- the generation FLOP floor (formula in the JSON) at the matmul throughput measured here, and the ratio;
- where generation's time goes: forward calls, seconds per call of a batch-1 decode step (the
  per-step Python/HF overhead), and generation at other batch sizes.

``--metrics`` instead times one whole ``npo-tofu eval`` of the checkpoint (``run_eval``: passes, aggregation
and, after, the metrics of :mod:`full_scale.extra_metrics`) before and after issue 14 in the same process:
"before" is ``EvalSpec(extra_metrics=False)`` (the code path of TOFU's metrics only, the same log),
"after" the default, with the tofu-mini holdout, a judge model (a second copy of the checkpoint, as the
study's oracle) and 1000 bootstrap resamples per CI. It writes ``bench/results/eval_metrics.json``
with the ratio (goal ≤ 1.3) and checks that TOFU's four per-sample logs are unchanged.

``--naive`` also times the per-sample loop (every NLL and generation at batch 1) and checks that it gives
the same metrics and texts (slow). ``--model DIR`` times an existing checkpoint.

    .venv/bin/python bench/bench_eval.py [--model DIR] [--ds-size 40] [--threads 1] [--naive]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from full_scale import aggregate as A
from full_scale import evaluate as E
from full_scale.data import encode_prompt, encode_qa, mini_finetune_corpus, pad_batch, resolve_data_dir
from full_scale.generate import greedy_generate, greedy_ids
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


def matmul_flops_per_s(n: int = 512, seconds: float = 1.0, k: int | None = None, m: int | None = None) -> float:
    """fp32 matmul throughput of this process ((n x k) @ (k x m), default square n = 512; process CPU time)."""
    k, m = k or n, m or n
    a, b = torch.randn(n, k), torch.randn(k, m)
    for _ in range(3):
        a @ b
    reps, c0 = 0, _cpu_s()
    while _cpu_s() - c0 < seconds:
        for _ in range(10):
            a @ b
        reps += 10
    return 2.0 * n * k * m * reps / (_cpu_s() - c0)


FLOOR_FORMULA = ("FLOPs = 2 * (N - V*d) * (prompt tokens + generated tokens) + 2 * V*d * generated tokens "
                 "+ sum over processed tokens of 4 * L * d * ctx; N = parameters of all matmuls (all parameters "
                 "minus the input embedding table; the untied lm_head, V*d, counted only where logits are read: "
                 "once per generated token), L layers, d hidden size, ctx = keys the token attends to; generated "
                 "tokens include each row's final EOS step; padding not counted; seconds = FLOPs / the fp32 "
                 "512x512 matmul throughput measured in the same process. 'generation_floor_s_brief_formula' is "
                 "2 * N * generated tokens + the same attention term (prefill left out, so it is lower)")


def generation_floor(model, prompts: list[list[int]], gens: list[list[int]], max_new: int) -> dict:
    cfg = model.config
    n_mm = count_parameters(model) - model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    flops, brief, n_prompt, n_gen = 0.0, 0.0, 0, 0
    for p, g in zip(prompts, gens):
        steps = len(g) + (1 if len(g) < max_new else 0)  # the EOS step
        n_prompt += len(p)
        n_gen += steps
        total = len(p) + steps - 1  # positions fed to the model (the last token is never fed)
        attn = 4.0 * L * d * total * (total + 1) / 2
        flops += 2.0 * (n_mm - head) * total + 2.0 * head * steps + attn
        brief += 2.0 * n_mm * steps + attn
    return {"flops": flops, "flops_brief_formula": brief, "matmul_parameters": n_mm, "lm_head_parameters": head,
            "prompt_tokens": n_prompt, "generated_tokens": n_gen}


class _Calls:
    """Counts model forward calls (decode steps + prefills)."""

    def __init__(self, model):
        self.n = 0
        self.h = model.register_forward_pre_hook(self)

    def __call__(self, *_):
        self.n += 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="checkpoint directory (default: a fresh tiny-llama 1M, briefly fine-tuned)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--ds-size", type=int, default=40, help="questions per eval set")
    ap.add_argument("--batch-size", type=int, default=16, help="batch of NLL and generation (npo-tofu eval's default)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="npo-tofu eval's default")
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (the minimum is kept)")
    ap.add_argument("--naive", action="store_true", help="also time the per-sample loop (slow)")
    ap.add_argument("--metrics", action="store_true",
                    help="time npo-tofu eval without/with the metrics beyond FQ and MU -> results/eval_metrics.json")
    ap.add_argument("--label", default="after", help="key of this run in --out (before / after)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir = resolve_data_dir(args.data_dir or os.environ.get("NPO_TOFU_DIR")
                                or Path(__file__).resolve().parents[2] / "shared" / "tofu" / "data")
    import full_scale

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.model) if args.model else None
        setup_s = 0.0
        if ckpt is None:
            _, setup_s, _ = _timed(lambda: make_checkpoint(Path(tmp) / "ckpt", data_dir, args.finetune_steps))
            ckpt = Path(tmp) / "ckpt"
        model, tok, fmt = load_model(str(ckpt), device="cpu")
        if args.metrics:
            return bench_metrics(args, model, tok, fmt, ckpt, data_dir, setup_s)
    model.eval()
    sets, sources, notes = E.eval_sets(SPLIT, data_dir, args.ds_size)
    questions = [it.question for v in sets.values() for it in v]
    pairs: dict = {}
    for v in sets.values():
        for it in v:
            for a in (it.answer, it.base, *it.perturbed):
                pairs.setdefault((it.question, a), len(pairs))
    E.evaluate_model(model, tok, fmt, {k: v[:1] for k, v in sets.items()}, max_new_tokens=4)  # warm-up
    bs, mnt = args.batch_size, args.max_new_tokens

    def best(fn):
        runs = [_timed(fn) for _ in range(args.repeats)]
        return runs[0][0], min(r[1] for r in runs), min(r[2] for r in runs)

    log, e_wall, e_cpu = best(lambda: E.evaluate_model(model, tok, fmt, sets, batch_size=bs, max_new_tokens=mnt))
    _, n_wall, n_cpu = best(lambda: E.answer_nll(model, tok, fmt, list(pairs), bs))
    calls = _Calls(model)
    gens, g_wall, g_cpu = best(lambda: greedy_ids(model, tok, fmt, questions, batch_size=bs, max_new_tokens=mnt))
    forward_calls = calls.n // args.repeats
    texts = [tok.decode(a, skip_special_tokens=True) for a in gens]
    logged = [log[k]["generated_text"][str(i)][1] for k in sets for i in range(len(sets[k]))]
    assert texts == logged, "greedy_ids and evaluate_model disagree"
    other_batches = {}
    for b in sorted({32, 64, len(questions)} - {bs}):
        calls.n = 0
        o, _, c = _timed(lambda b=b: greedy_ids(model, tok, fmt, questions, batch_size=b, max_new_tokens=mnt))
        other_batches[str(b)] = {"generation_cpu_s": c, "forward_calls": calls.n, "texts_equal": o == gens}
    # (ratios to the floor are added below, once the floor is known)
    calls.h.remove()
    gen_all = {}
    if "gen_batch_size" in inspect.signature(E.evaluate_model).parameters:  # npo-tofu eval --gen-batch-size
        log_all, _, c_all = best(lambda: E.evaluate_model(model, tok, fmt, sets, batch_size=bs, max_new_tokens=mnt,
                                                          gen_batch_size=len(questions)))
        gen_all = {"eval_cpu_s": c_all, "gen_batch_size": len(questions),
                   "texts_equal": all(log_all[k]["generated_text"] == log[k]["generated_text"] for k in sets)}
    # per-step overhead: batch-1 decode steps of one question (its FLOPs are ~nothing at 1M parameters)
    calls = _Calls(model)
    _, _, c1 = _timed(lambda: [greedy_ids(model, tok, fmt, [q], batch_size=1, max_new_tokens=mnt)
                               for q in questions[:8]])
    s_per_call = c1 / calls.n
    calls.h.remove()

    prompts = [encode_prompt(tok, q, fmt) for q in questions]
    floor = generation_floor(model, prompts, gens, mnt)
    thr = matmul_flops_per_s()
    floor_s = floor["flops"] / thr
    for v in other_batches.values():
        v["generation_ratio_to_floor"] = v["generation_cpu_s"] / floor_s
    h, ff = model.config.hidden_size, model.config.intermediate_size
    shape_thr = {f"{r}x{h}@{h}x{ff}": matmul_flops_per_s(r, 0.5, h, ff) for r in (1, bs, len(questions))}
    run = {
        "code": str(Path(full_scale.__file__).resolve().parent),
        "eval_cpu_s": e_cpu, "eval_wall_s": e_wall,
        "nll_cpu_s": n_cpu, "nll_wall_s": n_wall, "nll_sequences": len(pairs),
        "generation_cpu_s": g_cpu, "generation_wall_s": g_wall,
        "generation_share_of_eval": g_cpu / e_cpu,
        "generation_floor_s": floor_s,
        "generation_ratio_to_floor": g_cpu / floor_s,
        "generation_floor_s_brief_formula": floor["flops_brief_formula"] / thr,
        "goal_ratio_to_floor": 3.0,
        "forward_calls": forward_calls,
        "cpu_s_per_forward_call_batch1": s_per_call,
        "overhead_estimate_s": forward_calls * s_per_call,
        "overhead_share_of_generation": forward_calls * s_per_call / g_cpu,
        "other_generation_batch_sizes": other_batches,
        "eval_with_all_questions_in_one_generation_batch": gen_all,
        **floor,
        "matmul_flops_per_s": thr,
        "matmul_flops_per_s_at_model_shapes": shape_thr,
        "generation_floor_s_at_model_shape_batch": floor["flops"] / shape_thr[f"{bs}x{h}@{h}x{ff}"],
        "mean_generated_tokens": floor["generated_tokens"] / len(questions),
        "load_avg_1min": os.getloadavg()[0],
    }
    if args.naive:
        naive, nv_wall, nv_cpu = _timed(lambda: naive_log(model, tok, fmt, sets, mnt))
        a, b = A.aggregate(log, log), A.aggregate(naive, naive)
        keys = ("model_utility", *A.UTILITY_KEYS, *A.FORGET_KEYS)
        run["naive"] = {"wall_s": nv_wall, "cpu_s": nv_cpu, "speedup_cpu": nv_cpu / e_cpu,
                        "max_abs_metric_diff": max(abs(a[k] - b[k]) for k in keys),
                        "generations_equal": all(log[k]["generated_text"][i][1] == naive[k]["generated_text"][i]
                                                 for k in sets for i in naive[k]["generated_text"])}
    out = Path(args.out)
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        result = {}
    if "runs" not in result:
        result = {"runs": {}}
    result.update({
        "what": "TOFU eval of one tiny-llama checkpoint on tofu-mini (all four sets): NLL passes, greedy "
                "generation, and generation against its FLOP floor; process CPU seconds, min of repeats",
        "model": str(args.model or f"tiny-llama:1m fine-tuned {args.finetune_steps} steps"),
        "parameters": count_parameters(model),
        "forget_split": SPLIT,
        "ds_size": args.ds_size,
        "questions": len(questions),
        "batch_size": bs,
        "max_new_tokens": mnt,
        "floor_formula": FLOOR_FORMULA,
        "machine_note": "2 cores shared with other jobs: CPU time and same-process ratios, not wall time",
        "threads": args.threads,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
    })
    result["runs"][args.label] = {**run, "config": vars(args), "checkpoint_setup_s": setup_s}
    if "before" in result["runs"] and "after" in result["runs"]:
        bf, af = result["runs"]["before"], result["runs"]["after"]
        result["before_after"] = {k: {"before": bf[k], "after": af[k]} for k in (
            "eval_cpu_s", "nll_cpu_s", "generation_cpu_s", "generation_floor_s", "generation_ratio_to_floor")}
    write_json(out, result)
    print(f"[{args.label}] eval {e_cpu:.2f} s cpu (NLL {n_cpu:.2f}, generation {g_cpu:.2f}); generation floor "
          f"{floor_s:.3f} s ({thr / 1e9:.1f} GFLOP/s): {g_cpu / floor_s:.1f}x; {forward_calls} forward calls x "
          f"{s_per_call * 1e3:.2f} ms = {forward_calls * s_per_call:.2f} s -> {out}")
    ok = all(v["texts_equal"] for v in other_batches.values()) and gen_all.get("texts_equal", True)
    return 0 if ok and run.get("naive", {}).get("generations_equal", True) else 1


def _log_diff(a: dict, b: dict) -> tuple[float, bool]:
    """(max relative difference of TOFU's per-sample numbers (absolute below 1), whether every generated text
    is equal)."""
    diff, texts = 0.0, True
    for key in A.TASKS:
        for m, col in a[key].items():
            for i, v in col.items():
                w = b[key][m][i]
                if m == "generated_text":
                    texts &= v == w
                elif isinstance(v, list):
                    diff = max(diff, *(abs(x - y) / max(1.0, abs(x)) for x, y in zip(v, w)))
                else:
                    diff = max(diff, abs(v - w) / max(1.0, abs(v)))
    return diff, texts


def bench_metrics(args, model, tok, fmt, ckpt: Path, data_dir, setup_s: float) -> int:
    """Eval seconds per checkpoint without and with the new metrics (same process, alternating, min of repeats)."""
    from full_scale.config import EvalSpec
    from full_scale.extra_metrics import EXTRA_KEY

    model.eval()
    common = dict(forget_split=SPLIT, data_dir=str(data_dir), ds_size=args.ds_size, batch_size=args.batch_size,
                  max_new_tokens=args.max_new_tokens)
    specs = {"before": EvalSpec(**common, extra_metrics=False), "after": EvalSpec(**common, judge_model=str(ckpt))}
    prepared = {k: E.prepare_eval(v) for k, v in specs.items()}
    E._judge(prepared["after"], model)  # the judge is loaded once per run (as the study's per-epoch eval), not timed
    E.run_eval(model, tok, fmt, EvalSpec(**{**common, "ds_size": 1}))  # warm-up
    times: dict[str, list] = {"before": [], "after": []}
    logs = {}
    for _ in range(args.repeats):
        for k in ("before", "after"):
            (log, summary), wall, cpu = _timed(lambda k=k: E.run_eval(model, tok, fmt, specs[k], prepared[k]))
            times[k].append((wall, cpu))
            logs[k] = log
    diff, texts_same = _log_diff(logs["before"], logs["after"])
    same = texts_same and diff < 1e-4
    cpu = {k: min(c for _, c in v) for k, v in times.items()}
    wall = {k: min(w for w, _ in v) for k, v in times.items()}
    ratio = cpu["after"] / cpu["before"]
    result = {
        "what": "npo-tofu eval of one checkpoint (run_eval: NLL passes, greedy answers, aggregation), before = TOFU's "
                "metrics only (EvalSpec(extra_metrics=False)), after = with exact memorization, extraction strength, "
                "4 MIA AUCs against the tofu-mini holdout, fluency with a judge model and 1000-resample bootstrap CIs; "
                "process CPU seconds, min of repeats, alternating in one process",
        "model": str(args.model or f"tiny-llama:1m fine-tuned {args.finetune_steps} steps"),
        "forget_split": SPLIT, "ds_size": args.ds_size, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "threads": args.threads,
        "eval_cpu_s": cpu, "eval_wall_s": wall, "ratio_cpu": ratio, "ratio_wall": wall["after"] / wall["before"],
        "goal_ratio": 1.3, "meets_goal": ratio <= 1.3,
        "tofu_logs_unchanged": same, "tofu_logs_max_rel_diff": diff, "generated_texts_equal": texts_same,
        "tofu_logs_note": "the holdout answers join the one length-sorted NLL pass, so batches pad differently: "
                          "TOFU's numbers agree to float rounding, the greedy answers exactly",
        "new_metrics": sorted(summary.get("ci", {})),
        "holdout_questions": len(logs["after"][EXTRA_KEY]["holdout"]["num_tokens"]),
        "checkpoint_setup_s": setup_s, "load_avg_1min": os.getloadavg()[0],
        "machine_note": "2 cores shared with other jobs: CPU time and same-process ratios, not wall time",
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "command": ".venv/bin/python bench/bench_eval.py --metrics --ds-size 40 --threads 1",
    }
    out = Path(args.out) if args.out != str(OUT) else OUT.parent / "eval_metrics.json"
    write_json(out, result)
    print(f"eval per checkpoint: before {cpu['before']:.2f} s cpu, after {cpu['after']:.2f} s cpu: {ratio:.2f}x "
          f"(goal <= 1.3); TOFU logs unchanged: {same} -> {out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
