"""The one unlearning loop for the synthetic settings (logistic, mixture, Markov).

A setting supplies an :class:`Adapter` that turns parameters into the per-example tensors an
objective asks for (``objective.needs``). The loop

1. computes the reference tensors (``logp_ref``, ``idk_logp_ref``, ``retain_ref_logits``) **once**,
   at the reference parameters, and caches them — no reference model is evaluated during training;
2. runs full-batch gradient descent (or a given ``torch.optim`` optimizer) on
   ``objective(inputs).loss``;
3. records the adapter's metrics plus the loss terms at the requested steps, as a tidy table.

Parameters may carry leading *replica* axes (a grid of configs in one tensor program): the adapter
returns per-example tensors of shape ``(*replicas, n)``, losses reduce over the last axis, and the
loop sums over replicas so each gets its own gradient. ``lr`` may be a per-replica tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .losses import REFERENCE_OF, THETA_INPUTS, Objective, npo_weight  # noqa: F401  (re-exported)
from .runio import NonFiniteLoss  # noqa: F401  (re-exported: raised by run())


class Adapter(Protocol):
    def inputs(self, params: Sequence[Tensor], keys: frozenset[str]) -> dict[str, Tensor]:
        """Per-example tensors for ``keys`` (any of ``logp, idk_logp, retain_logp, retain_logits,
        length, retain_mask``), each of shape ``(*replicas, n[, ...])``."""

    def metrics(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        """Named quantities to record, each a tensor of shape ``(*replicas,)`` (or a scalar)."""

    # Optional closed-form chain rule (for models linear in their parameters, e.g. Φθ):
    #   vjp(params, inputs: dict[str, Tensor], cotangents: dict[str, Tensor]) -> list[Tensor]
    # returns, per parameter, Σ_k ⟨cotangents[k], ∂inputs[k]/∂param⟩ for the θ-dependent inputs in
    # THETA_INPUTS. With it, autograd runs only through the loss (over per-example tensors), never
    # through the model; without it, autograd differentiates the whole adapter (the reference path).
    #
    # Optional minibatch hook (not part of the Protocol, so existing adapters need nothing):
    #   select(step: int, ref: dict[str, Tensor]) -> dict[str, Tensor]
    # is called at the start of every step; the adapter picks that step's minibatch for its
    # following ``inputs`` calls and returns the cached reference tensors restricted to it.


def reference_inputs(adapter: Adapter, objective: Objective, params_ref: Sequence[Tensor]) -> dict[str, Tensor]:
    """The objective's reference tensors, computed once at ``params_ref`` without gradients."""
    wanted = {k for k, ref in REFERENCE_OF.items() if ref in objective.needs}
    if not wanted:
        return {}
    with torch.no_grad():
        got = adapter.inputs([p.detach() for p in params_ref], frozenset(wanted))
    # an adapter may return companions (e.g. ``retain_mask`` with ``retain_logits``): keep only references
    return {REFERENCE_OF[k]: v.detach() for k, v in got.items() if k in wanted}


def log_steps(total: int, n: int = 60, include_zero: bool = True) -> list[int]:
    """About ``n`` log-spaced integer steps in ``[1, total]`` (plus 0), deduplicated and sorted."""
    if total < 1:
        raise ValueError(f"steps must be >= 1, got {total}")
    pts = np.unique(np.round(np.logspace(0, np.log10(total), n)).astype(int))
    out = sorted(set(pts.tolist()) | {total} | ({0} if include_zero else set()))
    return out


def run(adapter: Adapter, objective: Objective, params0: Sequence[Tensor], *, steps: int,
        lr: float | Tensor, record_at: Iterable[int], params_ref: Sequence[Tensor] | None = None,
        optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
        progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Unlearn from ``params0`` for ``steps`` steps; return a tidy column dict.

    Columns: ``step``, ``replica`` and one column per recorded quantity (adapter metrics, ``loss``,
    ``forget_loss``, ``retain_loss``, and ``npo_weight`` — the mean W — when the objective uses
    ``logp_ref``). Rows are (record step × replica). Raises :class:`NonFiniteLoss` on divergence;
    finiteness is checked at record steps only (and at the last step), so the loop never syncs on it
    in between: a diverged run keeps exactly the records made before it diverged.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    params = [p.detach().clone().requires_grad_(True) for p in params0]
    ref = reference_inputs(adapter, objective, params_ref if params_ref is not None else params0)
    needs_theta = frozenset(objective.needs - set(ref))
    record = set(int(s) for s in record_at)
    opt = optimizer(params) if optimizer is not None else None
    select = getattr(adapter, "select", None)  # optional minibatch hook (see Adapter)
    vjp = getattr(adapter, "vjp", None)        # optional closed-form chain rule (see Adapter)
    rows: dict[str, list] = {}

    def _theta_inputs() -> dict[str, Tensor]:
        if vjp is None:
            return adapter.inputs(params, needs_theta)
        with torch.no_grad():
            got = adapter.inputs(params, needs_theta)
        return {k: v.detach().requires_grad_(k in THETA_INPUTS) for k, v in got.items()}

    def _terms(step: int):
        ref_now = select(step, ref) if select is not None else ref
        inputs: Mapping[str, Tensor] = {**_theta_inputs(), **ref_now}
        return objective(inputs), inputs

    def _grads(total: Tensor, inputs: Mapping[str, Tensor]) -> Sequence[Tensor]:
        if vjp is None:
            return torch.autograd.grad(total, params)
        keys = [k for k in inputs if k in THETA_INPUTS and inputs[k].requires_grad]
        cot = torch.autograd.grad(total, [inputs[k] for k in keys], allow_unused=True)
        used = [(k, g) for k, g in zip(keys, cot) if g is not None]   # e.g. KTO reads idk_logp without gradient
        return vjp(params, {k: inputs[k].detach() for k, _ in used}, dict(used))

    def _record(step: int, terms, inputs) -> None:
        with torch.no_grad():
            vals = {k: v.detach() for k, v in adapter.metrics(params).items()}
            vals["loss"], vals["forget_loss"], vals["retain_loss"] = (t.detach() for t in terms)
            if "logp_ref" in inputs:
                vals["npo_weight"] = npo_weight(inputs["logp"].detach(), inputs["logp_ref"],
                                                objective.beta).mean(-1)
        shape = np.broadcast_shapes(*(tuple(v.shape) for v in vals.values()))  # torch's imports torch.fx
        n = int(np.prod(shape)) if len(shape) else 1
        rows.setdefault("step", []).extend([step] * n)
        rows.setdefault("replica", []).extend(range(n))
        for k, v in vals.items():
            rows.setdefault(k, []).extend(v.expand(shape).reshape(-1).double().cpu().tolist())

    for step in range(steps + 1):
        terms, inputs = _terms(step)
        if step in record:
            _record(step, terms, inputs)
        total = terms.loss.sum()
        if (step in record or step == steps) and not torch.isfinite(total):
            exc = NonFiniteLoss(f"loss became non-finite by step {step} (objective {objective.name})")
            exc.step, exc.rows = step, {k: np.asarray(v) for k, v in rows.items()}  # the records made so far
            raise exc
        if step == steps:
            break
        grads = _grads(total, inputs)
        if opt is None:
            with torch.no_grad():
                for p, g in zip(params, grads):
                    step_lr = lr.to(p).reshape(lr.shape + (1,) * (p.ndim - lr.ndim)) if isinstance(lr, Tensor) else lr
                    p.sub_(step_lr * g)
        else:
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        if progress is not None:
            progress(step + 1)
    return {k: np.asarray(v) for k, v in rows.items()}
