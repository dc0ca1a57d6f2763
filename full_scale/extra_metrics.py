"""The LM evaluation beyond FQ and MU: memorization, membership inference, privleak, fluency, and
bootstrap CIs over questions for all of them (and for FQ and MU).

Everything here is computed from numbers ``npo-tofu eval`` already has (:mod:`full_scale.evaluate`):
per answer token of every forget-set answer and holdout answer, the log-prob of the label, whether
the teacher-forced argmax hits it, and the mean and standard deviation of the log-probs under the
model's own next-token distribution (Min-K%++); the greedy forget answers; and, when a judge model is
given, each greedy answer's mean per-token log-likelihood under the judge. The formulas are the pure
functions of :mod:`npo_sim.metrics`; this module only arranges them:

* per forget question: ``exact_memorization``, ``extraction_strength`` (open-unlearning's names);
* MIA scores (``loss``, ``min_k``, ``min_k_plus_plus`` with k = 0.4, ``zlib`` over the answer text,
  and ``reference`` = the model's mean answer log-prob minus the retain model's, when the retain log
  carries its per-sample scores), and per attack the AUC of forget (members) against holdout
  (non-members), as open-unlearning's MIA evaluation does on TOFU;
* ``privleak`` per attack against the retain (oracle) model's AUC, MUSE's definition, when the retain
  log carries it (an oracle's own ``npo-tofu eval`` log does);
* fluency of the greedy forget answers, over lowercased whitespace words: ``repetition`` (rep-3 per
  answer, averaged), ``distinct_2`` (pooled over answers), and ``judge_logp``;
* a 95% percentile bootstrap CI over questions for each (1000 resamples by default): forget questions
  for the forget-set metrics, forget and holdout questions independently for the AUCs (paired with
  the retain model's scores of the same questions for privleak), the forget questions of both models
  together for FQ, and each MU eval set on its own for MU;
* next to FQ, the lattice of values the KS p-value can take at these sample sizes
  (:func:`npo_sim.metrics.ks_attainable_pvalues`): how many there are, and the next ones above and below.

The per-sample numbers and the results are stored in the eval log under :data:`EXTRA_KEY`, so a
retain model's log gives the AUCs privleak compares with.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from npo_sim import metrics as M

from .aggregate import TASKS, UTILITY_KEYS, sample_stats, task_log

#: the key of this module's block in an eval log (beside TOFU's four)
EXTRA_KEY = "eval_extra_metrics"
#: MIA attacks computed from the model alone; ``reference`` needs the retain log's scores
ATTACKS = ("loss", "min_k", "min_k_plus_plus", "zlib")
MIN_K = 0.4
REP_N, DISTINCT_N = 3, 2
N_BOOT = 1000


# --------------------------------------------------------------------------------------------------
# per-sample numbers
# --------------------------------------------------------------------------------------------------
def _padded(rows: list[np.ndarray], dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    x = torch.zeros(len(rows), T, dtype=dtype)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.as_tensor(r, dtype=dtype)
        mask[i, :len(r)] = True
    return x, mask


def mia_scores(details: list[dict], texts: list[str]) -> dict[str, list[float]]:
    """Per example, every model-only MIA score (higher = more likely a member)."""
    lp, mask = _padded([d["logp"] for d in details])
    mu, _ = _padded([d["mu"] for d in details])
    sd, _ = _padded([d["sigma"] for d in details])
    return {"loss": M.mia_loss(lp, mask).tolist(), "min_k": M.mia_min_k(lp, mask, MIN_K).tolist(),
            "min_k_plus_plus": M.mia_min_k_plus_plus(lp, mu, sd, mask, MIN_K).tolist(),
            "zlib": M.mia_zlib(lp, mask, texts).tolist()}


def memorization(details: list[dict]) -> dict[str, list[float]]:
    hits, mask = _padded([d["hit"] for d in details], dtype=torch.bool)
    return {"exact_memorization": M.exact_memorization(hits, mask).tolist(),
            "extraction_strength": M.extraction_strength(hits, mask).tolist()}


def words(text: str) -> list[str]:
    return text.lower().split()


def fluency_samples(texts: list[str], judge_logp: list[float] | None) -> dict:
    return {"repetition": [M.repetition(words(t), REP_N) for t in texts],
            "words": [len(words(t)) for t in texts],
            "judge_logp": judge_logp}


def sample_block(forget_details, forget_texts, holdout_details, holdout_texts, generated, judge_logp,
                 holdout_source: str | None, judge: str | None) -> dict:
    """The per-sample part of :data:`EXTRA_KEY`: forget memorization and MIA scores, holdout MIA
    scores, fluency of the greedy forget answers."""
    forget = {**memorization(forget_details), "num_tokens": [len(d["logp"]) for d in forget_details],
              "mia": mia_scores(forget_details, forget_texts)}
    holdout = None
    if holdout_details:
        holdout = {"source": holdout_source, "num_tokens": [len(d["logp"]) for d in holdout_details],
                   "mia": mia_scores(holdout_details, holdout_texts)}
    return {"forget": forget, "holdout": holdout,
            "fluency": {**fluency_samples(generated, judge_logp), "generated": list(generated), "judge": judge}}


# --------------------------------------------------------------------------------------------------
# CIs
# --------------------------------------------------------------------------------------------------
def _ci(c: M.CI) -> dict:
    return {"estimate": c.estimate, "lo": c.lo, "hi": c.hi, "std": c.std}


def _pair_matrix(member, nonmember) -> np.ndarray:
    """``1`` where member > non-member, ``½`` on ties: its mean over any rows/columns is the AUC of
    those members and non-members (:func:`npo_sim.metrics.auc`), so resamples are index lookups."""
    a, b = np.asarray(member, float)[:, None], np.asarray(nonmember, float)[None, :]
    return (a > b) + 0.5 * (a == b)


def auc_ci(member, nonmember, n_boot: int, seed: int = 0) -> dict:
    C = _pair_matrix(member, nonmember)
    c = M.bootstrap_ci_strata(lambda i, j: C[np.ix_(i, j)].mean(),
                              (np.arange(C.shape[0]), np.arange(C.shape[1])), n_boot=n_boot, seed=seed)
    return {**_ci(c), "estimate": M.auc(member, nonmember)}


def privleak_ci(member, nonmember, r_member, r_nonmember, n_boot: int, seed: int = 0) -> dict:
    """privleak with the model's and the retain model's scores of the same questions resampled together."""
    C, R = _pair_matrix(member, nonmember), _pair_matrix(r_member, r_nonmember)

    def stat(i, j):
        ar = R[np.ix_(i, j)].mean()
        return M.privleak(C[np.ix_(i, j)].mean(), ar) if ar > 0 else math.nan

    c = M.bootstrap_ci_strata(stat, (np.arange(C.shape[0]), np.arange(C.shape[1])), n_boot=n_boot, seed=seed)
    return {**_ci(c), "estimate": M.privleak(M.auc(member, nonmember), M.auc(r_member, r_nonmember))}


def mean_ci(values, n_boot: int, seed: int = 0) -> dict:
    return _ci(M.bootstrap_ci(np.mean, np.asarray(values, float), n_boot=n_boot, seed=seed))


def _ks_stat(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample KS statistic (sup of the ECDF difference), as ``scipy.stats.ks_2samp``."""
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, x, side="right") / a.size - np.searchsorted(b, x, side="right") / b.size)
    return float(d.max())


