"""The paper's loss-level claims, measured: Proposition 1, W ∈ (0, 2), NPO bounded below.

:func:`run_core` evaluates the library losses on random log-ratios and returns a summary dict (and
writes ``core_claims.json`` plus a figure). It needs no training, so it takes a second.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import runio, theory
from .losses import ga, npo, npo_weight

BETAS = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)


def run_core(out_dir: Path, figures_dir: Path | None = None, seed: int = 0) -> dict:
    out_dir = Path(out_dir)
    g = torch.Generator().manual_seed(seed)
    logp = -4 * torch.rand(256, generator=g, dtype=torch.float64) - 0.1
    logp_ref = logp + 0.8 * torch.randn(256, generator=g, dtype=torch.float64)
    theta = logp.clone().requires_grad_(True)

    rows = []
    for beta in BETAS:
        loss = npo(theta, logp_ref, beta)
        (g_npo,) = torch.autograd.grad(loss, theta)
        (g_ga,) = torch.autograd.grad(ga(theta), theta)
        gap = (loss - 2 / beta * math.log(2)) - (ga(theta) - logp_ref.mean())
        r = (logp - logp_ref).numpy()
        rows.append({"beta": beta, "loss_gap": abs(gap.item()), "grad_gap": (g_npo - g_ga).norm().item(),
                     "leading_order": theory.prop1_gap_leading_order(r, beta)})
    loss_gaps = [r["loss_gap"] for r in rows]
    grad_gaps = [r["grad_gap"] for r in rows]

    ratios = torch.linspace(-30, 30, 2001, dtype=torch.float64)
    W = {b: npo_weight(ratios, torch.zeros_like(ratios), b) for b in (0.1, 0.5, 1.0)}
    w_min = min(float(w.min()) for w in W.values())
    w_max = max(float(w.max()) for w in W.values())
    at_ref = float(npo_weight(logp, logp, 0.7).sub(1).abs().max())

    # NPO is bounded below by 0 however far the likelihood is pushed down; GA's loss is not.
    pushed = torch.tensor([-1.0, -10.0, -100.0, -1000.0], dtype=torch.float64)
    npo_vals = [npo(p.reshape(1), torch.zeros(1, dtype=torch.float64), 1.0).item() for p in pushed]
    ga_vals = [ga(p.reshape(1)).item() for p in pushed]
    loss_at_ref = {str(b): npo(logp_ref, logp_ref, b).item() for b in (0.1, 1.0)}

    summary = {
        "prop1": {"rows": rows, "loss_gap_monotone": bool(np.all(np.diff(loss_gaps) < 0)),
                  "grad_gap_monotone": bool(np.all(np.diff(grad_gaps) < 0)),
                  "loss_gap_at_min_beta": loss_gaps[-1], "grad_gap_at_min_beta": grad_gaps[-1]},
        "weight": {"min": w_min, "max": w_max, "max_abs_dev_from_1_at_ref": at_ref,
                   "range_checked": "log-ratio in [-30, 30], beta in {0.1, 0.5, 1}"},
        "bounded_below": {"npo_at_logp": dict(zip(map(str, pushed.tolist()), npo_vals)),
                          "ga_at_logp": dict(zip(map(str, pushed.tolist()), ga_vals)),
                          "npo_at_ref": loss_at_ref,
                          "npo_min_seen": min(npo_vals)},
        "config": {"seed": seed, "n": 256, "betas": list(BETAS)},
    }
    runio.write_json(out_dir / "core_claims.json", summary)
    _plot(summary, W, ratios, out_dir, figures_dir)
    return summary


def _plot(summary, W, ratios, out_dir: Path, figures_dir) -> None:
    from .plots import new_figure

    fig, ax = new_figure(3, 1)
    rows = summary["prop1"]["rows"]
    b = [r["beta"] for r in rows]
    ax[0, 0].loglog(b, [r["loss_gap"] for r in rows], "o-", label="|loss gap|")
    ax[0, 0].loglog(b, [r["grad_gap"] for r in rows], "s-", label="‖grad gap‖")
    ax[0, 0].loglog(b, [r["leading_order"] for r in rows], "k--", label="β·E[r²]/4")
    ax[0, 0].set(xlabel="β", title="Prop. 1: NPO → GA as β → 0")
    ax[0, 0].legend()
    for beta, w in W.items():
        ax[0, 1].plot(ratios, w, label=f"β={beta}")
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
    runio.save_figure(fig, Path(out_dir) / "core_claims.png", copy_to=figures_dir)
