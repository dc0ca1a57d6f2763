"""The paper's loss-level claims, measured: Proposition 1, W ∈ (0, 2), NPO bounded below.

A :class:`~npo_sim.study.Study` that trains nothing: :func:`simulate` evaluates the library losses on
random log-ratios (a second of work), :func:`findings` judges the three claims, and the figure is
``core_claims.png``. Its summary file is ``core_claims.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import claims as C
from .. import theory
from ..losses import ga, npo, npo_weight
from ..runio import UserError
from ..study import Results, Study

FIGURE = "core_claims.png"
#: log π_θ − log π_ref at which NPO's and GA's losses are compared (the first three are quoted in the claim)
PUSHED = (-1.0, -10.0, -100.0, -1000.0)


@dataclass(frozen=True)
class CoreConfig:
    """Random log-ratios for Proposition 1, and the grids on which W and the NPO loss are checked."""

    seed: int = 0
    n: int = 256                                                  #: examples in the Prop. 1 batch
    betas: tuple[float, ...] = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)   #: Prop. 1's β, decreasing
    weight_betas: tuple[float, ...] = (0.1, 0.5, 1.0)             #: β at which W is checked
    log_ratio_max: float = 30.0                                   #: W is checked on log-ratios in [−max, max]

    def __post_init__(self) -> None:
        if self.n < 1:
            raise UserError(f"n must be >= 1, got {self.n}")
        for name in ("betas", "weight_betas"):
            vals = getattr(self, name)
            if not vals or not all(math.isfinite(b) and b > 0 for b in vals):
                raise UserError(f"{name} must be non-empty, finite and > 0, got {vals}")
        if not (math.isfinite(self.log_ratio_max) and self.log_ratio_max > 0):
            raise UserError(f"log_ratio_max must be finite and > 0, got {self.log_ratio_max}")


def log_ratio_grid(cfg: CoreConfig) -> torch.Tensor:
    """The log-ratios on which W is checked (and drawn)."""
    return torch.linspace(-cfg.log_ratio_max, cfg.log_ratio_max, 2001, dtype=torch.float64)


def _draw(cfg: CoreConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random log-likelihoods and reference log-likelihoods (log-ratios ~ N(0, 0.8²))."""
    g = torch.Generator().manual_seed(cfg.seed)
    logp = -4 * torch.rand(cfg.n, generator=g, dtype=torch.float64) - 0.1
    logp_ref = logp + 0.8 * torch.randn(cfg.n, generator=g, dtype=torch.float64)
    return logp, logp_ref


def _prop1(cfg: CoreConfig, logp: torch.Tensor, logp_ref: torch.Tensor) -> dict:
    """Proposition 1: the loss and gradient gaps between NPO and GA at each β."""
    theta = logp.clone().requires_grad_(True)
    rows = []
    for beta in cfg.betas:
        loss = npo(theta, logp_ref, beta)
        (g_npo,) = torch.autograd.grad(loss, theta)
        (g_ga,) = torch.autograd.grad(ga(theta), theta)
        gap = (loss - 2 / beta * math.log(2)) - (ga(theta) - logp_ref.mean())
        r = (logp - logp_ref).numpy()
        rows.append({"beta": beta, "loss_gap": abs(gap.item()), "grad_gap": (g_npo - g_ga).norm().item(),
                     "leading_order": theory.prop1_gap_leading_order(r, beta)})
    loss_gaps = [r["loss_gap"] for r in rows]
    grad_gaps = [r["grad_gap"] for r in rows]
    return {"rows": rows, "loss_gap_monotone": bool(np.all(np.diff(loss_gaps) < 0)),
            "grad_gap_monotone": bool(np.all(np.diff(grad_gaps) < 0)),
            "loss_gap_at_min_beta": loss_gaps[-1], "grad_gap_at_min_beta": grad_gaps[-1]}


#: βr = β(log π_θ − log π_ref) at which "π_θ ≪ π_ref" is read: (π_θ/π_ref)^β = e^{−4} ≈ 0.018
SMALL_BETA_R = (-4.0, -8.0, -16.0)


