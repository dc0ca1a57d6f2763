"""Markov-chain sequence unlearning with exact metrics (issue 5; SimNPO paper §5 / App. H setup).

Setting. ``K`` states (default 10). Chain ``retain`` lives on states {1,2,3}, ``forget1`` on {4,5,6},
``forget2`` on {7,8,9} (0-based indices 0..8 here); state 10 (index 9) belongs to no chain. From one of
its own states a chain moves to each own state with probability ``(1-ε)/g`` and to each other state
with ``ε/(K-g)``; rows of states outside its set are uniform; the initial distribution uses the same
split. Sequences are sampled, split 80/20 into train/test.

Models (both are functions of a parameter list: ``seq_logp``, ``retain_logp``, ``retain_logits``,
``next_logprobs``, and ``contexts``/``context_logprobs`` for the exact metrics):

* ``TabularModel``: initial logits ``(K,)`` and transition logits ``(K, K)``. Pretraining is **exact**:
  the maximum-likelihood solution (normalised counts, plus a small pseudocount ``α`` so no logit is
  ``-inf``) is the point gradient training converges to. Its KL to any chain is closed-form.
* ``TransformerModel`` (``markov_transformer.py``): token-averaged CE, AdamW, 5 epochs.

Target = pretrained on retain + forget (forget2 left out in the ``memorization`` preset); oracle =
pretrained on retain only. Unlearning uses the generic loop :func:`npo_sim.unlearn.run` with any
objective of :data:`npo_sim.losses.OBJECTIVES`; ``logp`` is the **summed** token log-probability,
``length`` the number of scored tokens (= sequence length). The IDK answer of a forget sequence is
the sequence of the same length that stays on state 10 (the no-chain state), which makes
``idk_rt``/``dpo*`` available. The tabular model trains full batch; the transformer on minibatches
(``batch_size`` forget + ``batch_size`` retain sequences per step, drawn by a schedule fixed by
``(seed, step)``) through the loop's ``select`` hook, with the reference log-probs cached once.

Optimisers. Tabular: plain GD (the divergence law is a statement about GD; Adam would normalise each
row's gradient separately and erase the per-sequence weighting that separates NPO from SimNPO).
SimNPO's forget gradient is ``(2/L)·σ(β·logp/L)`` ≈ 5e-4 of NPO's at the target (β=2.5, token NLL ≈ 2),
so in the tabular length/memorization presets its forget term gets a ×1000 step (``lr_scale``:
``lr·s`` with ``retain_weight/s``, i.e. the retain step is unchanged); GD paths are step-size
invariant, and every method is compared at its own best step. Transformer: Adam (lr 1e-4) for
length/memorization; GD for divergence (GA at lr 1e-4, NPO at 2e-3, so NPO reaches its saturating
regime while GA stays finite).

Metrics at every record step (all exact given the sampled test sets): next-state ``KL(truth ‖ model)``
averaged over all prefixes of the test sequences of each source, where truth is (a/b) the true chain of
that source or (c) the oracle model; per-token test log-likelihood; mean summed log-likelihood of the
forget train sequences; ``‖θ_t − θ_0‖``; and for the tabular model the closed-form per-token sequence
KL ``KL(chain ‖ model)/L`` (initial KL + transition KLs weighted by the chain's state visitation).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from . import unlearn
from .losses import OBJECTIVES, get_objective
from .markov_transformer import TransformerConfig, TransformerModel
from .metrics import linear_fit, log_fit
from .runio import UserError, save_figure, write_csv, write_json

SOURCES = ("retain", "forget1", "forget2")
IDK_METHODS = frozenset(n for n, o in OBJECTIVES.items() if "idk_logp" in o.needs)


# ==================================================================================================
# chains and data
# ==================================================================================================
@dataclass(frozen=True, eq=False)
class Chain:
    name: str
    init: np.ndarray   # (K,)
    trans: np.ndarray  # (K, K), rows sum to 1

    def rows(self) -> np.ndarray:
        """``(K+1, K)``: row 0 is the initial distribution, row ``s+1`` the transitions out of ``s``."""
        return np.vstack([self.init, self.trans])


def make_chain(name: str, n_states: int, own: Sequence[int], eps: float) -> Chain:
    g = len(own)
    split = np.full(n_states, eps / (n_states - g))
    split[list(own)] = (1.0 - eps) / g
    trans = np.full((n_states, n_states), 1.0 / n_states)
    trans[list(own)] = split
    return Chain(name, split.copy(), trans)


def make_chains(n_states: int = 10, group_size: int = 3, eps: float = 0.2) -> dict[str, Chain]:
    return {name: make_chain(name, n_states, range(i * group_size, (i + 1) * group_size), eps)
            for i, name in enumerate(SOURCES)}


def sample(chain: Chain, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` sequences of ``length`` states, ``(n, length)`` int64."""
    K = len(chain.init)
    x = np.empty((n, length), dtype=np.int64)
    x[:, 0] = np.minimum(np.searchsorted(np.cumsum(chain.init), rng.random(n), side="right"), K - 1)
    cum = np.cumsum(chain.trans, axis=1)
    for t in range(1, length):
        x[:, t] = np.minimum((rng.random(n)[:, None] >= cum[x[:, t - 1]]).sum(1), K - 1)
    return x


