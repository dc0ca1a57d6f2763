"""The §4 mixture's unlearning side: the adapter :func:`npo_sim.unlearn.run` trains through, the exact
binary KL its metrics use, and :func:`run_methods`, which runs every method as replicas of few tensor
programs (all seeds of a method, and all methods sharing an objective, in one run).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import unlearn
from ..losses import OBJECTIVES, get_objective, kl

if TYPE_CHECKING:
    from .mixture import MethodSpec, MixtureData

CURVE_COLUMNS = ("method", "seed", "step", "forget_distance", "retain_distance", "param_distance",
                 "forget_loss", "forget_nll", "retain_loss")


# --------------------------------------------------------------------------------------------------
# exact KL between 2-class logistic models
# --------------------------------------------------------------------------------------------------
def binary_kl(logit_p: Tensor, logit_q: Tensor) -> Tensor:
    """Elementwise ``KL(Bern(σ(a)) ‖ Bern(σ(b)))``: the library's :func:`npo_sim.losses.kl` on the
    2-class logits ``[0, a]`` (reference) and ``[0, b]``, kept per element (no reduction)."""
    two = lambda z: torch.stack([torch.zeros_like(z), z], -1)  # noqa: E731
    return kl(two(logit_q), two(logit_p), batch_dims=logit_p.ndim)


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
    """

    def __init__(self, data: MixtureData, theta_retr, dtype=torch.float32):
        t = lambda a, dt=dtype: torch.as_tensor(np.asarray(a), dtype=dt)  # noqa: E731
        f64 = torch.float64
        self.S, self.n_f = data.y_forget.shape
        self.forget_T = t(data.phi_forget).transpose(1, 2).contiguous()      # (S, k, n_f)
        self.retain_T = t(data.phi_retain).transpose(1, 2).contiguous()      # (S, k, n_r)
        eval_phi = np.concatenate([data.phi_eval_forget, data.phi_eval_retain], 1)
        self.eval_T = t(eval_phi, f64).transpose(1, 2).contiguous()
        self.n_eval = data.phi_eval_forget.shape[1]
        sign = lambda y, dt=dtype: t(2.0 * y - 1.0, dt)  # noqa: E731
        self.s_forget, self.s_idk, self.s_retain = sign(data.y_forget), sign(data.y_idk), sign(data.y_retain)
        self.s_forget64 = sign(data.y_forget, f64)
        self.forget64_T = self.forget_T.to(f64)
        self.theta_retr = t(theta_retr, f64)                               # (S, k)
        self.retr_eval = self._logits(self.theta_retr, self.eval_T)        # (S, 2·n_eval)

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
    }

    def inputs(self, params: Sequence[Tensor], keys: frozenset[str]) -> dict[str, Tensor]:
        feats = {"forget": self.forget_T, "retain": self.retain_T}
        z = {part: self._logits(params[0], feats[part]) for part in {self.INPUTS[k][0] for k in keys}}
        return {k: self.INPUTS[k][1](self, z[self.INPUTS[k][0]]) for k in keys}

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
# unlearning: all seeds of a method (and methods sharing an objective) in one run
# --------------------------------------------------------------------------------------------------
def run_methods(adapter: MixtureAdapter, theta_ref: Tensor, specs: Mapping[str, MethodSpec], *,
                steps: int, record_at: Sequence[int], seeds: Sequence[int]) -> pd.DataFrame:
    """Unlearn every method in ``specs`` from ``theta_ref`` (S, k); return the tidy curves table.

    Runs with one intra-op thread (restored afterwards): the ops are tiny, and a second thread only adds
    synchronisation, which stalls badly when the cores are shared.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        groups: dict[str, list[str]] = defaultdict(list)
        for name, spec in specs.items():
            groups[spec.objective].append(name)
        frames = [_run_group(adapter, theta_ref, objective, [specs[m] for m in names], names, steps=steps,
                             record_at=record_at, seeds=seeds) for objective, names in groups.items()]
    finally:
        torch.set_num_threads(threads)
    out = pd.concat(frames, ignore_index=True)
    order = {m: i for i, m in enumerate(specs)}
    out = out.sort_values(["method", "seed", "step"], key=lambda s: s.map(order) if s.name == "method" else s)
    return out[list(CURVE_COLUMNS)].reset_index(drop=True)


def _run_group(adapter, theta_ref, objective_name, specs, names, *, steps, record_at, seeds) -> pd.DataFrame:
    """Methods sharing one objective, as replicas of one run: per-replica lr and β, every seed."""
    S, c = theta_ref.shape[0], len(names)
    betas = [s.beta if s.beta is not None else OBJECTIVES[objective_name].beta for s in specs]
    # one value per replica; a plain float when the group shares it (skips per-step tensor checks)
    per_replica = lambda v: (float(v[0]) if len(set(v)) == 1  # noqa: E731
                             else torch.tensor(v, dtype=theta_ref.dtype).repeat_interleave(S))
    lr, beta = per_replica([s.lr for s in specs]), per_replica(betas)
    objective = get_objective(objective_name, beta=beta)
    theta0 = theta_ref.repeat(c, 1)                                    # (c·S, k), method-major
    df = pd.DataFrame(unlearn.run(adapter, objective, [theta0], steps=steps, lr=lr, record_at=record_at))
    df["method"] = [names[r // S] for r in df["replica"]]
    df["seed"] = [seeds[r % S] for r in df["replica"]]
    return df
