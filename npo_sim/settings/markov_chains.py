"""The Markov chains of the setting, their sequences, the tabular model and the exact KLs.

``K`` states (default 10). Chain ``retain`` lives on states {1,2,3}, ``forget1`` on {4,5,6},
``forget2`` on {7,8,9} (0-based indices 0..8 here); state 10 (index 9) belongs to no chain. From one of
its own states a chain moves to each own state with probability ``(1-ε)/g`` and to each other state
with ``ε/(K-g)``; rows of states outside its set are uniform; the initial distribution uses the same
split.

A model of the setting is a set of functions of a parameter list (``seq_logp``, ``retain_logp``,
``retain_logits``, ``next_logprobs``, and ``contexts``/``context_logprobs`` for the exact metrics).
:class:`TabularModel` is the closed-form one (with a closed-form ``vjp``); the tiny transformer is in
``markov_transformer``. The adapters for :func:`npo_sim.unlearn.run` and the exact-metric
:class:`Evaluator` are at the end; every function here accepts parameters with one leading replica axis
(the tabular model runs all methods as one batched program).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: the three chains, in the order of their state groups
SOURCES = ("retain", "forget1", "forget2")


# ==================================================================================================
# chains and sampling
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
    """The chain on the states ``own``: mass ``1-ε`` on its own states, ``ε`` leaks to the others."""
    g = len(own)
    split = np.full(n_states, eps / (n_states - g))
    split[list(own)] = (1.0 - eps) / g
    trans = np.full((n_states, n_states), 1.0 / n_states)
    trans[list(own)] = split
    return Chain(name, split.copy(), trans)


def make_chains(n_states: int = 10, group_size: int = 3, eps: float = 0.2) -> dict[str, Chain]:
    """One chain per source on consecutive groups of ``group_size`` states (the last states belong to none)."""
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
    def of(cls, x: np.ndarray) -> SeqSet:
        t = torch.as_tensor(x, dtype=torch.long)
        return cls(t, torch.full((t.shape[0],), t.shape[1], dtype=torch.long))

    @classmethod
    def cat(cls, sets: Sequence[SeqSet]) -> SeqSet:
        L = max(s.seqs.shape[1] for s in sets)
        return cls(torch.cat([F.pad(s.seqs, (0, L - s.seqs.shape[1])) for s in sets]),
                   torch.cat([s.lengths for s in sets]))

    def subset(self, idx) -> SeqSet:
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

    def sparse_counts(self, K: int) -> tuple[Tensor, Tensor]:
        """``counts(K)`` as a sparse CSR matrix and its transpose (cached): at most ``L`` of the ``(K+1)·K``
        entries of a row are non-zero, so the batched program's products run on the non-zeros only."""
        if getattr(self, "_csr", None) is None:
            c = self.counts(K)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": the two products used here are not
                warnings.simplefilter("ignore", UserWarning)
                self._csr = (c.to_sparse_csr(), c.T.contiguous().to_sparse_csr())
        return self._csr

    def count_stats(self, K: int) -> tuple[Tensor, Tensor]:
        """``counts(K).mean(0)`` and ``counts(K).sum(0)`` (cached: the full-batch tabular terms reuse them)."""
        if getattr(self, "_cstats", None) is None:
            c = self.counts(K)
            self._cstats = (c.mean(0), c.sum(0))
        return self._cstats

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
# the tabular model and the exact KLs
# ==================================================================================================
class TabularModel:
    """Params ``[init_logits (K,), trans_logits (K, K)]``; float64 throughout.

    Pretraining is exact: the maximum-likelihood solution (normalised counts plus a small pseudocount
    ``α``, so that no logit is ``-inf``) is the point gradient training converges to. Its KL to any
    chain is closed-form (:func:`chain_kl`).
    """

    kind = "tabular"

    def __init__(self, n_states: int, pseudocount: float = 0.1) -> None:
        self.K, self.pseudocount = n_states, pseudocount

    def row_logits(self, params: Sequence[Tensor]) -> Tensor:
        return torch.cat([params[0][..., None, :], params[1]], dim=-2)

    def next_logprobs(self, params: Sequence[Tensor], data: SeqSet) -> Tensor:
        return F.log_softmax(self.row_logits(params), -1)[data.rows]

    def _flat_logp(self, params: Sequence[Tensor]) -> Tensor:
        """The log-softmax table flattened to ``(*replicas, (K+1)·K)``."""
        lp = F.log_softmax(self.row_logits(params), -1)
        return lp.reshape(*lp.shape[:-2], -1)

    def seq_logp(self, params: Sequence[Tensor], data: SeqSet) -> Tensor:
        """``(*replicas, n)`` summed log-probabilities (params may carry one leading replica axis)."""
        flat = self._flat_logp(params)
        if flat.ndim == 1:
            u, inv = data.unique_counts(self.K)  # distinct sequences only (IDK sequences: one per length)
            return (u @ flat)[inv]
        return (data.sparse_counts(self.K)[0] @ flat.reshape(-1, flat.shape[-1]).T).T.reshape(*flat.shape[:-1], -1)

    def retain_logp(self, params: Sequence[Tensor], data: SeqSet) -> Tensor:
        """``(*replicas, 1)``: the mean retain log-likelihood (exact for the retain NLL term, which takes a mean)."""
        mean, flat = data.count_stats(self.K)[0], self._flat_logp(params)
        return (mean @ flat)[None] if flat.ndim == 1 else (flat @ mean)[..., None]

    def retain_logits(self, params: Sequence[Tensor], data: SeqSet) -> tuple[Tensor, Tensor]:
        """The ``K+1`` distinct rows with their prefix counts as weights: ``losses.kl`` then equals the
        per-position average over every retain prefix, exactly, at a fraction of the cost."""
        return self.row_logits(params), data.count_stats(self.K)[1].reshape(self.K + 1, self.K).sum(1)

    def vjp(self, params: Sequence[Tensor], data: dict[str, SeqSet], cotangents: dict[str, Tensor]) -> list[Tensor]:
        """Closed-form chain rule: ``Σ_k ⟨cotangent_k, ∂input_k/∂params⟩`` for the inputs above.

        Every input is linear in the log-softmax table ``S = log_softmax(Z)`` (``Z`` = the row logits),
        ``input = C @ S.reshape(-1)`` for a count matrix ``C``; so the pulled-back weights are
        ``N = Σ_k cotangent_kᵀ C_k`` (a ``(K+1, K)`` table of weighted counts) and
        ``∂/∂Z = N − rowsum(N)·softmax(Z)``. ``retain_logits`` is ``Z`` itself: its cotangent adds to ``∂/∂Z``
        directly. ``data`` names the sequences of each input (``logp``, ``idk_logp``, ``retain_logp``) and, for
        the compact per-token inputs (``token_logp``, ``forget_logits``), their table entries (``tokens``).
        """
        Z = self.row_logits(params)
        N = torch.zeros_like(Z)
        for key in ("logp", "idk_logp"):
            if key in cotangents:
                cot = cotangents[key].to(Z.dtype)
                if cot.ndim == 1:
                    u, inv = data[key].unique_counts(self.K)
                    N = N + (torch.zeros(len(u), dtype=u.dtype).index_add_(0, inv, cot) @ u).reshape(Z.shape)
                else:  # replicas: Cᵀ·cot on the sparse counts
                    ct = data[key].sparse_counts(self.K)[1]
                    N = N + (ct @ cot.reshape(-1, cot.shape[-1]).T).T.reshape(Z.shape)
        if "retain_logp" in cotangents:
            mean = data["retain_logp"].count_stats(self.K)[0].reshape(Z.shape[-2:])
            N = N + cotangents["retain_logp"].sum(-1)[..., None, None] * mean
        if "token_logp" in cotangents:   # compact token inputs (TabularAdapter): entries of the log-softmax table
            idx = data["tokens"]
            flat = torch.zeros(Z.shape[:-2] + (Z.shape[-2] * Z.shape[-1],), dtype=Z.dtype)
            N = N + flat.index_add(-1, idx, cotangents["token_logp"].to(Z.dtype).squeeze(-2)).reshape(Z.shape)
        gz = N - N.sum(-1, keepdim=True) * torch.softmax(Z, -1)
        if "retain_logits" in cotangents:
            gz = gz + cotangents["retain_logits"]
        if "forget_logits" in cotangents:  # compact: each entry's logits are its row of Z
            rows = data["tokens"] // self.K
            gz = gz.index_add(-2, rows, cotangents["forget_logits"].to(Z.dtype).squeeze(-3))
        return [gz[..., 0, :], gz[..., 1:, :]]

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
    """The chain's ``(K+1, K)`` rows (see :meth:`Chain.rows`) as a float64 tensor."""
    return torch.as_tensor(chain.rows(), dtype=torch.float64)


