"""TOFU evaluation with the benchmark's exact metrics: per-sample logs, forget quality, model utility.

Two halves:

* **Aggregation (no model).** :func:`load_log` reads a TOFU-format ``eval_log_aggregated.json`` in
  either published layout (per-sample values as ``{index: value}`` dicts, as the TOFU authors store
  them, or as lists, as the NPO authors do) and :func:`aggregate` turns a checkpoint log plus a
  retain-model log into forget quality (FQ), model utility (MU) and their components, following
  TOFU's ``aggregate_eval_stat.py``:

  - probability: retain/forget ``mean(exp(-avg_gt_loss))``; real authors/world facts
    ``mean(p_true / (p_true + sum_j p_perturbed_j))`` with ``p = exp(-avg loss)``;
  - ROUGE: ``mean(rougeL_recall)``;
  - truth ratio ``R = exp(mean_j average_perturb_loss_j - avg_paraphrased_loss)``; forget
    ``mean(min(R, 1/R))``, others ``mean(max(0, 1 - 1/R))``;
  - FQ: ``scipy.stats.ks_2samp`` p-value between the forget-set ``R`` of the checkpoint and of the
    retain model (TOFU's ``get_forget_quality`` compares the raw ``R`` values, not ``min(R, 1/R)``);
  - MU: harmonic mean of {retain, real authors, world facts} x {probability, ROUGE, truth ratio}.

  Everything is computed from log-losses in a numerically safe but algebraically identical form
  (``min(R,1/R) = exp(-|log R|)``, the probability ratio as a softmax, KS on ``log R``, which has
  the same ranks as ``R`` and hence the same statistic and p-value).

* **Evaluation of a model.** :func:`evaluate_model` computes the per-sample TOFU quantities with
  batched, padding-aware NLL (examples sorted by length, right padding) and batched greedy
  generation (left padding), and returns a log in TOFU's dict layout. ``npo-tofu eval`` writes it as
  ``eval_log_aggregated.json`` next to ``summary.json``; :func:`evaluate_epoch` is what
  ``npo-tofu unlearn --eval-every-epoch`` calls to grow ``eval_curve.csv``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npo_sim.metrics import harmonic_mean, ks_pvalue
from npo_sim.runio import UserError, write_csv, write_json

#: TOFU log key -> our short task name. Order = TOFU's order of the four files.
TASKS = {
    "eval_log.json": "retain",
    "eval_real_author_wo_options.json": "real_authors",
    "eval_real_world_wo_options.json": "world_facts",
    "eval_log_forget.json": "forget",
}
TASK_KEY = {name: key for key, name in TASKS.items()}
#: the nine model-utility components, in a fixed order
UTILITY_KEYS = tuple(f"{t}_{m}" for t in ("retain", "real_authors", "world_facts") for m in ("prob", "rouge", "truth_ratio"))
FORGET_KEYS = ("forget_prob", "forget_rouge", "forget_truth_ratio")
#: per-sample metrics aggregation needs, per use
_NEED_FULL = ("avg_gt_loss", "avg_paraphrased_loss", "average_perturb_loss", "rougeL_recall")
_NEED_FQ = ("avg_paraphrased_loss", "average_perturb_loss")


# --------------------------------------------------------------------------------------------------
# Reading logs (both layouts), with one-line errors for anything malformed
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskLog:
    """Per-sample arrays of one eval set, aligned by sample index."""

    gt: np.ndarray | None  # avg_gt_loss, (N,)
    para: np.ndarray  # avg_paraphrased_loss, (N,)
    perturb: np.ndarray  # average_perturb_loss, (N, K)
    rouge: np.ndarray | None  # rougeL_recall, (N,)

    @property
    def n(self) -> int:
        return len(self.para)

    @property
    def log_truth_ratio(self) -> np.ndarray:
        """``log R = mean_j(perturbed loss_j) - paraphrased loss``, per sample."""
        return self.perturb.mean(axis=-1) - self.para


def load_log(source, name: str | None = None) -> dict:
    """A TOFU-format log as a dict: ``source`` is a path to ``eval_log_aggregated.json`` (or a directory
    holding one) or an already-loaded dict. Raises :class:`UserError` for a missing or unparsable file."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "eval_log_aggregated.json"
    if not path.is_file():
        raise UserError(f"{name or 'log'} not found: {path}")
    try:
        with open(path) as fh:
            log = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(log, dict):
        raise UserError(f"{path}: expected a JSON object with keys {list(TASKS)}")
    return log


