"""Markov-chain sequence unlearning with exact metrics (issue 5; SimNPO paper §5 / App. H setup), as a Study.

Setting. Three Markov chains on groups of states (``markov_chains``): ``retain``, ``forget1`` and
``forget2``. Sequences are sampled from each and split 80/20 into train/test.

Models. ``TabularModel`` (``markov_chains``: initial and transition logits, exact MLE pretraining)
and ``TransformerModel`` (``markov_transformer``: token-averaged CE, AdamW, 5 epochs). Target =
pretrained on retain + forget (forget2 left out in the ``memorization`` preset); oracle = pretrained
on retain only.

Unlearning uses the generic loop :func:`npo_sim.unlearn.run` with any objective of the registry
(:data:`npo_sim.losses.OBJECTIVES`); ``logp`` is the **summed** token log-probability, ``length`` the
number of scored tokens (= sequence length). The IDK answer of a forget sequence is the sequence of
the same length that stays on the no-chain state, which makes the IDK/DPO objectives available. The
tabular model trains full batch; the transformer on minibatches (``batch_size`` forget +
``batch_size`` retain sequences per step, drawn by a schedule fixed by ``(seed, step)``) through the
loop's ``select`` hook, with the reference log-probs cached once.

Optimisers. Tabular: plain GD (the divergence law is a statement about GD; Adam would normalise each
row's gradient separately and erase the per-sequence weighting that separates NPO from SimNPO).
SimNPO's forget gradient is ``(2/L)·σ(β·logp/L)`` ≈ 5e-4 of NPO's at the target (β=2.5, token NLL ≈ 2),
so in the tabular length/memorization presets every method with the SimNPO forget term gets a ×1000
forget step (``lr_scale``: ``lr·s`` with ``retain_weight/s``, i.e. the retain step is unchanged); GD
paths are step-size invariant, and every method is compared at its own best step. Transformer: Adam
(lr 1e-4) for length/memorization; GD for divergence (GA at lr 1e-4, NPO at 2e-3, so NPO reaches its
saturating regime while GA stays finite).

Metrics at every record step (all exact given the sampled test sets): next-state ``KL(truth ‖ model)``
averaged over all prefixes of the test sequences of each source, where truth is the true chain of that
source or the oracle model; per-token test log-likelihood; mean summed log-likelihood of the forget
train sequences; ``‖θ_t − θ_0‖``; and for the tabular model the closed-form per-token sequence KL
``KL(chain ‖ model)/L``. What each preset concludes is in ``markov_findings``. At step 0 and the last
step, the ``privacy`` table (``markov_privacy``): exact memorization, LOSS-attack MIA AUC and privleak.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .. import claims as C
from .. import losses, unlearn
from ..losses import OBJECTIVES, get_objective
from ..runio import NonFiniteLoss, UserError
from ..study import Results, Study
from .markov_chains import (  # noqa: F401  (re-exported: tests and notebooks use M.*)
    ADAPTERS,
    SOURCES,
    Chain,
    Evaluator,
    MarkovAdapter,
    SeqSet,
    TabularAdapter,
    TabularModel,
    make_chains,
    sample,
)
from .markov_findings import DIVERGENCE_LAWS, FINDINGS, figure_name, length_verdict, method_summary
from .markov_privacy import Snapshots, run_privacy
from .markov_transformer import TransformerConfig, TransformerModel

#: methods whose forget term reads the IDK answer (they need the no-chain state)
IDK_METHODS = frozenset(n for n, o in OBJECTIVES.items() if "idk_logp" in o.needs)
# the adapters (autograd reference and closed-form tabular) and the exact-metric Evaluator are in markov_chains


# ==================================================================================================
# configuration and presets
# ==================================================================================================
OPTIMIZERS = {"gd": None, "adam": lambda lr: (lambda ps: torch.optim.Adam(ps, lr=lr)),
              "adamw": lambda lr: (lambda ps: torch.optim.AdamW(ps, lr=lr))}
#: model name -> (build it for a config, how it is pretrained)
MODELS = {
    "tabular": (lambda cfg: TabularModel(cfg.n_states, cfg.pseudocount), "exact MLE"),
    "transformer": (lambda cfg: TransformerModel(cfg.n_states, max(cfg.length, cfg.forget2_length), cfg.transformer,
                                                 cfg.seed), "AdamW"),
}


def _choices(kind: str, value: str, options) -> None:
    if value not in options:
        raise UserError(f"unknown {kind} {value!r}; choose from {', '.join(options)}")


@dataclass(frozen=True)
class MarkovConfig:
    """One Markov run. Build it with :func:`make_config` (preset, model tuning, quick, overrides)."""

    preset: str
    model: str = "tabular"
    n_states: int = 10
    group_size: int = 3
    eps: float = 0.2
    length: int = 20
    forget2_length: int = 20
    n_retain: int = 10000
    n_forget1: int = 5000
    n_forget2: int = 5000
    test_frac: float = 0.2
    pretrain_forget2: bool = True
    methods: tuple[str, ...] = tuple(DIVERGENCE_LAWS)
    beta: float | None = None          # None: each objective's registered default (NPO 0.1, SimNPO 2.5)
    steps: int = 300
    lr: float = 1.0
    optimizer: str = "gd"
    lr_scale: tuple[tuple[str, float], ...] = ()  # (method, s): forget-term step ×s (lr·s, retain_weight/s); gd only
    batch_size: int = 0                # 0 = full batch
    n_records: int = 40                # log-spaced record steps ...
    linear_records: int = 0            # ... plus this many evenly spaced ones
    eval_max: int = 0                  # cap on test / forget-eval sequences per source (0 = all)
    pseudocount: float = 0.1
    fit_from: int = 0                  # divergence fits use record steps >= fit_from (0: 1% of steps)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    seed: int = 0
    #: robustness grid of the length claim: (β, lr) settings (β None: the registry defaults) in which the
    #: claim's methods are rerun and the verdict recomputed (empty: none)
    grid: tuple[tuple[float | None, float], ...] = ()

    def __post_init__(self) -> None:
        _choices("preset", self.preset, PRESETS)
        _choices("model", self.model, MODELS)
        _choices("optimizer", self.optimizer, OPTIMIZERS)
        if not (0.0 <= self.eps < 1.0):
            raise UserError(f"eps must be in [0, 1), got {self.eps}")
        if self.length < 2 or self.forget2_length < 2:
            raise UserError(f"sequence length must be >= 2, got {min(self.length, self.forget2_length)}")
        if self.n_states < 3 * self.group_size + (0 if self.eps == 0 else 1) or self.group_size < 1:
            raise UserError(f"need n_states >= 3*group_size (+1 leak state), got {self.n_states}, {self.group_size}")
        if min(self.n_retain, self.n_forget1, self.n_forget2) < 5 or not (0 < self.test_frac < 1):
            raise UserError("need at least 5 sequences per source and 0 < test_frac < 1")
        self._check_methods()
        for name, ok, rule in (("steps", self.steps >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
                               ("batch_size", self.batch_size >= 0, ">= 0"), ("n_records", self.n_records >= 3, ">= 3"),
                               ("linear_records", self.linear_records >= 0, ">= 0"),
                               ("eval_max", self.eval_max >= 0, ">= 0"), ("fit_from", self.fit_from >= 0, ">= 0"),
                               ("pseudocount", self.pseudocount > 0, "> 0")):
            if not ok:
                raise UserError(f"{name} must be {rule}, got {getattr(self, name)}")
        if self.beta is not None and not self.beta > 0:
            raise UserError(f"beta must be > 0, got {self.beta}")
        if any(not lr > 0 or (b is not None and not b > 0) for b, lr in self.grid):
            raise UserError(f"grid settings need beta > 0 (or None) and lr > 0, got {self.grid}")
        if self.grid and self.preset != "length":
            raise UserError("a robustness grid is only declared for the length preset")
        if self.lr_scale and self.optimizer != "gd":
            raise UserError("lr_scale is only defined for optimizer 'gd'")
        if any(not v > 0 for _, v in self.lr_scale):
            raise UserError("lr_scale values must be > 0")

    def _check_methods(self) -> None:
        if not self.methods:
            raise UserError("methods must name at least one objective")
        for m in self.methods:
            try:
                get_objective(m)
            except ValueError as exc:  # lists the valid names
                raise UserError(str(exc)) from None
            if m not in METHODS:
                raise UserError(losses.skip_note("the Markov setting", SUPPLIES, [m]))
            if m in IDK_METHODS and self.n_states <= 3 * self.group_size:
                raise UserError(f"method {m!r} needs the no-chain IDK state (n_states > 3*group_size)")


def forget_step_scale(term: str, scale: float, among: Sequence[str] | None = None) -> tuple[tuple[str, float], ...]:
    """``lr_scale`` giving every registered method (``among`` these) whose forget term is ``term`` a ×scale step."""
    return tuple((m, scale) for m in (losses.methods() if among is None else among) if OBJECTIVES[m].forget == term)


#: what the Markov setting supplies: every input but activations (no RMU: the tabular model has none, and
#: the transformer's are not exposed); per-token forget inputs and their reference (cached at θ_0) included
SUPPLIES = frozenset(losses.INPUT_KEYS) - {"hidden", "hidden_mask", "rmu_control", "retain_hidden",
                                           "retain_ref_hidden", "retain_hidden_mask"}
#: every registered method the setting can run
METHODS = losses.methods(supplies=SUPPLIES)
#: the transformer presets run plain GA, the NPO family and the weighted/distillation terms, without the
#: retain-KL terms
TRANSFORMER_METHODS = losses.methods(family="ga", retain_free=True) + tuple(
    m for m in METHODS if OBJECTIVES[m].family in ("npo", "weighted", "distill") and "retain_ref_logits"
    not in OBJECTIVES[m].needs)
#: preset -> overrides common to both models
PRESETS = {
    "length": dict(forget2_length=5, methods=METHODS),
    "memorization": dict(pretrain_forget2=False, methods=METHODS),
    "divergence": dict(methods=tuple(DIVERGENCE_LAWS)),
}
#: (preset or "*", model) -> overrides; then (…, "quick") on top for --quick
TUNING = {
    ("*", "tabular"): dict(steps=400, lr=0.05, n_records=20, linear_records=40,
                           lr_scale=forget_step_scale("simnpo", 1000.0)),
    ("divergence", "tabular"): dict(steps=3000, lr=1.0, n_records=50, linear_records=0, lr_scale=()),
    ("*", "transformer"): dict(steps=400, lr=1e-4, optimizer="adam", batch_size=128, methods=TRANSFORMER_METHODS,
                               eval_max=500, n_records=15, linear_records=20),
    ("divergence", "transformer"): dict(steps=600, lr=1e-4, optimizer="gd", methods=tuple(DIVERGENCE_LAWS),
                                        n_records=30, linear_records=0,
                                        lr_scale=forget_step_scale("npo", 20.0, among=tuple(DIVERGENCE_LAWS))),
    ("*", "tabular", "quick"): dict(n_retain=5000, n_forget1=2500, n_forget2=2500, steps=200, lr=0.1,
                                    linear_records=25),
    ("divergence", "tabular", "quick"): dict(steps=3000, lr=1.0, n_records=30, linear_records=0),  # laws are asymptotic
    ("*", "transformer", "quick"): dict(n_retain=2000, n_forget1=1000, n_forget2=1000, steps=100, lr=3e-4, eval_max=300,
                                        n_records=10, linear_records=10,
                                        transformer=TransformerConfig(d_model=32, n_layers=2, n_heads=2)),
    ("divergence", "transformer", "quick"): dict(steps=300, lr=1e-4, n_records=30, linear_records=0),
}


#: the SimNPO authors' own synthetic setup (Unlearn-Simple, ``synthetic/``; the values as checked against that
#: code in issue 18): model, pretraining, unlearning optimiser, batch, steps and β. Applies to the balance
#: presets (length, memorization) on the transformer: ``make_config(preset, "transformer", paper=True)``.
#: Known difference: the authors score the L−1 transitions of a sequence; this setting also scores the
#: initial state (position 0, predicted from BOS).
PAPER_SETUP = dict(
    transformer=TransformerConfig(d_model=128, n_layers=4, n_heads=1, norm="post", pretrain_lr=5e-4, pretrain_epochs=5),
    optimizer="adamw", lr=5e-4, batch_size=4, steps=50, beta=1.0, lr_scale=(), n_records=10, linear_records=11,
    methods=("npo", "simnpo"),
)
#: the source of each PAPER_SETUP value, in words (the test checks the config against these)
PAPER_SOURCE = "Unlearn-Simple (SimNPO authors), synthetic/: as read against that code in issue 18"


def make_config(preset: str, model: str = "tabular", quick: bool = False, seed: int = 0, paper: bool = False,
                **overrides) -> MarkovConfig:
    """The resolved config: preset defaults, then model tuning, then quick, then the authors' setup
    (``paper``: :data:`PAPER_SETUP`, transformer balance presets only), then explicit (non-None) overrides."""
    _choices("preset", preset, PRESETS)
    _choices("model", model, MODELS)
    if paper and (model != "transformer" or preset == "divergence"):
        raise UserError("the SimNPO authors' setup (paper=True) needs the transformer and the length or "
                        "memorization preset")
    kw: dict = dict(PRESETS[preset])
    keys = [("*", model), (preset, model)] + ([("*", model, "quick"), (preset, model, "quick")] if quick else [])
    for k in keys:
        kw.update(TUNING.get(k, {}))
    if paper:
        kw.update(PAPER_SETUP)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    kw["methods"] = tuple(kw["methods"])
    return MarkovConfig(preset=preset, model=model, seed=seed, **kw)


# ==================================================================================================
# one experiment
# ==================================================================================================
def _split(x: np.ndarray, test_frac: float) -> tuple[SeqSet, SeqSet]:
    n_test = max(1, int(round(len(x) * test_frac)))
    return SeqSet.of(x[n_test:]), SeqSet.of(x[:n_test])


def build_data(cfg: MarkovConfig) -> tuple[dict[str, Chain], dict[str, tuple[SeqSet, SeqSet]]]:
    """The chains and, per source, its (train, test) sequences, sampled from one ``seed``-ed generator."""
    chains = make_chains(cfg.n_states, cfg.group_size, cfg.eps)
    rng = np.random.default_rng(cfg.seed)
    sizes = {"retain": (cfg.n_retain, cfg.length), "forget1": (cfg.n_forget1, cfg.length),
             "forget2": (cfg.n_forget2, cfg.forget2_length)}
    return chains, {s: _split(sample(chains[s], n, L, rng), cfg.test_frac) for s, (n, L) in sizes.items()}


def _cap(d: SeqSet, n: int) -> SeqSet:
    return d if not n or len(d) <= n else d.subset(slice(0, n))


def record_steps(cfg: MarkovConfig) -> list[int]:
    """Log-spaced record steps plus ``linear_records`` evenly spaced ones."""
    return sorted(set(unlearn.log_steps(cfg.steps, cfg.n_records))
                  | set(np.linspace(0, cfg.steps, cfg.linear_records).round().astype(int).tolist()))


class MethodBatch:
    """Several registry objectives as one, each on its own replica slice (replica ``r`` = ``objectives[r]``).

    Each objective is called on its slice of the per-replica inputs — the losses themselves are the
    registry's, never re-implemented — and the terms are stacked to ``(R,)``, so the loop's summed loss
    gives every replica its own method's gradient. ``length`` and ``retain_mask`` (read with ``get``, so not
    in ``needs``) are shared by all and passed whole.
    """

    PER_REPLICA = unlearn.THETA_INPUTS | frozenset(unlearn.REFERENCE_OF.values())

    def __init__(self, objectives: Sequence[losses.Objective]) -> None:
        self.objectives = list(objectives)
        self.name = "+".join(o.name for o in self.objectives)
        self.needs = frozenset().union(*(o.needs for o in self.objectives))
        self.beta = torch.tensor([float(o.beta) for o in self.objectives], dtype=torch.float64)

    def __call__(self, inputs) -> losses.LossTerms:
        terms = []
        for r, obj in enumerate(self.objectives):
            terms.append(obj({k: v[r] if k in self.PER_REPLICA else v for k, v in inputs.items()}))
        return losses.LossTerms(*(torch.stack(t) for t in zip(*terms)))


def _objective(cfg: MarkovConfig, method: str) -> tuple[losses.Objective, float]:
    """The method's objective and step size (``lr_scale``: forget step ×s, retain weight /s)."""
    scale = dict(cfg.lr_scale).get(method, 1.0)
    obj = get_objective(method, beta=cfg.beta, retain_weight=OBJECTIVES[method].retain_weight / scale)
    return obj, cfg.lr * scale