@dataclass(eq=False)
class SeqSet:
    """Right-padded state sequences ``(n, Lmax)`` with their lengths; cached tabular counts."""

    seqs: Tensor
    lengths: Tensor

    def __len__(self) -> int:
        return self.seqs.shape[0]

    @classmethod
    def of(cls, x: np.ndarray) -> "SeqSet":
        t = torch.as_tensor(x, dtype=torch.long)
        return cls(t, torch.full((t.shape[0],), t.shape[1], dtype=torch.long))

    @classmethod
    def cat(cls, sets: Sequence["SeqSet"]) -> "SeqSet":
        L = max(s.seqs.shape[1] for s in sets)
        return cls(torch.cat([F.pad(s.seqs, (0, L - s.seqs.shape[1])) for s in sets]),
                   torch.cat([s.lengths for s in sets]))

    def subset(self, idx) -> "SeqSet":
        return SeqSet(self.seqs[idx], self.lengths[idx])

    @functools.cached_property
    def mask(self) -> Tensor:
        return torch.arange(self.seqs.shape[1]) < self.lengths[:, None]

    @functools.cached_property
    def rows(self) -> Tensor:
        """Row (of the ``(K+1, K)`` tabular table) that predicts each position: 0, then ``x_{t-1}+1``."""
        return torch.cat([torch.zeros_like(self.seqs[:, :1]), self.seqs[:, :-1] + 1], dim=1)

    def counts(self, K: int) -> Tensor:
        """``(n, (K+1)·K)`` per-sequence counts of (row, next state) over valid positions."""
        u, inv = self.unique_counts(K)
        return u[inv]

    def unique_counts(self, K: int) -> tuple[Tensor, Tensor]:
        """Counts of the distinct sequences ``(u, (K+1)·K)`` and each sequence's index into them (cached)."""
        if getattr(self, "_ucounts", None) is None:
            keyed = torch.cat([self.seqs * self.mask, self.lengths[:, None]], dim=1)
            uniq, inv = torch.unique(keyed, dim=0, return_inverse=True)
            first = torch.full((len(uniq),), -1, dtype=torch.long).scatter_(0, inv, torch.arange(len(self)))
            sub = self.subset(first)
            c = torch.zeros(len(sub), (K + 1) * K, dtype=torch.float64)
            self._ucounts = (c.scatter_add_(1, sub.rows * K + sub.seqs, sub.mask.double()), inv)
        return self._ucounts


