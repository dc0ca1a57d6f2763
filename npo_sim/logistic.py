"""Theorem-2 lab: GA diverges linearly, NPO logarithmically, in high-dimensional logistic regression.

The setting (NPO paper, Theorem 2): ``π_θ(y=1|x) = σ(⟨x, θ⟩)``; ``n_f <= d`` forget samples with nearly
orthogonal ``x_i``, ``‖x_i‖ ∈ [b_x, B_x]``, ``‖θ_init‖ <= B_θ``; full-batch gradient descent with step
``η`` on the empirical forget loss, ``η0 = η/n_f``. With label-signed features ``a_i = s_i x_i`` the
margin of sample ``i`` is ``m_i = ⟨a_i, θ⟩`` and ``log π_θ(s_i|x_i) = log σ(m_i)``.

**Exact reduction.** Every gradient of a loss of the margins lies in ``span{a_i}``, so gradient descent
never leaves ``θ_init + span{a_i}``. Write ``A = L Q^T`` (``L`` the Cholesky factor of the Gram matrix
``A A^T``, ``Q`` an orthonormal basis of the span) and ``θ_t = θ_init + Q z_t``: a GD step on ``z`` moves θ
by ``−η Q Q^T ∇_θ L = −η ∇_θ L``, so GD on ``z`` *is* GD on θ. The adapter's parameters are therefore
``z`` (``k = min(n_f, d)`` numbers per config) and ``d`` only enters through the Gram matrix:
``‖θ_t − θ_init‖₂ = ‖z‖``, ``‖θ_t − θ_init‖_{XᵀX} = ‖A(θ_t − θ_init)‖ = ‖b‖`` with logit shifts
``b = L z``. The tests check this against GD on the full ``d``-dimensional θ.

**Batching.** A grid of configs runs as one tensor program per method through
:func:`npo_sim.unlearn.run`: configs are grouped by dataset ``(n_f, d, seed)`` into slots and the
parameters have shape ``(slots, replicas, k_max)``, so the forward pass is one batched matrix product.
Smaller ``n_f`` are zero-padded to ``n_max``; padded samples have zero features, hence constant
``logp`` and zero gradient, and each replica's step is scaled by ``n_max/n_f`` so that the mean over
``n_max`` entries gives exactly the gradient of the mean over its ``n_f`` samples. Recorded losses are
recomputed afterwards on the valid samples only, with the same objective.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import theory
from .losses import OBJECTIVES, get_objective, npo_weight
from .metrics import linear_fit, log_fit
from .runio import UserError, write_csv, write_json
from .unlearn import log_steps, run

#: objectives with no retain term (the ones Theorem 2 is about)
METHODS = tuple(name for name, obj in OBJECTIVES.items() if not obj.retain)
#: forget terms that have no β (every other retain-free forget term is parametrised by β)
_BETA_FREE = frozenset({"ga"})
INITS = ("margins", "random", "retain")
DTYPE = torch.float64


#: exact single-sample gradient flows (theory.py) that a simulated n_f = 1 run is checked against
FLOW_ORACLES = {
    "ga": lambda t, m0, c, eta, beta: theory.ga_flow_margin(t, m0, c, eta),
    "npo": lambda t, m0, c, eta, beta: theory.npo_flow_margin(t, m0, c, eta, beta),
}


def uses_beta(method: str) -> bool:
    return OBJECTIVES[method].forget not in _BETA_FREE


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TheoryConfig:
    """The whole study: a grid of (method, β, η, n_f, d, seed) plus the analysis choices."""

    steps: int = 100_000
    seed: int = 0
    methods: tuple[str, ...] = ("ga", "npo")
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

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise UserError(f"unknown or unsupported methods {bad}; choose from {', '.join(METHODS)} "
                            "(objectives with a retain term are not part of Theorem 2)")
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
        for name, grid in (("base_eta", self.etas), ("base_n_f", self.n_fs), ("base_d", self.ds),
                           ("base_beta", self.betas)):
            if getattr(self, name) not in grid:
                raise UserError(f"{name}={getattr(self, name)} must be one of {grid}")
        if self.check_orthogonality:
            for n_f in self.n_fs:
                for d in self.ds:
                    if n_f > d:
                        raise UserError(f"n_f={n_f} > d={d}: Theorem 2 needs n_f <= d with nearly orthogonal "
                                        "x_i (run without --check-orthogonality to simulate anyway)")

    def resolved(self) -> dict:
        out = dataclasses.asdict(self)
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


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForgetData:
    """One draw of the Theorem-2 setting, already reduced to the span of the forget features."""

    n_f: int
    d: int
    seed: int
    B: np.ndarray          # (n_f, k): logit shifts are b = B z, k = min(n_f, d)
    m0: np.ndarray         # (n_f,): margins s_i⟨x_i, θ_init⟩ (> 0: the labels θ_init predicts)
    c: np.ndarray          # (n_f,): ‖x_i‖²
    C0: float              # n_f · max_{i≠j} |⟨x_i, x_j⟩|
    theta_norm: float      # ‖θ_init‖
    A: np.ndarray | None = dataclasses.field(default=None, repr=False)  # (n_f, d) signed features, if kept

    @property
    def k(self) -> int:
        return self.B.shape[1]


def _fit_retain(Xr: np.ndarray, yr: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge-regularised logistic regression on the retain set (L-BFGS, float64)."""
    from scipy import optimize, special

    def f(theta):
        m = yr * (Xr @ theta)
        loss = np.mean(np.logaddexp(0.0, -m)) + 0.5 * ridge * theta @ theta
        grad = -(Xr.T @ (yr * special.expit(-m))) / len(yr) + ridge * theta
        return loss, grad

    res = optimize.minimize(f, np.zeros(Xr.shape[1]), jac=True, method="L-BFGS-B")
    return res.x


