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
from .aggregate import (
    DIALECT_KEY,
    FORGET_KEYS,
    NEED_FQ,
    QUESTIONS_KEY,
    UTILITY_KEYS,
    aggregate,
    load_retain_log,
    log_questions,
    task_log,
)
from .config import EvalJob, EvalSpec
from .data import encode_qa, get_format, pad_batch
from .dialects import get_dialect
from .extra_metrics import CURVE_METRICS, curve_values
from .generate import greedy_generate
from .logprobs import forward_logits, logprobs_from_logits, shifted

# --------------------------------------------------------------------------------------------------
# Eval sets
# --------------------------------------------------------------------------------------------------

#: forget splits with their own perturbed file; the others borrow forget10_perturbed (as the NPO paper)
_OWN_PERTURBED = ("forget01", "forget05", "forget10")
_BORROWS_PERTURBED = ("forget20", "forget30", "forget50", "forget90")
MINI_SPLITS = tuple(f"mini-{k}" for k in data.MINI_FORGET_AUTHORS)  # mini-forget10/20/50/90


@dataclass(frozen=True)
class EvalItem:
    """One evaluation question: the TOFU answer (ROUGE and ``avg_gt_loss``), the base answer of the
    truth ratio (``avg_paraphrased_loss``) and the perturbed (wrong) answers."""

    question: str
    answer: str
    base: str
    perturbed: tuple[str, ...]


def eval_sets(forget_split: str, data_dir=None, ds_size: int = 300,
              questions: str = "all") -> tuple[dict[str, list[EvalItem]], dict[str, str], list[str]]:
    """``(items per TOFU log key, source per key, notes)`` for ``forget_split``.

    forget01/05/10 use their ``_perturbed`` file; forget20/30/50/90 use ``forget10_perturbed`` (as the
    NPO paper did; noted). ``mini-forget10/20/50/90`` (tofu-mini) take forget *and* retain questions
    from the 20 forget10 authors, since a tiny model never saw ``retain_perturbed``'s authors (for
    ``mini-forget90`` the retain set is the 2 remaining authors, 40 QA). ``questions`` ``val``/``test``
    keeps that subset of every set (:func:`full_scale.data.question_subset`: positions 0, 5, 10, 15 of
    each author; every 5th row of real authors and world facts). Each set is then cut to its first
    ``ds_size`` rows, as TOFU does (a set smaller than ``ds_size`` is taken whole).
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
    rows = {  # key: (rows, base answer, the rows are whole authors)
        "eval_log.json": (retain_rows, "paraphrased_answer", True),
        "eval_real_author_wo_options.json": (data.load_split("real_authors_perturbed", data_dir), "answer", False),
        "eval_real_world_wo_options.json": (data.load_split("world_facts_perturbed", data_dir), "answer", False),
        "eval_log_forget.json": (forget_rows, "paraphrased_answer", True),
    }
    sets = {
        key: [EvalItem(r["question"], r["answer"], r[base], tuple(r["perturbed_answer"]))
              for r in data.question_subset(rs, questions, authors)[:ds_size]]
        for key, (rs, base, authors) in rows.items()
    }
    return sets, sources, notes


# --------------------------------------------------------------------------------------------------
# Batched NLL, greedy answers, ROUGE
# --------------------------------------------------------------------------------------------------


def _device(model):
    return next(model.parameters()).device


def answer_token_stats(model, tokenizer, fmt, pairs: list[tuple[str, str]], batch_size: int = 16,
                       detail=(), max_length: int = 512,
                       ce_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray, dict[int, dict]]:
    """``(summed NLL, answer token count, details)`` of each (question, answer) pair, answer tokens + EOS.

    Examples are sorted by length and right-padded per batch (little padding, same numbers as one at
    a time: position ids follow the attention mask, padding is masked out of the loss). For the pair
    indices in ``detail``, the same forward also gives, per answer token, ``logp`` (the label's
    log-prob), ``hit`` (teacher-forced argmax = label), and ``mu``/``sigma``, the mean and standard
    deviation of the log-probs under the model's own next-token distribution (Min-K%++); as numpy
    arrays in ``details[index]``.
    """
    enc = [encode_qa(tokenizer, q, a, fmt, max_length) for q, a in pairs]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]["input_ids"]))
    loss = np.zeros(len(enc))
    count = np.zeros(len(enc), dtype=np.int64)
    detail = set(detail)
    details: dict[int, dict] = {}
    dev = _device(model)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            b = {k: v.to(dev) for k, v in pad_batch([enc[i] for i in idx], tokenizer.pad_token_id).items()}
            logits = forward_logits(model, b["input_ids"], b["attention_mask"])
            lp, n = logprobs_from_logits(logits, b["labels"], ce_dtype)
            loss[idx] = (-lp).double().cpu().numpy()
            count[idx] = n.cpu().numpy()
            rows = [r for r, i in enumerate(idx) if i in detail]
            if rows:
                lg, targets, mask = shifted(logits[rows], b["labels"][rows])
                logp = torch.log_softmax(lg.float(), -1)
                p = logp.exp()
                mu = (p * logp).sum(-1)
                sigma = ((p * (logp - mu[..., None]) ** 2).sum(-1)).clamp_min(0).sqrt()
                tok = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
                hit = logp.argmax(-1) == targets
                for r, row in enumerate(rows):
                    m = mask[r]
                    details[idx[row]] = {"logp": tok[r][m].double().cpu().numpy(), "hit": hit[r][m].cpu().numpy(),
                                         "mu": mu[r][m].double().cpu().numpy(),
                                         "sigma": sigma[r][m].double().cpu().numpy()}
    return loss, count, details


def answer_nll(model, tokenizer, fmt, pairs: list[tuple[str, str]],
               batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(summed NLL, answer token count)`` of each (question, answer) pair (:func:`answer_token_stats`)."""
    loss, count, _ = answer_token_stats(model, tokenizer, fmt, pairs, batch_size)
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