# ==================================================================================================
# model A: tabular
# ==================================================================================================
class TabularModel:
    """Params ``[init_logits (K,), trans_logits (K, K)]``; float64 throughout."""

    kind = "tabular"

    def __init__(self, n_states: int, pseudocount: float = 0.1) -> None:
        self.K, self.pseudocount = n_states, pseudocount

    def row_logits(self, params: Sequence[Tensor]) -> Tensor:
        return torch.cat([params[0][..., None, :], params[1]], dim=-2)

    def next_logprobs(self, params: Sequence[Tensor], data: SeqSet) -> Tensor:
        return F.log_softmax(self.row_logits(params), -1)[data.rows]

    def seq_logp(self, params: Sequence[Tensor], data: SeqSet) -> Tensor:
        u, inv = data.unique_counts(self.K)  # distinct sequences only (IDK sequences: one per length)
        return (u @ F.log_softmax(self.row_logits(params), -1).reshape(-1))[inv]

    def retain_logp(self, params: Sequence[Tensor], data: SeqSet) -> Tensor:
        """``(1,)``: the mean retain log-likelihood. Exact for the retain NLL term, which only takes a mean."""
        return (data.counts(self.K).mean(0) @ F.log_softmax(self.row_logits(params), -1).reshape(-1))[None]

    def retain_logits(self, params: Sequence[Tensor], data: SeqSet) -> tuple[Tensor, Tensor]:
        """The ``K+1`` distinct rows with their prefix counts as weights: ``losses.kl`` then equals the
        per-position average over every retain prefix, exactly, at a fraction of the cost."""
        return self.row_logits(params), data.counts(self.K).sum(0).reshape(self.K + 1, self.K).sum(1)

    def contexts(self, data: SeqSet) -> tuple[Tensor, Tensor, Tensor]:
        """Distinct prediction contexts of ``data``: (chain-row index ``(C,)``, number of prefixes ``(C,)``,
        next-state counts ``(C, K)``). A tabular prediction depends only on the last state, so ``C = K+1``."""
        c = data.counts(self.K).sum(0).reshape(self.K + 1, self.K)
        return torch.arange(self.K + 1), c.sum(1), c

    def context_logprobs(self, params: Sequence[Tensor], data: SeqSet) -> Tensor:
        return F.log_softmax(self.row_logits(params), -1)

    def pretrain(self, data: SeqSet, seed: int = 0) -> tuple[list[Tensor], float]:
        """Exact MLE with pseudocount α: logits = log((counts + α) / row total). Returns (params, mean token NLL)."""
        c = data.counts(self.K).sum(0).reshape(self.K + 1, self.K) + self.pseudocount
        logits = torch.log(c / c.sum(1, keepdim=True))
        params = [logits[0].clone(), logits[1:].clone()]
        nll = -float(self.seq_logp(params, data).sum() / data.lengths.sum())
        return params, nll


def rows_tensor(chain: Chain) -> Tensor:
    return torch.as_tensor(chain.rows(), dtype=torch.float64)


def chain_kl(chain: Chain, model_rows_logp: Tensor, length: int) -> Tensor:
    """Closed-form ``KL(p_chain ‖ p_model)/L`` over length-``L`` sequences of a tabular model.

    ``KL = KL(π0 ‖ q0) + Σ_{t=0}^{L-2} Σ_s μ_t(s)·KL(P_s ‖ Q_s)`` with visitation ``μ_t = π0 Pᵗ``.
    """
    P = rows_tensor(chain)
    row_kl = (torch.xlogy(P, P) - P * model_rows_logp.to(P)).sum(-1)  # (K+1,)
    mu, total = P[0], row_kl[0]
    for _ in range(length - 1):
        total = total + mu @ row_kl[1:]
        mu = mu @ P[1:]
    return total / length


def weighted_kl(true_p: Tensor, model_logp: Tensor, weight: Tensor) -> Tensor:
    """``Σ_c w_c KL(true_c ‖ model_c) / Σ_c w_c`` over contexts ``c`` (rows of ``(C, K)`` tensors)."""
    per = (torch.xlogy(true_p, true_p) - true_p * model_logp.to(true_p)).sum(-1)
    w = weight.to(per)
    return (per * w).sum() / w.sum()


