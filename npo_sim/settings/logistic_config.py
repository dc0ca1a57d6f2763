"""The Theorem-2 lab's config: what the lab supplies, the methods it runs, :class:`TheoryConfig` and
:data:`QUICK` (the setting itself is :mod:`.logistic`; the data and adapter :mod:`.logistic_data`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .. import losses
from ..runio import UserError

#: the inputs the lab supplies: one token per example, two classes (the forget label and the other, which
#: plays the IDK answer), no retain set and no activations (RMU and every retain term are skipped)
SUPPLIES = frozenset({"logp", "logp_ref", "idk_logp", "idk_logp_ref", "length", "token_logp", "ref_token_logp",
                      "token_mask", "forget_logits", "forget_ref_logits", "forget_labels"})

#: objectives with no retain term (the ones Theorem 2 is about) whose inputs the lab supplies
METHODS = losses.methods(retain_free=True, supplies=SUPPLIES)
INITS = ("margins", "random", "retain")
DTYPE = torch.float64


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TheoryConfig:
    """The whole study: a grid of (method, β, η, n_f, d, seed) plus the analysis choices."""

    steps: int = 100_000
    seed: int = 0
    methods: tuple[str, ...] = ("ga", "npo")
    #: more methods, run at the base point only (plus their flow check): each one's divergence law
    law_methods: tuple[str, ...] = ()
    #: per-method hyperparameters other than β, ``(method, name, value)``: UNDIAL's registry γ = 10 puts
    #: its limit b → −γ beyond a 10^4-step horizon (the curvature there is ~e^{-10}), so the lab uses 3
    overrides: tuple[tuple[str, str, float], ...] = (("undial", "gamma", 3.0),)
    etas: tuple[float, ...] = (0.25, 0.5, 1.0)
    n_fs: tuple[int, ...] = (8, 16, 32)
    ds: tuple[int, ...] = (2048, 8192)
    n_seeds: int = 2
    betas: tuple[float, ...] = (0.5, 1.0, 2.0)          # β grid for β-methods (every η, n_f, d, seed)
    beta_sweep: tuple[float, ...] = (1e-3, 1e-2, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0)  # extra β at the base point
    base_eta: float = 1.0                                # the base point used for figures / headline numbers
    base_n_f: int = 16
    base_d: int = 8192
    base_beta: float = 1.0
    x_norm_min: float = 0.8                              # b_x
    x_norm_max: float = 1.2                              # B_x
    theta_norm: float = 20.0                             # B_θ
    init: str = "margins"
    margin_min: float = 0.5                              # init="margins": forget margins m_i(0) ~ U[min, max]
    margin_max: float = 2.0
    retain_n: int = 256                                  # init="retain": retain-set size
    record_points: int = 60                              # log-spaced record steps
    fit_eps: float = 0.05                                # fits use t where the law's small parameter <= eps
    flow_eta: float = 0.05                               # single-sample flow check: step (Euler ≈ flow)
    check_orthogonality: bool = False                    # require n_f <= d and C0 <= max_c0
    max_c0: float = 8.0
    quick: bool = False
    #: processes: 1 runs every method in one batched program; more run one program per method, each
    #: on its own process. How the grid runs, not what it computes (results agree to float rounding,
    #: ~1e-13), so it is left out of the summary.
    workers: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"steps must be >= 1, got {self.steps}")
        if self.workers < 1:
            raise UserError(f"workers must be >= 1, got {self.workers}")
        bad = [m for m in (*self.methods, *self.law_methods) if m not in METHODS]
        if bad or not self.methods:
            skip = losses.skip_note("the logistic lab", SUPPLIES, [m for m in bad if m in losses.OBJECTIVES])
            raise UserError(f"unknown or unsupported methods {bad}; choose from {', '.join(METHODS)} "
                            "(objectives with a retain term are not part of Theorem 2"
                            + (f"; {skip}" if skip else "") + ")")
        for method, name, value in self.overrides:
            losses.get_objective(method, **{name: value})   # ValueError on a bad name or value
        for name in ("etas", "betas", "beta_sweep"):
            vals = getattr(self, name)
            if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
                raise UserError(f"{name} must be non-empty, finite and > 0, got {vals}")
        if not self.n_fs or min(self.n_fs) < 1 or not self.ds or min(self.ds) < 1 or self.n_seeds < 1:
            raise UserError("n_fs, ds and n_seeds must be >= 1")
        if self.init not in INITS:
            raise UserError(f"unknown init {self.init!r}; choose from {', '.join(INITS)}")
        if not 0 < self.x_norm_min <= self.x_norm_max:
            raise UserError("need 0 < x_norm_min <= x_norm_max")
        if not 0 < self.margin_min <= self.margin_max or self.theta_norm <= 0:
            raise UserError("need 0 < margin_min <= margin_max and theta_norm > 0")
        for name, values in (("base_eta", self.etas), ("base_n_f", self.n_fs), ("base_d", self.ds),
                             ("base_beta", self.betas)):
            if getattr(self, name) not in values:
                raise UserError(f"{name}={getattr(self, name)} must be one of {values}")
        if self.check_orthogonality:
            for n_f in self.n_fs:
                for d in self.ds:
                    if n_f > d:
                        raise UserError(f"n_f={n_f} > d={d}: Theorem 2 needs n_f <= d with nearly orthogonal "
                                        "x_i (set check_orthogonality off to simulate anyway)")

    def resolved(self) -> dict:
        """The config as recorded in ``summary.json``, with the analysis choices spelled out."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "workers"}
        out["fit_window"] = (f"records where the asymptotic law's small parameters are <= {self.fit_eps}: "
                             "mean forget probability pi_theta (both laws need sigma(-m) ~ 1) and, for "
                             "beta-methods, mean W/2 (NPO's log law needs W ~ 2(pi/pi_ref)^beta << 1); "
                             "the last 8 records when fewer qualify (flagged in_regime=False)")
        out["forget_labels"] = ("s_i = the label theta_init predicts; init='margins' sets its confidence "
                                f"sigma(m_i(0)) with m_i(0) ~ U[{self.margin_min}, {self.margin_max}]")
        out["reduction"] = "theta_t - theta_init = Q z_t, Q an orthonormal basis of span{x_i} (exact)"
        return out


QUICK = TheoryConfig(steps=10_000, etas=(0.5, 1.0), n_fs=(8, 16), ds=(4096,), n_seeds=1, base_d=4096,
                     quick=True)

_BASE_POINT = (("base_eta", "etas"), ("base_n_f", "n_fs"), ("base_d", "ds"), ("base_beta", "betas"))


def _log_distance_to_1(beta: float) -> float:
    """|log β|; invalid β (≤ 0) sort last, so the config's own validation reports them."""
    return abs(math.log(beta)) if beta > 0 else math.inf


def make_config(base: TheoryConfig, **overrides) -> TheoryConfig:
    """``base`` with ``overrides``, keeping the base point inside a narrowed grid.

    When an override of ``etas``, ``n_fs``, ``ds`` or ``betas`` drops the base value, the base point moves
    to the grid's last value (for β: the one closest to 1 in log scale).
    """
    over = dict(overrides)
    for name, values_name in _BASE_POINT:
        values = over.get(values_name, getattr(base, values_name))
        if name not in over and getattr(base, name) not in values and values:
            over[name] = values[-1] if name != "base_beta" else min(values, key=_log_distance_to_1)
    return dataclasses.replace(base, **over)


