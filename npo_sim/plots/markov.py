"""Markov-setting figures, drawn from the study's results: the ``curves`` table and the summary.

``PLOTS[preset](curves, summary) -> Figure``. ``curves`` is ``Results.tables["curves"]`` (or the saved
``curves.csv``), ``summary`` is ``Results.summary`` (or the loaded ``summary.json``: only plain keys are
read from it, so either works). Labels and colours come from the method registry.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import color, label, new_figure


def _cfg(summary: dict, key: str):
    cfg = summary["config"]
    return cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)


def _x(df: pd.DataFrame) -> np.ndarray:
    return np.maximum(df.step.to_numpy(float), 0.8)  # step 0 drawn just left of step 1 on the log axis


def divergence(curves: pd.DataFrame, summary: dict):
    """One row per method: ‖θ_t−θ_0‖ and forget NLL vs t (log x-axis), with linear and log fits overlaid."""
    fits = summary["findings"]["fits"]
    methods = [m for m in dict.fromkeys(curves.method) if m in fits]  # a run that diverged at once has no fit
    fig, axes = new_figure(ncols=2, nrows=len(methods), height=2.8)
    for i, m in enumerate(methods):
        df = curves[(curves.method == m) & np.isfinite(curves.param_dist)]
        t = np.geomspace(max(1, df.step[df.step > 0].min()), df.step.max(), 200)
        for j, (q, col, ylab) in enumerate((("norm", "param_dist", "‖θ_t − θ_0‖"),
                                            ("forget_nll", "logp_forget", "forget NLL"))):
            ax = axes[i, j]
            y = df[col].to_numpy(float) * (-1 if q == "forget_nll" else 1)
            ax.plot(_x(df), y, "o", ms=3, color=color(m), label=label(m))
            for kind, ls, ft in (("linear", "-", t), ("log", "--", np.log(t + 1.0))):
                f = fits[m][f"{q}_{kind}"]
                ax.plot(t, f["slope"] * ft + f["intercept"], ls, lw=1.0, color="#444444",
                        label=f"{kind} fit, R²={f['r2']:.3f}")
            ax.set_xscale("log")
            ax.set_xlabel("step t")
            ax.set_ylabel(ylab)
            ax.legend(fontsize=6)
    fig.suptitle(f"Markov divergence law ({_cfg(summary, 'model')}): GA linear vs NPO logarithmic? "
                 f"(fits from step {summary['findings']['fit_range'][0]})", fontsize=9)
    fig.tight_layout()
    return fig


def balance(curves: pd.DataFrame, summary: dict):
    """Next-state KL to the oracle on Forget1 / Forget2 test prefixes, and KL to the true retain chain, vs t."""
    fig, axes = new_figure(ncols=3, width=3.6)
    L1, L2 = _cfg(summary, "length"), _cfg(summary, "forget2_length")
    panels = (("kl_forget1_oracle", f"Forget1 (L={L1}): KL(oracle ‖ model)"),
              ("kl_forget2_oracle", f"Forget2 (L={L2}): KL(oracle ‖ model)"),
              ("kl_retain_true", "retain: KL(true chain ‖ model)"))
    ref = summary["reference"]["target"]
    for ax, (col, title) in zip(axes[0], panels):
        for m, df in curves.groupby("method", sort=False):
            ax.plot(_x(df), df[col], "-", lw=1.2, color=color(m), label=label(m))
        ax.axhline(ref[col], color="#999999", lw=0.8, ls=":", label="target (t=0)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step t")
        ax.set_title(title, fontsize=8)
    axes[0, 0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"Markov {_cfg(summary, 'preset')} preset ({_cfg(summary, 'model')})", fontsize=9)
    return fig


PLOTS = {"divergence": divergence, "length": balance, "memorization": balance}