def chain_kl(chain: Chain, model_rows_logp: Tensor, length: int) -> Tensor:
    """Closed-form ``KL(p_chain ‖ p_model)/L`` over length-``L`` sequences of a tabular model.

    ``KL = KL(π0 ‖ q0) + Σ_{t=0}^{L-2} Σ_s μ_t(s)·KL(P_s ‖ Q_s)`` with visitation ``μ_t = π0 Pᵗ``.
    """
    P = rows_tensor(chain)
    row_kl = (torch.xlogy(P, P) - P * model_rows_logp.to(P)).sum(-1)  # (*replicas, K+1)
    mu, total = P[0], row_kl[..., 0]
    for _ in range(length - 1):
        total = total + (mu @ row_kl[1:] if row_kl.ndim == 1 else row_kl[..., 1:] @ mu)
        mu = mu @ P[1:]
    return total / length


def weighted_kl(true_p: Tensor, model_logp: Tensor, weight: Tensor) -> Tensor:
    """``Σ_c w_c KL(true_c ‖ model_c) / Σ_c w_c`` over contexts ``c`` (rows of ``(C, K)`` tensors; ``model_logp``
    may carry leading replica axes, which are kept)."""
    per = (torch.xlogy(true_p, true_p) - true_p * model_logp.to(true_p)).sum(-1)
    w = weight.to(per)
    return (per * w).sum(-1) / w.sum()