def fq_ci(ckpt_log_r, retain_log_r, n_boot: int, seed: int = 0) -> dict:
    """FQ with the forget questions of both models resampled together (paired by question).

    The KS p-value depends on the data only through the statistic (at fixed sample sizes), so each
    statistic's p-value is computed once by ``ks_2samp`` (:func:`npo_sim.metrics.ks_pvalue`) and reused."""
    cache: dict[int, float] = {}
    n, m = len(ckpt_log_r), len(retain_log_r)

    def stat(a, b):
        key = round(_ks_stat(a, b) * n * m)
        if key not in cache:
            cache[key] = M.ks_pvalue(a, b)
        return cache[key]

    c = M.bootstrap_ci(stat, (np.asarray(ckpt_log_r, float), np.asarray(retain_log_r, float)), n_boot=n_boot,
                       seed=seed)
    return {**_ci(c), "estimate": M.ks_pvalue(ckpt_log_r, retain_log_r)}


def fq_lattice(fq: float, n: int, m: int) -> dict:
    """How coarse FQ is: the number of values the KS p-value can take at (n, m), and the attainable
    values next above and below this FQ (``None`` at the ends, or when the sizes are too large to list)."""
    try:
        vals = M.ks_attainable_pvalues(n, m)
    except ValueError:
        return {"fq_attainable_values": None, "fq_next_above": None, "fq_next_below": None}
    tol = 1e-9 * max(fq, 1e-300)
    above, below = vals[vals > fq + tol], vals[vals < fq - tol]
    return {"fq_attainable_values": int(vals.size), "fq_next_above": float(above[0]) if above.size else None,
            "fq_next_below": float(below[-1]) if below.size else None}


