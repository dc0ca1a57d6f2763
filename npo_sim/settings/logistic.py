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

**Batching.** The whole grid, every method, runs as one tensor program through
:func:`npo_sim.unlearn.run` (:func:`simulate_batch`): configs are grouped by method and dataset
``(n_f, d, seed)`` into slots and the parameters have shape ``(slots, replicas, k_max)``, so the forward
pass is one batched matrix product; each method's registry objective applies to its own slots
(:class:`SlicedObjective`). The model is linear in ``z``, so the adapter's closed-form ``vjp``
(``∂L/∂z = c Bᵀ``) replaces autograd through the model: autograd only sees the loss over the
per-example log-likelihoods (the autograd path stays the reference the tests compare against).
Smaller ``n_f`` are zero-padded to ``n_max``; padded samples have zero features, hence constant
``logp`` and zero gradient, and each replica's step is scaled by ``n_max/n_f`` so that the mean over
``n_max`` entries gives exactly the gradient of the mean over its ``n_f`` samples. Recorded losses are
recomputed afterwards on the valid samples only, with the same objective.

This module holds the batched grid and :func:`simulate`; the config (and what the lab supplies) is
in :mod:`.logistic_config`, the data and the adapter in :mod:`.logistic_data`, the analysis in
:mod:`.logistic_analysis`, the claims and the text table in :mod:`.logistic_claims`, the figures in
:mod:`npo_sim.plots.theory`. :data:`STUDY` ties them together for :func:`npo_sim.study.run_study`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import losses
from ..study import Results, Study
from ..unlearn import log_steps, run
from .logistic_claims import describe, findings
from .logistic_config import (  # noqa: F401  (re-exported: the setting's config lives in logistic_config)
    DTYPE,
    INITS,
    METHODS,
    QUICK,
    SUPPLIES,
    TheoryConfig,
    make_config,
)
from .logistic_data import LogisticAdapter, make_data, margin_inputs


# --------------------------------------------------------------------------------------------------
# the batched grid
# --------------------------------------------------------------------------------------------------
def _uses_beta(method: str) -> bool:
    return losses.OBJECTIVES[method].uses_beta


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
    hyper: tuple[tuple[str, float], ...] = ()   # hyperparameters other than β (TheoryConfig.overrides)

    def objective(self, beta=None) -> losses.Objective:
        """This config's registry objective (``beta``: a per-replica tensor instead of ``self.beta``)."""
        return _objective(self.method, self.beta if beta is None else beta, self.hyper)


def expand_grid(cfg: TheoryConfig) -> list[Run]:
    """Every config: the main grid, the β sweep at the base point, and one single-sample flow check per
    method whose forget term has an exact flow (:func:`~.logistic_analysis.has_exact_flow`)."""
    from .logistic_analysis import has_exact_flow  # imported when needed: pandas and scipy are heavy

    runs: list[Run] = []
    seen = set()

    def add(method, beta, eta, n_f, d, seed, role="grid"):
        key = (method, beta, eta, n_f, d, seed, role)
        if key not in seen:
            seen.add(key)
            hyper = tuple((k, v) for m, k, v in cfg.overrides if m == method)
            runs.append(Run(len(runs), method, beta, eta, n_f, d, seed, role, hyper))

    def flow_check(method):
        if has_exact_flow(method):
            add(method, cfg.base_beta if _uses_beta(method) else math.nan, cfg.flow_eta, 1, cfg.base_d, 0, "flow")

    for method in cfg.methods:
        betas = cfg.betas if _uses_beta(method) else (math.nan,)
        for seed in range(cfg.n_seeds):
            for n_f in cfg.n_fs:
                for d in cfg.ds:
                    for eta in cfg.etas:
                        for beta in betas:
                            add(method, beta, eta, n_f, d, seed)
            if _uses_beta(method):
                for beta in cfg.beta_sweep:
                    add(method, beta, cfg.base_eta, cfg.base_n_f, cfg.base_d, seed)
        flow_check(method)   # the exact single-sample gradient flow (n_f = 1, small step so GD ≈ flow)
    for method in cfg.law_methods:
        add(method, cfg.base_beta if _uses_beta(method) else math.nan, cfg.base_eta, cfg.base_n_f, cfg.base_d, 0)
        flow_check(method)
    return runs