def _reduce(A: np.ndarray) -> np.ndarray:
    """``B`` (n × k, k = rank) with ``A = B Q^T`` for an orthonormal ``Q``: the Cholesky factor of the
    Gram matrix when ``A`` has full row rank, else ``R^T`` from a QR of ``A^T``."""
    if A.shape[0] <= A.shape[1]:
        try:
            return np.linalg.cholesky(A @ A.T)
        except np.linalg.LinAlgError:
            pass
    return np.linalg.qr(A.T)[1].T.copy()


def make_data(n_f: int, d: int, seed: int, cfg: TheoryConfig, keep_features: bool = False) -> ForgetData:
    """Draw forget features and θ_init, seeded by ``(cfg.seed, n_f, d, seed)``; label = θ_init's prediction.

    ``x_i = r_i·u_i`` with ``u_i`` uniform on the sphere and ``r_i ~ U[b_x, B_x]``. θ_init:
    ``margins`` — the vector of norm B_θ whose forget margins are ``m_i ~ U[margin_min, margin_max]``
    (needs n_f <= d); ``random`` — uniform direction, norm B_θ; ``retain`` — ridge logistic regression
    on a retain set labelled by a random teacher (10% label noise), projected onto ‖θ‖ <= B_θ.
    ``keep_features`` keeps the full label-signed ``(n_f, d)`` features (tests, the naive baseline).
    """
    if n_f > d and cfg.check_orthogonality:
        raise UserError(f"n_f={n_f} > d={d}: Theorem 2 needs n_f <= d (drop --check-orthogonality to run anyway)")
    rng = np.random.default_rng([cfg.seed, n_f, d, seed])
    U = rng.standard_normal((n_f, d))
    X = U / np.linalg.norm(U, axis=1, keepdims=True) * rng.uniform(cfg.x_norm_min, cfg.x_norm_max, (n_f, 1))
    if cfg.init == "margins":
        if n_f > d:
            raise UserError(f"init 'margins' needs n_f <= d (got n_f={n_f}, d={d}); use --init random")
        s = rng.choice([-1.0, 1.0], n_f)
        target = rng.uniform(cfg.margin_min, cfg.margin_max, n_f)
        A = s[:, None] * X
        G = A @ A.T
        theta_min = A.T @ np.linalg.solve(G, target)            # min-norm θ with A θ = target
        if np.linalg.norm(theta_min) > cfg.theta_norm:
            raise UserError(f"theta_norm={cfg.theta_norm} is too small for the requested margins "
                            f"(needs >= {np.linalg.norm(theta_min):.2f} at n_f={n_f}, d={d})")
        v = rng.standard_normal(d)
        v -= A.T @ np.linalg.solve(G, A @ v)                    # project out span{a_i}
        nv = np.linalg.norm(v)
        extra = math.sqrt(max(cfg.theta_norm ** 2 - theta_min @ theta_min, 0.0))
        theta = theta_min + (extra / nv * v if nv > 0 else 0.0)
    elif cfg.init == "random":
        g = rng.standard_normal(d)
        theta = cfg.theta_norm * g / np.linalg.norm(g)
    else:  # "retain"
        teacher = rng.standard_normal(d)
        Ur = rng.standard_normal((cfg.retain_n, d))
        Xr = Ur / np.linalg.norm(Ur, axis=1, keepdims=True) * rng.uniform(cfg.x_norm_min, cfg.x_norm_max,
                                                                          (cfg.retain_n, 1))
        yr = np.sign(Xr @ teacher) * np.where(rng.random(cfg.retain_n) < 0.1, -1.0, 1.0)
        theta = _fit_retain(Xr, yr, ridge=1e-3)
        norm = np.linalg.norm(theta)
        theta = theta * min(1.0, cfg.theta_norm / norm) if norm > 0 else theta
    raw = X @ theta
    s = np.where(raw >= 0, 1.0, -1.0)
    A = s[:, None] * X
    gram = X @ X.T
    off = np.abs(gram - np.diag(np.diag(gram)))
    C0 = float(n_f * off.max()) if n_f > 1 else 0.0
    if cfg.check_orthogonality and C0 > cfg.max_c0:
        raise UserError(f"near-orthogonality check failed: C0 = n_f*max|<x_i,x_j>| = {C0:.2f} > max_c0="
                        f"{cfg.max_c0} at n_f={n_f}, d={d} (increase d)")
    return ForgetData(n_f, d, seed, _reduce(A), np.abs(raw), np.diag(gram).copy(), C0,
                      float(np.linalg.norm(theta)), A if keep_features else None)