def _distinct_ci(grams: np.ndarray, n_boot: int, seed: int) -> dict:
    """distinct-n (pooled over answers) with a bias-corrected percentile CI. Resampling answers with
    replacement duplicates some, which lowers a pooled distinct count in every resample: the plain
    percentile interval then sits below the estimate. The interval is shifted by the estimated bias
    (estimate − mean of the resamples), the usual bias correction."""
    stat = lambda g: M.distinct_n(g, DISTINCT_N)  # noqa: E731
    c = M.bootstrap_ci(stat, grams, n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed)
    reps = [stat(grams[rng.integers(0, len(grams), len(grams))]) for _ in range(n_boot)] if len(grams) else [0.0]
    shift = c.estimate - float(np.mean(reps))
    return {**_ci(c), "lo": c.lo + shift, "hi": c.hi + shift}


def mu_ci(log: dict, n_boot: int, seed: int = 0, truth_ratio: str = "tofu") -> dict:
    """MU with each of its three eval sets resampled on its own (per-question TOFU statistics, with the
    dialect's truth-ratio formula)."""
    tasks = [TASKS[k] for k in TASKS if TASKS[k] != "forget"]
    groups = tuple(sample_stats(task_log(log, t), t, truth_ratio) for t in tasks)

    def stat(*gs):
        return M.harmonic_mean([v for g in gs for v in g.mean(axis=0)])

    c = M.bootstrap_ci_strata(stat, groups, n_boot=n_boot, seed=seed)
    assert len(UTILITY_KEYS) == 3 * len(groups)
    return _ci(c)


# --------------------------------------------------------------------------------------------------
# the results
# --------------------------------------------------------------------------------------------------
def retain_block(retain_log: dict | None) -> dict | None:
    """The retain log's :data:`EXTRA_KEY` block, when it has one."""
    if not isinstance(retain_log, dict):
        return None
    b = retain_log.get(EXTRA_KEY)
    return b if isinstance(b, dict) else None


def results(block: dict, log: dict, stats: dict, retain_log: dict | None, n_boot: int = N_BOOT,
            seed: int = 0) -> tuple[dict, list[str]]:
    """``(metrics with CIs, notes)`` from the per-sample block, the TOFU log and its aggregate."""
    notes: list[str] = []
    ci: dict[str, dict] = {}
    f = block["forget"]
    for k in ("exact_memorization", "extraction_strength"):
        ci[k] = mean_ci(f[k], n_boot, seed)
    mu = mu_ci(log, n_boot, seed, stats.get("truth_ratio_formula", "tofu"))
    ci["model_utility"] = {**mu, "estimate": stats["model_utility"]}
    out: dict = {}
    if "forget_quality" in stats and retain_log is not None:
        ck, rt = task_log(log, "forget").log_truth_ratio, task_log(retain_log, "forget", ("avg_paraphrased_loss",
                                                                                         "average_perturb_loss"))
        rt = rt.log_truth_ratio
        if len(ck) == len(rt):
            ci["forget_quality"] = fq_ci(ck, rt, n_boot, seed)
        else:
            notes.append("forget_quality: no CI (the two forget sets differ in size, so questions cannot be paired)")
        out.update(fq_lattice(stats["forget_quality"], len(ck), len(rt)))
    rb = retain_block(retain_log)
    h = block["holdout"]
    if h is None:
        notes.append("no holdout set: MIA AUCs and privleak are not computed (pass --holdout-file; tofu-mini "
                     "has its own)")
    else:
        scores = dict(f["mia"]), dict(h["mia"])
        rf, rh = (rb or {}).get("forget"), (rb or {}).get("holdout")
        same = bool(rf and rh and rf.get("num_tokens") == f["num_tokens"] and rh.get("num_tokens") == h["num_tokens"])
        if same:  # the reference attack (open-unlearning's mia_reference), the retain model as reference
            scores[0]["reference"] = (np.asarray(f["mia"]["loss"]) - np.asarray(rf["mia"]["loss"])).tolist()
            scores[1]["reference"] = (np.asarray(h["mia"]["loss"]) - np.asarray(rh["mia"]["loss"])).tolist()
        elif rb is not None:
            notes.append("mia reference: not computed (the retain log's forget/holdout answers have other token "
                         "counts: another tokenizer, split or holdout)")
        aucs = {}
        for a in scores[0]:
            ci[f"mia_auc_{a}"] = auc_ci(scores[0][a], scores[1][a], n_boot, seed)
            aucs[a] = ci[f"mia_auc_{a}"]["estimate"]
        out["mia_auc"] = aucs
        r_auc = ((rb or {}).get("results") or {}).get("mia_auc") or {}
        for a in ATTACKS:
            if a not in r_auc:
                continue
            if not r_auc[a] > 0:
                notes.append(f"privleak_{a}: undefined (the retain model's {a} AUC is 0)")
                continue
            if same:
                ci[f"privleak_{a}"] = privleak_ci(scores[0][a], scores[1][a], rf["mia"][a], rh["mia"][a], n_boot, seed)
            else:
                c = auc_ci(scores[0][a], scores[1][a], n_boot, seed)
                ci[f"privleak_{a}"] = {k: (M.privleak(v, r_auc[a]) if k != "std" else v / r_auc[a] * 100)
                                       for k, v in c.items()}
        if retain_log is None:
            notes.append("privleak: no --retain-log, so no retain-model AUC to compare with")
        elif not r_auc:
            notes.append("privleak: the retain log carries no MIA AUCs (evaluate the retain model with a holdout "
                         "set and pass that log)")
    fl = block["fluency"]
    ci["fluency_repetition"] = mean_ci(fl["repetition"], n_boot, seed)
    grams = np.empty(len(fl["generated"]), dtype=object)
    grams[:] = [words(t) for t in fl["generated"]]
    ci[f"fluency_distinct_{DISTINCT_N}"] = _distinct_ci(grams, n_boot, seed)
    if fl["judge_logp"] is not None:
        ci["fluency_judge_logp"] = mean_ci(fl["judge_logp"], n_boot, seed)
    else:
        notes.append("no judge model (--judge-model): the judge log-likelihood of the generated answers is omitted")
    for k, v in ci.items():
        out[k] = v["estimate"]
    out["ci"] = ci
    out["n_boot"] = n_boot
    return out, notes


