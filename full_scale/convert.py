"""Eval-output layouts: TOFU's ``eval_log_aggregated.json`` and open-unlearning's ``TOFU_EVAL.json`` /
``TOFU_SUMMARY.json``, converted both ways (``npo-tofu convert``).

open-unlearning stores one entry per metric, ``{"agg_value": x, "value_by_index": {"0": {...}, ...}}``,
named ``<set>_<metric>`` with the sets ``forget``, ``retain``, ``ra`` (real authors) and ``wf`` (world
facts) (its ``configs/eval/tofu_metrics/*.yaml``), and ``TOFU_SUMMARY.json`` holds the ``agg_value`` of
each. This module writes and reads the per-sample quantities TOFU's metrics are built from:

* ``<set>_Q_A_Prob``: ``{"prob": e^{−avg_gt_loss}, "avg_loss": avg_gt_loss}``;
* ``<set>_Q_A_PARA_Prob`` / ``<set>_Q_A_PERT_Prob``: the same for the paraphrased answer and (lists) the
  perturbed answers;
* ``<set>_Q_A_ROUGE``: ``{"rougeL_recall": r}`` (plus ``generation``/``ground_truth`` when the log has them);
* ``<set>_truth_ratio``: ``{"score": R}`` with ``R = mean_j p_pert,j / p_para`` (the ratio open-unlearning's
  truth-ratio metric aggregates; its ``agg_value`` here is this project's statistic of the log's dialect);
* ``forget_quality`` and ``model_utility`` as single ``agg_value`` entries, when known.

Reading gives back a TOFU-layout log (``avg_gt_loss``, ``avg_paraphrased_loss``, ``average_perturb_loss``,
``rougeL_recall`` per set), which :func:`full_scale.aggregate.aggregate` reads like any other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from npo_sim.runio import UserError, write_json

from .aggregate import DIALECT_KEY, TASKS, aggregate, task_log

#: TOFU eval file -> open-unlearning's set prefix
OU_SETS = {"eval_log_forget.json": "forget", "eval_log.json": "retain", "eval_real_author_wo_options.json": "ra",
           "eval_real_world_wo_options.json": "wf"}
EVAL_FILE, SUMMARY_FILE, TOFU_FILE = "TOFU_EVAL.json", "TOFU_SUMMARY.json", "eval_log_aggregated.json"


def _entry(values: dict) -> dict:
    return {"agg_value": None, "value_by_index": values}


def to_open_unlearning(log: dict, retain_log: dict | None = None) -> tuple[dict, dict]:
    """``(TOFU_EVAL, TOFU_SUMMARY)`` dicts from a TOFU-layout log (and the retain log, for FQ)."""
    stats = aggregate(log, retain_log)
    out: dict = {}
    for key, prefix in OU_SETS.items():
        t = task_log(log, key)
        n = t.n
        gen = log[key].get("generated_text")
        rouge = {str(i): {"rougeL_recall": float(t.rouge[i])} for i in range(n)}
        if isinstance(gen, dict):
            for i, triple in sorted(gen.items(), key=lambda kv: int(kv[0]))[:n]:
                if isinstance(triple, list) and len(triple) == 3:
                    rouge[str(int(i))].update(input=triple[0], generation=triple[1], ground_truth=triple[2])
        ratio = np.exp(np.log(np.mean(np.exp(-t.perturb), axis=1)) + t.para)      # mean p_pert / p_para
        entries = {
            "Q_A_Prob": {str(i): {"prob": math.exp(-t.gt[i]), "avg_loss": float(t.gt[i])} for i in range(n)},
            "Q_A_PARA_Prob": {str(i): {"prob": math.exp(-t.para[i]), "avg_loss": float(t.para[i])} for i in range(n)},
            "Q_A_PERT_Prob": {str(i): {"prob": [math.exp(-v) for v in t.perturb[i]],
                                       "avg_loss": [float(v) for v in t.perturb[i]]} for i in range(n)},
            "Q_A_ROUGE": rouge,
            "truth_ratio": {str(i): {"score": float(ratio[i])} for i in range(n)},
        }
        short = TASKS[key]
        aggs = {"Q_A_Prob": stats.get(f"{short}_prob"), "Q_A_ROUGE": stats.get(f"{short}_rouge"),
                "truth_ratio": stats.get(f"{short}_truth_ratio"),
                "Q_A_PARA_Prob": float(np.mean(np.exp(-t.para))),
                "Q_A_PERT_Prob": float(np.mean(np.exp(-t.perturb)))}
        for name, values in entries.items():
            e = _entry(values)
            e["agg_value"] = aggs[name]
            out[f"{prefix}_{name}"] = e
    out["model_utility"] = {"agg_value": stats["model_utility"]}
    if "forget_quality" in stats:
        out["forget_quality"] = {"agg_value": stats["forget_quality"]}
    if log.get(DIALECT_KEY):
        out[DIALECT_KEY] = log[DIALECT_KEY]
    summary = {k: v["agg_value"] for k, v in out.items() if isinstance(v, dict) and "agg_value" in v}
    return out, summary


def from_open_unlearning(ou: dict, where: str = "TOFU_EVAL.json") -> dict:
    """A TOFU-layout log (``{index: value}`` per-sample dicts) from an open-unlearning ``TOFU_EVAL`` dict."""
    log: dict = {}

    def vals(prefix: str, name: str, field: str, key: str) -> dict:
        k = f"{prefix}_{name}"
        if k not in ou or "value_by_index" not in ou[k]:
            raise UserError(f"{where}: missing {k}.value_by_index (needed for {key})")
        try:
            return {str(int(i)): v[field] for i, v in ou[k]["value_by_index"].items()}
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}: {k}.value_by_index entries need {field!r}") from None

    for key, prefix in OU_SETS.items():
        log[key] = {"avg_gt_loss": vals(prefix, "Q_A_Prob", "avg_loss", key),
                    "avg_paraphrased_loss": vals(prefix, "Q_A_PARA_Prob", "avg_loss", key),
                    "average_perturb_loss": vals(prefix, "Q_A_PERT_Prob", "avg_loss", key),
                    "rougeL_recall": vals(prefix, "Q_A_ROUGE", "rougeL_recall", key)}
    if ou.get(DIALECT_KEY):
        log[DIALECT_KEY] = ou[DIALECT_KEY]
    return log


def _read(path: Path) -> dict:
    if path.is_dir():
        for name in (TOFU_FILE, EVAL_FILE):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise UserError(f"{path}: holds neither {TOFU_FILE} nor {EVAL_FILE}")
    if not path.is_file():
        raise UserError(f"not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def layout_of(data: dict) -> str:
    """``"tofu"`` (eval_log_aggregated.json) or ``"open-unlearning"`` (TOFU_EVAL.json)."""
    if any(k in data for k in TASKS):
        return "tofu"
    if any(isinstance(v, dict) and "value_by_index" in v for v in data.values()):
        return "open-unlearning"
    raise UserError("neither a TOFU eval_log_aggregated.json nor an open-unlearning TOFU_EVAL.json")


def convert(src, to: str, out, retain_log=None) -> list[Path]:
    """Convert the eval output at ``src`` into layout ``to`` under directory ``out``; returns the files written."""
    data = _read(Path(src))
    have = layout_of(data)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if to == "open-unlearning":
        log = data if have == "tofu" else from_open_unlearning(data)
        retain = None if retain_log is None else _read(Path(retain_log))
        if retain is not None and layout_of(retain) == "open-unlearning":
            retain = from_open_unlearning(retain, str(retain_log))
        ev, summary = to_open_unlearning(log, retain)
        write_json(out / EVAL_FILE, ev)
        write_json(out / SUMMARY_FILE, summary)
        return [out / EVAL_FILE, out / SUMMARY_FILE]
    if to == "tofu":
        log = data if have == "tofu" else from_open_unlearning(data, str(src))
        write_json(out / TOFU_FILE, log)
        return [out / TOFU_FILE]
    raise UserError(f"--to must be tofu or open-unlearning, got {to!r}")
