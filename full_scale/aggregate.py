"""TOFU's metrics from its per-sample logs (no model): forget quality, model utility and their parts.

:func:`load_log` reads a TOFU-format ``eval_log_aggregated.json`` in either published layout
(per-sample values as ``{index: value}`` dicts, as the TOFU authors store them, or as lists, as the NPO
authors do) and :func:`aggregate` turns a checkpoint log plus a retain-model log into forget quality
(FQ), model utility (MU) and their components, following TOFU's ``aggregate_eval_stat.py``:

- probability: retain/forget ``mean(exp(-avg_gt_loss))``; real authors/world facts
  ``mean(p_true / (p_true + sum_j p_perturbed_j))`` with ``p = exp(-avg loss)``;
- ROUGE: ``mean(rougeL_recall)``;
- truth ratio ``R = exp(mean_j average_perturb_loss_j - avg_paraphrased_loss)``; forget
  ``mean(min(R, 1/R))``, others ``mean(max(0, 1 - 1/R))``;
- FQ: ``scipy.stats.ks_2samp`` p-value between the forget-set ``R`` of the checkpoint and of the
  retain model (TOFU's ``get_forget_quality`` compares the raw ``R`` values, not ``min(R, 1/R)``);
- MU: harmonic mean of {retain, real authors, world facts} x {probability, ROUGE, truth ratio}.

Everything is computed from log-losses in a numerically safe but algebraically identical form
(``min(R,1/R) = exp(-|log R|)``, the probability ratio as a softmax, KS on ``log R``, which has the
same ranks as ``R`` and hence the same statistic and p-value). ``npo-tofu aggregate`` runs
:func:`aggregate` on two log files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npo_sim.metrics import harmonic_mean, ks_pvalue
from npo_sim.runio import UserError

from .dialects import DIALECTS, check_same, get_dialect

#: TOFU log key -> our short task name. Order = TOFU's order of the four files.
TASKS = {
    "eval_log.json": "retain",
    "eval_real_author_wo_options.json": "real_authors",
    "eval_real_world_wo_options.json": "world_facts",
    "eval_log_forget.json": "forget",
}
TASK_KEY = {name: key for key, name in TASKS.items()}
#: the nine model-utility components, in a fixed order
UTILITY_KEYS = tuple(f"{t}_{m}" for t in ("retain", "real_authors", "world_facts")
                     for m in ("prob", "rouge", "truth_ratio"))
FORGET_KEYS = ("forget_prob", "forget_rouge", "forget_truth_ratio")
#: the key of an eval log naming the dialect it was computed in (absent in published logs: unknown)
DIALECT_KEY = "dialect"
#: the key of an eval log naming its question subset (full_scale.data.question_subset; absent: "all")
QUESTIONS_KEY = "questions"
#: per-sample metrics aggregation needs, per use
_NEED_FULL = ("avg_gt_loss", "avg_paraphrased_loss", "average_perturb_loss", "rougeL_recall")
_NEED_FQ = ("avg_paraphrased_loss", "average_perturb_loss")
NEED_FQ = _NEED_FQ  #: the per-sample keys forget quality reads from a retain log


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


def log_questions(log: dict, name: str = "log") -> str:
    """The question subset a log was evaluated on: its :data:`QUESTIONS_KEY`, ``"all"`` when absent."""
    from .data import QUESTION_SUBSETS

    q = log.get(QUESTIONS_KEY, "all")
    if q not in QUESTION_SUBSETS:
        raise UserError(f"{name}: unknown question subset {q!r} (expected one of {', '.join(QUESTION_SUBSETS)})")
    return q


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


def truth_ratio_terms(t: TaskLog, forget: bool, formula: str = "tofu") -> np.ndarray:
    """Per-sample truth-ratio terms, whose mean is the statistic (a dialect's ``truth_ratio``):

    * ``"tofu"`` (``aggregate_eval_stat.py``): ``R = exp(mean_j L_pert,j − L_para)``; forget
      ``min(R, 1/R)``, others ``max(0, 1 − 1/R)``;
    * ``"tofu-utility"``: probabilities averaged first, ``R′ = mean_j e^{−L_pert,j} / e^{−L_para}``;
      forget ``min(R′, 1/R′)``, others ``max(0, 1 − R′)``;
    * ``"prob_mean"`` (open-unlearning 2025): ``p_para / (p_para + mean_j p_pert,j)``, every set.
    """
    if formula == "tofu":
        lr = t.log_truth_ratio
        return np.exp(-np.abs(lr)) if forget else np.maximum(0.0, -np.expm1(-lr))
    # log of mean_j p_pert,j, computed stably
    neg = -t.perturb
    top = neg.max(axis=1)
    log_pert = top + np.log(np.mean(np.exp(neg - top[:, None]), axis=1))
    log_r = log_pert + t.para                       # log R′ = log(mean p_pert) − log p_para
    if formula == "tofu-utility":
        return np.exp(-np.abs(log_r)) if forget else np.maximum(0.0, -np.expm1(log_r))
    if formula == "prob_mean":
        return 1.0 / (1.0 + np.exp(log_r))          # p_para/(p_para + mean p_pert) = 1/(1 + R′)
    raise UserError(f"unknown truth-ratio formula {formula!r}")


def truth_ratio_stat(t: TaskLog, forget: bool, formula: str = "tofu") -> float:
    """TOFU "Truth Ratio" (default formula): forget ``mean(min(R, 1/R))``, others ``mean(max(0, 1 - 1/R))``."""
    return float(np.mean(truth_ratio_terms(t, forget, formula)))


def task_stats(t: TaskLog, task: str, truth_ratio: str = "tofu") -> dict[str, float]:
    """The three TOFU statistics of one eval set (task is a short name)."""
    return {
        f"{task}_prob": probability(t, with_options=task in ("real_authors", "world_facts")),
        f"{task}_rouge": float(np.mean(t.rouge)),
        f"{task}_truth_ratio": truth_ratio_stat(t, task == "forget", truth_ratio),
    }


def sample_stats(t: TaskLog, task: str, truth_ratio: str = "tofu") -> np.ndarray:
    """``(N, 3)`` per-sample terms whose column means are :func:`task_stats` of ``task`` (probability,
    ROUGE, truth-ratio statistic): what a bootstrap over questions resamples."""
    if task in ("real_authors", "world_facts"):
        neg = -np.concatenate([t.gt[:, None], t.perturb], axis=1)
        neg -= neg.max(axis=1, keepdims=True)
        p = np.exp(neg)
        prob = p[:, 0] / p.sum(axis=1)
    else:
        prob = np.exp(-t.gt)
    tr = truth_ratio_terms(t, task == "forget", truth_ratio)
    return np.stack([prob, np.asarray(t.rouge, float), tr], axis=1)


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


def aggregate(ckpt_log, retain_log=None, *, ckpt_name: str = "checkpoint log", retain_name: str = "retain log",
              allow_mismatched: bool = True, truth_ratio: str | None = None,
              allow_mixed_dialects: bool = False) -> dict:
    """FQ (when a retain log is given), MU, the 9 MU components and the forget-set statistics.

    ``ckpt_log``/``retain_log``: paths or loaded dicts. Raises :class:`UserError` on any malformed or
    mismatched input; never returns a ``None`` FQ when a retain log was passed. Forget sets of
    different sizes are compared with a note, or refused when not ``allow_mismatched`` (the CLI's
    default, ``--allow-mismatched-logs`` to compare anyway).
    """
    ck = load_log(ckpt_log, ckpt_name)
    if not isinstance(ckpt_log, dict):
        ckpt_name = str(ckpt_log)  # errors inside the file name the file
    rt_log = load_log(retain_log, retain_name) if retain_log is not None else None
    dialect = check_same({ckpt_name: ck.get(DIALECT_KEY),
                          **({retain_name: rt_log.get(DIALECT_KEY)} if rt_log is not None else {})},
                         allow_mixed_dialects)
    if truth_ratio is None:   # the log's own dialect decides, or tofu's formula for a published log
        truth_ratio = get_dialect(dialect).truth_ratio if dialect in DIALECTS else "tofu"
    tasks = {TASKS[k]: task_log(ck, k, _NEED_FULL, ckpt_name) for k in TASKS}
    stats: dict[str, float] = {}
    for name, t in tasks.items():
        stats.update(task_stats(t, name, truth_ratio))
    out: dict = {}
    notes: list[str] = []
    if retain_log is not None:
        rt = task_log(rt_log, "forget", _NEED_FQ, retain_name if isinstance(retain_log, dict) else str(retain_log))
        if rt.n != tasks["forget"].n and not allow_mismatched:
            raise UserError(f"mismatched logs: {ckpt_name} has {tasks['forget'].n} forget samples, "
                            f"{retain_name if isinstance(retain_log, dict) else retain_log} has {rt.n}; "
                            "pass --allow-mismatched-logs to compare them anyway")
        q_ck, q_rt = log_questions(ck, ckpt_name), log_questions(rt_log, retain_name)
        if q_ck != q_rt:
            if not allow_mismatched:
                raise UserError(f"mismatched logs: {ckpt_name} was evaluated on the {q_ck!r} questions, "
                                f"{retain_name if isinstance(retain_log, dict) else retain_log} on {q_rt!r}; "
                                "pass --allow-mismatched-logs to compare them anyway")
            notes.append(f"question subsets differ: checkpoint {q_ck!r}, retain log {q_rt!r} "
                         "(KS compares the two distributions anyway)")
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
    out["dialect"], out["truth_ratio_formula"] = dialect, truth_ratio
    out["notes"] = notes
    return out


def load_retain_log(path) -> dict | None:
    """Load and validate a retain log up front (before any model work); ``None`` passes through."""
    if path is None:
        return None
    log = load_log(path, "retain log")
    task_log(log, "forget", _NEED_FQ, str(path))
    return log
