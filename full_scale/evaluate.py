"""TOFU evaluation of a model: the eval sets, per-sample TOFU logs, ``npo-tofu eval`` and the per-epoch hook.

:func:`evaluate_model` computes the per-sample TOFU quantities with batched, padding-aware NLL
(examples sorted by length, right padding) and the shared greedy decoder of
:mod:`full_scale.generate` (left padding, KV cache), and returns a log in TOFU's dict layout;
:mod:`full_scale.aggregate` turns logs into forget quality and model utility. :func:`evaluate_checkpoint`
(``npo-tofu eval``) writes ``eval_log_aggregated.json`` next to ``summary.json``;
:func:`evaluate_epoch` is what ``npo-tofu unlearn --eval-every-epoch`` calls after every epoch to grow
``eval_curve.csv``. Both are driven by a frozen :class:`~full_scale.config.EvalSpec`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from npo_sim.runio import UserError, jsonable, write_csv, write_json

from . import data
from .aggregate import FORGET_KEYS, NEED_FQ, UTILITY_KEYS, aggregate, load_retain_log, task_log
from .config import EvalJob, EvalSpec
from .data import encode_qa, get_format, pad_batch
from .generate import greedy_generate
from .logprobs import sequence_logprobs

# --------------------------------------------------------------------------------------------------
# Eval sets
# --------------------------------------------------------------------------------------------------

#: forget splits with their own perturbed file; the others borrow forget10_perturbed (as the NPO paper)
_OWN_PERTURBED = ("forget01", "forget05", "forget10")
_BORROWS_PERTURBED = ("forget20", "forget30", "forget50", "forget90")
MINI_SPLITS = ("mini-forget10", "mini-forget20", "mini-forget50")


@dataclass(frozen=True)
class EvalItem:
    """One evaluation question: the TOFU answer (ROUGE and ``avg_gt_loss``), the base answer of the
    truth ratio (``avg_paraphrased_loss``) and the perturbed (wrong) answers."""

    question: str
    answer: str
    base: str
    perturbed: tuple[str, ...]


def eval_sets(forget_split: str, data_dir=None,
              ds_size: int = 300) -> tuple[dict[str, list[EvalItem]], dict[str, str], list[str]]:
    """``(items per TOFU log key, source per key, notes)`` for ``forget_split``.

    forget01/05/10 use their ``_perturbed`` file; forget20/30/50/90 use ``forget10_perturbed`` (as the
    NPO paper did; noted). ``mini-forget10/20/50`` (tofu-mini) take forget *and* retain questions from
    the 20 forget10 authors, since a tiny model never saw ``retain_perturbed``'s authors. Each set is
    cut to its first ``ds_size`` rows, as TOFU does.
    """
    if ds_size < 1:
        raise UserError(f"ds_size must be ≥ 1, got {ds_size}")
    notes: list[str] = []
    if forget_split in _OWN_PERTURBED:
        forget_src, retain_src = f"{forget_split}_perturbed", "retain_perturbed"
        forget_rows, retain_rows = data.load_split(forget_src, data_dir), data.load_split(retain_src, data_dir)
    elif forget_split in _BORROWS_PERTURBED:
        forget_src, retain_src = "forget10_perturbed", "retain_perturbed"
        forget_rows, retain_rows = data.load_split(forget_src, data_dir), data.load_split(retain_src, data_dir)
        notes.append(f"{forget_split} has no perturbed file: forget-set metrics use forget10_perturbed "
                     "(as the NPO paper)")
    elif forget_split in MINI_SPLITS:
        forget_rows, retain_rows = data.mini_splits(forget_split, data_dir)
        forget_src = f"tofu-mini {forget_split} (last authors of forget10_perturbed)"
        retain_src = f"tofu-mini retain authors of forget10_perturbed for {forget_split}"
        notes.append("tofu-mini: the retain eval set is the mini retain authors (forget10_perturbed), "
                     "not retain_perturbed")
    else:
        valid = ", ".join(_OWN_PERTURBED + _BORROWS_PERTURBED + MINI_SPLITS)
        raise UserError(f"unknown forget split {forget_split!r}; valid: {valid}")
    sources = {
        "eval_log.json": retain_src,
        "eval_real_author_wo_options.json": "real_authors_perturbed",
        "eval_real_world_wo_options.json": "world_facts_perturbed",
        "eval_log_forget.json": forget_src,
    }
    rows = {
        "eval_log.json": (retain_rows, "paraphrased_answer"),
        "eval_real_author_wo_options.json": (data.load_split("real_authors_perturbed", data_dir), "answer"),
        "eval_real_world_wo_options.json": (data.load_split("world_facts_perturbed", data_dir), "answer"),
        "eval_log_forget.json": (forget_rows, "paraphrased_answer"),
    }
    sets = {
        key: [EvalItem(r["question"], r["answer"], r[base], tuple(r["perturbed_answer"])) for r in rs[:ds_size]]
        for key, (rs, base) in rows.items()
    }
    return sets, sources, notes


# --------------------------------------------------------------------------------------------------
# Batched NLL, greedy answers, ROUGE
# --------------------------------------------------------------------------------------------------


def _device(model):
    return next(model.parameters()).device


def answer_nll(model, tokenizer, fmt, pairs: list[tuple[str, str]],
               batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(summed NLL, answer token count)`` of each (question, answer) pair, answer tokens + EOS only.

    Examples are sorted by length and right-padded per batch (little padding, same numbers as one at
    a time: position ids follow the attention mask, padding is masked out of the loss).
    """
    enc = [encode_qa(tokenizer, q, a, fmt) for q, a in pairs]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]["input_ids"]))
    loss = np.zeros(len(enc))
    count = np.zeros(len(enc), dtype=np.int64)
    dev = _device(model)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            b = {k: v.to(dev) for k, v in pad_batch([enc[i] for i in idx], tokenizer.pad_token_id).items()}
            lp, n = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"])
            loss[idx] = (-lp).double().cpu().numpy()
            count[idx] = n.cpu().numpy()
    return loss, count