#: scalar metrics of :func:`results` that go into eval_curve.csv (each with _lo and _hi)
CURVE_METRICS = ("exact_memorization", "extraction_strength", *(f"mia_auc_{a}" for a in (*ATTACKS, "reference")),
                 *(f"privleak_{a}" for a in ATTACKS), "fluency_repetition", f"fluency_distinct_{DISTINCT_N}",
                 "fluency_judge_logp")


def curve_values(summary: dict) -> dict:
    """The CURVE_METRICS of a summary with their CI bounds (NaN where absent), and FQ's/MU's bounds."""
    ci = summary.get("ci", {})
    row = {}
    for k in ("forget_quality", "model_utility", *CURVE_METRICS):
        c = ci.get(k)
        if k not in ("forget_quality", "model_utility"):
            row[k] = c["estimate"] if c else math.nan
        row[f"{k}_lo"], row[f"{k}_hi"] = (c["lo"], c["hi"]) if c else (math.nan, math.nan)
    return row


def format_line(summary: dict) -> list[str]:
    """Human-readable lines of the new metrics with their CIs (what ``npo-tofu eval`` prints)."""
    ci = summary.get("ci", {})

    def f(k, fmt=".3g"):
        c = ci[k]
        return f"{c['estimate']:{fmt}} [{c['lo']:{fmt}}, {c['hi']:{fmt}}]"

    lines = []
    if "forget_quality" in ci:
        g = lambda v: "none" if v is None else format(v, ".3g")  # noqa: E731
        lat = (f"; {summary['fq_attainable_values']} attainable values, next above {g(summary['fq_next_above'])}, "
               f"next below {g(summary['fq_next_below'])}" if summary.get("fq_attainable_values") else "")
        lines.append(f"FQ {f('forget_quality')}{lat}")
    lines.append(f"MU {f('model_utility', '.4f')}")
    lines.append(f"exact memorization {f('exact_memorization')}  extraction strength {f('extraction_strength')}")
    aucs = [f"{k[8:]} {f(k)}" for k in ci if k.startswith("mia_auc_")]
    if aucs:
        lines.append("MIA AUC forget vs holdout: " + "  ".join(aucs))
    leaks = [f"{k[9:]} {f(k)}" for k in ci if k.startswith("privleak_")]
    if leaks:
        lines.append("privleak vs retain model: " + "  ".join(leaks))
    fl = f"fluency: repetition {f('fluency_repetition')}  distinct-{DISTINCT_N} {f(f'fluency_distinct_{DISTINCT_N}')}"
    if "fluency_judge_logp" in ci:
        fl += f"  judge log-lik/token {f('fluency_judge_logp')}"
    lines.append(fl)
    return lines