# ==================================================================================================
# adapter for npo_sim.unlearn.run, and the exact metrics
# ==================================================================================================
class MarkovAdapter:
    """Turns params into the objective's inputs on the forget/retain train sets (optionally minibatched)."""

    def __init__(self, model, forget: SeqSet, retain: SeqSet, idk: SeqSet | None, evaluator: "Evaluator",
                 batch_size: int = 0, seed: int = 0) -> None:
        self.model, self.forget, self.retain, self.idk, self.evaluator = model, forget, retain, idk, evaluator
        self.batch_size, self.seed = batch_size, seed
        self._fi = self._ri = None  # current minibatch (None = full batch)

    def select(self, step: int, ref: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.batch_size:
            return ref
        rng = np.random.default_rng((self.seed, step))
        self._fi = torch.as_tensor(rng.choice(len(self.forget), min(self.batch_size, len(self.forget)), replace=False))
        self._ri = torch.as_tensor(rng.choice(len(self.retain), min(self.batch_size, len(self.retain)), replace=False))
        pick = {"logp_ref": self._fi, "idk_logp_ref": self._fi, "retain_ref_logits": self._ri}
        return {k: v[pick[k]] for k, v in ref.items()}

    def _sub(self, data: SeqSet | None, idx) -> SeqSet | None:
        return data if idx is None or data is None else data.subset(idx)

    def inputs(self, params: Sequence[Tensor], keys: frozenset[str]) -> dict[str, Tensor]:
        forget, retain = self._sub(self.forget, self._fi), self._sub(self.retain, self._ri)
        out: dict[str, Tensor] = {}
        if "logp" in keys:
            out["logp"] = self.model.seq_logp(params, forget)
        if "length" in keys:
            out["length"] = forget.lengths.to(torch.get_default_dtype())
        if "idk_logp" in keys:
            out["idk_logp"] = self.model.seq_logp(params, self._sub(self.idk, self._fi))
        if "retain_logp" in keys:
            out["retain_logp"] = self.model.retain_logp(params, retain)
        if "retain_logits" in keys:
            out["retain_logits"], out["retain_mask"] = self.model.retain_logits(params, retain)
        return out

    def metrics(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        return self.evaluator(params)


class Evaluator:
    """Exact metrics of a parameter list over the test prefixes. Truths (true chains, oracle) are
    precomputed once per prediction context (``model.contexts``: every prefix for the transformer, the
    ``K+1`` distinct rows for the tabular model — the same average, computed exactly either way)."""

    def __init__(self, model, chains: dict[str, Chain], test: dict[str, SeqSet], forget_eval: dict[str, SeqSet],
                 params0: Sequence[Tensor], oracle: Sequence[Tensor], lengths: dict[str, int]) -> None:
        self.model, self.chains, self.test, self.forget_eval, self.lengths = model, chains, test, forget_eval, lengths
        self.params0 = [p.detach().clone() for p in params0]
        self.ctx = {s: model.contexts(d) for s, d in test.items()}
        with torch.no_grad():
            self.true_p = {s: rows_tensor(chains[s])[self.ctx[s][0]] for s in test}
            self.oracle_p = {s: model.context_logprobs(oracle, d).double().exp() for s, d in test.items()}

    @torch.no_grad()
    def __call__(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for s, d in self.test.items():
            _, w, counts = self.ctx[s]
            lp = self.model.context_logprobs(params, d).double()
            out[f"kl_{s}_true"] = weighted_kl(self.true_p[s], lp, w)
            out[f"kl_{s}_oracle"] = weighted_kl(self.oracle_p[s], lp, w)
            out[f"ll_{s}_test"] = (counts * lp).sum() / w.sum()
        if self.model.kind == "tabular":
            rows_lp = F.log_softmax(self.model.row_logits(params), -1)
            for s, c in self.chains.items():
                out[f"ckl_{s}"] = chain_kl(c, rows_lp, self.lengths[s])
        logps = {s: self.model.seq_logp(params, d) for s, d in self.forget_eval.items()}
        for s, v in logps.items():
            out[f"logp_{s}"] = v.mean()
        out["logp_forget"] = torch.cat(list(logps.values())).mean()
        out["param_dist"] = torch.sqrt(sum(((p - p0) ** 2).sum() for p, p0 in zip(params, self.params0)))
        return {k: v.double() for k, v in out.items()}


# ==================================================================================================
# configuration and presets
# ==================================================================================================
OPTIMIZERS = {"gd": None, "adam": lambda lr: (lambda ps: torch.optim.Adam(ps, lr=lr))}
MODELS = ("tabular", "transformer")


@dataclass(frozen=True)
class MarkovConfig:
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
    methods: tuple[str, ...] = ("ga", "npo")
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

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.model not in MODELS:
            raise UserError(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        if not (0.0 <= self.eps < 1.0):
            raise UserError(f"eps must be in [0, 1), got {self.eps}")
        if self.length < 2 or self.forget2_length < 2:
            raise UserError(f"sequence length must be >= 2, got {min(self.length, self.forget2_length)}")
        if self.n_states < 3 * self.group_size + (0 if self.eps == 0 else 1) or self.group_size < 1:
            raise UserError(f"need n_states >= 3*group_size (+1 leak state), got {self.n_states}, {self.group_size}")
        if min(self.n_retain, self.n_forget1, self.n_forget2) < 5 or not (0 < self.test_frac < 1):
            raise UserError("need at least 5 sequences per source and 0 < test_frac < 1")
        for m in self.methods:
            get_objective(m)  # ValueError listing the valid names
            if m in IDK_METHODS and self.n_states <= 3 * self.group_size:
                raise UserError(f"method {m!r} needs the no-chain IDK state (n_states > 3*group_size)")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.steps < 1 or not self.lr > 0 or self.batch_size < 0 or self.n_records < 3:
            raise UserError("need steps >= 1, lr > 0, batch_size >= 0, n_records >= 3")
        if self.lr_scale and self.optimizer != "gd":
            raise UserError("lr_scale is only defined for optimizer 'gd'")
        if any(not v > 0 for _, v in self.lr_scale):
            raise UserError("lr_scale values must be > 0")
        if not self.pseudocount > 0:
            raise UserError("pseudocount must be > 0")


ALL_METHODS = ("ga", "ga_rt", "ga_kl", "npo", "npo_rt", "npo_kl", "simnpo", "simnpo_rt", "idk_rt", "dpo", "dpo_rt", "dpo_kl")
#: preset -> overrides common to both models
PRESETS = {
    "length": dict(forget2_length=5, methods=ALL_METHODS),
    "memorization": dict(pretrain_forget2=False, methods=ALL_METHODS),
    "divergence": dict(methods=("ga", "npo")),
}
#: (preset or "*", model) -> overrides; then (…, "quick") on top for --quick
SIMNPO_SCALE = (("simnpo", 1000.0), ("simnpo_rt", 1000.0))
TUNING = {
    ("*", "tabular"): dict(steps=400, lr=0.05, n_records=20, linear_records=40, lr_scale=SIMNPO_SCALE),
    ("divergence", "tabular"): dict(steps=3000, lr=1.0, n_records=50, linear_records=0, lr_scale=()),
    ("*", "transformer"): dict(steps=400, lr=1e-4, optimizer="adam", batch_size=128,
                               methods=("ga", "npo", "npo_rt", "simnpo", "simnpo_rt"), eval_max=500, n_records=15,
                               linear_records=20),
    ("divergence", "transformer"): dict(steps=600, lr=1e-4, optimizer="gd", methods=("ga", "npo"), n_records=30,
                                        linear_records=0, lr_scale=(("npo", 20.0),)),
    ("*", "tabular", "quick"): dict(n_retain=5000, n_forget1=2500, n_forget2=2500, steps=200, lr=0.1, linear_records=25),
    ("divergence", "tabular", "quick"): dict(steps=3000, lr=1.0, n_records=30, linear_records=0),  # laws are asymptotic
    ("*", "transformer", "quick"): dict(n_retain=2000, n_forget1=1000, n_forget2=1000, steps=100, lr=3e-4, eval_max=300,
                                        n_records=10, linear_records=10,
                                        transformer=TransformerConfig(d_model=32, n_layers=2, n_heads=2)),
    ("divergence", "transformer", "quick"): dict(steps=300, lr=1e-4, n_records=30, linear_records=0),
}


def make_config(preset: str, model: str = "tabular", quick: bool = False, seed: int = 0, **overrides) -> MarkovConfig:
    """The resolved config: preset defaults, then model tuning, then quick, then explicit overrides."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if model not in MODELS:
        raise UserError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    kw: dict = dict(PRESETS[preset])
    keys = [("*", model), (preset, model)] + ([("*", model, "quick"), (preset, model, "quick")] if quick else [])
    for k in keys:
        kw.update(TUNING.get(k, {}))
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if "methods" in kw:
        kw["methods"] = tuple(kw["methods"])
    return MarkovConfig(preset=preset, model=model, seed=seed, **kw)


# ==================================================================================================
# one experiment
# ==================================================================================================
def _split(x: np.ndarray, test_frac: float) -> tuple[SeqSet, SeqSet]:
    n_test = max(1, int(round(len(x) * test_frac)))
    return SeqSet.of(x[n_test:]), SeqSet.of(x[:n_test])


def build_data(cfg: MarkovConfig) -> tuple[dict[str, Chain], dict[str, tuple[SeqSet, SeqSet]]]:
    chains = make_chains(cfg.n_states, cfg.group_size, cfg.eps)
    rng = np.random.default_rng(cfg.seed)
    sizes = {"retain": (cfg.n_retain, cfg.length), "forget1": (cfg.n_forget1, cfg.length),
             "forget2": (cfg.n_forget2, cfg.forget2_length)}
    return chains, {s: _split(sample(chains[s], n, L, rng), cfg.test_frac) for s, (n, L) in sizes.items()}


def _cap(d: SeqSet, n: int) -> SeqSet:
    return d if not n or len(d) <= n else d.subset(slice(0, n))


def simulate(cfg: MarkovConfig, progress=None) -> tuple[pd.DataFrame, dict]:
    """Run every method of ``cfg``; return (tidy curves, summary dict). Writes nothing."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    chains, data = build_data(cfg)
    train = {s: d[0] for s, d in data.items()}
    model = (TabularModel(cfg.n_states, cfg.pseudocount) if cfg.model == "tabular"
             else TransformerModel(cfg.n_states, max(cfg.length, cfg.forget2_length), cfg.transformer, cfg.seed))
    pre_sources = [s for s in SOURCES if s != "forget2" or cfg.pretrain_forget2]
    target, target_nll = model.pretrain(SeqSet.cat([train[s] for s in pre_sources]), cfg.seed)
    oracle, oracle_nll = model.pretrain(train["retain"], cfg.seed + 1)
    t_pre = time.perf_counter() - t0

    forget = SeqSet.cat([train["forget1"], train["forget2"]])
    idk = SeqSet(torch.full_like(forget.seqs, cfg.n_states - 1), forget.lengths) if cfg.n_states > 3 * cfg.group_size else None
    lengths = {"retain": cfg.length, "forget1": cfg.length, "forget2": cfg.forget2_length}
    evaluator = Evaluator(model, chains, {s: _cap(data[s][1], cfg.eval_max) for s in SOURCES},
                          {s: _cap(train[s], cfg.eval_max) for s in ("forget1", "forget2")}, target, oracle, lengths)
    reference = {name: {k: float(v) for k, v in evaluator(p).items()} for name, p in (("target", target), ("oracle", oracle))}
    record = sorted(set(unlearn.log_steps(cfg.steps, cfg.n_records))
                    | set(np.linspace(0, cfg.steps, cfg.linear_records).round().astype(int).tolist()))
    opt = OPTIMIZERS[cfg.optimizer]
    frames, timings, diverged = [], {}, {}
    for method in cfg.methods:
        t1 = time.perf_counter()
        scale = dict(cfg.lr_scale).get(method, 1.0)
        obj = get_objective(method, beta=cfg.beta, retain_weight=OBJECTIVES[method].retain_weight / scale)
        adapter = MarkovAdapter(model, forget, train["retain"], idk, evaluator, cfg.batch_size, cfg.seed)
        try:
            res = unlearn.run(adapter, obj, target, steps=cfg.steps, lr=cfg.lr * scale, record_at=record,
                              optimizer=opt(cfg.lr) if opt else None)
        except unlearn.NonFiniteLoss as exc:  # a diverged run is a result: keep its records up to that step
            res, diverged[method] = exc.rows, exc.step
        frames.append(pd.DataFrame(res).drop(columns="replica").assign(method=method))
        timings[method] = time.perf_counter() - t1
        if progress:
            progress(method, timings[method])
    curves = pd.concat(frames, ignore_index=True)
    curves.insert(0, "model", cfg.model)
    curves.insert(0, "preset", cfg.preset)
    summary = {
        "config": cfg,
        "pretrain": {"target_token_nll": target_nll, "oracle_token_nll": oracle_nll,
                     "target_sources": pre_sources, "method": "exact MLE" if cfg.model == "tabular" else "AdamW"},
        "reference": reference,
        "methods": {m: _method_summary(curves[curves.method == m]) for m in cfg.methods},
        "diverged_at_step": diverged,
        "timing_s": {"pretrain": t_pre, **timings, "total": time.perf_counter() - t0},
    }
    summary["findings"] = FINDINGS[cfg.preset](cfg, curves, summary)
    return curves, summary


METRIC_COLS = [f"kl_{s}_{t}" for s in SOURCES for t in ("true", "oracle")] + [f"ll_{s}_test" for s in SOURCES]


def _method_summary(df: pd.DataFrame) -> dict:
    """Final row, and the row where the forget KL to the oracle (test prefixes, F1 and F2 pooled) is smallest."""
    forget_kl = (df["kl_forget1_oracle"] + df["kl_forget2_oracle"]) / 2
    cols = [c for c in df.columns if c not in ("preset", "model", "method")]
    return {"final": df.iloc[-1][cols].astype(float).to_dict(),
            "best": df.loc[forget_kl.idxmin(), cols].astype(float).to_dict()}


# ==================================================================================================
# findings per preset (measured numbers + a verdict computed from them)
# ==================================================================================================
def _balance(cfg: MarkovConfig, summary: dict, at: str) -> dict:
    orc = summary["reference"]["oracle"]
    out = {}
    for m, s in summary["methods"].items():
        row = s[at]
        out[m] = {"step": int(row["step"]), "kl_retain_true": row["kl_retain_true"],
                  "kl_retain_oracle": row["kl_retain_oracle"]}
        for f in ("forget1", "forget2"):
            gap = row[f"ll_{f}_test"] - orc[f"ll_{f}_test"]  # < 0: below the oracle = over-unlearned
            out[m][f] = {"kl_true": row[f"kl_{f}_true"], "kl_oracle": row[f"kl_{f}_oracle"], "ll_gap_vs_oracle": gap,
                         "state": "over-unlearned" if gap < 0 else "under-unlearned"}
    return out


def _findings_length(cfg, curves, summary) -> dict:
    res = {"at_best": _balance(cfg, summary, "best"), "final": _balance(cfg, summary, "final"),
           "note": "forget1 long (L=%d), forget2 short (L=%d); 'best' = step minimising the mean forget KL to the "
                   "oracle; ll_gap = per-token test log-lik minus the oracle's (<0 over-unlearned)"
                   % (cfg.length, cfg.forget2_length)}
    verdict = []
    for m in [m for m in ("npo", "simnpo") if m in res["at_best"]]:
        b = res["at_best"][m]
        verdict.append(f"{m}: at its best step {b['step']} KL-to-oracle short={b['forget2']['kl_oracle']:.4f} vs "
                       f"long={b['forget1']['kl_oracle']:.4f} (short {b['forget2']['state']}, long {b['forget1']['state']})")
    res["verdict"] = "; ".join(verdict)
    return res


def _findings_memorization(cfg, curves, summary) -> dict:
    res = {"at_best": _balance(cfg, summary, "best"), "final": _balance(cfg, summary, "final"),
           "note": "forget2 left out of pretraining; over-unlearned = test log-lik below the oracle's"}
    verdict = []
    for m in [m for m in ("npo", "simnpo") if m in res["at_best"]]:
        b = res["at_best"][m]
        yes = b["forget2"]["ll_gap_vs_oracle"] < 0 and b["forget1"]["ll_gap_vs_oracle"] > 0
        res[f"{m}_over_f2_under_f1"] = bool(yes)
        verdict.append(f"{m}: forget2 gap {b['forget2']['ll_gap_vs_oracle']:+.4f}, forget1 gap "
                       f"{b['forget1']['ll_gap_vs_oracle']:+.4f} nats/token -> {'yes' if yes else 'no'}")
    res["verdict"] = "; ".join(verdict)
    return res


def divergence_fits(curves: pd.DataFrame, fit_from: int) -> dict:
    """Linear and log fits of ‖θ_t−θ_0‖ and of the forget NLL (−mean summed log-lik) against t, per method."""
    out = {}
    for m, df in curves.groupby("method", sort=False):
        df = df[(df.step >= max(fit_from, 1)) & np.isfinite(df.param_dist) & np.isfinite(df.logp_forget)]
        if len(df) < 3:
            continue  # diverged too early to fit
        t = df.step.to_numpy(float)
        out[m] = {f"{name}_{kind}": fit(t, y).as_dict()
                  for name, y in (("norm", df.param_dist.to_numpy()), ("forget_nll", -df.logp_forget.to_numpy()))
                  for kind, fit in (("linear", linear_fit), ("log", log_fit))}
        # growth exponent p of ‖θ_t−θ_0‖ ∝ t^p over the window: 1 for linear growth, → 0 for logarithmic
        out[m]["norm_loglog"] = linear_fit(np.log(t), np.log(np.maximum(df.param_dist.to_numpy(), 1e-300))).as_dict()
    return out


def _findings_divergence(cfg, curves, summary) -> dict:
    fit_from = cfg.fit_from or max(1, cfg.steps // 100)
    fits = divergence_fits(curves, fit_from)
    windows = {f"from_{w}": divergence_fits(curves, w) for w in sorted({1, fit_from, cfg.steps // 30, cfg.steps // 10})}
    res = {"fits": fits, "fit_range": [fit_from, cfg.steps],
           "r2_by_window": {w: {m: {**{k: v["r2"] for k, v in f.items() if k != "norm_loglog"},
                                    "norm_loglog_slope": f["norm_loglog"]["slope"]} for m, f in fw.items()}
                            for w, fw in windows.items()},
           "note": "fits over record steps >= fit_from (default 1% of the run: the laws are asymptotic); "
                   "r2_by_window repeats them from other first steps"}
    parts = []
    for m, law, other in (("ga", "linear", "log"), ("npo", "log", "linear")):
        if m in fits:
            f = fits[m]
            ok = all(f[f"{q}_{law}"]["r2"] > 0.98 and f[f"{q}_{law}"]["r2"] >= f[f"{q}_{other}"]["r2"]
                     for q in ("norm", "forget_nll"))
            res[f"{m}_{law}_law_holds"] = bool(ok)
            parts.append(f"{m}: norm R² {law} {f[f'norm_{law}']['r2']:.4f} vs {other} {f[f'norm_{other}']['r2']:.4f}, "
                         f"forget NLL R² {law} {f[f'forget_nll_{law}']['r2']:.4f} vs {other} "
                         f"{f[f'forget_nll_{other}']['r2']:.4f} -> {'holds' if ok else 'does not hold'}")
    res["verdict"] = "; ".join(parts)
    return res


FINDINGS = {"length": _findings_length, "memorization": _findings_memorization, "divergence": _findings_divergence}


# ==================================================================================================
# entry points
# ==================================================================================================
def run_markov(preset: str, model: str = "tabular", quick: bool = False, out_dir=None, figures_dir=None,
               seed: int = 0, progress=None, **overrides) -> dict:
    """Run a preset; write curves.csv, summary.json and the figure into ``out_dir`` (if given), copying
    the figure into ``figures_dir`` (if given). Returns the summary. Validates before doing anything."""
    cfg = make_config(preset, model, quick, seed, **overrides)
    curves, summary = simulate(cfg, progress)
    if out_dir is not None:
        from .plots import markov as plots

        out = Path(out_dir)
        write_csv(out / "curves.csv", curves)
        write_json(out / "summary.json", summary)
        fig = plots.PLOTS[preset](curves, summary)
        save_figure(fig, out / f"markov_{preset}_{model}.png", copy_to=figures_dir)
    return summary


def add_arguments(p) -> None:
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--model", default="tabular", help="tabular (default) or transformer")
    p.add_argument("--quick", action="store_true", help="smaller/faster version (used by `npo-sim figures`)")
    p.add_argument("--out", required=True, help="run directory for curves.csv, summary.json, figure")
    p.add_argument("--figures", default="figures", help="directory that receives a copy of the figure ('' = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=None, help="comma-separated objectives (default: the preset's)")
    p.add_argument("--eps", type=float, default=None, help="leakage ε in [0,1) (default 0.2)")
    p.add_argument("--length", type=int, default=None, help="sequence length (default 20)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the models are tiny)")


def main(args) -> int:
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    summary = run_markov(args.preset, args.model, args.quick, args.out, args.figures or None, args.seed,
                         progress=lambda m, s: print(f"  {m}: {s:.1f}s", flush=True),
                         methods=methods, eps=args.eps, length=args.length, steps=args.steps, lr=args.lr,
                         beta=args.beta)
    print(format_summary(summary))
    print(f"wrote {Path(args.out) / 'curves.csv'}, summary.json, markov_{args.preset}_{args.model}.png")
    return 0


def format_summary(summary: dict) -> str:
    cfg, f = summary["config"], summary["findings"]
    lines = [f"markov {cfg.preset} ({cfg.model}): pretrain token NLL target {summary['pretrain']['target_token_nll']:.4f}, "
             f"oracle {summary['pretrain']['oracle_token_nll']:.4f}; total {summary['timing_s']['total']:.1f}s"]
    if cfg.preset == "divergence":
        for m, fits in f["fits"].items():
            for q in ("norm", "forget_nll"):
                lin, lg = fits[f"{q}_linear"], fits[f"{q}_log"]
                lines.append(f"  {m:4s} {q:10s} linear: slope {lin['slope']:.4g}/step R² {lin['r2']:.4f} | "
                             f"log: slope {lg['slope']:.4g}/ln-step R² {lg['r2']:.4f}")
            lines.append(f"  {m:4s} norm ∝ t^p: p = {fits['norm_loglog']['slope']:.3f}")
    else:
        lines.append(f"  at each method's best step (min mean forget KL to oracle); F1 = forget1 (L={cfg.length}), "
                     f"F2 = forget2 (L={cfg.forget2_length}); KL = next-state KL on test prefixes")
        lines.append(f"  {'method':10s} {'step':>5s} {'F1 KL→true':>10s} {'F2 KL→true':>10s} {'F1 KL→orc':>10s} "
                     f"{'F2 KL→orc':>10s} {'F1 llgap':>9s} {'F2 llgap':>9s} {'ret KL→true':>11s}")
        for m, b in f["at_best"].items():
            lines.append(f"  {m:10s} {b['step']:5d} {b['forget1']['kl_true']:10.4f} {b['forget2']['kl_true']:10.4f} "
                         f"{b['forget1']['kl_oracle']:10.4f} {b['forget2']['kl_oracle']:10.4f} "
                         f"{b['forget1']['ll_gap_vs_oracle']:+9.4f} {b['forget2']['ll_gap_vs_oracle']:+9.4f} "
                         f"{b['kl_retain_true']:11.4f}")
    for m, step in summary["diverged_at_step"].items():
        lines.append(f"  {m}: loss became non-finite at step {step}; curves and fits stop there")
    lines.append(f"  verdict: {f['verdict']}")
    return "\n".join(lines)