_SCORER = None


def rouge_recall(generated: list[str], answers: list[str]) -> tuple[list[float], list[float]]:
    """(ROUGE-1 recall, ROUGE-L recall) of each generation against its answer (``rouge_score``, stemming)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [_SCORER.score(a, g) for g, a in zip(generated, answers)]
    return [s["rouge1"].recall for s in scores], [s["rougeL"].recall for s in scores]


def evaluate_model(model, tokenizer, fmt, sets: dict[str, list[EvalItem]], *, batch_size: int = 16,
                   max_new_tokens: int = 128, gen_batch_size: int | None = None) -> dict:
    """The TOFU per-sample log (dict layout, TOFU key names) of ``model`` on ``sets``.

    All NLLs of all sets are computed in one length-sorted pass over the unique (question, answer)
    pairs (real authors/world facts have base answer = answer, scored once). The greedy answers of all
    sets are decoded together, in length-sorted batches of ``gen_batch_size`` (default ``batch_size``;
    the answers do not depend on it; on CPU a small model decodes fastest in large batches).
    """
    gen_batch_size = batch_size if gen_batch_size is None else gen_batch_size
    if batch_size < 1 or gen_batch_size < 1:
        raise UserError(f"batch sizes must be ≥ 1, got {batch_size} and {gen_batch_size}")
    fmt = get_format(fmt)
    was_training = model.training
    model.eval()
    try:
        pairs: dict[tuple[str, str], int] = {}
        for items in sets.values():
            for it in items:
                for a in (it.answer, it.base, *it.perturbed):
                    pairs.setdefault((it.question, a), len(pairs))
        loss, count = answer_nll(model, tokenizer, fmt, list(pairs), batch_size)
        questions = [it.question for items in sets.values() for it in items]
        gens = greedy_generate(model, tokenizer, fmt, questions, gen_batch_size, max_new_tokens)
    finally:
        model.train(was_training)

    log: dict = {}
    g = iter(gens)
    for key, items in sets.items():
        t: dict[str, dict] = {k: {} for k in (
            "avg_gt_loss", "gt_loss", "num_token_gt", "avg_paraphrased_loss", "paraphrased_loss",
            "num_token_paraphrased", "average_perturb_loss", "perturb_loss", "num_token_perturb",
            "rouge1_recall", "rougeL_recall", "generated_text")}
        texts = [next(g) for _ in items]
        r1, rl = rouge_recall(texts, [it.answer for it in items])
        for i, it in enumerate(items):
            k = str(i)
            gt, para = pairs[(it.question, it.answer)], pairs[(it.question, it.base)]
            pert = [pairs[(it.question, a)] for a in it.perturbed]
            t["gt_loss"][k], t["num_token_gt"][k] = float(loss[gt]), int(count[gt])
            t["avg_gt_loss"][k] = float(loss[gt] / count[gt])
            t["paraphrased_loss"][k], t["num_token_paraphrased"][k] = float(loss[para]), int(count[para])
            t["avg_paraphrased_loss"][k] = float(loss[para] / count[para])
            t["perturb_loss"][k] = [float(loss[j]) for j in pert]
            t["num_token_perturb"][k] = [int(count[j]) for j in pert]
            t["average_perturb_loss"][k] = [float(loss[j] / count[j]) for j in pert]
            t["rouge1_recall"][k], t["rougeL_recall"][k] = r1[i], rl[i]
            t["generated_text"][k] = [fmt.render(it.question, tokenizer), texts[i], it.answer]
        log[key] = t
    return log


# --------------------------------------------------------------------------------------------------
# npo-tofu eval, and the per-epoch hook of npo-tofu unlearn --eval-every-epoch
# --------------------------------------------------------------------------------------------------


def prepare_eval(spec: EvalSpec) -> tuple[dict | None, tuple]:
    """``(retain log, eval sets)`` of ``spec``, loaded and validated before any model work.

    A retain log whose forget set has another sample count than this evaluation's is an error unless
    ``spec.allow_mismatched_logs`` (then ``summary.json`` carries a note)."""
    retain = load_retain_log(spec.retain_log)
    sets = eval_sets(spec.forget_split, spec.data_dir, spec.ds_size)
    if retain is not None and not spec.allow_mismatched_logs:
        n_retain = task_log(retain, "forget", NEED_FQ, str(spec.retain_log)).n
        n = len(sets[0]["eval_log_forget.json"])
        if n != n_retain:
            raise UserError(f"mismatched logs: the retain log {spec.retain_log} has {n_retain} forget samples, "
                            f"this evaluation {n} (--ds-size {spec.ds_size}); pass --allow-mismatched-logs to "
                            "compare them anyway")
    return retain, sets


def run_eval(model, tokenizer, fmt, spec: EvalSpec, prepared=None) -> tuple[dict, dict]:
    """Evaluate ``model`` as ``spec`` says: ``(TOFU log, summary)``. The summary holds FQ when a retain
    log is given, MU, the components, eval-set sources, notes and timing. ``prepared`` is a
    :func:`prepare_eval` result to reuse."""
    retain_log, (sets, sources, notes) = prepared or prepare_eval(spec)
    t0 = time.perf_counter()
    log = evaluate_model(model, tokenizer, fmt, sets, batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens,
                         gen_batch_size=spec.gen_batch_size)
    seconds = time.perf_counter() - t0
    stats = aggregate(log, retain_log, ckpt_name="evaluated model", retain_name="retain log")
    summary = {
        **{k: v for k, v in stats.items() if k != "notes"},
        "forget_split": spec.forget_split,
        "eval_sets": {k: {"source": sources[k], "n": len(v)} for k, v in sets.items()},
        "notes": notes + stats["notes"],
        "eval_seconds": seconds,
    }
    return log, summary


def evaluate_checkpoint(job: EvalJob) -> dict:
    """``npo-tofu eval``: every input checked first, then the model evaluated; writes
    ``eval_log_aggregated.json``, ``summary.json`` (with the job's config) and ``timing.json`` (the
    eval's seconds, kept apart so that the same model gives byte-identical results) into ``job.out``."""
    from npo_sim.runio import check_out_dir

    from .models import load_model

    check_out_dir(job.out)
    if job.device and job.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {job.device}: CUDA is not available on this machine")
    prepared = prepare_eval(job.eval)
    if job.threads:  # as the training commands (full_scale.train.run): before any model work
        torch.set_num_threads(job.threads)
    model, tokenizer, fmt = load_model(job.model, device=job.device, data_dir=job.eval.data_dir,
                                       allow_pickle=job.allow_pickle_weights)
    log, summary = run_eval(model, tokenizer, fmt, job.eval, prepared)
    summary["prompt_format"] = fmt
    summary["config"] = jsonable(job.to_json())
    out = Path(job.out)
    write_json(out / "eval_log_aggregated.json", log)
    write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "eval_seconds"})
    write_json(out / "timing.json", {"eval_seconds": summary["eval_seconds"]})
    return summary