def _objective(method: str, beta, hyper: tuple[tuple[str, float], ...] = ()) -> losses.Objective:
    return losses.get_objective(method, **({"beta": beta} if _uses_beta(method) else {}), **dict(hyper))


@dataclass(frozen=True)
class SlicedObjective:
    """Several registry objectives in one program: ``parts[i] = (objective, a, b)`` owns slots ``a:b``.

    Each objective is the library's own, applied to its slice of every input (replica axis 0); the loss
    terms are concatenated back, so summing them gives every replica the gradient of its own method.
    ``beta`` (per replica, 1 where unused) is only read when the loop records the NPO weight.
    """

    parts: tuple[tuple[losses.Objective, int, int], ...]
    beta: torch.Tensor

    @property
    def name(self) -> str:
        return "+".join(o.name for o, _, _ in self.parts)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(o.needs for o, _, _ in self.parts))

    def __call__(self, inputs) -> losses.LossTerms:
        terms = [o({k: inputs[k][a:b] for k in o.needs}) for o, a, b in self.parts]
        return losses.LossTerms(*(torch.cat(t) for t in zip(*terms)))


def _slots(runs: list[Run], cap: int | None) -> tuple[list, int]:
    """Group configs by (method, dataset) into slots of at most ``cap`` configs, methods contiguous.

    ``cap`` (default: chosen to minimise padded work) is the most configs sharing one dataset slot:
    the padded work is about slots × (cap + 8), as each slot also reads its (k × n) features, worth
    ~8 replicas of elementwise work.
    """
    order = {m: i for i, m in enumerate(dict.fromkeys(r.method for r in runs))}
    keys = sorted({(r.method, r.n_f, r.d, r.seed) for r in runs}, key=lambda k: (order[k[0]], *k[1:]))
    per = {k: [r for r in runs if (r.method, r.n_f, r.d, r.seed) == k] for k in keys}
    cap = cap or min(range(1, max(map(len, per.values())) + 1),
                     key=lambda c: (c + 8) * sum(-(-len(g) // c) for g in per.values()))
    return [(k, g[i: i + cap]) for k, g in per.items() for i in range(0, len(g), cap)], cap


def simulate_batch(runs: list[Run], data: dict, steps: int, record_at: list[int],
                   full_dim: dict | None = None, cap: int | None = None) -> dict[str, np.ndarray]:
    """Run every config of ``runs`` (any mix of methods) in one batched :func:`npo_sim.unlearn.run` call.

    ``data`` maps ``(n_f, d, seed)`` to :class:`ForgetData`. ``full_dim`` (tests, naive baseline) maps the
    same keys to the full label-signed ``(n_f, d)`` feature matrix, to run on θ − θ_init itself (through
    the same closed-form chain rule). Slots are grouped by method; each method's registry objective
    applies to its own slots (:class:`SlicedObjective`). Returns run's column dict with an extra
    ``config_id`` column (dummy replicas dropped).
    """
    slots, Rm = _slots(runs, cap)
    D = len(slots)
    n_max = max(r.n_f for r in runs)
    feats = {k: (full_dim[k] if full_dim is not None else data[k].B) for k in {(r.n_f, r.d, r.seed) for r in runs}}
    k_max = max(f.shape[1] for f in feats.values())
    Bt = torch.zeros(D, k_max, n_max, dtype=DTYPE)
    m0 = torch.zeros(D, 1, n_max, dtype=DTYPE)
    lr = torch.zeros(D, Rm, dtype=DTYPE)                      # dummy replicas: lr = 0
    beta = torch.ones(D, Rm, dtype=DTYPE)
    ids = np.full((D, Rm), -1)
    bounds: dict[str, list[int]] = {}
    first = {}
    for i, ((method, *key), group) in enumerate(slots):
        key = tuple(key)
        f = torch.as_tensor(feats[key], dtype=DTYPE)
        Bt[i, : f.shape[1], : f.shape[0]] = f.T
        m0[i, 0, : key[0]] = torch.as_tensor(data[key].m0, dtype=DTYPE)
        bounds.setdefault(method, [i, i])[1] = i + 1
        first.setdefault(method, group[0])
        for j, r in enumerate(group):
            lr[i, j] = r.eta * n_max / r.n_f                   # padding correction (see module doc)
            beta[i, j] = r.beta if _uses_beta(method) else 1.0
            ids[i, j] = r.config_id
    if len(bounds) == 1:
        objective = first[next(iter(bounds))].objective(beta)
    else:
        objective = SlicedObjective(tuple((first[m].objective(beta[a:b]), a, b) for m, (a, b) in bounds.items()), beta)
    out = run(LogisticAdapter(Bt, m0), objective, [torch.zeros(D, Rm, k_max, dtype=DTYPE)],
              steps=steps, lr=lr, record_at=record_at)
    out["config_id"] = ids.reshape(-1)[out["replica"]]
    keep = out["config_id"] >= 0
    return {k: v[keep] for k, v in out.items()}


def simulate_group(method: str, runs: list[Run], data: dict, steps: int, record_at: list[int],
                   full_dim: dict | None = None, cap: int | None = None) -> dict[str, np.ndarray]:
    """:func:`simulate_batch` for the configs of one method (``runs`` must all be ``method``'s)."""
    if any(r.method != method for r in runs):
        raise ValueError(f"simulate_group({method!r}) got configs of other methods")
    return simulate_batch(runs, data, steps, record_at, full_dim, cap)


def _tidy(runs: list[Run], data: dict, raw: dict, cfg: TheoryConfig):
    """Per-(config, step) rows and per-(config, step, sample) shifts, in config order; losses recomputed
    on the valid samples with each config's own objective."""
    import pandas as pd

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
        obj = r.objective()
        forget = obj(margin_inputs(m, m_ref, obj.needs)).forget.numpy()
        lp, lp0 = F.logsigmoid(m), F.logsigmoid(m_ref)
        w = (losses.npo_weight(lp, lp0, r.beta).mean(-1).numpy() if _uses_beta(r.method)
             else np.full(len(steps), np.nan))
        # the log law's small parameter (p/p_0)^a, as σ(a·(log p − log p_0)) (NPO's W/2 at β = a)
        tail_w = (torch.sigmoid(float(obj.tail) * (lp - lp0)).mean(-1).numpy() if obj.law == "log"
                  else np.full(len(steps), np.nan))
        ab = np.abs(b)
        traj.append(pd.DataFrame({
            "config_id": r.config_id, "role": r.role, "method": r.method, "beta": r.beta, "eta": r.eta,
            "n_f": r.n_f, "d": r.d, "seed": r.seed, "eta0": r.eta / r.n_f, "c_mean": dat.c.mean(),
            # GA's exact drift b' = η0·AAᵀ1 once σ(−m) ≈ 1 (signed Gram matrix AAᵀ = BBᵀ): its RMS over samples
            "gram_rowsum_rms": float(np.sqrt(np.mean((dat.B @ dat.B.sum(0)) ** 2))),
            "m0_mean": dat.m0.mean(), "C0": dat.C0, "theta_init_norm": dat.theta_norm, "step": steps,
            "dist_xtx": raw["dist_xtx"][sel], "dist_l2": raw["dist_l2"][sel],
            "rms_shift": np.sqrt((b ** 2).mean(1)), "abs_shift_min": ab.min(1), "abs_shift_mean": ab.mean(1),
            "abs_shift_max": ab.max(1), "forget_prob": torch.sigmoid(m).mean(-1).numpy(),
            "forget_loss": forget, "npo_weight": w, "tail_weight": tail_w}))
        if r.role == "flow" or (r.n_f == cfg.base_n_f and r.d == cfg.base_d and r.seed == 0
                                and r.eta == cfg.base_eta):
            S, n = b.shape
            shifts.append(pd.DataFrame({
                "config_id": r.config_id, "step": np.repeat(steps, n), "sample": np.tile(np.arange(n), S),
                "shift": b.reshape(-1), "c": np.tile(dat.c, S), "m0": np.tile(dat.m0, S)}))
    return pd.concat(traj, ignore_index=True), pd.concat(shifts, ignore_index=True)


def _group_worker(methods, group, data, steps, record):
    """Run one batched program (in this process or a worker process); returns (raw columns, seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny tensors: extra threads only add synchronisation
    try:
        t0 = time.process_time()
        raw = simulate_batch(group, data, steps, record)
        return raw, time.process_time() - t0
    finally:
        torch.set_num_threads(threads)


def _run_groups(jobs: dict, workers: int) -> dict:
    """``{name: (raw, seconds)}``; ``workers > 1`` runs the programs in parallel processes."""
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = {m: ex.submit(_group_worker, *job) for m, job in jobs.items()}
            return {m: f.result() for m, f in futures.items()}
    return {m: _group_worker(*job) for m, job in jobs.items()}


def simulate_grid(cfg: TheoryConfig, progress=None) -> tuple:
    """Draw the data and run the whole grid -> (trajectories, logit shifts, per-program timing).

    With ``cfg.workers == 1`` every method trains in one batched program; with more, one program per
    method on its own process. Results are the same either way (to float rounding: ~1e-13).
    ``progress`` (e.g. ``print``) receives one line per program. Timing is process CPU seconds.
    """

    runs = expand_grid(cfg)
    data = {}
    for r in runs:
        key = (r.n_f, r.d, r.seed)
        if key not in data:
            data[key] = make_data(*key, cfg)
    record = log_steps(cfg.steps, cfg.record_points)
    methods = tuple(dict.fromkeys(r.method for r in runs))
    if cfg.workers > 1 and len(methods) > 1:
        groups = {m: [r for r in runs if r.method == m] for m in methods}
    else:
        groups = {"+".join(methods): runs}
    # a loss that couples examples (KTO's batch-mean reference point) is not exact under zero-padding to
    # another n_f: such methods run one program per n_f
    coupled = {m for m in methods if losses.OBJECTIVES[m].couples_examples}
    if coupled:
        groups = {k: [r for r in g if r.method not in coupled] for k, g in groups.items()}
        groups = {k: g for k, g in groups.items() if g}
        for r in runs:
            if r.method in coupled:
                groups.setdefault(f"{r.method}@n_f={r.n_f}", []).append(r)
    results = _run_groups({m: (m, g, data, cfg.steps, record) for m, g in groups.items()}, cfg.workers)
    raws, timing = [], {}
    for name, (raw, seconds) in results.items():
        timing[name] = {"configs": len(groups[name]), "seconds": seconds}
        if progress:
            progress(f"  {name}: {len(groups[name])} configs x {cfg.steps} steps in {seconds:.1f}s")
        raws.append(raw)
    keys = dict.fromkeys(k for r in raws for k in r)    # a program over smaller n_f has fewer b_i columns
    raw = {k: np.concatenate([r.get(k, np.full(len(r["step"]), np.nan)) for r in raws]) for k in keys}
    traj, shifts = _tidy(runs, data, raw, cfg)
    return traj, shifts, timing


# --------------------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------------------
def simulate(cfg: TheoryConfig, progress: bool = False) -> Results:
    """Run the grid and analyse it: tables ``trajectories``, ``logit_shifts``, ``fits`` and ``overlays``,
    and the summary (fits, scaling checks, envelopes, steps-to-reach, β sweep, flow check, config)."""
    traj, shifts, _ = simulate_grid(cfg, print if progress else None)
    from .logistic_analysis import analyze

    summary, fits, overlays = analyze(traj, shifts, cfg)
    return Results({"trajectories": traj, "logit_shifts": shifts, "fits": fits, "overlays": overlays}, summary)


def figures(results: Results, cfg: TheoryConfig) -> dict:
    """The four Theorem-2 figures (matplotlib is imported only when they are drawn)."""
    from ..plots.theory import theory_figures

    return theory_figures(results)


STUDY = Study("theory", simulate, findings, figures, describe=describe)


def report_configs(smoke: bool) -> dict[str, TheoryConfig]:
    """The run ``npo-sim figures`` makes: ``theory`` at the quick grid (smoke: 2000 steps, 4 sweep βs),
    with every other method the lab supports at the base point, for its divergence law."""
    law = tuple(m for m in METHODS if m not in QUICK.methods)
    if smoke:   # one method of each other law kind draws the figure's panels
        return {"theory": dataclasses.replace(QUICK, steps=2000, betas=(0.5, 1.0, 2.0),
                                              beta_sweep=(0.001, 0.1, 1.0, 10.0), law_methods=("wga", "undial"))}
    return {"theory": dataclasses.replace(QUICK, law_methods=law)}