def _column(task: dict, key: str, where: str) -> tuple[list[int], list]:
    """(sample indices, values) of one per-sample metric, in either layout, sorted by index."""
    if key not in task:
        raise UserError(f"{where}: missing per-sample key {key!r}")
    col = task[key]
    if isinstance(col, list):
        return list(range(len(col))), col
    if isinstance(col, dict):
        try:
            items = sorted((int(k), v) for k, v in col.items())
        except ValueError:
            raise UserError(f"{where}: {key} has non-integer sample keys") from None
        return [i for i, _ in items], [v for _, v in items]
    raise UserError(f"{where}: {key} must be a list or an {{index: value}} dict, got {type(col).__name__}")


def _floats(values: list, key: str, where: str, idx: list[int]) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        if key == "average_perturb_loss":
            lens = {i: (len(v) if isinstance(v, list) else 1) for i, v in zip(idx, values)}
            first = idx[0]
            bad = next(i for i in idx if lens[i] != lens[first])
            raise UserError(
                f"{where}: {key} has {lens[first]} perturbed answers at sample {first} but {lens[bad]} at sample {bad}"
            ) from None
        raise UserError(f"{where}: {key} holds non-numeric values") from None
    if arr.size == 0:
        raise UserError(f"{where}: {key} is empty")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = idx[int(np.argwhere(bad)[0][0])]
        raise UserError(f"{where}: {key} is not finite (NaN/inf) at sample {i}")
    return arr


def task_log(log: dict, task: str, need=_NEED_FULL, name: str = "log") -> TaskLog:
    """Validated per-sample arrays of ``task`` (a TOFU key or a short name) from a loaded log."""
    key = TASK_KEY.get(task, task)
    if key not in log:
        raise UserError(f"{name}: missing eval set {key!r} (has {sorted(log)})")
    entry = log[key]
    where = f"{name}: {key}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected an object of per-sample metrics")
    cols: dict[str, np.ndarray] = {}
    index = None
    for k in need:
        idx, vals = _column(entry, k, where)
        if index is None:
            index = idx
        elif idx != index:
            raise UserError(f"{where}: {k} covers samples {_span(idx)}, {need[0]} covers {_span(index)}")
        cols[k] = _floats(vals, k, where, idx)
    perturb = cols["average_perturb_loss"]
    if perturb.ndim != 2 or perturb.shape[1] < 1:
        raise UserError(f"{where}: average_perturb_loss must hold a list of perturbed losses per sample")
    return TaskLog(
        gt=cols.get("avg_gt_loss"), para=cols["avg_paraphrased_loss"], perturb=perturb, rouge=cols.get("rougeL_recall")
    )


def _span(idx: list[int]) -> str:
    return f"{len(idx)} samples [{idx[0]}..{idx[-1]}]" if idx else "no samples"


# --------------------------------------------------------------------------------------------------
# TOFU's formulas
# --------------------------------------------------------------------------------------------------


def probability(t: TaskLog, with_options: bool) -> float:
    """TOFU "Prob.": ``mean(exp(-avg_gt_loss))`` (retain, forget) or, with options (real authors, world
    facts), ``mean(p_true / (p_true + sum p_perturbed))`` computed as a softmax over ``-losses``."""
    if not with_options:
        return float(np.mean(np.exp(-t.gt)))
    neg = -np.concatenate([t.gt[:, None], t.perturb], axis=1)
    neg -= neg.max(axis=1, keepdims=True)
    p = np.exp(neg)
    return float(np.mean(p[:, 0] / p.sum(axis=1)))


def truth_ratio_stat(t: TaskLog, forget: bool) -> float:
    """TOFU "Truth Ratio": forget ``mean(min(R, 1/R))``, others ``mean(max(0, 1 - 1/R))``."""
    lr = t.log_truth_ratio
    if forget:
        return float(np.mean(np.exp(-np.abs(lr))))
    return float(np.mean(np.maximum(0.0, -np.expm1(-lr))))


def task_stats(t: TaskLog, task: str) -> dict[str, float]:
    """The three TOFU statistics of one eval set (task is a short name)."""
    return {
        f"{task}_prob": probability(t, with_options=task in ("real_authors", "world_facts")),
        f"{task}_rouge": float(np.mean(t.rouge)),
        f"{task}_truth_ratio": truth_ratio_stat(t, forget=task == "forget"),
    }


