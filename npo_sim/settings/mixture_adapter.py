"""The §4 mixture's unlearning side: the adapter :func:`npo_sim.unlearn.run` trains through, the exact
binary KL its metrics use, and :func:`run_methods`, which runs every method × seed as the replicas of
one tensor program (:class:`MultiObjective`: each method's registry objective on its replica slice),
with the closed-form gradient :meth:`MixtureAdapter.vjp` (autograd is the tested reference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import unlearn
from ..losses import OBJECTIVES, LossTerms, Objective, get_objective

if TYPE_CHECKING:
    from .mixture_config import MethodSpec, MixtureData

CURVE_COLUMNS = ("method", "seed", "step", "forget_distance", "retain_distance", "param_distance",
                 "forget_loss", "forget_nll", "retain_loss")


# --------------------------------------------------------------------------------------------------
# exact KL between 2-class logistic models
# --------------------------------------------------------------------------------------------------
def binary_kl(logit_p: Tensor, logit_q: Tensor) -> Tensor:
    """Elementwise ``KL(Bern(σ(a)) ‖ Bern(σ(b)))`` (no reduction), in log-sigmoids so it cannot overflow:
    ``σ(a)(log σ(a) − log σ(b)) + σ(−a)(log σ(−a) − log σ(−b))``. It equals the library's
    :func:`npo_sim.losses.kl` on the 2-class logits ``[0, a]`` and ``[0, b]`` (tested), at a fraction of
    the cost of a log-softmax over a last axis of size 2."""
    lp, lq = F.logsigmoid(logit_p), F.logsigmoid(logit_q)
    lp_, lq_ = F.logsigmoid(-logit_p), F.logsigmoid(-logit_q)
    return lp.exp() * (lp - lq) + lp_.exp() * (lp_ - lq_)


def mean_binary_kl(logit_p: Tensor, logit_q: Tensor) -> Tensor:
    """``E_x KL(π_p(·|x) ‖ π_q(·|x))`` over the last axis."""
    return binary_kl(logit_p, logit_q).mean(-1)


# --------------------------------------------------------------------------------------------------
# the adapter for npo_sim.unlearn.run
# --------------------------------------------------------------------------------------------------
class MixtureAdapter:
    """Turns θ of shape ``(G, k)`` into the per-example tensors the objectives ask for.

    Replicas are method-major: replica ``r`` uses seed ``r % S`` (``G = c·S`` for ``c`` methods that
    share one objective). Features are stored transposed, ``(S, k, n)``, so the logits are one batched
    row-vector × matrix product (thin matmuls in the other layout are several times slower on CPU).
    Training tensors use ``dtype``; the metrics are always computed in float64.

    The model is linear in θ, so the loop's gradient is the closed-form chain rule :meth:`vjp`
    (``Φᵀ(c ⊙ ∂input/∂z)``); ``closed_form=False`` hides it, and the loop differentiates the adapter by
    autograd instead (the reference the tests compare against).
    """

    def __init__(self, data: MixtureData, theta_retr, dtype=torch.float32, closed_form: bool = True):
        t = lambda a, dt=dtype: torch.as_tensor(np.asarray(a), dtype=dt)  # noqa: E731
        f64 = torch.float64
        self.S, self.n_f = data.y_forget.shape
        self.forget, self.retain = t(data.phi_forget), t(data.phi_retain)  # (S, n, k), for the vjp
        self.forget_T = self.forget.transpose(1, 2).contiguous()             # (S, k, n_f)
        self.retain_T = self.retain.transpose(1, 2).contiguous()             # (S, k, n_r)
        eval_phi = np.concatenate([data.phi_eval_forget, data.phi_eval_retain], 1)
        self.eval_T = t(eval_phi, f64).transpose(1, 2).contiguous()
        self.n_eval = data.phi_eval_forget.shape[1]
        sign = lambda y, dt=dtype: t(2.0 * y - 1.0, dt)  # noqa: E731
        self.s_forget, self.s_idk, self.s_retain = sign(data.y_forget), sign(data.y_idk), sign(data.y_retain)
        self.s_forget64 = sign(data.y_forget, f64)
        self.forget64_T = self.forget_T.to(f64)
        self.theta_retr = t(theta_retr, f64)                               # (S, k)
        self.retr_eval = self._logits(self.theta_retr, self.eval_T)        # (S, 2·n_eval)
        if not closed_form:
            self.vjp = None                                                # unlearn.run: autograd path

        #: input key -> the method blocks (of S replicas each) that read it; absent: every block
        self.blocks: dict[str, list[int]] = {}

    def _rows(self, x: Tensor, key: str) -> Tensor:
        """Rows (G, n) restricted to the blocks that read ``key``: (c'·S, n), blocks in order."""
        if key not in self.blocks:
            return x
        return x.reshape(-1, self.S, x.shape[-1])[self.blocks[key]].reshape(-1, x.shape[-1])

    # θ (G, k) -> logits (G, n) against per-seed features (S, k, n)
    def _logits(self, theta: Tensor, feats_T: Tensor) -> Tensor:
        G = theta.shape[0]
        c = G // self.S
        z = theta.reshape(c, self.S, -1).transpose(0, 1) @ feats_T         # (S, c, n)
        return z.transpose(0, 1).reshape(G, -1)

    def _per_replica(self, x: Tensor, G: int) -> Tensor:
        return x.expand(G // self.S, *x.shape).reshape(G, *x.shape[1:])

    #: input key -> (which logits it reads, f(adapter, logits))
    INPUTS = {
        "logp": ("forget", lambda a, z: F.logsigmoid(a._per_replica(a.s_forget, z.shape[0]) * z)),
        "idk_logp": ("forget", lambda a, z: F.logsigmoid(a._per_replica(a.s_idk, z.shape[0]) * z)),
        "length": ("forget", lambda a, z: torch.ones_like(z)),                     # one label: |y| = 1
        "retain_logp": ("retain", lambda a, z: F.logsigmoid(a._per_replica(a.s_retain, z.shape[0]) * z)),
        "retain_logits": ("retain", lambda a, z: torch.stack([torch.zeros_like(z), z], -1)),  # classes [0, 1]
        # the forget example as one token (T = 1): its log-prob, the two-class logits [0, z], its class
        "token_logp": ("forget", lambda a, z: F.logsigmoid(a._per_replica(a.s_forget, z.shape[0]) * z)[..., None]),
        "token_mask": ("forget", lambda a, z: torch.ones(z.shape + (1,), dtype=z.dtype)),
        "forget_logits": ("forget", lambda a, z: torch.stack([torch.zeros_like(z), z], -1)[..., None, :]),
        "forget_labels": ("forget", lambda a, z: (a._per_replica(a.s_forget, z.shape[0]) > 0).long()[..., None]),
    }

    def inputs(self, params: Sequence[Tensor], keys: frozenset[str]) -> dict[str, Tensor]:
        """Per-example tensors; a key read by only some method blocks (:attr:`blocks`) covers only
        their replicas. Logits are one pass over each feature set (the features, not the FLOPs, are
        what costs: the product is memory-bound), then restricted to a key's blocks."""
        feats = {"forget": self.forget_T, "retain": self.retain_T}
        z = {part: self._logits(params[0], feats[part]) for part in {self.INPUTS[k][0] for k in keys}}
        return {k: self.INPUTS[k][1](self, self._rows(z[self.INPUTS[k][0]], k)) for k in keys}

    #: θ-dependent input -> (which features, its sign labels or None, how ∂input/∂z is read)
    VJP = {"logp": ("forget", "s_forget"), "idk_logp": ("forget", "s_idk"),
           "retain_logp": ("retain", "s_retain"), "retain_logits": ("retain", None),
           "token_logp": ("forget", "s_forget"), "forget_logits": ("forget", None)}

    def vjp(self, params: Sequence[Tensor], inputs: Mapping[str, Tensor],
            cotangents: Mapping[str, Tensor]) -> list[Tensor]:
        """Closed-form ``Σ_k ⟨c_k, ∂input_k/∂θ⟩`` (see :func:`npo_sim.unlearn.run`).

        For ``logp = log σ(s·z)``, ``∂logp/∂z = s·σ(−s·z) = −s·expm1(logp)``; for ``retain_logits =
        [0, z]`` it is the second class's cotangent. Per feature set, ``∂z/∂θ = Φ`` gives
        ``∇θ = Φᵀ(Σ_k c_k ⊙ ∂input_k/∂z)``, one batched matmul per feature set.
        """
        theta = params[0]
        G = theta.shape[0]
        dz: dict[str, Tensor] = {}
        for key, c in cotangents.items():
            part, sign = self.VJP[key]
            x = inputs[key]
            if key in ("token_logp", "forget_logits"):   # one token per example: drop the T = 1 axis
                c, x = c[..., 0, :] if key == "forget_logits" else c[..., 0], x[..., 0]
            if sign is None:
                d = c[..., 1]
            else:
                d = c * self._per_replica(getattr(self, sign), c.shape[0]) * -torch.expm1(x)
            if key in self.blocks:                                             # compact: back to all G rows
                full = torch.zeros(G // self.S, self.S, d.shape[-1], dtype=d.dtype)
                full[self.blocks[key]] = d.reshape(-1, self.S, d.shape[-1])
                d = full.reshape(G, -1)
            dz[part] = dz[part] + d if part in dz else d
        grad = torch.zeros_like(theta)
        for part, d in dz.items():
            feats = {"forget": self.forget, "retain": self.retain}[part]         # (S, n, k)
            g = d.reshape(-1, self.S, d.shape[-1]).transpose(0, 1) @ feats      # (S, c, k)
            grad = grad + g.transpose(0, 1).reshape(G, -1)
        return [grad]

    def metrics(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        theta = params[0].double()
        G = theta.shape[0]
        dist = binary_kl(self._per_replica(self.retr_eval, G), self._logits(theta, self.eval_T))
        zf = self._logits(theta, self.forget64_T)
        return {
            "forget_distance": dist[:, : self.n_eval].mean(-1),
            "retain_distance": dist[:, self.n_eval:].mean(-1),
            "param_distance": (theta - self._per_replica(self.theta_retr, G)).norm(dim=-1),
            "forget_nll": -F.logsigmoid(self._per_replica(self.s_forget64, G) * zf).mean(-1),
        }


# --------------------------------------------------------------------------------------------------
# unlearning: every method x every seed as replicas of one tensor program
# --------------------------------------------------------------------------------------------------
class MultiObjective:
    """Several registry objectives, each on its own contiguous replica slice of one program.

    ``needs`` is the union of the parts' needs; each part's registry objective sees only its slice of
    every input it reads, and the per-replica loss terms are concatenated back in replica order, so the
    loop's ``loss.sum()`` is the sum of every part's own loss (no loss is re-implemented here). ``beta``
    is one value per replica (1 where a part has no β); it is only read by the loop's ``npo_weight``
    record column.
    """

    def __init__(self, parts: Sequence[tuple[Objective, slice]], beta: Tensor,
                 blocks: Mapping[str, list[int]] | None = None):
        self.parts = list(parts)
        self.beta = beta
        self.name = "+".join(o.name for o, _ in self.parts)
        #: key -> the blocks whose replicas a compact input holds (see MixtureAdapter.blocks)
        self.blocks = dict(blocks or {})

    def _slice(self, key: str, i: int, sl: slice) -> slice:
        """Part ``i``'s rows in input ``key``: its own slice, or its place among a compact key's blocks."""
        base = BASE_OF.get(key, key)
        if base not in self.blocks:
            return sl
        j, n = self.blocks[base].index(i), sl.stop - sl.start
        return slice(j * n, (j + 1) * n)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(o.needs for o, _ in self.parts))

    def __call__(self, inputs: Mapping[str, Tensor]) -> LossTerms:
        terms = [o({k: inputs[k][self._slice(k, i, sl)] for k in o.needs}) for i, (o, sl) in enumerate(self.parts)]
        return LossTerms(*(torch.cat(t) for t in zip(*terms)))


#: reference input -> the θ input it is the reference of
BASE_OF = {ref: k for k, ref in unlearn.REFERENCE_OF.items()}
#: inputs computed only for the method blocks that read them (``logp`` stays full: the loop's
#: ``npo_weight`` record pairs it with the per-replica β)
COMPACT = ("idk_logp", "length", "retain_logp", "retain_logits", "token_logp", "token_mask", "forget_logits",
           "forget_labels")


def build_program(specs: Mapping[str, MethodSpec], S: int, dtype) -> tuple[MultiObjective, Tensor]:
    """One replica block of ``S`` seeds per method (method-major): the objective and per-replica lr.

    Inputs in :data:`COMPACT` hold only the blocks of the methods that read them (the others would
    compute, e.g., retain logits that no loss reads)."""
    parts, lrs, betas = [], [], []
    for i, spec in enumerate(specs.values()):
        beta = spec.beta if spec.beta is not None else OBJECTIVES[spec.objective].beta
        parts.append((get_objective(spec.objective, beta=beta), slice(i * S, (i + 1) * S)))
        lrs += [spec.lr] * S
        betas += [beta if OBJECTIVES[spec.objective].uses_beta else 1.0] * S
    blocks = {k: [i for i, (o, _) in enumerate(parts) if k in {BASE_OF.get(n, n) for n in o.needs}]
              for k in COMPACT}
    blocks = {k: b for k, b in blocks.items() if b and len(b) < len(parts)}
    return (MultiObjective(parts, torch.tensor(betas, dtype=dtype), blocks), torch.tensor(lrs, dtype=dtype))


def run_methods(adapter: MixtureAdapter, theta_ref: Tensor, specs: Mapping[str, MethodSpec], *,
                steps: int, record_at: Sequence[int], seeds: Sequence[int]) -> pd.DataFrame:
    """Unlearn every method in ``specs`` from ``theta_ref`` (S, k) in one run; return the tidy curves.

    Replica ``r`` is method ``r // S`` on seed ``r % S``. Runs with one intra-op thread (restored
    afterwards): the ops are tiny, and a second thread only adds synchronisation, which stalls badly
    when the cores are shared.
    """
    S, names = theta_ref.shape[0], list(specs)
    objective, lr = build_program(specs, S, theta_ref.dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    adapter.blocks = objective.blocks
    try:
        rows = unlearn.run(adapter, objective, [theta_ref.repeat(len(names), 1)], steps=steps, lr=lr,
                           record_at=record_at)
    finally:
        torch.set_num_threads(threads)
        adapter.blocks = {}
    df = pd.DataFrame(rows)
    df["method"] = [names[r // S] for r in df["replica"]]
    df["seed"] = [seeds[r % S] for r in df["replica"]]
    order = {m: i for i, m in enumerate(specs)}
    df = df.sort_values(["method", "seed", "step"], key=lambda s: s.map(order) if s.name == "method" else s)
    return df[list(CURVE_COLUMNS)].reset_index(drop=True)