def _unlearn_batched(cfg: MarkovConfig, model, forget, retain, idk, evaluator, target) -> list[pd.DataFrame]:
    """Every method in one batched program (full-batch GD on the tabular model): one frame per method,
    the same rows a separate run gives (``npo_weight`` only for the methods that read ``logp_ref``)."""
    objs, lrs = zip(*(_objective(cfg, m) for m in cfg.methods))
    R = len(objs)
    params0 = [p.expand(R, *p.shape).clone() for p in target]
    adapter = TabularAdapter(model, forget, retain, idk, evaluator)
    res = unlearn.run(adapter, MethodBatch(objs), params0, steps=cfg.steps, record_at=record_steps(cfg),
                      lr=torch.tensor(lrs, dtype=torch.float64))
    evaluator.keep(cfg.methods, replicas=True)
    table = pd.DataFrame(res)
    frames = []
    for r, (method, obj) in enumerate(zip(cfg.methods, objs)):
        frame = table[table.replica == r].drop(columns="replica").reset_index(drop=True)
        if "npo_weight" in frame and "logp_ref" not in obj.needs:
            frame = frame.drop(columns="npo_weight")
        frames.append(frame.assign(method=method))
    return frames


def _unlearn_each(cfg: MarkovConfig, model, forget, retain, idk, evaluator, target, progress: bool,
                  diverged: dict) -> list[pd.DataFrame]:
    """One run per method (a diverged run is a result: its records up to that step are kept)."""
    record, opt = record_steps(cfg), OPTIMIZERS[cfg.optimizer]
    frames = []
    for method in cfg.methods:
        t1 = time.perf_counter()
        obj, lr = _objective(cfg, method)
        adapter = ADAPTERS[model.kind](model, forget, retain, idk, evaluator, cfg.batch_size, cfg.seed)
        try:
            res = unlearn.run(adapter, obj, target, steps=cfg.steps, lr=lr, record_at=record,
                              optimizer=opt(cfg.lr) if opt else None)
        except NonFiniteLoss as exc:
            res, diverged[method] = exc.rows, exc.step
        evaluator.keep([method])
        frames.append(pd.DataFrame(res).drop(columns="replica").assign(method=method))
        if progress:
            print(f"  {method}: {time.perf_counter() - t1:.1f}s", flush=True)
    return frames