def forget_quality(ckpt: TaskLog, retain: TaskLog) -> tuple[float, float]:
    """(p-value, KS statistic) of ``ks_2samp`` between the forget-set truth ratios ``R`` of the
    checkpoint and the retain model, exactly TOFU's ``get_forget_quality``. KS depends only on the ranks
    of the pooled sample, so it is evaluated on ``log R`` (no overflow)."""
    if ckpt.perturb.shape[1] != retain.perturb.shape[1]:
        raise UserError(
            f"forget logs disagree: checkpoint has {ckpt.perturb.shape[1]} perturbed answers per question, "
            f"retain log has {retain.perturb.shape[1]}"
        )
    from scipy.stats import ks_2samp

    p = ks_pvalue(ckpt.log_truth_ratio, retain.log_truth_ratio)
    stat = float(ks_2samp(ckpt.log_truth_ratio, retain.log_truth_ratio).statistic)
    if not math.isfinite(p):
        raise UserError("forget quality could not be computed (KS p-value is not finite)")
    return p, stat


def aggregate(ckpt_log, retain_log=None, *, ckpt_name: str = "checkpoint log", retain_name: str = "retain log") -> dict:
    """FQ (when a retain log is given), MU, the 9 MU components and the forget-set statistics.

    ``ckpt_log``/``retain_log``: paths or loaded dicts. Raises :class:`UserError` on any malformed or
    mismatched input; never returns a ``None`` FQ when a retain log was passed.
    """
    ck = load_log(ckpt_log, ckpt_name)
    if not isinstance(ckpt_log, dict):
        ckpt_name = str(ckpt_log)  # errors inside the file name the file
    tasks = {TASKS[k]: task_log(ck, k, _NEED_FULL, ckpt_name) for k in TASKS}
    stats: dict[str, float] = {}
    for name, t in tasks.items():
        stats.update(task_stats(t, name))
    out: dict = {}
    notes: list[str] = []
    if retain_log is not None:
        rt_log = load_log(retain_log, retain_name)
        rt = task_log(rt_log, "forget", _NEED_FQ, retain_name if isinstance(retain_log, dict) else str(retain_log))
        fq, ks = forget_quality(tasks["forget"], rt)
        out["forget_quality"] = fq
        out["ks_statistic"] = ks
        if rt.n != tasks["forget"].n:
            notes.append(
                f"forget sets differ in size: checkpoint {tasks['forget'].n} samples, retain log {rt.n} "
                "(KS compares the two distributions anyway)"
            )
    out["model_utility"] = harmonic_mean([stats[k] for k in UTILITY_KEYS])
    out.update({k: stats[k] for k in UTILITY_KEYS + FORGET_KEYS})
    out["n_forget"] = tasks["forget"].n
    if retain_log is not None:
        out["n_forget_retain_log"] = rt.n
    out["num_perturbed"] = int(tasks["forget"].perturb.shape[1])
    out["notes"] = notes
    return out


# --------------------------------------------------------------------------------------------------
# CLI: npo-tofu aggregate
# --------------------------------------------------------------------------------------------------


def add_aggregate_arguments(p) -> None:
    p.add_argument("--ckpt-log", required=True, help="eval_log_aggregated.json of the evaluated model (or its directory)")
    p.add_argument("--retain-log", required=True, help="eval_log_aggregated.json of the retain (oracle) model")
    p.add_argument("--out", default=None, help="also write the JSON object to this file")


def aggregate_main(args) -> int:
    result = aggregate(args.ckpt_log, args.retain_log)
    result = {**result, "ckpt_log": str(args.ckpt_log), "retain_log": str(args.retain_log)}
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


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


