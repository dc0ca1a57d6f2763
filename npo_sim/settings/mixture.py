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
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import losses
from ..losses import DPO_SCALE, OBJECTIVES
from ..plots import synthetic as plots
from ..runio import UserError
from ..study import Results, Study
from . import mixture_analysis as analysis
from .mixture_adapter import MixtureAdapter, mean_binary_kl, run_methods
from .mixture_pretrain import PRETRAINERS

ALPHAS = (1.0, 0.0)
PRETRAIN_CHOICES = tuple(PRETRAINERS)
#: what the mixture supplies: per-example and one-token inputs of a two-class model, retain logits; no
#: activations (its random features are fixed, so RMU has nothing to steer)
SUPPLIES = frozenset({"logp", "logp_ref", "idk_logp", "idk_logp_ref", "length", "retain_logp", "retain_logits",
                      "retain_ref_logits", "retain_mask", "token_logp", "ref_token_logp", "token_mask",
                      "forget_logits", "forget_ref_logits", "forget_labels"})
#: every method the setting supports: the paper's Table 1 in its order, then the others (``--methods all``)
SUPPORTED = losses.paper_table1() + tuple(
    m for m in losses.methods(supplies=SUPPLIES) if m not in losses.paper_table1())
#: the methods run by default: Table 1, then the other "synthetic" methods (the step overhead grows with
#: each method, so the next objectives run on request: their laws are the logistic lab's rows)
METHODS = tuple(m for m in SUPPORTED if m in losses.paper_table1() or "synthetic" in OBJECTIVES[m].tags)
#: the Table-1 family whose step size a method of a family outside Table 1 borrows (WGA/SatImp are weighted
#: GA, UNDIAL/CE-U distil towards a target like GA's likelihood terms, KTO is NPO-like)
DONOR_FAMILY = {"weighted": "ga", "distill": "ga", "kto": "npo"}


# --------------------------------------------------------------------------------------------------
# hyperparameters (the paper's Table 1, plus the extras)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """One method: a registered objective (npo_sim.losses.OBJECTIVES) and its step size / β."""

    objective: str
    lr: float
    beta: float | None = None   # None: the objective has no β (or keeps its registry default)
    source: str = "paper Table 1"


#: α -> forget-term family -> (step size, β) of that family's methods in the paper's Table 1 (App. D).
#: IDK+RT uses GA's step size.
PAPER_TABLE1 = {
    1.0: {"ga": (5e-4, None), "idk": (5e-4, None), "npo": (5e-3, 1.0), "dpo": (5e-3, 0.1)},
    0.0: {"ga": (1e-4, None), "idk": (1e-4, None), "npo": (5e-2, 10.0), "dpo": (5e-2, 5.0)},
}


def _spec(name: str, table: Mapping[str, tuple]) -> MethodSpec:
    """A method's hyperparameters: its Table-1 row, or for an extra method those of the first Table-1
    method of its family (its step size; its β too when the forget terms match, else the registry's β).

    A term that needs ``length`` (SimNPO) sees ``|y| = 1`` here, with the registry's margin γ.
    """
    o = OBJECTIVES[name]
    family = o.family if o.family in table else DONOR_FAMILY[o.family]
    lr, beta = table[family]
    if o.paper_row is not None:
        return MethodSpec(name, lr, beta)
    donor = OBJECTIVES[next(m for m in losses.paper_table1() if OBJECTIVES[m].family == family)]
    if not o.uses_beta:
        beta, how = None, ""
    elif o.forget == donor.forget:
        how = " and β"
    else:
        beta, how = o.beta, f", β={o.beta:g}" + (f", γ={o.gamma:g}, |y|=1" if "length" in o.needs else "")
    return MethodSpec(name, lr, beta, source=f"extra (not in the paper): {donor.label}'s lr{how}")