#: columns of eval_curve.csv, in order
CURVE_COLUMNS = ("epoch", "forget_quality", "model_utility", *UTILITY_KEYS, *FORGET_KEYS, "n_forget", "eval_seconds")


def evaluate_epoch(model, tokenizer, fmt, run_dir, epoch: int, spec: EvalSpec, prepared=None) -> dict:
    """Evaluate after unlearning epoch ``epoch`` and add a row to ``run_dir/eval_curve.csv``.

    ``spec`` carries the retain model's log (forget quality; :class:`~full_scale.config.TrainJob`
    requires it). The epoch's TOFU log goes to
    ``run_dir/eval/epoch_NNN/eval_log_aggregated.json``. The CSV is rewritten whole (atomically), and a
    re-evaluated epoch (after ``--resume``) replaces its old row. Returns the row.
    """
    import pandas as pd

    log, summary = run_eval(model, tokenizer, fmt, spec, prepared)
    run_dir = Path(run_dir)
    write_json(run_dir / "eval" / f"epoch_{int(epoch):03d}" / "eval_log_aggregated.json", log)
    row = {"epoch": int(epoch), **{k: summary[k] for k in CURVE_COLUMNS if k != "epoch"}}
    path = run_dir / "eval_curve.csv"
    old = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=list(CURVE_COLUMNS))
    old = old[old["epoch"] != int(epoch)]
    new = pd.DataFrame([row], columns=list(CURVE_COLUMNS))
    curve = new if old.empty else pd.concat([old, new], ignore_index=True)
    write_csv(path, curve.sort_values("epoch").reset_index(drop=True))
    return row