def eval_sets(forget_split: str, data_dir=None, ds_size: int = 300) -> tuple[dict[str, list[EvalItem]], dict[str, str], list[str]]:
    """``(items per TOFU log key, source per key, notes)`` for ``forget_split``.

    forget01/05/10 use their ``_perturbed`` file; forget20/30/50/90 use ``forget10_perturbed`` (as the
    NPO paper did; noted). ``mini-forget10/20/50`` (tofu-mini) take forget *and* retain questions from
    the 20 forget10 authors, since a tiny model never saw ``retain_perturbed``'s authors. Each set is
    cut to its first ``ds_size`` rows, as TOFU does.
    """
    from . import data

    if ds_size < 1:
        raise UserError(f"--ds-size must be >= 1, got {ds_size}")
    notes: list[str] = []
    if forget_split in _OWN_PERTURBED:
        forget_src, retain_src = f"{forget_split}_perturbed", "retain_perturbed"
        forget_rows, retain_rows = data.load_split(forget_src, data_dir), data.load_split(retain_src, data_dir)
    elif forget_split in _BORROWS_PERTURBED:
        forget_src, retain_src = "forget10_perturbed", "retain_perturbed"
        forget_rows, retain_rows = data.load_split(forget_src, data_dir), data.load_split(retain_src, data_dir)
        notes.append(f"{forget_split} has no perturbed file: forget-set metrics use forget10_perturbed (as the NPO paper)")
    elif forget_split in MINI_SPLITS:
        forget_rows, retain_rows = data.mini_splits(forget_split, data_dir)
        forget_src = f"tofu-mini {forget_split} (last authors of forget10_perturbed)"
        retain_src = f"tofu-mini retain authors of forget10_perturbed for {forget_split}"
        notes.append("tofu-mini: the retain eval set is the mini retain authors (forget10_perturbed), not retain_perturbed")
    else:
        raise UserError(
            f"unknown forget split {forget_split!r}; valid: {', '.join(_OWN_PERTURBED + _BORROWS_PERTURBED + MINI_SPLITS)}"
        )
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
# Batched NLL and batched greedy generation
# --------------------------------------------------------------------------------------------------


def _device(model):
    return next(model.parameters()).device