# --------------------------------------------------------------------------------------------------
# the adapter: per-example log-likelihoods from the reduced parameters
# --------------------------------------------------------------------------------------------------
class LogisticAdapter:
    """Batched logistic forget set. Params: one tensor ``z`` of shape ``(D, R, k)`` (datasets × replicas).

    ``Bt`` has shape ``(D, k, n)`` and ``m0`` ``(D, 1, n)``; margins are ``m = m0 + z @ Bt``. Passing the
    full label-signed feature matrix as ``Bt`` (``k = d``) gives plain gradient descent on θ − θ_init.
    Inputs: ``logp = log σ(m)`` (the forget label), ``idk_logp = log σ(−m)`` (the other label, DPO's
    winner), ``length = 1`` (one token).
    """

    def __init__(self, Bt: torch.Tensor, m0: torch.Tensor):
        self.Bt, self.m0 = Bt, m0
        self._inputs = {
            "logp": lambda m: F.logsigmoid(m),
            "idk_logp": lambda m: F.logsigmoid(-m),
            "length": lambda m: torch.ones_like(m),
        }

    def shifts(self, z: torch.Tensor) -> torch.Tensor:
        return torch.matmul(z, self.Bt)

    def inputs(self, params, keys):
        m = torch.baddbmm(self.m0, params[0], self.Bt)          # m0 + z @ Bt in one kernel
        return {k: self._inputs[k](m) for k in keys}

    def metrics(self, params):
        z = params[0]
        b = self.shifts(z)
        out = {"dist_xtx": b.norm(dim=-1), "dist_l2": z.norm(dim=-1)}
        for i in range(b.shape[-1]):
            out[f"b{i}"] = b[..., i]
        return out


@dataclass(frozen=True)
class Run:
    """One config of the grid."""

    config_id: int
    method: str
    beta: float            # NaN for β-free methods
    eta: float
    n_f: int
    d: int
    seed: int
    role: str = "grid"     # "grid" or "flow" (the single-sample flow check)


def expand_grid(cfg: TheoryConfig) -> list[Run]:
    runs: list[Run] = []
    seen = set()

    def add(method, beta, eta, n_f, d, seed, role="grid"):
        key = (method, beta, eta, n_f, d, seed, role)
        if key not in seen:
            seen.add(key)
            runs.append(Run(len(runs), method, beta, eta, n_f, d, seed, role))

    for method in cfg.methods:
        betas = cfg.betas if uses_beta(method) else (math.nan,)
        for seed in range(cfg.n_seeds):
            for n_f in cfg.n_fs:
                for d in cfg.ds:
                    for eta in cfg.etas:
                        for beta in betas:
                            add(method, beta, eta, n_f, d, seed)
            if uses_beta(method):
                for beta in cfg.beta_sweep:
                    add(method, beta, cfg.base_eta, cfg.base_n_f, cfg.base_d, seed)
        # single-sample check of the exact gradient flow (n_f = 1, small step so GD ≈ flow)
        if method in FLOW_ORACLES:
            add(method, cfg.base_beta if uses_beta(method) else math.nan, cfg.flow_eta, 1, cfg.base_d, 0, "flow")
    return runs