@dataclass
class Extra:
    """What the metrics beyond TOFU's need: the holdout rows (``None``: no holdout set) and the judge
    ``(model, tokenizer, fmt)`` (``None``: no judge)."""

    holdout: list[dict] | None = None
    holdout_source: str | None = None
    judge: tuple | None = None
    judge_name: str | None = None


def evaluate_model(model, tokenizer, fmt, sets: dict[str, list[EvalItem]], *, batch_size: int = 16,
                   max_new_tokens: int = 128, gen_batch_size: int | None = None, extra: Extra | None = None,
                   dialect: str | None = None) -> dict:
    """The TOFU per-sample log (dict layout, TOFU key names) of ``model`` on ``sets``.

    All NLLs of all sets are computed in one length-sorted pass over the unique (question, answer)
    pairs (real authors/world facts have base answer = answer, scored once). The greedy answers of all
    sets are decoded together, in length-sorted batches of ``gen_batch_size`` (default ``batch_size``;
    the answers do not depend on it; on CPU a small model decodes fastest in large batches).

    ``dialect`` (:mod:`full_scale.dialects`) sets the tokenisation, the max length, the precision of the
    cross-entropy and the generation budget (tofu: 200 tokens in total per batch of ``gen_batch_size``,
    batches in set order). With ``extra``, the same NLL pass also scores the holdout answers and keeps the
    per-token numbers
    of the forget and holdout answers, the judge scores the greedy forget answers, and the log gets
    the per-sample block :data:`full_scale.extra_metrics.EXTRA_KEY` (its results are added by
    :func:`run_eval`).
    """
    gen_batch_size = batch_size if gen_batch_size is None else gen_batch_size
    if batch_size < 1 or gen_batch_size < 1:
        raise UserError(f"batch sizes must be ≥ 1, got {batch_size} and {gen_batch_size}")
    d = get_dialect(dialect)
    fmt = d.prompt_format(get_format(fmt))
    total = d.generation_max_length if d.generation_budget == "total_length" else None
    was_training = model.training
    model.eval()
    try:
        pairs: dict[tuple[str, str], int] = {}
        for items in sets.values():
            for it in items:
                for a in (it.answer, it.base, *it.perturbed):
                    pairs.setdefault((it.question, a), len(pairs))
        forget = sets["eval_log_forget.json"]
        detail = []
        if extra is not None:
            detail = [pairs[(it.question, it.answer)] for it in forget]
            for r in extra.holdout or []:
                detail.append(pairs.setdefault((r["question"], r["answer"]), len(pairs)))
        loss, count, details = answer_token_stats(model, tokenizer, fmt, list(pairs), batch_size, detail,
                                                  d.max_length, d.eval_ce_dtype)
        questions = [it.question for items in sets.values() for it in items]
        if total is None:
            gens = greedy_generate(model, tokenizer, fmt, questions, gen_batch_size, max_new_tokens)
        else:   # tofu batches each eval set on its own, in order
            gens = [g for items in sets.values()
                    for g in greedy_generate(model, tokenizer, fmt, [it.question for it in items], gen_batch_size,
                                             max_new_tokens, total)]
    finally:
        model.train(was_training)
    block = None
    if extra is not None:
        from . import extra_metrics as X

        order = list(sets)
        start = sum(len(sets[k]) for k in order[:order.index("eval_log_forget.json")])
        f_gens = gens[start:start + len(forget)]
        judge_logp = None
        if extra.judge is not None:
            jm, jt, jf = extra.judge
            jl, jc = answer_nll(jm, jt, jf, [(it.question, g) for it, g in zip(forget, f_gens)], batch_size)
            judge_logp = (-jl / jc).tolist()
        hold = extra.holdout or []
        block = X.sample_block([details[i] for i in detail[:len(forget)]], [it.answer for it in forget],
                               [details[i] for i in detail[len(forget):]], [r["answer"] for r in hold],
                               f_gens, judge_logp, extra.holdout_source if hold else None, extra.judge_name)

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
    if block is not None:
        from .extra_metrics import EXTRA_KEY

        log[EXTRA_KEY] = block
    return log


