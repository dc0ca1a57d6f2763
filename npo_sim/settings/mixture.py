"""The NPO paper's §4 synthetic experiment (App. D): random-features logistic model on Gaussian mixtures.

Setting (per seed; every seed redraws W, the training sets, the eval sets and the IDK labels):

* forget data ``x ~ N(α·1, I)``, ``P(y=1|x) = σ((x − μ_f)ᵀθ_f + 1)``; retain data ``x ~ N(−α·1, I)``,
  ``P(y=1|x) = σ((x − μ_r)ᵀθ_r − 1)`` with ``θ_f = −θ_r = 1/√d``, ``μ_f = −μ_r = α·1``;
* model ``π_θ(y=1|x) = σ(θᵀ ReLU(Wx))``, ``W`` (128×d) frozen with ``N(0, 1/d)`` entries;
* ``π_ref`` fits forget ∪ retain, the oracle ``π_retr`` fits retain only (mean NLL, no regulariser),
  by Newton's method (default) or the paper's full-batch GD recipe (:mod:`.mixture_pretrain`);
* unlearning from ``π_ref`` with the generic loop :func:`npo_sim.unlearn.run` and the objectives of
  :mod:`npo_sim.losses`; every method × seed is a replica of one
  tensor program, with the closed-form gradient.

Pipeline: :func:`make_data` -> :func:`pretrain` -> :class:`~.mixture_adapter.MixtureAdapter` +
:func:`~.mixture_adapter.run_methods` -> :mod:`.mixture_analysis` (summary, findings, claims).
:func:`simulate` does all of it and returns the tables; :data:`STUDY` hands it to
:func:`npo_sim.study.run_study`, which writes the run directory. Figures: :mod:`npo_sim.plots.synthetic`.
The config, the methods and their Table-1 hyperparameters are in :mod:`.mixture_config`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import numpy as np
import torch

from ..plots import synthetic as plots
from ..study import Results, Study
from . import mixture_analysis as analysis
from .mixture_adapter import MixtureAdapter, mean_binary_kl, run_methods
from .mixture_config import (  # noqa: F401  (re-exported: the setting's config lives in mixture_config)
    ALPHAS,
    DONOR_FAMILY,
    HYPERPARAMETERS,
    METHODS,
    PAPER_TABLE1,
    PRETRAIN_CHOICES,
    SUPPLIES,
    SUPPORTED,
    MethodSpec,
    MixtureData,
    SyntheticConfig,
)
from .mixture_pretrain import PRETRAINERS


# --------------------------------------------------------------------------------------------------
# data and features
# --------------------------------------------------------------------------------------------------
def _sample_one(rng: np.random.Generator, cfg: SyntheticConfig):
    d, a = cfg.d, cfg.alpha
    theta_f = np.full(d, 1.0 / math.sqrt(d))
    mu_f = np.full(d, a)
    W = rng.normal(0.0, 1.0 / math.sqrt(d), size=(cfg.width, d))

    def draw(n: int, sign: float):   # sign +1: forget distribution, −1: retain distribution
        x = rng.normal(sign * a, 1.0, size=(n, d))
        p1 = 1.0 / (1.0 + np.exp(-((x - sign * mu_f) @ (sign * theta_f) + sign * 1.0)))
        return np.maximum(x @ W.T, 0.0), (rng.random(n) < p1).astype(np.float64)

    phi_f, y_f = draw(cfg.n_forget, +1.0)
    phi_r, y_r = draw(cfg.n_retain, -1.0)
    y_idk = (rng.random(cfg.n_forget) < 0.5).astype(np.float64)
    phi_ef, _ = draw(cfg.n_eval, +1.0)
    phi_er, _ = draw(cfg.n_eval, -1.0)
    return phi_f, y_f, y_idk, phi_r, y_r, phi_ef, phi_er


def make_data(cfg: SyntheticConfig) -> MixtureData:
    """Draw every seed's W, training sets, eval sets and IDK labels (numpy ``default_rng(seed)``)."""
    parts = [_sample_one(np.random.default_rng(s), cfg) for s in cfg.seed_list]
    return MixtureData(*(np.stack(arrs) for arrs in zip(*parts)), seeds=tuple(cfg.seed_list))


# --------------------------------------------------------------------------------------------------
# the experiment
# --------------------------------------------------------------------------------------------------
def _start_kl(data: MixtureData, theta: np.ndarray) -> dict:
    """Forget/retain distance of π_ref from π_retr on the eval sets (the trade-off curves' start)."""
    ev_f = np.einsum("snk,skc->snc", data.phi_eval_forget, theta)
    ev_r = np.einsum("snk,skc->snc", data.phi_eval_retain, theta)
    f = mean_binary_kl(torch.as_tensor(ev_f[..., 1]), torch.as_tensor(ev_f[..., 0])).numpy()
    r = mean_binary_kl(torch.as_tensor(ev_r[..., 1]), torch.as_tensor(ev_r[..., 0])).numpy()
    return {"forget_distance": analysis.ms(f), "retain_distance": analysis.ms(r)}