def _weight(cfg: CoreConfig, logp: torch.Tensor, weight=npo_weight) -> dict:
    """W over the log-ratio grid (range, monotone in the log-ratio), at π_θ ≪ π_ref, and at θ = ref."""
    ratios = log_ratio_grid(cfg)
    W = [weight(ratios, torch.zeros_like(ratios), b) for b in cfg.weight_betas]
    small = {f"{b:g}": [float(weight(torch.tensor([x / b], dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                                     b)) for x in SMALL_BETA_R] for b in cfg.weight_betas}
    betas = ", ".join(f"{b:g}" for b in cfg.weight_betas)
    return {"min": min(float(w.min()) for w in W), "max": max(float(w.max()) for w in W),
            "monotone": all(bool((torch.diff(w) >= 0).all()) for w in W),
            "below_2_ratio_pow_beta": all(bool((w <= 2 * torch.exp(b * ratios) * (1 + 1e-12)).all())
                                          for w, b in zip(W, cfg.weight_betas)),
            "at_small_ratio": small, "small_beta_r": list(SMALL_BETA_R),
            "max_abs_dev_from_1_at_ref": float(weight(logp, logp, 0.7).sub(1).abs().max()),
            "range_checked": f"log-ratio in [{-cfg.log_ratio_max:g}, {cfg.log_ratio_max:g}], beta in {{{betas}}}"}


def _bounded_below(logp_ref: torch.Tensor) -> dict:
    """NPO stays >= 0 however far the likelihood is pushed down; GA's loss does not."""
    pushed = torch.tensor(PUSHED, dtype=torch.float64)
    npo_vals = [npo(p.reshape(1), torch.zeros(1, dtype=torch.float64), 1.0).item() for p in pushed]
    ga_vals = [ga(p.reshape(1)).item() for p in pushed]
    return {"npo_at_logp": dict(zip(map(str, pushed.tolist()), npo_vals)),
            "ga_at_logp": dict(zip(map(str, pushed.tolist()), ga_vals)),
            "npo_at_ref": {str(b): npo(logp_ref, logp_ref, b).item() for b in (0.1, 1.0)},
            "npo_min_seen": min(npo_vals)}


def simulate(cfg: CoreConfig, progress: bool = False) -> Results:
    """Evaluate the losses; no tables, only the summary (``core_claims.json``)."""
    logp, logp_ref = _draw(cfg)
    summary = {"prop1": _prop1(cfg, logp, logp_ref), "weight": _weight(cfg, logp),
               "bounded_below": _bounded_below(logp_ref),
               "config": {"seed": cfg.seed, "n": cfg.n, "betas": list(cfg.betas)}}
    return Results({}, summary)


def _prop1_claim(s: dict) -> C.Claim:
    p = s["prop1"]
    r0, r1 = p["rows"][0], p["rows"][-1]
    monotone = p["loss_gap_monotone"] and p["grad_gap_monotone"]
    return C.Claim(
        "Prop. 1: NPO → GA as β → 0 (loss gap [L_NPO − (2/β)log 2] − [L_GA − E log π_ref] and gradient gap → 0)",
        f"β={r0['beta']:g}→{r1['beta']:g}: loss gap {r0['loss_gap']:.2e}→{r1['loss_gap']:.2e} "
        f"(≈β·E[r²]/4: {r1['leading_order']:.2e}), grad gap {r0['grad_gap']:.2e}→{r1['grad_gap']:.2e}; "
        f"monotone: {monotone}",
        C.verdict(monotone and r1["loss_gap"] < 1e-3), FIGURE,
        "holds when both gaps shrink strictly as β decreases and the loss gap at the smallest β is < 1e-3")


#: "W ≪ 1": the bound W must be under at (π_θ/π_ref)^β = e^{−4}
SMALL_W = 0.05


def _weight_claim(s: dict) -> C.Claim:
    w = s["weight"]
    at4 = {b: v[0] for b, v in w["at_small_ratio"].items()}
    ok = w["monotone"] and w["below_2_ratio_pow_beta"] and all(v < SMALL_W for v in at4.values())
    return C.Claim(
        "NPO's weight W = 2π_θ^β/(π_θ^β+π_ref^β) is an adaptive smoothing weight: W ≪ 1 when π_θ ≪ π_ref",
        f"W increasing in log π_θ − log π_ref: {w['monotone']}; W ≤ 2(π_θ/π_ref)^β: {w['below_2_ratio_pow_beta']} "
        f"over {w['range_checked']}; W at (π_θ/π_ref)^β = e^−4 for β = "
        + ", ".join(f"{b}: {v:.3g}" for b, v in at4.items())
        + f"; range ({w['min']:.2e}, {w['max']:.15g}); W at θ = ref {1 + w['max_abs_dev_from_1_at_ref']:.0f}",
        C.verdict(ok), FIGURE,
        f"holds when, at every β checked, W is non-decreasing in the log-ratio, W ≤ 2(π_θ/π_ref)^β on the grid, "
        f"and W < {SMALL_W:g} at (π_θ/π_ref)^β = e^−4 (GA's weight, 1 everywhere, fails)")


def _bounded_claim(s: dict) -> C.Claim:
    b = s["bounded_below"]
    return C.Claim(
        "NPO loss is bounded below (by 0), GA's is not",
        "NPO(β=1) at log π_θ−log π_ref = −1, −10, −100: "
        + ", ".join(f"{v:.2g}" for v in list(b["npo_at_logp"].values())[:3])
        + f"; GA: {', '.join(f'{v:g}' for v in list(b['ga_at_logp'].values())[:3])}; "
        f"(2/β)log 2 at ref: {b['npo_at_ref']['1.0']:.4f}",
        C.verdict(b["npo_min_seen"] >= 0), FIGURE,
        "holds when every NPO loss value seen, however far log π_θ is pushed down, is >= 0")


def findings(results: Results, cfg: CoreConfig) -> list[C.Claim]:
    return [claim(results.summary) for claim in (_prop1_claim, _weight_claim, _bounded_claim)]


def figures(results: Results, cfg: CoreConfig) -> dict:
    from ..plots.theory import core_figure

    return {FIGURE: core_figure(results.summary, cfg.weight_betas, log_ratio_grid(cfg))}


STUDY = Study("core", simulate, findings, figures, summary_file="core_claims.json")


def report_configs(smoke: bool) -> dict[str, CoreConfig]:
    """The run ``npo-sim figures`` makes: ``core`` at the defaults (smoke or not: it takes a second)."""
    return {"core": CoreConfig()}