# --------------------------------------------------------------------------------------------------
# npo-tofu eval, and the per-epoch hook of npo-tofu unlearn --eval-every-epoch
# --------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """The inputs of an evaluation, loaded and checked before any model work (:func:`prepare_eval`).
    The judge model is loaded on first use, on the evaluated model's device, and kept."""

    retain: dict | None
    sets: dict
    sources: dict
    notes: list
    holdout: list[dict] | None = None
    holdout_source: str | None = None
    judge_path: str | None = None
    judge: tuple | None = None

    def __iter__(self):  # (retain log, (sets, sources, notes)), as before
        return iter((self.retain, (self.sets, self.sources, self.notes)))


def holdout_set(spec: EvalSpec) -> tuple[list[dict] | None, str | None, list[str]]:
    """``(holdout rows, source, notes)``: ``spec.holdout_file``, else tofu-mini's own holdout for a mini
    split, else none (said in a note: then no MIA AUC and no privleak), cut to ``ds_size`` rows."""
    if spec.holdout_file:
        rows, src = data.load_holdout(spec.holdout_file), str(spec.holdout_file)
    elif spec.forget_split in MINI_SPLITS:
        a = data.MINI_HOLDOUT_AUTHORS
        rows, src = data.mini_holdout(spec.data_dir), f"tofu-mini holdout (full.json authors {a[0]}-{a[-1]})"
    else:
        return None, None, ["no holdout set (--holdout-file): MIA AUCs and privleak are absent"]
    return rows[:spec.ds_size], src, []


def prepare_eval(spec: EvalSpec) -> Prepared:
    """The retain log, eval sets, holdout and judge checkpoint of ``spec``, loaded and validated before
    any model work.

    A retain log whose forget set has another sample count than this evaluation's, or that was evaluated on
    another question subset (``questions``), is an error unless ``spec.allow_mismatched_logs`` (then
    ``summary.json`` carries a note). A holdout that shares a
    question with the forget set is an error; a judge directory is checked like ``--model``."""
    retain = load_retain_log(spec.retain_log)
    sets, sources, notes = eval_sets(spec.forget_split, spec.data_dir, spec.ds_size, spec.questions)
    if retain is not None and not spec.allow_mismatched_logs:
        q_retain = log_questions(retain, str(spec.retain_log))
        if q_retain != spec.questions:
            raise UserError(f"mismatched logs: the retain log {spec.retain_log} was evaluated on the {q_retain!r} "
                            f"questions, this evaluation on {spec.questions!r} (--questions); pass "
                            "--allow-mismatched-logs to compare them anyway")
        n_retain = task_log(retain, "forget", NEED_FQ, str(spec.retain_log)).n
        n = len(sets["eval_log_forget.json"])
        if n != n_retain:
            raise UserError(f"mismatched logs: the retain log {spec.retain_log} has {n_retain} forget samples, "
                            f"this evaluation {n} (--ds-size {spec.ds_size}); pass --allow-mismatched-logs to "
                            "compare them anyway")
    prepared = Prepared(retain, sets, sources, list(notes))
    if not spec.extra_metrics:
        return prepared
    holdout, src, h_notes = holdout_set(spec)
    if holdout is not None:
        shared = {r["question"] for r in holdout} & {it.question for it in sets["eval_log_forget.json"]}
        if shared:
            raise UserError(f"holdout {src} shares {len(shared)} question(s) with the forget set {spec.forget_split}: "
                            "a holdout must be data the model never saw")
    prepared.holdout, prepared.holdout_source = holdout, src
    prepared.notes += h_notes
    if spec.judge_model:
        _check_judge(spec.judge_model)
        prepared.judge_path = spec.judge_model
    return prepared


def _check_judge(path: str) -> None:
    from .models import check_local_checkpoint, is_adapter_dir, resolve_checkpoint

    p = Path(str(resolve_checkpoint(path)))
    if str(path).startswith("tiny-llama"):
        raise UserError(f"--judge-model {path}: a judge must be a trained checkpoint directory, not a fresh tiny-llama")
    if not p.is_dir():
        raise UserError(f"judge model directory not found: {path}")
    if is_adapter_dir(p):  # a LoRA run's model/: checked when load_model loads it onto its base
        return
    if not (p / "config.json").is_file():
        raise UserError(f"judge model {path}: no model in it (config.json missing)")
    check_local_checkpoint(p)