def _newton_vs_gd(data: MixtureData, th_newton: np.ndarray, th_gd: np.ndarray) -> dict:
    """How far the paper's GD recipe is from the exact optimum, per model (seed mean ± std)."""
    ev = np.concatenate([data.phi_eval_forget, data.phi_eval_retain], axis=1)
    out = {}
    for col, model in enumerate(("ref", "retr")):
        a, b = th_newton[..., col], th_gd[..., col]
        diff = np.linalg.norm(a - b, axis=1)
        dist = mean_binary_kl(torch.as_tensor(np.einsum("snk,sk->sn", ev, a)),
                              torch.as_tensor(np.einsum("snk,sk->sn", ev, b))).numpy()
        out[model] = {"param_distance": analysis.ms(diff),
                      "relative_param_distance": analysis.ms(diff / np.linalg.norm(a, axis=1)),
                      "kl_newton_to_gd_on_eval": analysis.ms(dist)}
    return out


def _scalars(info: dict) -> dict:
    return {k: (analysis.ms(v.ravel()) if isinstance(v, np.ndarray) else v) for k, v in info.items()}


def _compare_note(config: SyntheticConfig) -> str:
    other = next(p for p in PRETRAIN_CHOICES if p != config.pretrain)
    return (f"{other} pretraining was also run and compared (--compare-pretrain)" if config.compare_pretrain
            else f"the {other}-pretraining comparison did not run (off by default; --compare-pretrain)")


def pretrain(data: MixtureData, config: SyntheticConfig) -> tuple[np.ndarray, dict]:
    """θ (S, k, 2) = [θ_ref, θ_retr] by the configured recipe, and the pretraining summary (with the
    other recipe's fit and its distance from this one when ``compare_pretrain``)."""
    theta, info = PRETRAINERS[config.pretrain](data, config)
    out: dict = {"method": config.pretrain, "compared": config.compare_pretrain,
                 "compare_note": _compare_note(config), config.pretrain: _scalars(info),
                 "start": {config.pretrain: _start_kl(data, theta)}}
    if config.compare_pretrain:
        other = next(p for p in PRETRAIN_CHOICES if p != config.pretrain)
        theta_o, info_o = PRETRAINERS[other](data, config, compare=True)
        out[other] = _scalars(info_o)
        out["start"][other] = _start_kl(data, theta_o)
        th_n, th_g = (theta, theta_o) if config.pretrain == "newton" else (theta_o, theta)
        out["newton_vs_gd"] = _newton_vs_gd(data, th_n, th_g)
    sep = sorted({sd for rec in (out.get("newton") or {}).values() if isinstance(rec, dict)
                  for sd in rec.get("quasi_separated_seeds", [])})
    if sep:
        out["note"] = (f"seeds {sep}: the training data are (quasi-)separable for Newton's fit (a training "
                       "logit beyond ±30), so no finite optimum exists and Newton stopped on a ray of large "
                       "‖θ‖ once ‖∇‖ < 1e-10; GD's finite budget keeps θ moderate (see theta_norm_per_seed)")
    return theta, out


def _config_summary(config: SyntheticConfig) -> dict:
    return {**dataclasses.asdict(config),
            "dpo_note": "DPO is scaled by 2/beta as in the official NPO code (the paper's equation uses "
                        "1/beta); see npo_sim.losses.DPO_SCALE",
            "idk_note": "IDK+RT/DPO+RT: the IDK answer is a Bernoulli(0.5) label per forget x",
            "seeds_used": config.seed_list, "record_at": "every record_every steps and the last"}


def simulate(config: SyntheticConfig, progress: bool = False) -> Results:
    """The whole experiment for ``config.alpha``: the ``curves`` table and the summary (config,
    pretraining, per-method numbers, the paper's findings). ``progress`` prints each phase's time."""
    t0 = time.perf_counter()
    data = make_data(config)
    theta, pretraining = pretrain(data, config)
    if progress:
        print(f"pretrained ({config.pretrain}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    t1 = time.perf_counter()
    dtype = getattr(torch, config.dtype)
    adapter = MixtureAdapter(data, theta[..., 1], dtype=dtype)
    curves = run_methods(adapter, torch.as_tensor(theta[..., 0], dtype=dtype), config.specs,
                         steps=config.steps, record_at=config.record_at, seeds=config.seed_list)
    if progress:
        print(f"unlearned {len(config.methods)} methods x {config.seeds} seeds x {config.steps} steps in "
              f"{time.perf_counter() - t1:.1f} s", file=sys.stderr)
    summary = {"config": _config_summary(config), "pretraining": pretraining,
               "methods": analysis.summarize(curves, config), "findings": analysis.measure(curves, config)}
    tables = {"curves": curves}
    if config.beta_sweep:
        tables["beta_sweep"] = run_methods(adapter, torch.as_tensor(theta[..., 0], dtype=dtype), config.sweep_specs,
                                           steps=config.steps, record_at=config.record_at, seeds=config.seed_list)
        summary["beta_sweep"] = analysis.beta_sweep(tables["beta_sweep"], config)
    return Results(tables=tables, summary=summary)


STUDY = Study(name="synthetic", simulate=simulate, findings=analysis.claims, figures=plots.figures)


def report_configs(smoke: bool) -> dict[str, SyntheticConfig]:
    """The runs ``npo-sim figures`` makes: both α at the defaults (one seed and 400 steps when ``smoke``)."""
    sweep = {1.0: REPORT_BETA_SWEEP, 0.0: ()}
    return {f"synthetic_alpha{a:g}": SyntheticConfig(alpha=a, seeds=1, steps=400, compare_pretrain=False,
                                                     beta_sweep=sweep[a])
            if smoke else SyntheticConfig(alpha=a, beta_sweep=sweep[a]) for a in ALPHAS}


#: the β sequence of the α = 1 "NPO → GA as β → 0" row in ``npo-sim figures``
REPORT_BETA_SWEEP = (1.0, 0.1, 0.01, 0.001)