def _unlearn_all(cfg: MarkovConfig, model, forget: SeqSet, retain: SeqSet, idk: SeqSet | None,
                 evaluator: Evaluator, target: list[Tensor], progress: bool) -> tuple[pd.DataFrame, dict]:
    """Unlearn every method from the target; return (tidy curves, {method: step its loss went non-finite}).

    The tabular model under full-batch GD runs all methods as one batched program; if any of them
    diverges, every method is rerun on its own (so each diverged run keeps exactly its own records).
    The transformer (minibatches, Adam) runs one method at a time.
    """
    frames, diverged = None, {}
    if model.kind == "tabular" and OPTIMIZERS[cfg.optimizer] is None and not cfg.batch_size:
        t1 = time.perf_counter()
        try:
            frames = _unlearn_batched(cfg, model, forget, retain, idk, evaluator, target)
            if progress:
                print(f"  {', '.join(cfg.methods)} (batched): {time.perf_counter() - t1:.1f}s", flush=True)
        except NonFiniteLoss:
            frames = None
    if frames is None:
        frames = _unlearn_each(cfg, model, forget, retain, idk, evaluator, target, progress, diverged)
    curves = pd.concat(frames, ignore_index=True)
    curves.insert(0, "model", cfg.model)
    curves.insert(0, "preset", cfg.preset)
    return curves, diverged