def simulate_group(method: str, runs: list[Run], data: dict, steps: int, record_at: list[int],
                   full_dim: dict | None = None, cap: int | None = None) -> dict[str, np.ndarray]:
    """Run every config of one method in one batched :func:`npo_sim.unlearn.run` call.

    ``data`` maps ``(n_f, d, seed)`` to :class:`ForgetData`. ``full_dim`` (tests, naive baseline) maps the
    same keys to the full label-signed ``(n_f, d)`` feature matrix, to run on θ − θ_init itself.
    ``cap`` (default: chosen to minimise padded work) is the most configs sharing one dataset slot.
    Returns run's column dict with an extra ``config_id`` column (dummy replicas dropped).
    """
    keys = sorted({(r.n_f, r.d, r.seed) for r in runs})
    per = {k: [r for r in runs if (r.n_f, r.d, r.seed) == k] for k in keys}
    # one slot = one dataset and up to `cap` of its configs. cap minimises the padded work, about
    # slots × (cap + 8): each slot also reads its (k × n) features, worth ~8 replicas of elementwise work
    cap = cap or min(range(1, max(map(len, per.values())) + 1),
                     key=lambda c: (c + 8) * sum(-(-len(g) // c) for g in per.values()))
    slots = [(k, g[i: i + cap]) for k, g in per.items() for i in range(0, len(g), cap)]
    D, Rm = len(slots), cap
    n_max = max(k[0] for k in keys)
    feats = {k: (full_dim[k] if full_dim is not None else data[k].B) for k in keys}
    k_max = max(f.shape[1] for f in feats.values())
    Bt = torch.zeros(D, k_max, n_max, dtype=DTYPE)
    m0 = torch.zeros(D, 1, n_max, dtype=DTYPE)
    lr = torch.zeros(D, Rm, dtype=DTYPE)                      # dummy replicas: lr = 0
    beta = torch.ones(D, Rm, dtype=DTYPE)
    ids = np.full((D, Rm), -1)
    for i, (k, group) in enumerate(slots):
        f = torch.as_tensor(feats[k], dtype=DTYPE)
        Bt[i, : f.shape[1], : f.shape[0]] = f.T
        m0[i, 0, : k[0]] = torch.as_tensor(data[k].m0, dtype=DTYPE)
        for j, r in enumerate(group):
            lr[i, j] = r.eta * n_max / r.n_f                   # padding correction (see module doc)
            beta[i, j] = r.beta if uses_beta(method) else 1.0
            ids[i, j] = r.config_id
    obj = get_objective(method, beta=beta) if uses_beta(method) else get_objective(method)
    adapter = LogisticAdapter(Bt, m0)
    out = run(adapter, obj, [torch.zeros(D, Rm, k_max, dtype=DTYPE)], steps=steps, lr=lr, record_at=record_at)
    out["config_id"] = ids.reshape(-1)[out["replica"]]
    keep = out["config_id"] >= 0
    return {k: v[keep] for k, v in out.items()}


def _tidy(method: str, runs: list[Run], data: dict, raw: dict, cfg: TheoryConfig):
    """Per-(config, step) rows and per-(config, step, sample) shifts; losses recomputed on valid samples."""
    by_id = {r.config_id: r for r in runs}
    traj, shifts = [], []
    for cid in np.unique(raw["config_id"]):
        r = by_id[int(cid)]
        dat = data[(r.n_f, r.d, r.seed)]
        sel = raw["config_id"] == cid
        steps = raw["step"][sel]
        b = np.stack([raw[f"b{i}"][sel] for i in range(r.n_f)], axis=1)        # (S, n_f)
        m = torch.as_tensor(dat.m0 + b, dtype=DTYPE)
        m_ref = torch.as_tensor(dat.m0, dtype=DTYPE).expand_as(m)
        inputs = {"logp": F.logsigmoid(m), "logp_ref": F.logsigmoid(m_ref), "idk_logp": F.logsigmoid(-m),
                  "idk_logp_ref": F.logsigmoid(-m_ref), "length": torch.ones_like(m)}
        obj = get_objective(method, beta=r.beta) if uses_beta(method) else get_objective(method)
        forget = obj(inputs).forget.numpy()
        w = (npo_weight(inputs["logp"], inputs["logp_ref"], r.beta).mean(-1).numpy() if uses_beta(method)
             else np.full(len(steps), np.nan))
        ab = np.abs(b)
        traj.append(pd.DataFrame({
            "config_id": r.config_id, "role": r.role, "method": r.method, "beta": r.beta, "eta": r.eta,
            "n_f": r.n_f, "d": r.d, "seed": r.seed, "eta0": r.eta / r.n_f, "c_mean": dat.c.mean(),
            "m0_mean": dat.m0.mean(), "C0": dat.C0, "theta_init_norm": dat.theta_norm, "step": steps,
            "dist_xtx": raw["dist_xtx"][sel], "dist_l2": raw["dist_l2"][sel],
            "rms_shift": np.sqrt((b ** 2).mean(1)), "abs_shift_min": ab.min(1), "abs_shift_mean": ab.mean(1),
            "abs_shift_max": ab.max(1), "forget_prob": torch.sigmoid(m).mean(-1).numpy(),
            "forget_loss": forget, "npo_weight": w}))
        if r.role == "flow" or (r.n_f == cfg.base_n_f and r.d == cfg.base_d and r.seed == 0
                                and r.eta == cfg.base_eta):
            S, n = b.shape
            shifts.append(pd.DataFrame({
                "config_id": r.config_id, "step": np.repeat(steps, n), "sample": np.tile(np.arange(n), S),
                "shift": b.reshape(-1), "c": np.tile(dat.c, S), "m0": np.tile(dat.m0, S)}))
    return pd.concat(traj, ignore_index=True), pd.concat(shifts, ignore_index=True)


def _group_worker(method, group, data, steps, record):
    """Run one method's group (in this process or a worker process); returns (raw columns, seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny tensors: extra threads only add synchronisation
    try:
        t0 = time.perf_counter()
        raw = simulate_group(method, group, data, steps, record)
        return raw, time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


def simulate(cfg: TheoryConfig, progress=print, workers: int = 1) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Draw the data and run the whole grid: one batched program per method.

    ``workers > 1`` runs the methods' programs in parallel processes (one core each); results are
    identical either way.
    """
    runs = expand_grid(cfg)
    data = {}
    for r in runs:
        key = (r.n_f, r.d, r.seed)
        if key not in data:
            data[key] = make_data(*key, cfg)
    record = log_steps(cfg.steps, cfg.record_points)
    groups = {m: [r for r in runs if r.method == m] for m in cfg.methods}
    jobs = {m: (m, g, data, cfg.steps, record) for m, g in groups.items()}
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = {m: ex.submit(_group_worker, *job) for m, job in jobs.items()}
            results = {m: f.result() for m, f in futures.items()}
    else:
        results = {m: _group_worker(*job) for m, job in jobs.items()}
    trajs, shifts, timing = [], [], {}
    for method, (raw, seconds) in results.items():
        timing[method] = {"configs": len(groups[method]), "seconds": seconds}
        if progress:
            progress(f"  {method}: {len(groups[method])} configs x {cfg.steps} steps in {seconds:.1f}s")
        t, s = _tidy(method, groups[method], data, raw, cfg)
        trajs.append(t)
        shifts.append(s)
    return pd.concat(trajs, ignore_index=True), pd.concat(shifts, ignore_index=True), timing


# --------------------------------------------------------------------------------------------------
# analysis (over the tidy tables only)
# --------------------------------------------------------------------------------------------------
def _window(t: np.ndarray, small: np.ndarray, eps: float) -> tuple[np.ndarray, bool]:
    """Records from the first one where the law's small parameter is <= eps on (at least the last 8)."""
    hit = np.nonzero(small <= eps)[0]
    start = int(hit[0]) if len(hit) else len(t)
    in_regime = len(t) - start >= 8
    keep = np.arange(len(t)) >= min(start, len(t) - 8)
    return keep & (t > 0), in_regime


def fit_table(traj: pd.DataFrame, eps: float) -> pd.DataFrame:
    """One row per config: linear fit of distance vs t and log fit vs log t over the fit window.

    The window is where the asymptotic law applies: from the first record where the mean forget
    probability and (β-methods) the mean NPO weight W/2 are both <= ``eps``. With fewer than 8 such
    records the fit uses the last 8 and the config is flagged ``in_regime = False``.
    """
    rows = []
    for cid, g in traj.groupby("config_id", sort=True):
        g = g.sort_values("step")
        t, D = g["step"].to_numpy(float), g["dist_xtx"].to_numpy()
        first = g.iloc[0]
        # σ(−m) ≈ 1 needs a small forget probability; Lemma 4 also needs W ≈ 2(π/π_ref)^β << 1
        small = np.fmax(g["forget_prob"].to_numpy(), g["npo_weight"].to_numpy() / 2)   # fmax ignores NaN W
        w, in_regime = _window(t, small, eps)
        lin, lg = linear_fit(t[w], D[w]), log_fit(t[w], D[w])
        rows.append({**{k: first[k] for k in ("config_id", "role", "method", "beta", "eta", "n_f", "d", "seed",
                                              "eta0", "c_mean", "C0")},
                     "fit_from": float(t[w].min()), "in_regime": in_regime,
                     "linear_slope": lin.slope, "linear_r2": lin.r2, "log_slope": lg.slope, "log_r2": lg.r2, "distance_T": float(D[-1]),
                     "npo_weight_T": float(g["npo_weight"].iloc[-1])})
    return pd.DataFrame(rows)


def _scaling(x: np.ndarray, y: np.ndarray) -> dict:
    if len(x) < 3 or np.ptp(np.log(x)) == 0:
        return {"n_configs": int(len(x))}
    f = linear_fit(np.log(x), np.log(y))
    ratio = y / x
    return {"exponent": f.slope, "r2": f.r2, "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
            "n_configs": int(len(x))}


def _steps_to_reach(t: np.ndarray, rho: np.ndarray, R: float) -> float | None:
    """First step at which the (increasing) curve ``rho`` reaches R, interpolated in log t."""
    hit = np.nonzero(rho >= R)[0]
    if len(hit) == 0:
        return None
    i = int(hit[0])
    if i == 0 or t[i - 1] <= 0:
        return float(t[i])
    lt = np.interp(R, [rho[i - 1], rho[i]], np.log([t[i - 1], t[i]]))
    return float(np.exp(lt))


def _base(fits: pd.DataFrame, cfg: TheoryConfig, method: str, beta: float | None = None) -> pd.Series | None:
    sel = fits[(fits.role == "grid") & (fits.method == method) & (fits.eta == cfg.base_eta)
               & (fits.n_f == cfg.base_n_f) & (fits.d == cfg.base_d) & (fits.seed == 0)]
    if beta is not None:
        sel = sel[np.isclose(sel.beta, beta)]
    return None if sel.empty else sel.iloc[0]


def _curve(table: pd.DataFrame, cid: int, col: str = "dist_xtx"):
    g = table[table.config_id == cid].sort_values("step")
    return g["step"].to_numpy(float), g[col].to_numpy()


def _sample_matrix(shifts: pd.DataFrame, cid: int):
    g = shifts[shifts.config_id == cid]
    wide = g.pivot(index="step", columns="sample", values="shift").sort_index()
    per = g.drop_duplicates("sample").sort_values("sample")
    return wide.index.to_numpy(float), wide.to_numpy(), per["c"].to_numpy(), per["m0"].to_numpy()


def analyze(traj: pd.DataFrame, shifts: pd.DataFrame, cfg: TheoryConfig) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Fits, scaling checks, envelopes, steps-to-reach, β sweep and flow check -> (summary, fits, overlays)."""
    fits = fit_table(traj, cfg.fit_eps)
    grid = fits[fits.role == "grid"]
    summary: dict = {}
    overlays = []

    ga = _base(fits, cfg, "ga") if "ga" in cfg.methods else None
    npo = _base(fits, cfg, "npo", cfg.base_beta) if "npo" in cfg.methods else None
    if ga is not None:
        g = grid[grid.method == "ga"]
        summary["ga"] = {"slope": ga.linear_slope, "linear_r2": ga.linear_r2, "log_r2": ga.log_r2,
                         "distance_T": ga.distance_T, "eta": ga.eta, "n_f": int(ga.n_f), "d": int(ga.d),
                         "fit_from": ga.fit_from, "linear_r2_min_over_grid": float(g.linear_r2.min()),
                         "slope_scaling": {"law": "slope ~ eta/sqrt(n_f)",
                                           **_scaling((g.eta / np.sqrt(g.n_f)).to_numpy(), g.linear_slope.to_numpy())}}
    if npo is not None:
        g = grid[(grid.method == "npo")]
        main = g[g.beta.isin(cfg.betas)]
        in_log = g[g.in_regime]                                # reached the log regime (W << 1)
        summary["npo"] = {"beta": cfg.base_beta, "log_slope": npo.log_slope, "log_r2": npo.log_r2,
                          "linear_r2": npo.linear_r2, "distance_T": npo.distance_T, "eta": npo.eta,
                          "n_f": int(npo.n_f), "d": int(npo.d), "fit_from": npo.fit_from,
                          "log_r2_by_beta": {str(b): float(main[np.isclose(main.beta, b)].log_r2.min())
                                             for b in cfg.betas},
                          "log_slope_scaling": {"law": "log_slope ~ sqrt(n_f)/beta (configs in the log regime)",
                                                **_scaling((np.sqrt(in_log.n_f) / in_log.beta).to_numpy(),
                                                           in_log.log_slope.to_numpy())}}
    if ga is not None and npo is not None:
        summary["npo_over_ga_distance_T"] = npo.distance_T / ga.distance_T

    # the realised Theorem-2 assumptions, per (n_f, d)
    nd = grid.groupby(["n_f", "d"]).C0.max().reset_index()
    th = traj.groupby("config_id").theta_init_norm.first()
    summary["data"] = {"C0_definition": "n_f * max_{i != j} |<x_i, x_j>|",
                       "C0_max_by_nf_d": [{"n_f": int(r.n_f), "d": int(r.d), "C0": float(r.C0)} for r in nd.itertuples()],
                       "theta_init_norm": [float(th.min()), float(th.max())],
                       "x_norm_range": [cfg.x_norm_min, cfg.x_norm_max]}

    # every method at the base point (β = base_beta where it applies)
    summary["by_method"] = {}
    for method in cfg.methods:
        row = _base(fits, cfg, method, cfg.base_beta if uses_beta(method) else None)
        if row is not None:
            summary["by_method"][method] = {k: row[k] for k in ("beta", "linear_slope", "linear_r2", "log_slope",
                                                                  "log_r2", "distance_T", "in_regime")}

    # β sweep at the base point, against GA at the same point (Proposition 1)
    sweep = []
    for beta in sorted(set(cfg.beta_sweep) | set(cfg.betas)):
        row = _base(fits, cfg, "npo", beta) if "npo" in cfg.methods else None
        if row is None:
            continue
        entry = {"beta": beta, "distance_T": row.distance_T, "log_r2": row.log_r2, "linear_r2": row.linear_r2,
                 "log_slope": row.log_slope, "log_slope_x_beta_over_sqrt_nf": row.log_slope * beta / math.sqrt(row.n_f),
                 "npo_weight_T": row.npo_weight_T, "in_log_regime": bool(row.in_regime)}
        if ga is not None:
            t, d_npo = _curve(traj, int(row.config_id))
            _, d_ga = _curve(traj, int(ga.config_id))
            early = (t > 0) & (t <= 1000)
            entry["max_rel_dev_from_ga_t_le_1e3"] = float(np.max(np.abs(d_npo[early] / d_ga[early] - 1)))
        sweep.append(entry)
    summary["beta_sweep"] = sweep

    # Lemma-4 envelope constants over t, and GA's linear envelope, at the base configs
    if npo is not None:
        t, b, c, m0 = _sample_matrix(shifts, int(npo.config_id))
        pos = t > 0
        C = theory.implied_rate(t, np.abs(b), npo.eta0, npo.beta)             # (S>0, n_f)
        C_a, C_b = theory.envelope_constants(t, np.abs(b), npo.eta0, npo.beta)
        decades = []
        for k in range(1, int(math.ceil(math.log10(cfg.steps))) + 1):
            w = (t[pos] > 10 ** (k - 1)) & (t[pos] <= 10 ** k) if k > 1 else t[pos] <= 10
            if w.any():
                decades.append({"t_from": 10 ** (k - 1) if k > 1 else 1, "t_to": 10 ** k,
                                "C_a": float(C[w].min()), "C_b": float(C[w].max())})
        tp = t[pos]
        drift = []                     # per-sample change of log C(t) over each decade ending at T
        for k in (2, 1):
            i0 = int(np.argmin(np.abs(np.log(tp / (tp[-1] / 10 ** k)))))
            i1 = int(np.argmin(np.abs(np.log(tp / (tp[-1] / 10 ** (k - 1))))))
            drift.append({"t_from": float(tp[i0]), "t_to": float(tp[i1]),
                          "max_abs_log_change": float(np.abs(np.log(C[i1] / C[i0])).max())})
        summary["envelope"] = {"C_a": C_a, "C_b": C_b, "ratio": C_b / C_a, "beta": npo.beta, "eta0": npo.eta0,
                               "by_decade": decades,
                               "last_decade_ratio": decades[-1]["C_b"] / decades[-1]["C_a"],
                               "per_sample_drift": drift}
        lo, hi = theory.npo_envelope(t, npo.eta0, npo.beta, C_a, C_b)
        overlays += [_ov("npo_envelope_lo", npo.config_id, -1, t, lo), _ov("npo_envelope_hi", npo.config_id, -1, t, hi)]
        sub = t[pos][:: max(1, int(pos.sum()) // 30)]
        flows = [theory.npo_flow_margin(sub, m0[i], c[i], npo.eta0, npo.beta) - m0[i] for i in range(len(c))]
        overlays += [_ov("flow_shift", npo.config_id, i, sub, f) for i, f in enumerate(flows)]
        overlays.append(_ov("flow_distance", npo.config_id, -1, sub, np.sqrt(np.sum(np.square(flows), axis=0))))
    if ga is not None:
        t, b, c, m0 = _sample_matrix(shifts, int(ga.config_id))
        pos = t > 0
        rate = np.abs(b[pos]) / (ga.eta0 * t[pos, None])
        summary["ga_envelope"] = {"c_a": float(rate.min()), "c_b": float(rate.max()),
                                  "c_last_decade": [float(rate[t[pos] > cfg.steps / 10].min()),
                                                    float(rate[t[pos] > cfg.steps / 10].max())],
                                  "x_norm_sq_range": [float(c.min()), float(c.max())]}
        flows = [theory.ga_flow_margin(t, m0[i], c[i], ga.eta0) - m0[i] for i in range(len(c))]
        overlays += [_ov("flow_shift", ga.config_id, i, t, f) for i, f in enumerate(flows)]
        overlays.append(_ov("flow_distance", ga.config_id, -1, t, np.sqrt(np.sum(np.square(flows), axis=0))))
        overlays += [_ov("ga_linear_lo", ga.config_id, -1, t, -theory.ga_logit_shift(t, c.min(), ga.eta0)),
                     _ov("ga_linear_hi", ga.config_id, -1, t, -theory.ga_logit_shift(t, c.max(), ga.eta0))]

    # "exponentially slower": steps for the RMS logit shift to reach R
    if ga is not None and npo is not None:
        tg, rg = _curve(traj, int(ga.config_id), "rms_shift")
        tn, rn = _curve(traj, int(npo.config_id), "rms_shift")
        env, genv = summary["envelope"], summary["ga_envelope"]
        reach = []
        for R in 2.0 ** np.arange(-1, int(math.log2(max(rg[-1], 1.0))) + 1):
            with np.errstate(over="ignore"):      # NPO's e^{βR} overflows to inf for large R: that is the point
                npo_band = [float(theory.steps_to_reach_npo(R, env[C] / npo.beta, npo.eta0, npo.beta))
                            for C in ("C_b", "C_a")]
            reach.append({
                "R": float(R), "ga_steps": _steps_to_reach(tg, rg, R), "npo_steps": _steps_to_reach(tn, rn, R),
                "ga_theory": [float(theory.steps_to_reach_ga(R, genv["c_b"], ga.eta0)),
                              float(theory.steps_to_reach_ga(R, genv["c_a"], ga.eta0))],
                "npo_theory": npo_band})
        summary["steps_to_reach"] = {"quantity": "RMS logit shift sqrt(mean_i b_i^2) = distance_xtx/sqrt(n_f)",
                                     "theory": "GA: R/(c eta0), c in ga_envelope; NPO: (e^{beta R}-1)/(C eta0), "
                                               "C in [C_a, C_b]", "table": reach}

    # the exact single-sample gradient flow (theory.ga_flow_margin / npo_flow_margin)
    flow = {}
    for cid in fits[fits.role == "flow"].config_id:
        row = fits[fits.config_id == cid].iloc[0]
        t, b, c, m0 = _sample_matrix(shifts, int(cid))
        pos = np.nonzero(t > 0)[0]
        pos = pos[:: max(1, len(pos) // 15)]
        ref = FLOW_ORACLES[row.method](t[pos], m0[0], c[0], row.eta, row.beta) - m0[0]
        rel = np.abs(b[pos, 0] - ref) / np.abs(ref)
        flow[row.method] = {"eta": row.eta, "beta": row.beta, "m0": float(m0[0]), "c": float(c[0]),
                            "max_rel_err": float(rel.max()), "t_max": float(t[-1])}
    summary["flow_check"] = flow
    summary["config"] = cfg.resolved()
    ov = pd.concat(overlays, ignore_index=True) if overlays else pd.DataFrame(
        columns=["curve", "config_id", "sample", "step", "value"])
    return summary, fits, ov


def _ov(curve: str, cid, sample: int, t, values) -> pd.DataFrame:
    return pd.DataFrame({"curve": curve, "config_id": int(cid), "sample": sample, "step": np.asarray(t, float),
                         "value": np.asarray(values, float)})


# --------------------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------------------
def run_theory(cfg: TheoryConfig, out_dir, figures_dir=None, progress=print, workers: int = 1) -> dict:
    """Simulate, analyse, and write trajectories.csv, logit_shifts.csv, fits.csv, overlays.csv,
    summary.json and the figures into ``out_dir`` (figures also copied into ``figures_dir`` if given).

    Nothing is written unless the whole simulation succeeds (a diverged run raises NonFiniteLoss first).
    """
    out = Path(out_dir)
    t0 = time.perf_counter()
    traj, shifts, timing = simulate(cfg, progress=progress, workers=workers)
    summary, fits, overlays = analyze(traj, shifts, cfg)
    summary["timing"] = {"simulate": timing, "total_seconds": None}
    write_csv(out / "trajectories.csv", traj)
    write_csv(out / "logit_shifts.csv", shifts)
    write_csv(out / "fits.csv", fits)
    write_csv(out / "overlays.csv", overlays)
    summary["timing"]["total_seconds"] = time.perf_counter() - t0
    write_json(out / "summary.json", summary)
    from .plots.theory import make_all

    make_all(out, figures_dir)
    return summary


def format_table(summary: dict) -> str:
    """A short table of the fitted rates."""
    lines = [f"{'method':<8}{'beta':>7}{'eta':>6}{'n_f':>5}  {'law':<11}{'slope':>10}{'R2':>9}{'dist@T':>11}"]
    if "ga" in summary:
        g = summary["ga"]
        lines.append(f"{'ga':<8}{'-':>7}{g['eta']:>6g}{g['n_f']:>5}  {'D ~ t':<11}{g['slope']:>10.4g}"
                     f"{g['linear_r2']:>9.5f}{g['distance_T']:>11.4g}")
    for e in summary.get("beta_sweep", []):
        mark = "" if e["in_log_regime"] else " (log regime not reached by T)"
        lines.append(f"{'npo':<8}{e['beta']:>7g}{summary['npo']['eta']:>6g}{summary['npo']['n_f']:>5}  "
                     f"{'D ~ log t':<11}{e['log_slope']:>10.4g}{e['log_r2']:>9.5f}{e['distance_T']:>11.4g}{mark}")
    for method, e in summary.get("by_method", {}).items():
        if method not in ("ga", "npo"):
            lines.append(f"{method:<8}{e['beta']:>7g}{'':>6}{'':>5}  {'D ~ log t':<11}{e['log_slope']:>10.4g}"
                         f"{e['log_r2']:>9.5f}{e['distance_T']:>11.4g}")
    for key, name in (("ga", "slope_scaling"), ("npo", "log_slope_scaling")):
        s = summary.get(key, {}).get(name, {})
        if "exponent" in s:
            lines.append(f"{key} {s['law']}: fitted exponent {s['exponent']:.3f} (R2 {s['r2']:.4f}, "
                         f"{s['n_configs']} configs)")
    if "data" in summary:
        c0 = [e["C0"] for e in summary["data"]["C0_max_by_nf_d"]]
        lines.append(f"data: C0 = n_f*max|<x_i,x_j>| in [{min(c0):.2f}, {max(c0):.2f}] over (n_f, d); "
                     f"|theta_init| = {summary['data']['theta_init_norm'][1]:.3g}")
    if "envelope" in summary:
        e = summary["envelope"]
        lines.append(f"NPO envelope: C_a={e['C_a']:.3g} C_b={e['C_b']:.3g} (last decade "
                     f"{e['by_decade'][-1]['C_a']:.3g}..{e['by_decade'][-1]['C_b']:.3g})")
    if "flow_check" in summary:
        lines.append("single-sample flow check, max rel. error: " + ", ".join(
            f"{k} {v['max_rel_err']:.2%}" for k, v in summary["flow_check"].items()))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quick", action="store_true", help="small grid, 10^4 steps (< 30 s); used by tests and figures")
    p.add_argument("--steps", type=int, default=None, help="GD steps T (default 10^5, or 10^4 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="base data seed")
    p.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=None,
                   help=f"comma list from {','.join(METHODS)} (default ga,npo)")
    p.add_argument("--etas", type=_floats, default=None, help="comma list of step sizes eta")
    p.add_argument("--betas", type=_floats, default=None, help="comma list of beta for the main grid")
    p.add_argument("--n-f", dest="n_fs", type=_ints, default=None, help="comma list of forget-set sizes")
    p.add_argument("--d", dest="ds", type=_ints, default=None, help="comma list of dimensions")
    p.add_argument("--init", choices=INITS, default=None, help="how theta_init is drawn (default margins)")
    p.add_argument("--check-orthogonality", action="store_true",
                   help="error unless every n_f <= d and C0 = n_f*max|<x_i,x_j>| <= --max-c0")
    p.add_argument("--max-c0", type=float, default=None)
    p.add_argument("--workers", type=int, default=1, help="processes: one method's batched program each (default 1)")
    p.add_argument("--figures", default="figures", help="also copy figures here ('' to skip; default figures/)")


def config_from_args(args) -> TheoryConfig:
    base = QUICK if args.quick else TheoryConfig()
    over = {k: v for k, v in {"steps": args.steps, "seed": args.seed, "methods": args.methods,
                              "etas": args.etas, "betas": args.betas, "n_fs": args.n_fs, "ds": args.ds,
                              "init": args.init, "max_c0": args.max_c0}.items() if v is not None}
    over["check_orthogonality"] = bool(args.check_orthogonality)
    # keep the base point inside a user-narrowed grid
    for name, grid in (("base_eta", "etas"), ("base_n_f", "n_fs"), ("base_d", "ds"), ("base_beta", "betas")):
        vals = over.get(grid, getattr(base, grid))
        if getattr(base, name) not in vals and vals:
            over[name] = vals[-1] if name != "base_beta" else min(vals, key=lambda b: abs(math.log(b)))
    return dataclasses.replace(base, **over)


def main(args) -> int:
    cfg = config_from_args(args)
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    summary = run_theory(cfg, args.out, figures_dir=args.figures or None, workers=args.workers)
    print(format_table(summary))
    print(f"wrote {args.out}/summary.json, trajectories.csv, figures ({summary['timing']['total_seconds']:.1f}s)")
    return 0
