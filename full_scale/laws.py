"""The divergence law of every method on the LM: the study's SGD constant-lr runs next to its laws.

Theorem 2 (and its generalisation in :mod:`npo_sim.theory`) is stated for plain gradient steps at a
constant step size: a method whose gradient weight has tail ``W ~ c·p^a`` drives the parameters away
from θ_0 linearly in the step when ``a = 0`` (GA) and logarithmically when ``a > 0`` (NPO: ``a = β``);
a fixed target (UNDIAL) makes the shift converge. The registry holds each method's predicted law
(:attr:`npo_sim.losses.Objective.law`). ``npo-tofu study`` runs every method with plain SGD, a constant
lr and no weight decay (``law/``), and this module measures, from each run's ``train_log.csv``:

* ``growth_exponent``: the slope of ``log ‖θ_t−θ_0‖`` against ``log t`` over the second half of the
  run (``p`` in ``‖θ_t−θ_0‖ ∝ t^p``): 1 for linear growth, above 1 for faster, toward 0 for logarithmic
  growth (whose local exponent is ``1/log t``) and 0 for a converged shift;
* the R² of a line and of a log curve fitted to the whole run.

``follows`` applies the declared thresholds :data:`EXPONENT_RULE`: ``linear`` needs ``0.8 ≤ p ≤ 1.25``
(faster growth, as GA's explosive divergence under SGD, is not the linear law),
``log`` needs ``p < 0.5``, ``converges`` needs ``p < 0.1``. A method that does not move (``‖θ_t−θ_0‖``
stuck at 0, as a do-nothing method) gets no exponent and follows nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from npo_sim.losses import OBJECTIVES, color, label
from npo_sim.metrics import linear_fit, log_fit
from npo_sim.runio import save_figure

#: predicted law -> (test on the growth exponent p, its statement)
EXPONENT_RULE = {"linear": (lambda p: 0.8 <= p <= 1.25, "0.8 ≤ p ≤ 1.25"), "log": (lambda p: p < 0.5, "p < 0.5"),
                 "converges": (lambda p: p < 0.1, "p < 0.1")}
LAW_COLUMNS = ("method", "predicted", "tail", "steps", "final_distance", "growth_exponent", "r2_linear", "r2_log",
               "follows", "status")


def growth_exponent(step: np.ndarray, dist: np.ndarray) -> float:
    """Slope of log ‖θ_t−θ_0‖ vs log t over the second half of the steps (NaN if it does not move)."""
    half = step >= max(1.0, step.max() / 2)
    t, y = step[half], dist[half]
    if len(t) < 3 or not np.all(y > 0) or not np.all(np.isfinite(y)) or np.ptp(np.log(t)) == 0:
        return math.nan
    return float(linear_fit(np.log(t), np.log(y)).slope)


def law_row(method: str, log: pd.DataFrame | None, status: str) -> dict:
    o = OBJECTIVES[method]
    tail = o.tail
    row = {"method": method, "predicted": o.law, "tail": tail if isinstance(tail, str) else float(tail),
           "steps": 0, "final_distance": math.nan, "growth_exponent": math.nan, "r2_linear": math.nan,
           "r2_log": math.nan, "follows": None, "status": status}
    if log is None or log.empty:
        return row
    t, y = log["step"].to_numpy(float), log["param_dist"].to_numpy(float)
    p = growth_exponent(t, y)
    row.update(steps=int(t.max()), final_distance=float(y[-1]), growth_exponent=p)
    if len(t) >= 3 and np.all(np.isfinite(y)) and np.ptp(y) > 0:
        row.update(r2_linear=float(linear_fit(t, y).r2), r2_log=float(log_fit(t, y).r2))
    rule = EXPONENT_RULE.get(o.law)
    if rule is not None and math.isfinite(p):
        row["follows"] = bool(rule[0](p))
    return row


def load_law_runs(dirs) -> dict[str, tuple[pd.DataFrame | None, str]]:
    """method -> (its train_log, status) for the law run directories (``status``: finished, or why not)."""
    out = {}
    for d in map(Path, dirs):
        cfg_path = d / "config.json"
        if not cfg_path.is_file():
            continue
        method = json.loads(cfg_path.read_text())["method"]
        log_path = d / "train_log.csv"
        if (d / "run.json").is_file() and log_path.is_file():
            out[method] = (pd.read_csv(log_path), "finished")
        else:
            out[method] = (pd.read_csv(log_path) if log_path.is_file() else None,
                           "stopped (see the stage log: a non-finite loss stops a run)")
    return out


def law_table(runs: dict[str, tuple[pd.DataFrame | None, str]]) -> pd.DataFrame:
    rows = [law_row(m, *runs[m]) for m in OBJECTIVES if m in runs]
    return pd.DataFrame(rows, columns=list(LAW_COLUMNS))


def law_markdown(df: pd.DataFrame, settings: dict) -> str:
    fmt = lambda v, f: "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, f)  # noqa: E731
    lines = ["| method | tail a | predicted | steps | final ‖θ−θ_0‖ | growth exponent p | R² line / log | follows |",
             "|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        tail = r.tail if isinstance(r.tail, str) else f"{r.tail:g}"
        follows = "—" if r.follows is None or r.follows != r.follows else ("yes" if r.follows else "no")
        lines.append(f"| {label(r.method)} | {tail} | {r.predicted} | {r.steps} | {fmt(r.final_distance, '.3g')} | "
                     f"{fmt(r.growth_exponent, '.2f')} | {fmt(r.r2_linear, '.3f')} / {fmt(r.r2_log, '.3f')} | "
                     f"{follows}{'' if r.status == 'finished' else ' (' + r.status + ')'} |")
    rules = "; ".join(f"{law}: {text}" for law, (_, text) in EXPONENT_RULE.items())
    s = settings or {}
    return ("\n".join(lines) + f"\n\nPlain SGD at a constant lr {s.get('lr', '?')}, no weight decay, "
            f"{s.get('epochs', '?')} epochs on {s.get('split', '?')}; p is the log-log slope of ‖θ_t−θ_0‖ over the "
            f"second half of the run. Declared rules: {rules}. — : no law (n/a) or the run did not move.\n")


def plot_laws(law_runs: dict, practice: dict[str, pd.DataFrame], out_path) -> None:
    """One small panel per method: ‖θ_t−θ_0‖ of the SGD law run (solid) and of the AdamW practice run on
    the same split (dashed), titled with the predicted law and the measured exponent."""
    from npo_sim.plots import new_figure

    names = [m for m in OBJECTIVES if m in law_runs or m in practice]
    if not names:
        return
    ncols = min(7, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = new_figure(ncols=ncols, nrows=nrows, width=2.4, height=2.0)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, m in zip(axes.flat, names):
        log, _ = law_runs.get(m, (None, ""))
        p = math.nan
        if log is not None and not log.empty:
            ax.plot(log["step"], log["param_dist"], color=color(m), lw=1.4, label="SGD, constant lr")
            p = growth_exponent(log["step"].to_numpy(float), log["param_dist"].to_numpy(float))
        if m in practice:
            g = practice[m]
            ax.plot(g["step"], g["param_distance"], color=color(m), lw=1.0, ls="--", label="AdamW (practice)")
        ax.set_title(f"{label(m)}: {OBJECTIVES[m].law}" + (f", p={p:.2f}" if math.isfinite(p) else ""), fontsize=7)
        ax.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=5)
    fig.supxlabel("step", fontsize=8)
    fig.supylabel("‖θ_t − θ_0‖", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_path)