def simulate(cfg: MarkovConfig, progress: bool = False) -> Results:
    """Run every method of ``cfg``: the ``curves`` table and the summary (with its findings). Writes nothing."""
    return _simulate(cfg, progress)


def _simulate(cfg: MarkovConfig, progress: bool = False, privacy: bool = True) -> Results:
    """:func:`simulate`; ``privacy=False`` skips the privacy table (the robustness grid's runs)."""
    torch.manual_seed(cfg.seed)
    chains, data = build_data(cfg)
    train = {s: d[0] for s, d in data.items()}
    build, pretrain_method = MODELS[cfg.model]
    model = build(cfg)
    pre_sources = [s for s in SOURCES if s != "forget2" or cfg.pretrain_forget2]
    target, target_nll = model.pretrain(SeqSet.cat([train[s] for s in pre_sources]), cfg.seed)
    oracle, oracle_nll = model.pretrain(train["retain"], cfg.seed + 1)

    forget = SeqSet.cat([train["forget1"], train["forget2"]])
    idk = SeqSet(torch.full_like(forget.seqs, cfg.n_states - 1), forget.lengths) \
        if cfg.n_states > 3 * cfg.group_size else None
    lengths = {"retain": cfg.length, "forget1": cfg.length, "forget2": cfg.forget2_length}
    evaluator = Snapshots(Evaluator(model, chains, {s: _cap(data[s][1], cfg.eval_max) for s in SOURCES},
                          {s: _cap(train[s], cfg.eval_max) for s in ("forget1", "forget2")}, target, oracle, lengths))
    reference = {name: {k: float(v) for k, v in evaluator(p).items()}
                 for name, p in (("target", target), ("oracle", oracle))}
    curves, diverged = _unlearn_all(cfg, model, forget, train["retain"], idk, evaluator, target, progress)
    summary = {
        "config": cfg,
        "pretrain": {"target_token_nll": target_nll, "oracle_token_nll": oracle_nll,
                     "target_sources": pre_sources, "method": pretrain_method},
        "reference": reference,
        "methods": {m: method_summary(curves[curves.method == m]) for m in cfg.methods},
        "diverged_at_step": diverged,
    }
    summary["findings"] = FINDINGS[cfg.preset].analyse(cfg, curves, summary)
    if cfg.grid:
        summary["findings"]["robustness"] = robustness(cfg)
    if not privacy:
        return Results({"curves": curves}, summary)
    privacy, summary["privacy"] = run_privacy(model, cfg.model, chains, evaluator, target, oracle, curves)
    return Results({"curves": curves, "privacy": privacy}, summary)