def answer_nll(model, tokenizer, fmt, pairs: list[tuple[str, str]], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(summed NLL, answer token count)`` of each (question, answer) pair, answer tokens + EOS only.

    Examples are sorted by length and right-padded per batch (little padding, same numbers as one at
    a time: position ids follow the attention mask, padding is masked out of the loss).
    """
    import torch

    from .data import encode_qa, pad_batch
    from .logprobs import sequence_logprobs

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


def greedy_generate(model, tokenizer, fmt, questions: list[str], batch_size: int = 16, max_new_tokens: int = 128) -> list[str]:
    """Greedy answers to ``questions``: prompts encoded exactly as in training, sorted by length and
    left-padded per batch; decoded without special tokens (TOFU's ``batch_decode``)."""
    import torch

    from .data import encode_prompt

    prompts = [encode_prompt(tokenizer, q, fmt) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    dev = _device(model)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            T = max(len(prompts[i]) for i in idx)
            ids = torch.tensor([[pad] * (T - len(prompts[i])) + prompts[i] for i in idx], device=dev)
            mask = torch.tensor([[0] * (T - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=dev)
            gen = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(gen[:, T:], skip_special_tokens=True)
            for i, t in zip(idx, texts):
                out[i] = t
    return out


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
                   max_new_tokens: int = 128) -> dict:
    """The TOFU per-sample log (dict layout, TOFU key names) of ``model`` on ``sets``.

    All NLLs of all sets are computed in one length-sorted pass over the unique (question, answer)
    pairs (real authors/world facts have base answer = answer, scored once).
    """
    from .data import get_format

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
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
        gens = greedy_generate(model, tokenizer, fmt, questions, batch_size, max_new_tokens)
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


def _check_retain_log(path) -> dict | None:
    """Load and validate a retain log up front (before any model work); ``None`` passes through."""
    if path is None:
        return None
    log = load_log(path, "retain log")
    task_log(log, "forget", _NEED_FQ, str(path))
    return log


def run_eval(model, tokenizer, fmt, forget_split: str, *, data_dir=None, ds_size: int = 300, batch_size: int = 16,
             max_new_tokens: int = 128, retain_log=None, prepared=None) -> tuple[dict, dict]:
    """Evaluate ``model`` on ``forget_split``: ``(TOFU log, summary)``. The summary holds FQ when a
    retain log is given, MU, the components, eval-set sources, notes and timing. ``prepared`` is an
    :func:`eval_sets` result to reuse."""
    sets, sources, notes = prepared or eval_sets(forget_split, data_dir, ds_size)
    t0 = time.perf_counter()
    log = evaluate_model(model, tokenizer, fmt, sets, batch_size=batch_size, max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - t0
    stats = aggregate(log, retain_log, ckpt_name="evaluated model", retain_name="retain log")
    summary = {
        **{k: v for k, v in stats.items() if k != "notes"},
        "forget_split": forget_split,
        "eval_sets": {k: {"source": sources[k], "n": len(v)} for k, v in sets.items()},
        "notes": notes + stats["notes"],
        "eval_seconds": seconds,
    }
    return log, summary


def add_eval_arguments(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory, HF id, or tiny-llama[:SIZE]")
    p.add_argument("--forget-split", required=True,
                   help="forget01/05/10/20/30/50/90, or mini-forget10/20/50 for tofu-mini")
    p.add_argument("--out", required=True, help="output directory: eval_log_aggregated.json and summary.json")
    p.add_argument("--retain-log", default=None, help="the retain model's eval_log_aggregated.json: adds forget quality")
    p.add_argument("--data-dir", default=None, help="TOFU data directory (default: $NPO_TOFU_DIR)")
    p.add_argument("--ds-size", type=int, default=300, help="questions per eval set (TOFU: 300)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of NLL and generation")
    p.add_argument("--max-new-tokens", type=int, default=128, help="greedy generation length for ROUGE")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def eval_main(args) -> int:
    from .models import load_model

    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.device and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    retain = _check_retain_log(args.retain_log)
    prepared = eval_sets(args.forget_split, args.data_dir, args.ds_size)
    model, tokenizer, fmt = load_model(args.model, device=args.device, data_dir=args.data_dir)
    log, summary = run_eval(model, tokenizer, fmt, args.forget_split, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, retain_log=retain, prepared=prepared)
    summary["prompt_format"] = fmt
    summary["config"] = {k: v for k, v in vars(args).items() if not callable(v)}
    out = Path(args.out)
    write_json(out / "eval_log_aggregated.json", log)
    write_json(out / "summary.json", summary)
    for note in summary["notes"]:
        print(f"note: {note}")
    fq = f"FQ {summary['forget_quality']:.4g}  " if "forget_quality" in summary else ""
    print(f"{fq}MU {summary['model_utility']:.4f}  forget ROUGE {summary['forget_rouge']:.4f}  "
          f"({summary['eval_seconds']:.1f} s) -> {out}")
    return 0


#: columns of eval_curve.csv, in order
CURVE_COLUMNS = ("epoch", "forget_quality", "model_utility", *UTILITY_KEYS, *FORGET_KEYS, "n_forget", "eval_seconds")


def epoch_eval_split(args) -> str:
    """The eval forget split of an unlearning run: ``--forget forgetXX`` (``mini-forgetXX`` under
    ``--preset mini``)."""
    split = getattr(args, "forget_split", None) or getattr(args, "forget", None)
    if not split:
        raise UserError("--eval-every-epoch needs the forget split (--forget)")
    if getattr(args, "preset", None) == "mini" and not split.startswith("mini-"):
        split = f"mini-{split}"
    return split


def check_epoch_eval_args(args) -> None:
    """Validate what :func:`evaluate_epoch` will need, before any training (train.py calls this)."""
    if getattr(args, "retain_log", None) is None:
        raise UserError("--eval-every-epoch needs --retain-log (the retain model's eval_log_aggregated.json) "
                        "to compute forget quality")
    _check_retain_log(args.retain_log)
    eval_sets(epoch_eval_split(args), getattr(args, "data_dir", None), getattr(args, "eval_ds_size", None) or 300)


def evaluate_epoch(model, tokenizer, fmt, run_dir, epoch: int, args) -> dict:
    """Evaluate after unlearning epoch ``epoch`` and add a row to ``run_dir/eval_curve.csv``.

    Reads from ``args``: ``forget`` (or ``forget_split``), ``preset``, ``retain_log`` (required),
    ``data_dir``, and optionally ``eval_ds_size`` (300), ``eval_batch_size`` (16) and
    ``eval_max_new_tokens`` (128). The epoch's TOFU log goes to
    ``run_dir/eval/epoch_NNN/eval_log_aggregated.json``. The CSV is rewritten whole (atomically), and a
    re-evaluated epoch (after ``--resume``) replaces its old row. Returns the row.
    """
    import pandas as pd

    if getattr(args, "retain_log", None) is None:
        raise UserError("--eval-every-epoch needs --retain-log to compute forget quality")
    log, summary = run_eval(
        model, tokenizer, fmt, epoch_eval_split(args), data_dir=getattr(args, "data_dir", None),
        ds_size=getattr(args, "eval_ds_size", None) or 300, batch_size=getattr(args, "eval_batch_size", None) or 16,
        max_new_tokens=getattr(args, "eval_max_new_tokens", None) or 128, retain_log=_check_retain_log(args.retain_log),
    )
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
