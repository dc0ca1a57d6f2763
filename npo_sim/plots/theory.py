"""Figures for the loss-level claims and the Theorem-2 lab (``npo-sim theory``), drawn from result tables.

:func:`theory_figures` draws ``theory_divergence.png``, ``theory_logit_shifts.png``,
``theory_steps_to_reach.png`` and ``theory_beta_sweep.png`` from the lab's :class:`~npo_sim.study.Results`
(tables ``trajectories``, ``logit_shifts``, ``fits``, ``overlays`` and the summary);
:func:`core_figure` draws ``core_claims.png`` from the loss-level summary. Each returns figures; the
study runner saves them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps

from .. import theory
from ..losses import npo_weight
from ..study import Results
from . import color, label, new_figure


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


def _ga_envelope_panel(ax, ov: pd.DataFrame, cid: int, s: dict) -> None:
    t, lo = _overlay(ov, "ga_linear_lo", cid)
    _, hi = _overlay(ov, "ga_linear_hi", cid)
    keep = t > 0
    ax.plot(t[keep], lo[keep], "g--", lw=1.2, label=r"$c_{min}\eta_0 t$, $c_{max}\eta_0 t$")
    ax.plot(t[keep], hi[keep], "g--", lw=1.2)
    ax.set_yscale("log")
    ax.set_title("GA: |b_i| ≍ η0·t (Lemma 3)")


def _npo_envelope_panel(ax, ov: pd.DataFrame, cid: int, s: dict) -> None:
    t, lo = _overlay(ov, "npo_envelope_lo", cid)
    _, hi = _overlay(ov, "npo_envelope_hi", cid)
    keep, e = t > 0, s["envelope"]
    ax.fill_between(t[keep], lo[keep], hi[keep], color="g", alpha=0.15,
                    label=f"(1/β)log(C η0 t+1), C∈[{e['C_a']:.2g},{e['C_b']:.2g}]")
    ax.set_title(f"NPO β={s['config']['base_beta']}: |b_i| logarithmic (Lemma 4)")


#: the envelope each method's logit shifts are drawn against (Lemma 3 for GA, Lemma 4 for NPO)
_ENVELOPE_PANELS = {"ga": _ga_envelope_panel, "npo": _npo_envelope_panel}


def _shift_panel(ax, method: str, cid: int, sh: pd.DataFrame, ov: pd.DataFrame, s: dict) -> None:
    """Per-sample |b_i(t)| of one config with the exact per-sample flow and the method's envelope."""
    g = sh[(sh.config_id == cid) & (sh.step > 0)]
    for i, gi in g.groupby("sample"):
        ax.plot(gi.step, -gi["shift"], color=color(method), lw=0.7, alpha=0.6,
                label=f"{label(method)} |b_i(t)|" if i == 0 else None)
        t, v = _overlay(ov, "flow_shift", cid, int(i))
        ax.plot(t[t > 0], -v[t > 0], "k:", lw=0.6, label="exact flow per sample" if i == 0 else None)
    _ENVELOPE_PANELS[method](ax, ov, cid, s)
    ax.set_xscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("|logit shift|")
    ax.legend(fontsize=6)