def grid_label(beta: float | None, lr: float) -> str:
    return f"β={'default' if beta is None else format(beta, 'g')}, lr={lr:g}"


def robustness(cfg: MarkovConfig) -> dict:
    """The preset's verdict rerun at every (β, lr) of ``cfg.grid`` on the methods its claim reads: per
    setting, the verdict and the number it is judged on. Only the length preset declares a grid."""
    reads = FINDINGS[cfg.preset].reads
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # many tiny runs: a second thread only adds overhead (restored below)
    try:
        for beta, lr in cfg.grid:
            sub = dataclasses.replace(cfg, beta=beta, lr=lr, grid=(),
                                      methods=tuple(m for m in cfg.methods if m in reads))
            f = _simulate(sub, privacy=False).summary["findings"]
            out[grid_label(beta, lr)] = {"beta": beta, "lr": lr, "verdict": length_verdict(f),
                                         "share": f.get("path", {}).get("share", float("nan"))}
    finally:
        torch.set_num_threads(threads)
    return out


# ==================================================================================================
# the Study, and the runs `npo-sim figures` makes
# ==================================================================================================
#: the control every Markov criterion also runs on: the methods at zero learning rate, which leave every
#: record equal to the target's (step 0 held for the whole run)
CONTROL = "null method (= step 0 held)"