# ==================================================================================================
# adapter for npo_sim.unlearn.run, and the exact metrics
# ==================================================================================================
class MarkovAdapter:
    """Turns params into the objective's inputs on the forget/retain train sets (optionally minibatched)."""

    def __init__(self, model, forget: SeqSet, retain: SeqSet, idk: SeqSet | None, evaluator: Evaluator,
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
        pick = {"logp_ref": self._fi, "idk_logp_ref": self._fi, "retain_ref_logits": self._ri,
                "ref_token_logp": self._fi, "forget_ref_logits": self._fi}
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
        out.update(self._token_inputs(params, forget, keys))
        return out

    def _token_inputs(self, params: Sequence[Tensor], forget: SeqSet, keys: frozenset[str]) -> dict[str, Tensor]:
        """Per-token forget inputs, one row per sequence: ``(n, L)`` log-probs of the next states, the
        ``(n, L, K)`` next-state log-probabilities as logits, the states as labels, the validity mask."""
        out: dict[str, Tensor] = {}
        if keys & {"token_logp", "forget_logits"}:
            nl = self.model.next_logprobs(params, forget)
            if "token_logp" in keys:
                out["token_logp"] = nl.gather(-1, forget.seqs.unsqueeze(-1)).squeeze(-1)
            if "forget_logits" in keys:
                out["forget_logits"] = nl
        if "token_mask" in keys:
            out["token_mask"] = forget.mask.to(torch.get_default_dtype())
        if "forget_labels" in keys:
            out["forget_labels"] = forget.seqs
        return out

    def metrics(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        return self.evaluator(params)


class TabularAdapter(MarkovAdapter):
    """The tabular model's adapter with the closed-form chain rule (:meth:`TabularModel.vjp`): the loop
    then runs autograd only through the loss, never through the model. :class:`MarkovAdapter` on the same
    model is the autograd reference a test compares it with."""

    def vjp(self, params: Sequence[Tensor], inputs: dict[str, Tensor], cotangents: dict[str, Tensor]) -> list[Tensor]:
        data = {"logp": self._sub(self.forget, self._fi), "idk_logp": self._sub(self.idk, self._fi),
                "retain_logp": self._sub(self.retain, self._ri)}
        if "token_logp" in cotangents or "forget_logits" in cotangents:
            data["tokens"] = self._entries(data["logp"])[0]
        return self.model.vjp(params, data, cotangents)

    def _entries(self, forget: SeqSet) -> tuple[Tensor, Tensor]:
        """The forget set's distinct (row, next state) table entries and their weights
        ``w_e = mean_i c_i(e)/L_i`` (``c_i`` = entry counts of sequence i), non-zero ones only (cached)."""
        if getattr(forget, "_entries", None) is None:
            w = (forget.counts(self.model.K) / forget.lengths[:, None].double()).mean(0)
            idx = torch.nonzero(w).squeeze(-1)
            forget._entries = (idx, w[idx])
        return forget._entries

    def _token_inputs(self, params: Sequence[Tensor], forget: SeqSet, keys: frozenset[str]) -> dict[str, Tensor]:
        """Per-token inputs in the tabular model's compact form: one pseudo-example whose tokens are the
        distinct table entries, weighted by :meth:`_entries`. A per-token value depends on its (row, state)
        only, so every token-level term (a token mean per sequence, then a mean over sequences) is exact."""
        out: dict[str, Tensor] = {}
        idx, w = self._entries(forget)
        K = self.model.K
        if "token_logp" in keys:
            flat = F.log_softmax(self.model.row_logits(params), -1).flatten(-2)       # (*R, (K+1)·K)
            out["token_logp"] = flat[..., idx].unsqueeze(-2)                          # (*R, 1, E)
        if "forget_logits" in keys:
            Z = self.model.row_logits(params)                                         # (*R, K+1, K)
            out["forget_logits"] = Z[..., idx // K, :].unsqueeze(-3)                  # (*R, 1, E, K)
        if "token_mask" in keys:
            out["token_mask"] = w[None]                     # float64 weights (the table is float64)
        if "forget_labels" in keys:
            out["forget_labels"] = (idx % K)[None]
        return out


#: model kind -> its adapter class
ADAPTERS = {"tabular": TabularAdapter, "transformer": MarkovAdapter}


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
            out[f"ll_{s}_test"] = (counts * lp).sum((-2, -1)) / w.sum()
        if self.model.kind == "tabular":
            rows_lp = F.log_softmax(self.model.row_logits(params), -1)
            for s, c in self.chains.items():
                out[f"ckl_{s}"] = chain_kl(c, rows_lp, self.lengths[s])
        logps = {s: self.model.seq_logp(params, d) for s, d in self.forget_eval.items()}
        for s, v in logps.items():
            out[f"logp_{s}"] = v.mean(-1)
        out["logp_forget"] = torch.cat(list(logps.values()), -1).mean(-1)
        lead = params[0].ndim - self.params0[0].ndim  # replica axes (0 for one run)
        sq = [(p - p0) ** 2 for p, p0 in zip(params, self.params0)]
        out["param_dist"] = torch.sqrt(sum(d.sum(tuple(range(lead, d.ndim))) if lead else d.sum() for d in sq))
        return {k: v.double() for k, v in out.items()}
