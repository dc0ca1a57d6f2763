"""The Markov chains of the setting, their sequences, the tabular model and the exact KLs.

``K`` states (default 10). Chain ``retain`` lives on states {1,2,3}, ``forget1`` on {4,5,6},
``forget2`` on {7,8,9} (0-based indices 0..8 here); state 10 (index 9) belongs to no chain. From one of
its own states a chain moves to each own state with probability ``(1-ε)/g`` and to each other state
with ``ε/(K-g)``; rows of states outside its set are uniform; the initial distribution uses the same
split.

A model of the setting is a set of functions of a parameter list (``seq_logp``, ``retain_logp``,
``retain_logits``, ``next_logprobs``, and ``contexts``/``context_logprobs`` for the exact metrics).
:class:`TabularModel` is the closed-form one; the tiny transformer is in ``markov_transformer``.
"""

from __future__ import annotations

import functools
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
    """The chain's ``(K+1, K)`` rows (see :meth:`Chain.rows`) as a float64 tensor."""
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
