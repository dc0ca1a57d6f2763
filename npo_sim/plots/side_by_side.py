"""Theory and experiment side by side: ‖θ_t − θ_0‖ and the forget log-likelihood vs step, GA and NPO.

Three columns (the logistic lab, the Markov divergence preset, the LM of the tofu-mini study), two
rows (parameter distance, forget log-likelihood). Over each GA curve a linear fit and over each NPO
curve a log fit (``npo_sim.metrics.linear_fit`` / ``log_fit``) are drawn, with R² in the legend:
Theorem 2 says GA diverges linearly in t and NPO only logarithmically.

Inputs are the result tables (DataFrames or CSV paths), each may be ``None`` (the panel says so):

* ``theory_traj``: ``npo_sim.settings.logistic`` ``trajectories.csv`` (``role, config_id, method, step,
  dist_l2, forget_prob``); the ``flow`` configuration of each method is used (the first config
  otherwise). Its forget log-likelihood is ``log(mean forget probability)``.
* ``markov_curves``: ``npo_sim.settings.markov`` ``curves.csv`` (``model, method, step, param_dist,
  logp_forget``); the first model.
* ``lm_curves``: the study's ``lm_curves.csv`` (``split, method, step, param_distance,
  forget_logp_sum, forget_logp_token``); the split with the most steps unless ``lm_split`` is given.
  Its forget log-likelihood is the per-token answer log-likelihood of the step's forget batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..losses import OBJECTIVES
from . import color, label, new_figure

#: the figure compares Theorem 2's two methods
METHODS = ("ga", "npo")
#: the law each method's curve is fitted with: a β-weighted ascent diverges like log t, plain GA linearly
FIT_OF = {m: "log" if OBJECTIVES[m].uses_beta else "linear" for m in METHODS}


def _frame(x) -> pd.DataFrame | None:
    if x is None:
        return None
    if isinstance(x, pd.DataFrame):
        return x
    p = Path(x)
    return pd.read_csv(p) if p.is_file() else None


def theory_series(traj: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """method -> (step, dist, loglik) from a logistic-lab trajectories table."""
    out = {}
    for m in METHODS:
        d = traj[traj["method"] == m]
        if d.empty:
            continue
        if "role" in d and (d["role"] == "flow").any():
            d = d[d["role"] == "flow"]
        d = d[d["config_id"] == d["config_id"].iloc[0]].sort_values("step")
        out[m] = pd.DataFrame({"step": d["step"].to_numpy(float), "dist": d["dist_l2"].to_numpy(float),
                               "loglik": np.log(d["forget_prob"].to_numpy(float))})
    return out


def markov_series(curves: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """method -> (step, dist, loglik) from a Markov curves table (first model)."""
    if "model" in curves:
        curves = curves[curves["model"] == curves["model"].iloc[0]]
    out = {}
    for m in METHODS:
        d = curves[curves["method"] == m]
        if d.empty:
            continue
        d = d.groupby("step", as_index=False)[["param_dist", "logp_forget"]].mean().sort_values("step")
        out[m] = pd.DataFrame({"step": d["step"].to_numpy(float), "dist": d["param_dist"].to_numpy(float),
                               "loglik": d["logp_forget"].to_numpy(float)})
    return out


def lm_series(lm: pd.DataFrame, split: str | None = None) -> tuple[dict[str, pd.DataFrame], str | None]:
    """(method -> (step, dist, loglik), split used) from lm_curves.csv."""
    lm = lm[lm["method"].isin(METHODS)]
    if lm.empty:
        return {}, None
    if split is None:
        split = lm.groupby("split")["step"].max().idxmax()
    lm = lm[lm["split"] == split]
    out = {}
    for m, d in lm.groupby("method"):
        d = d.sort_values("step")
        out[m] = pd.DataFrame({"step": d["step"].to_numpy(float), "dist": d["param_distance"].to_numpy(float),
                               "loglik": d["forget_logp_token"].to_numpy(float)})
    return out, split


def fit_series(method: str, t: np.ndarray, y: np.ndarray):
    """The divergence-law fit of ``method`` (GA linear, NPO log) over the finite points, or None."""
    from npo_sim.metrics import linear_fit, log_fit

    ok = np.isfinite(t) & np.isfinite(y) & (t >= 0)
    if ok.sum() < 3:
        return None
    return (linear_fit if FIT_OF[method] == "linear" else log_fit)(t[ok], y[ok])


def _predict(method: str, fit, t: np.ndarray) -> np.ndarray:
    x = t if FIT_OF[method] == "linear" else np.log(t + 1.0)
    return fit.slope * x + fit.intercept


def plot_side_by_side(theory_traj, markov_curves, lm_curves, out_path, figures_dir=None, lm_split: str | None = None):
    """Draw the 2 x 3 figure into ``out_path`` (copied into ``figures_dir`` when given).

    Returns ``{setting: {method: {"dist": fit dict, "loglik": fit dict}}}`` with the drawn fits.
    """
    from npo_sim.runio import save_figure

    th, mk, lm = _frame(theory_traj), _frame(markov_curves), _frame(lm_curves)
    lm_data, split = lm_series(lm, lm_split) if lm is not None else ({}, None)
    settings = [
        ("logistic lab", theory_series(th) if th is not None else {}, "log mean forget prob"),
        ("Markov (divergence preset)", markov_series(mk) if mk is not None else {}, "mean forget log-lik."),
        (f"LM tofu-mini ({split})" if split else "LM tofu-mini", lm_data, "forget log-lik. per token"),
    ]
    fig, axes = new_figure(ncols=3, nrows=2, width=4.3, height=3.2)
    fits: dict = {}
    for j, (title, series, ylab) in enumerate(settings):
        fits[title] = {}
        for i, (key, row_label) in enumerate((("dist", "‖θ_t − θ_0‖"), ("loglik", ylab))):
            ax = axes[i][j]
            if not series:
                ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes)
            handles = []
            for m, d in series.items():
                # GA on the left axis, NPO on a right axis of its own: their scales differ by orders of magnitude
                a = ax if m == "ga" or len(series) == 1 else ax.twinx()
                t, y = d["step"].to_numpy(), d[key].to_numpy()
                handles += a.plot(t, y, color=color(m), lw=1.6, label=label(m))
                fit = fit_series(m, t, y)
                if fit is not None:
                    tt = np.linspace(np.nanmin(t), np.nanmax(t), 200)
                    handles += a.plot(tt, _predict(m, fit, tt), color="k", ls="--", lw=0.9,
                                      label=f"{label(m)} {FIT_OF[m]} fit, R²={fit.r2:.3f}")
                    fits[title].setdefault(m, {})[key] = fit.as_dict()
                if a is not ax:
                    a.tick_params(axis="y", colors=color(m))
                    a.grid(False)
                else:
                    ax.tick_params(axis="y", colors=color(m)) if len(series) > 1 else None
            if i == 0:
                ax.set_title(title)
            else:
                ax.set_xlabel("step")
            ax.set_ylabel(row_label + (" (GA left, NPO right)" if len(series) > 1 else ""))
            if handles:
                ax.legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle("GA diverges linearly, NPO logarithmically: theory, Markov chains and an LM", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_path, copy_to=figures_dir)
    return fits