def _implied_rate_panel(ax, row: pd.Series, sh: pd.DataFrame) -> None:
    """NPO's implied envelope constant C(t) = (e^{β|b_i|} − 1)/(η0 t), per sample."""
    g = sh[(sh.config_id == int(row.config_id)) & (sh.step > 0)]
    for _, gi in g.groupby("sample"):
        C = np.expm1(row.beta * np.abs(gi["shift"].to_numpy())) / (row.eta0 * gi.step.to_numpy())
        ax.plot(gi.step, C, color=color("npo"), lw=0.7, alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel(r"$C(t)=(e^{\beta|b|}-1)/(\eta_0 t)$")
    ax.set_title("implied envelope constant stays bounded")


def logit_shifts(res: dict):
    """Per-sample |b_i(t)| under GA and NPO with their Lemma-3/4 envelopes, and NPO's implied C(t)."""
    fits, sh, ov, s = res["fits"], res["shifts"], res["overlays"], res["summary"]
    cfg = s["config"]
    fig, axes = new_figure(3)
    ga = _base_rows(fits, cfg, "ga")
    npo = _base_rows(fits, cfg, "npo")
    npo = npo[np.isclose(npo.beta, cfg["base_beta"])]
    for ax, rows, method in ((axes[0][0], ga, "ga"), (axes[0][1], npo, "npo")):
        if not rows.empty:
            _shift_panel(ax, method, int(rows.config_id.iloc[0]), sh, ov, s)
    if not npo.empty:
        _implied_rate_panel(axes[0][2], npo.iloc[0], sh)
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
    cmap = colormaps["viridis"]
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


def laws(res: dict):
    """Every method's RMS logit shift ‖θ_t − θ_init‖_{XᵀX}/√n_f at the base point, with the law its weight's
    tail predicts (dashed): linear, (1/a)·log(1 + Kt) with K fitted, or the limit γ; one panel per law."""
    s, ov, fits = res["summary"], res["overlays"], res["fits"]
    kinds = [k for k in ("linear", "log", "converges") if any(e["law"] == k for e in s.get("laws", {}).values())]
    fig, axes = new_figure(max(1, len(kinds)))
    panels = dict(zip(kinds, axes[0]))
    for method, e in s.get("laws", {}).items():
        ax = panels[e["law"]]
        rows = _base_rows(fits, s["config"], method)
        cid = int((rows if e["beta"] is None else rows[np.isclose(rows.beta, e["beta"])]).config_id.iloc[0])
        t, v = _overlay(ov, "law_measured", cid)
        tp, vp = _overlay(ov, "law_predicted", cid)
        keep, keep_p = t >= 1, tp >= 1
        a = "" if e["tail"] is None else f", a={e['tail']:g}"
        ax.plot(t[keep], v[keep], color=color(method), lw=2, label=f"{label(method)}{a}")
        ax.plot(tp[keep_p], vp[keep_p], color=color(method), ls="--", lw=1)
    for kind, ax in panels.items():
        ax.set_xscale("log")
        if kind == "linear":
            ax.set_yscale("log")
        ax.set_xlabel("step t (log)")
        ax.set_ylabel(r"$\|\theta_t-\theta_{init}\|_{X^TX}/\sqrt{n_f}$")
        ax.set_title({"linear": "a = 0: linear (dashed: η0·RMS(AAᵀ1)·t)",
                      "log": "a > 0: (1/a)·log t (dashed: rate 1/a, K fitted)",
                      "converges": "fixed target: converges (dashed: limit)"}[kind], fontsize=9)
        ax.legend(fontsize=7)
    return fig


#: file name -> figure function, in the order the lab's figures are drawn
THEORY_FIGURES = {"theory_divergence.png": divergence, "theory_logit_shifts.png": logit_shifts,
                  "theory_steps_to_reach.png": steps_to_reach, "theory_beta_sweep.png": beta_sweep,
                  "theory_laws.png": laws}
FIGURES = tuple(THEORY_FIGURES)


def _trim_minor_ticks(fig) -> None:
    """Drop the unlabelled minor ticks of log axes that show at least two labelled major ticks.

    Laying out those ticks (and their mathtext labels) was a third of the time spent saving these
    figures; the curves, labels and major ticks are unchanged. An axis spanning less than a decade
    keeps its minor ticks, since they carry its only labels.
    """
    from matplotlib.ticker import NullLocator

    for ax in fig.axes:
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            if axis.get_scale() != "log":
                continue
            lo, hi = min(lo, hi), max(lo, hi)
            majors = [t for t in axis.get_major_locator()() if lo <= t <= hi]
            if len(majors) >= 2:
                axis.set_minor_locator(NullLocator())


def theory_figures(results: Results) -> dict:
    """``{file name: figure}`` for the Theorem-2 lab (each drawn once, when saved)."""
    res = {"traj": results.tables["trajectories"], "shifts": results.tables["logit_shifts"],
           "fits": results.tables["fits"], "overlays": results.tables["overlays"], "summary": results.summary}
    figs = {name: fn(res) for name, fn in THEORY_FIGURES.items()}
    for fig in figs.values():
        _trim_minor_ticks(fig)
    return figs


# --------------------------------------------------------------------------------------------------
# loss-level claims
# --------------------------------------------------------------------------------------------------
def core_figure(summary: dict, weight_betas, log_ratios: torch.Tensor):
    """Prop. 1's gaps over β, the NPO weight W over the log-ratio, and NPO's loss against GA's.

    The gaps are the summary's measured rows; W (the library's :func:`~npo_sim.losses.npo_weight` at each
    of ``weight_betas``, over the ``log_ratios`` the study checked) and the loss are closed forms.
    """
    fig, ax = new_figure(3, 1)
    rows = summary["prop1"]["rows"]
    b = [r["beta"] for r in rows]
    ax[0, 0].loglog(b, [r["loss_gap"] for r in rows], "o-", label="|loss gap|")
    ax[0, 0].loglog(b, [r["grad_gap"] for r in rows], "s-", label="‖grad gap‖")
    ax[0, 0].loglog(b, [r["leading_order"] for r in rows], "k--", label="β·E[r²]/4")
    ax[0, 0].set(xlabel="β", title="Prop. 1: NPO → GA as β → 0")
    ax[0, 0].legend()
    for beta in weight_betas:
        w = npo_weight(log_ratios, torch.zeros_like(log_ratios), beta)
        ax[0, 1].plot(log_ratios.numpy(), w.numpy(), label=f"β={beta}")
    ax[0, 1].axhline(2, color="k", lw=0.6, ls=":")
    ax[0, 1].axhline(0, color="k", lw=0.6, ls=":")
    ax[0, 1].set(xlabel="log π_θ − log π_ref", ylabel="W", title="NPO weight W ∈ (0, 2)")
    ax[0, 1].legend()
    r = np.linspace(-10, 3, 400)
    ax[0, 2].plot(r, [theory.npo_loss([x], 1.0) for x in r], label="NPO, β=1")
    ax[0, 2].plot(r, r, label="GA (= log π_θ; ref at 0)")
    ax[0, 2].axhline(0, color="k", lw=0.6, ls=":")
    ax[0, 2].set(xlabel="log π_θ − log π_ref", title="NPO loss is bounded below")
    ax[0, 2].legend()
    return fig