#: alpha -> method -> hyperparameters
HYPERPARAMETERS: dict[float, dict[str, MethodSpec]] = {
    alpha: {m: _spec(m, table) for m in SUPPORTED} for alpha, table in PAPER_TABLE1.items()}


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticConfig:
    """One α of the experiment. The per-method hyperparameters follow from α (:attr:`specs`)."""

    alpha: float = 1.0
    seeds: int = 20                    # outcomes are heavy-tailed across seeds: findings carry seed CIs
    seed0: int = 0                     # seeds used: seed0, ..., seed0 + seeds - 1
    pretrain: str = "newton"           # newton | gd
    compare_pretrain: bool = False     # also run the other recipe and report the difference
    methods: tuple[str, ...] = METHODS
    steps: int = 2000
    record_every: int = 25
    threshold: float = 0.005           # "forget distance below" threshold of the paper's finding
    d: int = 16
    width: int = 128
    n_forget: int = 200
    n_retain: int = 1000
    n_eval: int = 1000
    gd_steps: int = 20000
    gd_lr: float = 0.05
    dtype: str = "float32"             # of the unlearning loop; pretraining and metrics are float64
    #: NPO at these β, at GA's step size, next to GA (the paper's Fig. 3: the NPO trajectory approaches GA's
    #: as β → 0); empty: not run. Its curves are the ``beta_sweep`` table.
    beta_sweep: tuple[float, ...] = ()
    dpo_scale: str = field(default=DPO_SCALE, init=False)

    def __post_init__(self) -> None:
        if self.alpha not in HYPERPARAMETERS:
            raise UserError(f"alpha must be one of {', '.join(f'{a:g}' for a in ALPHAS)} "
                            f"(the paper's Table 1 settings), got {self.alpha:g}")
        if self.seeds < 1:
            raise UserError(f"seeds must be >= 1, got {self.seeds}")
        if self.pretrain not in PRETRAIN_CHOICES:
            raise UserError(f"pretrain must be one of {', '.join(PRETRAIN_CHOICES)}, got {self.pretrain!r}")
        if isinstance(self.methods, str):
            raise UserError(f"methods must be a tuple of method names, got the string {self.methods!r}")
        bad = [m for m in self.methods if m not in HYPERPARAMETERS[self.alpha]]
        unsupported = [m for m in bad if m in OBJECTIVES]
        if unsupported:
            raise UserError(losses.skip_note("the §4 mixture", SUPPLIES, unsupported))
        if bad or not self.methods:
            raise UserError(f"unknown method(s) {', '.join(bad) or '(none given)'}; "
                            f"choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise UserError(f"methods listed twice: {', '.join(self.methods)}")
        for name in ("steps", "record_every", "d", "width", "n_forget", "n_retain", "n_eval", "gd_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.threshold > 0 and self.gd_lr > 0):
            raise UserError("threshold and gd_lr must be > 0")
        if not all(b > 0 for b in self.beta_sweep) or len(set(self.beta_sweep)) != len(self.beta_sweep):
            raise UserError(f"beta_sweep must hold distinct values > 0, got {self.beta_sweep}")
        if self.dtype not in ("float32", "float64"):
            raise UserError(f"dtype must be float32 or float64, got {self.dtype!r}")

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed0, self.seed0 + self.seeds))

    @property
    def specs(self) -> dict[str, MethodSpec]:
        return {m: HYPERPARAMETERS[self.alpha][m] for m in self.methods}

    @property
    def sweep_specs(self) -> dict[str, MethodSpec]:
        """GA and NPO at each ``beta_sweep`` β, all at GA's Table-1 step size."""
        lr = HYPERPARAMETERS[self.alpha]["ga"].lr
        return {"ga": HYPERPARAMETERS[self.alpha]["ga"], **{
            f"npo@{b:g}": MethodSpec("npo", lr, b, source="β sweep: NPO at GA's lr") for b in self.beta_sweep}}

    @property
    def record_at(self) -> list[int]:
        return sorted(set(range(0, self.steps + 1, self.record_every)) | {self.steps})


# --------------------------------------------------------------------------------------------------
# data and features
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MixtureData:
    """Per-seed arrays stacked on a leading seed axis S. Features are φ = ReLU(Wx) (width 128)."""

    phi_forget: np.ndarray    # (S, n_f, k) forget training features
    y_forget: np.ndarray      # (S, n_f) labels in {0, 1}
    y_idk: np.ndarray         # (S, n_f) the IDK+RT "answer": Bernoulli(0.5) per forget x
    phi_retain: np.ndarray    # (S, n_r, k)
    y_retain: np.ndarray      # (S, n_r)
    phi_eval_forget: np.ndarray  # (S, n_eval, k) fresh forget samples (metrics only)
    phi_eval_retain: np.ndarray  # (S, n_eval, k)
    seeds: tuple[int, ...]


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
