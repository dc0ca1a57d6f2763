"""How much do conventions move the numbers? The same study under several dialects, side by side.

:func:`compare` reads the ``summary.json`` of one tofu-mini study per dialect (``npo-tofu study
--dialect NAME``, or its ``report/`` directory) and returns, per split and method, each dialect's
last-epoch FQ and MU and how far they move from the first dialect's: ``|Δ log10 FQ|`` (FQ is a
p-value spread over decades) and ``|Δ MU|``. ``npo-tofu compare-dialects`` writes it as
``dialects.csv`` and ``dialects.md``; ``figures/REPORT.md`` shows the markdown when it is in
``figures/tofu_mini/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from npo_sim.losses import label
from npo_sim.runio import UserError, write_csv, write_text

FILE_MD, FILE_CSV = "dialects.md", "dialects.csv"


def _summary(path) -> dict:
    p = Path(path)
    for cand in (p, p / "summary.json", p / "report" / "summary.json"):
        if cand.is_file():
            try:
                return json.loads(cand.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"{cand}: not valid JSON ({exc})") from None
    raise UserError(f"no study summary.json at {p} (or {p}/report)")


def _rows(summary: dict) -> dict[tuple[str, str], tuple[float, float]]:
    out = {(r["split"], "target"): (t.get("forget_quality"), t.get("model_utility"))
           for r in summary.get("best_fq", []) for t in [summary["targets"].get(r["split"], {})]}
    for r in summary.get("best_fq", []):
        out[(r["split"], r["method"])] = (r.get("fq_last"), r.get("mu_last"))
    return out


def _log10(x) -> float:
    return math.log10(x) if x is not None and x > 0 else math.nan


def compare(studies: dict[str, str | Path], complete_only: bool = True) -> pd.DataFrame:
    """``{dialect: study dir or summary.json}`` -> one row per (split, method) the first dialect has
    (``complete_only``: only those every dialect measured)."""
    if len(studies) < 2:
        raise UserError("compare-dialects needs at least two studies (NAME=DIR)")
    tables = {d: _rows(_summary(p)) for d, p in studies.items()}
    names = list(tables)
    base = tables[names[0]]
    rows = []
    for key, (fq0, mu0) in base.items():
        row = {"split": key[0], "method": key[1]}
        dfq, dmu = [], []
        for d in names:
            fq, mu = tables[d].get(key, (None, None))
            row[f"fq_{d}"], row[f"mu_{d}"] = fq, mu
            if d != names[0] and fq is not None and mu is not None:
                dfq.append(abs(_log10(fq) - _log10(fq0)))
                dmu.append(abs(mu - mu0))
        row["max_abs_dlog10_fq"] = max(dfq) if dfq else math.nan
        row["max_abs_dmu"] = max(dmu) if dmu else math.nan
        if complete_only and len(dmu) < len(names) - 1:
            continue
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame, names: list[str]) -> str:
    head = ("| split | method | " + " | ".join(f"FQ {d}" for d in names) + " | "
            + " | ".join(f"MU {d}" for d in names) + " | max abs Δ log10 FQ | max abs Δ MU |")
    lines = [head, "|---" * (2 + 2 * len(names) + 2) + "|"]

    def f(v, fmt):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    for _, r in df.iterrows():
        name = "target (before unlearning)" if r["method"] == "target" else label(r["method"])
        lines.append(f"| {r['split']} | {name} | " + " | ".join(f(r[f'fq_{d}'], '.3g') for d in names) + " | "
                     + " | ".join(f(r[f'mu_{d}'], '.3f') for d in names)
                     + f" | {f(r['max_abs_dlog10_fq'], '.2f')} | {f(r['max_abs_dmu'], '.3f')} |")
    return "\n".join(lines)


def write(studies: dict[str, str | Path], out) -> pd.DataFrame:
    df = compare(studies)
    out = Path(out)
    write_csv(out / FILE_CSV, df)
    write_text(out / FILE_MD, markdown(df, list(studies)) + "\n")
    return df