def null_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """The curves of a zero-learning-rate run: each method's step-0 row at every record step."""
    out = curves.sort_values(["method", "step"], kind="stable").copy()
    first = out.groupby("method", sort=False).transform("first")
    for c in out.columns:
        if c not in ("preset", "model", "method", "step"):
            out[c] = first[c].to_numpy()
    return out.sort_index()


def findings(results: Results, cfg: MarkovConfig) -> list:
    """The preset's claim, judged on the summary's findings block, and the same criterion on the null
    method's curves (met there too: vacuous). The robustness grid, when declared, is part of the verdict."""
    finding, s = FINDINGS[cfg.preset], results.summary
    claim = finding.claim(s["findings"], cfg)
    if "curves" not in results.tables:
        return [claim]
    null = null_curves(results.tables["curves"])
    null_summary = {**s, "methods": {m: method_summary(null[null.method == m]) for m in s["methods"]}}
    null_claim = finding.claim(finding.analyse(cfg, null, null_summary), cfg)
    grid = s["findings"].get("robustness")
    text = (f"grid β × lr ({len(grid)} settings): " + "; ".join(f"{k}: {v['verdict']}" for k, v in grid.items())
            if grid else "")
    return [C.with_checks(claim, {CONTROL: null_claim.verdict}, text)]


