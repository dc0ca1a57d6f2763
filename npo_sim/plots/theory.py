"""Figures for the Theorem-2 lab (``npo-sim theory``), drawn from the run directory's CSV/JSON only.

``make_all(run_dir, figures_dir)`` writes ``theory_divergence.png``, ``theory_logit_shifts.png``,
``theory_steps_to_reach.png`` and ``theory_beta_sweep.png`` into ``run_dir`` (and copies them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..runio import save_figure
from . import color, label, new_figure

FIGURES = ("theory_divergence.png", "theory_logit_shifts.png", "theory_steps_to_reach.png",
           "theory_beta_sweep.png")


def load(run_dir) -> dict:
    d = Path(run_dir)
    return {"traj": pd.read_csv(d / "trajectories.csv"), "shifts": pd.read_csv(d / "logit_shifts.csv"),
            "fits": pd.read_csv(d / "fits.csv"), "overlays": pd.read_csv(d / "overlays.csv"),
            "summary": json.loads((d / "summary.json").read_text())}


def _base_rows(fits: pd.DataFrame, cfg: dict, method: str) -> pd.DataFrame:
    return fits[(fits.role == "grid") & (fits.method == method) & np.isclose(fits.eta, cfg["base_eta"])
                & (fits.n_f == cfg["base_n_f"]) & (fits.d == cfg["base_d"]) & (fits.seed == 0)]


def _curve(df: pd.DataFrame, cid: int, col: str):
    g = df[df.config_id == cid].sort_values("step")
    return g["step"].to_numpy(float), g[col].to_numpy(float)


def _overlay(ov: pd.DataFrame, curve: str, cid: int, sample: int = -1):
    g = ov[(ov.curve == curve) & (ov.config_id == cid) & (ov["sample"] == sample)].sort_values("step")
    return g["step"].to_numpy(float), g["value"].to_numpy(float)


def divergence(res: dict):
    """‖θ_t − θ_init‖_{XᵀX} vs t, linear and log axes, with the decoupled exact-flow prediction."""
    fits, traj, ov, cfg = res["fits"], res["traj"], res["overlays"], res["summary"]["config"]
    fig, axes = new_figure(2)
    ga = _base_rows(fits, cfg, "ga")
    npo = _base_rows(fits, cfg, "npo")
    npo = npo[npo.beta.isin(cfg["betas"])].sort_values("beta")
    for ax, logx in zip(axes[0], (False, True)):
        lo = 1 if logx else 0
        for _, r in ga.iterrows():
            t, v = _curve(traj, r.config_id, "dist_xtx")
            ax.plot(t[t >= lo], v[t >= lo], color=color("ga"), lw=2, label=label("ga"))
        for k, (_, r) in enumerate(npo.iterrows()):
            t, v = _curve(traj, r.config_id, "dist_xtx")
            ax.plot(t[t >= lo], v[t >= lo], color=color("npo"), lw=2, alpha=0.4 + 0.3 * k,
                    label=f"{label('npo')} β={r.beta:g}")
        for cid in list(ga.config_id) + list(npo.config_id):
            t, v = _overlay(ov, "flow_distance", int(cid))
            if len(t):
                t, v = t[t >= lo], v[t >= lo]
                ax.plot(t, v, "k--", lw=0.9, label="exact flow (decoupled)" if cid == ga.config_id.iloc[0] else None)
        ax.set_xlabel("step t" + (" (log)" if logx else ""))
        ax.set_ylabel(r"$\|\theta_t-\theta_{init}\|_{X^TX}$")
        if logx:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title("log–log: GA slope 1, NPO flattens")
        else:
            ax.set_title(f"n_f={cfg['base_n_f']}, η={cfg['base_eta']}: GA linear, NPO logarithmic")
    axes[0][0].legend(fontsize=7)
    return fig


def logit_shifts(res: dict):
    """Per-sample |b_i(t)| under GA and NPO with their Lemma-3/4 envelopes, and NPO's implied C(t)."""
    fits, sh, ov, s = res["fits"], res["shifts"], res["overlays"], res["summary"]
    cfg = s["config"]
    fig, axes = new_figure(3)
    ga = _base_rows(fits, cfg, "ga")
    npo = _base_rows(fits, cfg, "npo")
    npo = npo[np.isclose(npo.beta, cfg["base_beta"])]
    for ax, rows, method in ((axes[0][0], ga, "ga"), (axes[0][1], npo, "npo")):
        if rows.empty:
            continue
        cid = int(rows.config_id.iloc[0])
        g = sh[(sh.config_id == cid) & (sh.step > 0)]
        for i, gi in g.groupby("sample"):
            ax.plot(gi.step, -gi["shift"], color=color(method), lw=0.7, alpha=0.6,
                    label=f"{label(method)} |b_i(t)|" if i == 0 else None)
            t, v = _overlay(ov, "flow_shift", cid, int(i))
            ax.plot(t[t > 0], -v[t > 0], "k:", lw=0.6, label="exact flow per sample" if i == 0 else None)
        lo_name, hi_name = ("ga_linear_lo", "ga_linear_hi") if method == "ga" else ("npo_envelope_lo", "npo_envelope_hi")
        t, lo = _overlay(ov, lo_name, cid)
        _, hi = _overlay(ov, hi_name, cid)
        keep = t > 0
        if method == "ga":
            ax.plot(t[keep], lo[keep], "g--", lw=1.2, label=r"$c_{min}\eta_0 t$, $c_{max}\eta_0 t$")
            ax.plot(t[keep], hi[keep], "g--", lw=1.2)
            ax.set_yscale("log")
            ax.set_title("GA: |b_i| ≍ η0·t (Lemma 3)")
        else:
            e = s["envelope"]
            ax.fill_between(t[keep], lo[keep], hi[keep], color="g", alpha=0.15,
                            label=f"(1/β)log(C η0 t+1), C∈[{e['C_a']:.2g},{e['C_b']:.2g}]")
            ax.set_title(f"NPO β={cfg['base_beta']}: |b_i| logarithmic (Lemma 4)")
        ax.set_xscale("log")
        ax.set_xlabel("step t")
        ax.set_ylabel("|logit shift|")
        ax.legend(fontsize=6)
    ax = axes[0][2]
    if not npo.empty:
        cid = int(npo.config_id.iloc[0])
        row = npo.iloc[0]
        g = sh[(sh.config_id == cid) & (sh.step > 0)]
        for i, gi in g.groupby("sample"):
            C = np.expm1(row.beta * np.abs(gi["shift"].to_numpy())) / (row.eta0 * gi.step.to_numpy())
            ax.plot(gi.step, C, color=color("npo"), lw=0.7, alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step t")
        ax.set_ylabel(r"$C(t)=(e^{\beta|b|}-1)/(\eta_0 t)$")
        ax.set_title("implied envelope constant stays bounded")
    return fig


def steps_to_reach(res: dict):
    """Steps for the RMS logit shift to reach R: linear in R for GA, exponential for NPO."""
    st = res["summary"].get("steps_to_reach")
    fig, axes = new_figure(1, width=5.0)
    ax = axes[0][0]
    if st:
        tab = pd.DataFrame(st["table"])
        R = tab.R.to_numpy()
        T = res["summary"]["config"]["steps"]
        for method in ("ga", "npo"):
            # JSON stores an overflowed exponential as "inf": float() reads it back; clip for display
            th = np.minimum([[float(v) for v in pair] for pair in tab[f"{method}_theory"]], 1e6 * T)
            ax.fill_between(R, th[:, 0], th[:, 1], color=color(method), alpha=0.15,
                            label=f"{label(method)} theory band")
            meas = tab[f"{method}_steps"].astype(float)
            ax.plot(R, meas, "o-", color=color(method), label=f"{label(method)} measured")
        ax.axhline(T, color="k", lw=0.8, ls=":", label="T (horizon)")
        ax.set_yscale("log")
        ax.set_ylim(1, 1e6 * T)
        ax.set_xscale("log", base=2)
    ax.set_xlabel("R (RMS logit shift)")
    ax.set_ylabel("steps to reach R")
    ax.set_title("NPO is exponentially slower to diverge")
    ax.legend(fontsize=7)
    return fig


def beta_sweep(res: dict):
    """NPO trajectories over β (→ GA as β → 0, Prop. 1) and the log-slope's 1/β scaling."""
    fits, traj, s = res["fits"], res["traj"], res["summary"]
    cfg = s["config"]
    fig, axes = new_figure(2)
    ax = axes[0][0]
    ga = _base_rows(fits, cfg, "ga")
    for _, r in ga.iterrows():
        t, v = _curve(traj, r.config_id, "dist_xtx")
        ax.plot(t[t > 0], v[t > 0], color=color("ga"), lw=2.5, label=label("ga"))
    npo = _base_rows(fits, cfg, "npo").sort_values("beta")
    cmap = __import__("matplotlib").colormaps["viridis"]
    for k, (_, r) in enumerate(npo.iterrows()):
        t, v = _curve(traj, r.config_id, "dist_xtx")
        ax.plot(t[t > 0], v[t > 0], color=cmap(k / max(1, len(npo) - 1)), lw=1.2, label=f"NPO β={r.beta:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel(r"$\|\theta_t-\theta_{init}\|_{X^TX}$")
    ax.set_title("β → 0: NPO → GA (Prop. 1)")
    ax.legend(fontsize=6)
    ax = axes[0][1]
    sw = pd.DataFrame(s["beta_sweep"])
    if not sw.empty:
        ok = sw.in_log_regime.astype(bool)
        ax.plot(sw.beta[ok], sw.log_slope[ok], "o", color=color("npo"), label="fitted log-slope (log regime)")
        ax.plot(sw.beta[~ok], sw.log_slope[~ok], "x", color="gray", label="not yet in log regime at T")
        b = np.logspace(np.log10(sw.beta.min()), np.log10(sw.beta.max()), 50)
        ax.plot(b, np.sqrt(cfg["base_n_f"]) / b, "k--", lw=1, label=r"$\sqrt{n_f}/\beta$")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("β")
    ax.set_ylabel("dD / d log t")
    ax.set_title("NPO log-slope ∝ 1/β")
    ax.legend(fontsize=7)
    return fig


def make_all(run_dir, figures_dir=None) -> list[Path]:
    res = load(run_dir)
    out = []
    for name, fn in zip(FIGURES, (divergence, logit_shifts, steps_to_reach, beta_sweep)):
        out.append(save_figure(fn(res), Path(run_dir) / name, copy_to=figures_dir))
    return out
