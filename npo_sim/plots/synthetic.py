"""Figures for the §4 mixture experiment, drawn from its ``curves`` table.

* ``synthetic_tradeoff_alpha{α}.png`` — forget distance vs retain distance along each method's
  trajectory (the paper's Figure-3 style): seed-mean curve, thin per-seed curves, start marked.
* ``synthetic_distances_alpha{α}.png`` — forget distance, retain distance and ‖θ − θ_retr‖ vs step,
  seed geometric mean with a ×/÷ 1 geometric-std band (log axes).

:func:`figures` is the study's figure hook: it returns both, keyed by file name, for
:func:`npo_sim.study.run_study` to save.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import color, label, new_figure

_FLOOR = 1e-6   # log axes: distances are clipped here for display only


def _methods(curves: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(curves["method"]))


def draw_tradeoff(ax, curves: pd.DataFrame, alpha: float, threshold: float | None = None) -> None:
    for m in _methods(curves):
        c = curves[curves["method"] == m]
        for _, g in c.groupby("seed"):
            ax.plot(g["forget_distance"].clip(lower=_FLOOR), g["retain_distance"].clip(lower=_FLOOR),
                    color=color(m), lw=0.5, alpha=0.25)
        mean = c.groupby("step")[["forget_distance", "retain_distance"]].mean()
        ax.plot(mean["forget_distance"].clip(lower=_FLOOR), mean["retain_distance"].clip(lower=_FLOOR),
                color=color(m), lw=1.6, label=label(m))
    start = curves[curves["step"] == curves["step"].min()][["forget_distance", "retain_distance"]].mean()
    ax.plot([start["forget_distance"]], [start["retain_distance"]], "k*", ms=9, label="start (π_ref)", zorder=5)
    if threshold is not None:
        ax.axvline(threshold, color="k", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()   # time runs left to right: forgetting decreases the forget distance
    ax.set_xlabel("forget distance  E KL(π_retr ‖ π_θ) on forget")
    ax.set_ylabel("retain distance  E KL(π_retr ‖ π_θ) on retain")
    ax.set_title(f"trade-off, α = {alpha:g}")


def draw_vs_step(axes, curves: pd.DataFrame, threshold: float | None = None) -> None:
    """Seed geometric mean with a ×/÷ geometric-std band (log axes: distances span decades across seeds)."""
    panels = [("forget_distance", "forget distance"), ("retain_distance", "retain distance"),
              ("param_distance", "‖θ − θ_retr‖")]
    for ax, (col, title) in zip(axes, panels):
        for m in _methods(curves):
            logs = np.log(curves.loc[curves["method"] == m, ["step", col]].set_index("step")[col].clip(lower=_FLOOR))
            g = logs.groupby(level=0)
            mean, std = g.mean(), g.std(ddof=1).fillna(0.0)
            ax.plot(mean.index, np.exp(mean), color=color(m), lw=1.4, label=label(m))
            ax.fill_between(mean.index, np.exp(mean - std), np.exp(mean + std), color=color(m), alpha=0.15, lw=0)
        ax.set_yscale("log")
        if threshold is not None and col == "forget_distance":
            ax.axhline(threshold, color="k", ls=":", lw=0.8)
        ax.set_xlabel("unlearning step")
        ax.set_title(title)


def tradeoff_figure(curves: pd.DataFrame, alpha: float, threshold: float):
    """One panel: the trade-off curves of every method."""
    fig, axes = new_figure(1, 1, width=5.2, height=4.2)
    draw_tradeoff(axes[0, 0], curves, alpha, threshold)
    axes[0, 0].legend(fontsize=7, ncol=2)
    return fig


def distances_figure(curves: pd.DataFrame, alpha: float, threshold: float, seeds: int, pretrain: str,
                     compared: bool = False):
    """Three panels: forget distance, retain distance and ‖θ − θ_retr‖ against the step; the title says
    whether the other pretraining recipe was also run for comparison."""
    fig, axes = new_figure(3, 1, width=4.0, height=3.2)
    draw_vs_step(axes[0], curves, threshold)
    axes[0, 0].legend(fontsize=7, ncol=2)
    note = "compared with the other recipe" if compared else "no pretraining comparison run"
    fig.suptitle(f"§4 mixture, α = {alpha:g}: geometric mean ×/÷ geometric std over {seeds} seeds "
                 f"({pretrain} pretraining; {note})", fontsize=9)
    return fig


def figures(results, cfg) -> dict:
    """Both figures of one run (``results.tables["curves"]``), keyed by file name."""
    curves, tag = results.tables["curves"], f"alpha{cfg.alpha:g}"
    return {f"synthetic_tradeoff_{tag}.png": tradeoff_figure(curves, cfg.alpha, cfg.threshold),
            f"synthetic_distances_{tag}.png": distances_figure(curves, cfg.alpha, cfg.threshold, cfg.seeds,
                                                               cfg.pretrain, cfg.compare_pretrain)}


__all__ = ["figures", "tradeoff_figure", "distances_figure", "draw_tradeoff", "draw_vs_step"]