def figures(results: Results, cfg: MarkovConfig) -> dict:
    """``markov_<preset>_<model>.png``, drawn from the curves and the summary."""
    from ..plots.markov import PLOTS

    return {figure_name(cfg): PLOTS[cfg.preset](results.tables["curves"], results.summary)}


STUDY = Study("markov", simulate, findings, figures)

#: run directory -> (preset, model) of the Markov rows of figures/REPORT.md, in report order
REPORT_RUNS = {"markov_length": ("length", "tabular"), "markov_memorization": ("memorization", "tabular"),
               "markov_divergence": ("divergence", "tabular"),
               "markov_divergence_transformer": ("divergence", "transformer")}
#: steps of a smoke run, per model
SMOKE_STEPS = {"tabular": 100, "transformer": 20}
#: smaller data for a smoke run, per model (the transformer's pretraining dominates its smoke run)
SMOKE_SIZES = {"tabular": {}, "transformer": dict(n_retain=400, n_forget1=200, n_forget2=200, eval_max=100)}


def smoke_overrides(model: str) -> dict:
    """Few steps, and only the methods the claims of that model's report runs read (in registry order)."""
    reads = {m for preset, mod in REPORT_RUNS.values() if mod == model for m in FINDINGS[preset].reads}
    return dict(steps=SMOKE_STEPS[model], methods=tuple(m for m in losses.methods() if m in reads),
                **SMOKE_SIZES[model])


#: the length claim's robustness grid in ``npo-sim figures``: β (None: the registry defaults, NPO 0.1 and
#: SimNPO 2.5; 1: the SimNPO authors' β for both) × lr around the quick tabular step
LENGTH_GRID = tuple((b, lr) for b in (None, 0.5, 1.0) for lr in (0.05, 0.1, 0.2))


def report_configs(smoke: bool) -> dict[str, MarkovConfig]:
    """The runs ``npo-sim figures`` makes: each preset's quick config (``smoke``: shrunk to a test, no grid),
    the length run with its β × lr grid."""
    out = {}
    for name, (preset, model) in REPORT_RUNS.items():
        # (the smoke run skips the grid: tests/test_claims_criteria.py runs it at quick size)
        extra = dict(grid=LENGTH_GRID) if (preset, model) == ("length", "tabular") and not smoke else {}
        out[name] = make_config(preset, model, quick=True, **extra, **(smoke_overrides(model) if smoke else {}))
    return out