def _judge(prepared: Prepared, model, same_as: str | None = None):
    if prepared.judge_path is None:
        return None
    if prepared.judge is None:
        from .models import load_model, resolve_checkpoint

        if same_as is not None and Path(str(resolve_checkpoint(same_as))).resolve() == \
                Path(str(resolve_checkpoint(prepared.judge_path))).resolve():
            return None  # the caller passes the evaluated model itself
        jm, jt, jf = load_model(prepared.judge_path, device=_device(model))
        jm.eval()
        prepared.judge = (jm, jt, jf)
    return prepared.judge


def run_eval(model, tokenizer, fmt, spec: EvalSpec, prepared: Prepared | None = None,
             model_path: str | None = None) -> tuple[dict, dict]:
    """Evaluate ``model`` as ``spec`` says: ``(TOFU log, summary)``. The summary holds FQ when a retain
    log is given, MU, the components, eval-set sources, notes and timing, and (``spec.extra_metrics``)
    the metrics of :mod:`full_scale.extra_metrics` with their CIs under ``ci``. ``prepared`` is a
    :func:`prepare_eval` result to reuse; ``model_path`` lets a judge that is this same checkpoint be
    the loaded model."""
    prepared = prepared or prepare_eval(spec)
    sets, sources = prepared.sets, prepared.sources
    t0 = time.perf_counter()
    extra = None
    if spec.extra_metrics:
        judge = _judge(prepared, model, model_path)
        if judge is None and prepared.judge_path is not None:
            judge = (model, tokenizer, fmt)
        extra = Extra(prepared.holdout, prepared.holdout_source, judge, prepared.judge_path)
    log = evaluate_model(model, tokenizer, fmt, sets, batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens,
                         gen_batch_size=spec.gen_batch_size, extra=extra, dialect=spec.dialect)
    log[DIALECT_KEY] = spec.dialect
    if spec.questions != "all":  # absent = all questions (as in logs written before the subsets existed)
        log[QUESTIONS_KEY] = spec.questions
    stats = aggregate(log, prepared.retain, ckpt_name="evaluated model", retain_name="retain log",
                      truth_ratio=get_dialect(spec.dialect).truth_ratio, allow_mixed_dialects=spec.allow_mixed_dialects)
    summary = {
        **{k: v for k, v in stats.items() if k != "notes"},
        "dialect": spec.dialect,
        "questions": spec.questions,
        "forget_split": spec.forget_split,
        "eval_sets": {k: {"source": sources[k], "n": len(v)} for k, v in sets.items()},
        "notes": prepared.notes + stats["notes"],
    }
    if extra is not None:
        from . import extra_metrics as X

        res, notes = X.results(log[X.EXTRA_KEY], log, stats, prepared.retain, n_boot=spec.n_boot)
        log[X.EXTRA_KEY]["results"] = res
        summary["eval_sets"]["holdout"] = {"source": prepared.holdout_source, "n": len(prepared.holdout or [])}
        summary["judge_model"] = prepared.judge_path
        summary.update(res)
        summary["notes"] = summary["notes"] + notes
    summary["eval_seconds"] = time.perf_counter() - t0
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
                                       allow_pickle=job.allow_pickle_weights, base_model=job.base_model)
    log, summary = run_eval(model, tokenizer, fmt, job.eval, prepared, model_path=job.model)
    summary["prompt_format"] = fmt
    summary["config"] = jsonable(job.to_json())
    out = Path(job.out)
    write_json(out / "eval_log_aggregated.json", log)
    write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "eval_seconds"})
    write_json(out / "timing.json", {"eval_seconds": summary["eval_seconds"]})
    return summary


#: columns of eval_curve.csv, in order
CURVE_COLUMNS = ("epoch", "forget_quality", "model_utility", *UTILITY_KEYS, *FORGET_KEYS, "n_forget", "eval_seconds",
                 "forget_quality_lo", "forget_quality_hi", "model_utility_lo", "model_utility_hi",
                 *(c for k in CURVE_METRICS for c in (k, f"{k}_lo", f"{k}_hi")))


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
    row = {"epoch": int(epoch), **curve_values(summary)}
    row.update({k: summary[k] for k in CURVE_COLUMNS if k in summary and k not in row and k != "epoch"})
    path = run_dir / "eval_curve.csv"
    old = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=list(CURVE_COLUMNS))
    old = old[old["epoch"] != int(epoch)]
    new = pd.DataFrame([row], columns=list(CURVE_COLUMNS))
    curve = new if old.empty else pd.concat([old.reindex(columns=list(CURVE_COLUMNS)), new], ignore_index=True)
    write_csv(path, curve.sort_values("epoch").reset_index(drop=True))
    return row
