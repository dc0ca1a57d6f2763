"""Every unlearning objective, defined once, as pure functions of per-example tensors.

No function here calls a model. A *setting* (logistic model, Markov chain, 7B LM) is whatever turns
parameters into the tensors below; the losses are pure math over them.

Conventions
-----------
* ``logp`` is a per-example log-likelihood ``log π_θ(y|x)`` (for sequences: the *summed* token
  log-probability; the adapter chooses the reduction and documents it).
* All per-example losses reduce with a mean over the **last** axis. Leading axes are independent
  replicas (e.g. a grid of configs trained in one batched tensor program): for a 1-D input the result
  is a scalar, for a ``(G, n)`` input it is ``(G,)``. Summing those and calling ``backward`` gives
  every replica its own gradient.
* Hyperparameters (``beta``, ``gamma``) may be floats or tensors broadcastable to the replica axes.
* Every forget term is written so that **minimising** it unlearns.

Known differences between published implementations, and what we chose:

* DPO is scaled by ``2/β`` (as in the official NPO code, so DPO without its winner term is NPO up to
  a constant); the NPO paper's equation uses ``1/β``. :data:`DPO_SCALE` names the choice.
* SimNPO's margin ``γ`` enters as ``γ`` (the paper's equation); the official code uses ``β·γ``.
  Irrelevant for the default ``γ = 0``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_SCALE = "2/beta"

__all__ = [
    "ga", "npo", "npo_weight", "simnpo", "dpo", "nll", "kl",
    "wga", "tnpo", "satimp", "undial", "ce_u", "rmu", "hidden_mse", "kto",
    "Objective", "LossTerms", "OBJECTIVES", "FORGET_TERMS", "RETAIN_TERMS", "get_objective",
    "methods", "paper_table1", "label", "color",
    "INPUT_KEYS", "REFERENCE_OF", "THETA_INPUTS", "CONVERGES", "NOT_APPLICABLE", "DPO_SCALE",
    "skipped", "skip_note",
]


# --------------------------------------------------------------------------------------------------
# hyperparameter helpers
# --------------------------------------------------------------------------------------------------
def _positive(name: str, value: float | Tensor) -> None:
    if isinstance(value, Tensor):
        ok = bool(torch.isfinite(value).all()) and bool((value > 0).all())
    else:
        ok = math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def _per_replica(value: float | Tensor, like: Tensor) -> float | Tensor:
    """Broadcast a per-replica hyperparameter of shape ``like.shape[:-1]`` against ``like``."""
    if isinstance(value, Tensor) and value.ndim > 0 and value.ndim == like.ndim - 1:
        return value.to(like).unsqueeze(-1)
    if isinstance(value, Tensor):
        return value.to(like)
    return value


# --------------------------------------------------------------------------------------------------
# the losses
# --------------------------------------------------------------------------------------------------
def ga(logp: Tensor) -> Tensor:
    """Gradient-ascent forget term ``mean(log π_θ(y|x))``. Minimising it drives the likelihood down."""
    return logp.mean(-1)


def nll(logp: Tensor) -> Tensor:
    """Retain term: negative log-likelihood ``−mean(log π_θ(y|x))``."""
    return -logp.mean(-1)


def npo(logp: Tensor, logp_ref: Tensor, beta: float | Tensor) -> Tensor:
    """NPO loss ``(2/β)·mean(log(1 + (π_θ/π_ref)^β))``.

    Computed as ``(2/β)·softplus(β(logp − logp_ref))``, which is finite for any finite log-ratio
    (softplus switches to the identity for large arguments). Equivalent to the official code's
    ``−(2/β)·logsigmoid(−β(logp − logp_ref))``. The per-example gradient is ``W·∇logp`` with
    ``W = npo_weight(...)`` (NPO paper, eq. 3).
    """
    _positive("beta", beta)
    b = _per_replica(beta, logp)
    return (2.0 / b * F.softplus(b * (logp - logp_ref))).mean(-1)


def npo_weight(logp: Tensor, logp_ref: Tensor, beta: float | Tensor) -> Tensor:
    """Per-example NPO gradient weight ``W = 2π_θ^β/(π_θ^β + π_ref^β) = 2σ(β(logp − logp_ref))``.

    ``W ∈ (0, 2)``, ``W = 1`` at ``θ = ref``, and ``W → 1`` as ``β → 0`` (GA's weight up to scale).
    Not reduced: one weight per example.
    """
    _positive("beta", beta)
    b = _per_replica(beta, logp)
    return 2.0 * torch.sigmoid(b * (logp - logp_ref))


def simnpo(logp: Tensor, length: Tensor, beta: float | Tensor, gamma: float | Tensor = 0.0) -> Tensor:
    """SimNPO loss ``−(2/β)·mean(log σ(−(β/|y|)·logp − γ))`` (Fan et al., 2024).

    Reference-free and length-normalised: ``length`` is ``|y|``, the number of tokens in ``y``.
    """
    _positive("beta", beta)
    if isinstance(length, Tensor) and bool((length <= 0).any()):
        raise ValueError("simnpo: every length must be > 0")
    b = _per_replica(beta, logp)
    g = _per_replica(gamma, logp)
    return (-2.0 / b * F.logsigmoid(-b / length * logp - g)).mean(-1)


def dpo(logp_win: Tensor, logp_lose: Tensor, logp_ref_win: Tensor, logp_ref_lose: Tensor,
        beta: float | Tensor) -> Tensor:
    """DPO loss ``−(2/β)·mean(log σ(β[(logp_w − logp_ref_w) − (logp_l − logp_ref_l)]))``.

    For unlearning the forget answer is the loser and an IDK answer the winner. Scaled by ``2/β``
    (see :data:`DPO_SCALE`); dropping the winner term recovers :func:`npo` up to a constant.
    """
    _positive("beta", beta)
    b = _per_replica(beta, logp_win)
    margin = (logp_win - logp_ref_win) - (logp_lose - logp_ref_lose)
    return (-2.0 / b * F.logsigmoid(b * margin)).mean(-1)


def kl(logits: Tensor, ref_logits: Tensor, mask: Tensor | None = None, batch_dims: int = 0) -> Tensor:
    """``KL(π_ref ‖ π_θ)`` per position, averaged over the unmasked positions.

    ``logits`` and ``ref_logits`` have the class/vocabulary axis last: ``(B, K)`` class logits or
    ``(B, T, V)`` token logits. ``mask`` (shape ``logits.shape[:-1]``) selects positions. The first
    ``batch_dims`` axes are kept as independent replicas (default: average over everything).
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"kl: logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ")
    logq = F.log_softmax(logits, dim=-1)
    logp_ref = F.log_softmax(ref_logits, dim=-1)
    per_pos = (logp_ref.exp() * (logp_ref - logq)).sum(-1)
    dims = tuple(range(batch_dims, per_pos.ndim))
    if mask is None:
        return per_pos.mean(dim=dims) if dims else per_pos
    m = mask.to(per_pos.dtype)
    if m.shape != per_pos.shape:
        raise ValueError(f"kl: mask shape {tuple(m.shape)} must be {tuple(per_pos.shape)}")
    return (per_pos * m).sum(dim=dims) / m.sum(dim=dims).clamp_min(1.0)


# --------------------------------------------------------------------------------------------------
# token-level and distribution-level forget terms
# --------------------------------------------------------------------------------------------------
# Token-level terms take ``token_logp`` and ``mask`` of shape ``(*replicas, n, T)`` (``mask`` marks the
# answer tokens, at least one per example): they reduce over T with the mask (a token mean per
# example), then take the mean over n. Logit-level terms take ``(*replicas, n, T, V)`` logits and
# ``(*replicas, n, T)`` labels and mask. Weights written ``sg(·)`` carry no gradient.
def _token_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(per_token.dtype)
    if m.shape != per_token.shape:   # a mask without the replica axes applies to every replica
        if m.shape != per_token.shape[per_token.ndim - m.ndim:]:
            raise ValueError(f"mask shape {tuple(m.shape)} must be {tuple(per_token.shape)} (or its trailing axes)")
        m = m.expand_as(per_token)
    n_tok = m.sum(-1)
    if bool((n_tok == 0).any()):
        raise ValueError("every example needs at least one answer token in its mask")
    return ((per_token * m).sum(-1) / n_tok).mean(-1)


def _per_replica_tokens(value: float | Tensor, like: Tensor) -> float | Tensor:
    """Broadcast a per-replica hyperparameter against ``(*replicas, n, T)``."""
    if isinstance(value, Tensor) and value.ndim > 0 and value.ndim == like.ndim - 2:
        return value.to(like).reshape(value.shape + (1, 1))
    return value.to(like) if isinstance(value, Tensor) else value


def wga(token_logp: Tensor, mask: Tensor, beta: float | Tensor) -> Tensor:
    """Weighted gradient ascent (Wang et al., 2025, "Rethinking LLM unlearning objectives"):
    ``mean_i mean_{t∈y_i} sg(p_t^β)·log p_t``. Its per-token gradient weight is ``W = p^β`` (tail a = β).

    open-unlearning's WGA pools the token mean over the micro-batch; here it is per example, then over
    examples, like every other term.
    """
    _positive("beta", beta)
    b = _per_replica_tokens(beta, token_logp)
    return _token_mean(torch.exp(b * token_logp).detach() * token_logp, mask)


def tnpo(token_logp: Tensor, ref_token_logp: Tensor, mask: Tensor, beta: float | Tensor) -> Tensor:
    """Token-level NPO (Wang et al., 2025): NPO's ``(2/β)·log(1+(p_t/p_ref,t)^β)`` per answer token,
    token mean per example, mean over examples. Per-token weight ``2σ(β(log p_t − log p_ref,t))``."""
    _positive("beta", beta)
    b = _per_replica_tokens(beta, token_logp)
    return _token_mean(2.0 / b * F.softplus(b * (token_logp - ref_token_logp)), mask)


def satimp(token_logp: Tensor, mask: Tensor, beta1: float | Tensor, beta2: float | Tensor) -> Tensor:
    """SatImp (Yang et al., 2025, "Exploring criteria of loss reweighting to enhance LLM unlearning"):
    ``mean_i mean_t sg(p_t^{β1}(1−p_t)^{β2})·log p_t``: weight ``W = p^{β1}(1−p)^{β2}`` (tail a = β1)."""
    _positive("beta1", beta1)
    if not (isinstance(beta2, Tensor) or (math.isfinite(beta2) and beta2 >= 0)):
        raise ValueError(f"beta2 must be finite and >= 0, got {beta2!r}")
    b1, b2 = _per_replica_tokens(beta1, token_logp), _per_replica_tokens(beta2, token_logp)
    p = token_logp.exp()
    weight = (p ** b1 * (1.0 - p).clamp_min(0.0) ** b2).detach()
    return _token_mean(weight * token_logp, mask)


def undial(logits: Tensor, ref_logits: Tensor, labels: Tensor, mask: Tensor, gamma: float | Tensor) -> Tensor:
    """UNDIAL (Dong et al., 2025): self-distillation towards the reference's next-token distribution with
    the true token's logit lowered by γ: ``KL(q ‖ π_θ)``, ``q = softmax(z_ref − γ·onehot(y))``, averaged
    over answer positions per example, then over examples. The target is fixed, so the drift stops."""
    onehot = F.one_hot(labels.clamp_min(0), logits.shape[-1]).to(ref_logits.dtype)
    g = gamma.to(ref_logits).reshape(gamma.shape + (1,) * (ref_logits.ndim - gamma.ndim)) \
        if isinstance(gamma, Tensor) and gamma.ndim > 0 else gamma
    logq = F.log_softmax((ref_logits - g * onehot).detach(), dim=-1)
    per_pos = (logq.exp() * (logq - F.log_softmax(logits, dim=-1))).sum(-1)
    return _token_mean(per_pos, mask)


def ce_u(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """CE-U (cross-entropy unlearning, Yang et al., 2025): cross-entropy towards the model's own
    distribution with the true token's logit set to −∞, ``q = softmax(sg(z) with z_y = −∞)``; the
    gradient on the true logit is ``p_y`` (tail a = 1)."""
    onehot = F.one_hot(labels.clamp_min(0), logits.shape[-1]).bool()
    q = F.softmax(logits.detach().masked_fill(onehot, -math.inf), dim=-1)
    per_pos = -(q * F.log_softmax(logits, dim=-1)).sum(-1)
    return _token_mean(per_pos, mask)


def rmu(hidden: Tensor, control: Tensor, mask: Tensor) -> Tensor:
    """RMU's forget term (Li et al., 2024, WMDP): steer one layer's forget activations to a scaled random
    vector, ``mean_i mean_{t} ‖h_t − c·u‖²/d`` (``control`` = c·u, shape ``(d,)``)."""
    per_pos = (hidden - control).pow(2).mean(-1)
    return _token_mean(per_pos, mask)


def hidden_mse(hidden: Tensor, ref_hidden: Tensor, mask: Tensor) -> Tensor:
    """RMU's retain term: ``mean_i mean_t ‖h_t − h_ref,t‖²/d`` on retain activations."""
    return _token_mean((hidden - ref_hidden).pow(2).mean(-1), mask)


def kto(logp: Tensor, logp_ref: Tensor, z0: Tensor, beta: float | Tensor) -> Tensor:
    """KTO's undesirable-example loss as in the NPO repository (``TOFU/dataloader.py``, ``kto_sigmoid``):
    ``1 − (2/β)·mean σ(z0 − β(logp − logp_ref))``, with the reference point ``z0`` (there: the mean
    IDK-answer log-ratio, without gradient). Gradient weight ``2σ'(z0 − βr) ~ 2e^{−z0}(π/π_ref)^β``: a = β."""
    _positive("beta", beta)
    b = _per_replica(beta, logp)
    return 1.0 - (2.0 / b * torch.sigmoid(z0.detach() - b * (logp - logp_ref))).mean(-1)


# --------------------------------------------------------------------------------------------------
# composed objectives
# --------------------------------------------------------------------------------------------------
#: Every tensor an objective may ask for. A training loop computes exactly ``objective.needs``.
#: Shapes: per-example ``(*replicas, n)``; per-token ``(*replicas, n, T)`` (one token per example, T = 1,
#: in the classification settings); logits with the class/vocabulary axis last; activations ``(…, d)``.
INPUT_KEYS = {
    "logp": "per-example forget log-likelihood under π_θ",
    "logp_ref": "per-example forget log-likelihood under π_ref (cacheable before training)",
    "length": "per-example forget answer length |y| in tokens",
    "idk_logp": "per-example log-likelihood of an IDK answer to the forget question under π_θ",
    "idk_logp_ref": "the same under π_ref",
    "retain_logp": "per-example retain log-likelihood under π_θ",
    "retain_logits": "retain logits under π_θ, class/vocab axis last",
    "retain_ref_logits": "retain logits under π_ref",
    "retain_mask": "optional mask over retain_logits positions",
    "token_logp": "per-token forget log-probs log π_θ(y_t|x, y_<t), (*replicas, n, T)",
    "ref_token_logp": "the same under π_ref (cacheable before training)",
    "token_mask": "answer-token mask of token_logp / forget_logits, (n, T), at least one token per example",
    "forget_logits": "forget logits under π_θ at the positions of token_logp, (*replicas, n, T, V)",
    "forget_ref_logits": "the same under π_ref (needs the reference model, or is cached in small settings)",
    "forget_labels": "the forget answer's token (class) ids at those positions, (n, T)",
    "hidden": "forget activations of the steered layer (RMU), (*replicas, n, T, d)",
    "hidden_mask": "mask over hidden's positions (the answer tokens)",
    "rmu_control": "RMU's fixed control vector c·u, (d,): u uniform on [0, 1)^d, normalised, c = γ",
    "retain_hidden": "retain activations of the same layer under π_θ",
    "retain_ref_hidden": "the same under π_ref",
    "retain_hidden_mask": "mask over retain_hidden's positions",
}

#: θ-dependent input -> its reference counterpart (computed once at θ_0 by the synthetic loop)
REFERENCE_OF = {"logp": "logp_ref", "idk_logp": "idk_logp_ref", "retain_logits": "retain_ref_logits",
                "token_logp": "ref_token_logp", "forget_logits": "forget_ref_logits",
                "retain_hidden": "retain_ref_hidden"}
#: the inputs that depend on θ differentiably (lengths, masks, labels and the control vector do not)
THETA_INPUTS = frozenset({"logp", "idk_logp", "retain_logp", "retain_logits", "token_logp", "forget_logits",
                          "hidden", "retain_hidden"})

#: a term's divergence law when its gradient weight has no power tail in p
CONVERGES = "converges"   #: the target is a fixed distribution: the logit shift converges
NOT_APPLICABLE = "n/a"    #: the term does not act on log p (RMU steers activations)


@dataclass(frozen=True)
class _Term:
    """One forget or retain term: its function and the facts every setting reads about it."""

    fn: Callable[[Mapping[str, Tensor], Objective], Tensor]
    needs: frozenset[str]
    description: str
    #: family of the forget term ("ga", "npo", "idk", "dpo", "weighted", "distill", "representation");
    #: claims such as "NPO-based methods ..." read it
    family: str = ""
    #: the hyperparameters the term reads (``beta``, ``beta2``, ``gamma``); the others are ignored
    hyper: tuple[str, ...] = ()
    #: how a sequence setting turns per-token log-probs into ``logp``: ``"sum"`` (the summed
    #: log-likelihood, for terms compared with a reference or normalised by length) or ``"token_mean"``
    #: (follows the setting's NLL reduction, e.g. ``npo-tofu --ga-reduction``, per-example token mean by default)
    reduction: str = "token_mean"
    #: the tail exponent ``a`` of the gradient weight, ``W(p) ~ c·p^a`` as ``p → 0`` (one token), as a
    #: function of the objective; or :data:`CONVERGES` / :data:`NOT_APPLICABLE`. The theory reads it:
    #: a = 0 diverges linearly, a > 0 logarithmically with rate 1/a (``theory.weighted_ascent_shift``)
    tail: Callable[[Objective], float] | str = NOT_APPLICABLE
    #: the per-example (per-token) gradient weight ``W(logp, logp_ref, objective)`` with
    #: ``∂L/∂log p_i = W_i/n``, for the terms that are exactly ``W·∇log p`` (None otherwise); the exact
    #: single-sample flow (``theory.weighted_flow_margin``) and the weight identity tests read it
    weight: Callable[[Tensor, Tensor, Objective], Tensor] | None = None
    #: whether the loss couples the examples beyond a mean of per-example terms (KTO's reference point is a
    #: batch mean): such a loss is not exact under zero-padding, and depends on how a batch is split
    couples_examples: bool = False
    #: for a :data:`CONVERGES` term: the |logit shift| its fixed target sets for one token of a two-class
    #: model (the minimiser of the term); the logistic lab predicts the limit with it
    limit: Callable[[Objective], float] | None = None

    @property
    def uses_beta(self) -> bool:
        """Whether the term is parametrised by β (GA and the IDK/NLL terms are not)."""
        return "beta" in self.hyper


def _kto_z0(x: Mapping[str, Tensor]) -> Tensor:
    """KTO's reference point: the mean IDK-answer log-ratio over the batch, without gradient (NPO repo)."""
    return (x["idk_logp"] - x["idk_logp_ref"]).mean(-1, keepdim=True).detach()


_TOKENS = frozenset({"token_logp", "token_mask"})

FORGET_TERMS: dict[str, _Term] = {
    "ga": _Term(lambda x, o: ga(x["logp"]), frozenset({"logp"}), "gradient ascent", family="ga",
                tail=lambda o: 0.0, weight=lambda lp, lp0, o: torch.ones_like(lp)),
    "npo": _Term(lambda x, o: npo(x["logp"], x["logp_ref"], o.beta),
                 frozenset({"logp", "logp_ref"}), "negative preference optimization",
                 family="npo", hyper=("beta",), reduction="sum", tail=lambda o: o.beta,
                 weight=lambda lp, lp0, o: npo_weight(lp, lp0, o.beta)),
    "simnpo": _Term(lambda x, o: simnpo(x["logp"], x["length"], o.beta, o.gamma),
                    frozenset({"logp", "length"}), "SimNPO (reference-free, length-normalised)",
                    family="npo", hyper=("beta", "gamma"), reduction="sum", tail=lambda o: o.beta,
                    weight=lambda lp, lp0, o: 2.0 * torch.sigmoid(o.beta * lp + o.gamma)),  # |y| = 1
    "idk": _Term(lambda x, o: nll(x["idk_logp"]), frozenset({"idk_logp"}),
                 "fit 'I don't know' answers on forget questions", family="idk"),
    "dpo": _Term(lambda x, o: dpo(x["idk_logp"], x["logp"], x["idk_logp_ref"], x["logp_ref"], o.beta),
                 frozenset({"logp", "logp_ref", "idk_logp", "idk_logp_ref"}),
                 "DPO with the IDK answer as winner and the forget answer as loser",
                 family="dpo", hyper=("beta",), reduction="sum", tail=lambda o: o.beta),
    "wga": _Term(lambda x, o: wga(x["token_logp"], x["token_mask"], o.beta), _TOKENS,
                 "weighted gradient ascent (per-token weight p^beta)", family="weighted", hyper=("beta",),
                 tail=lambda o: o.beta, weight=lambda lp, lp0, o: torch.exp(o.beta * lp)),
    "tnpo": _Term(lambda x, o: tnpo(x["token_logp"], x["ref_token_logp"], x["token_mask"], o.beta),
                  _TOKENS | {"ref_token_logp"}, "token-level NPO", family="npo", hyper=("beta",),
                  tail=lambda o: o.beta, weight=lambda lp, lp0, o: npo_weight(lp, lp0, o.beta)),
    "satimp": _Term(lambda x, o: satimp(x["token_logp"], x["token_mask"], o.beta, o.beta2), _TOKENS,
                    "SatImp (per-token weight p^beta (1-p)^beta2)", family="weighted", hyper=("beta", "beta2"),
                    tail=lambda o: o.beta,
                    weight=lambda lp, lp0, o: torch.exp(o.beta * lp) * (-torch.expm1(lp)).clamp_min(0) ** o.beta2),
    "undial": _Term(lambda x, o: undial(x["forget_logits"], x["forget_ref_logits"], x["forget_labels"],
                                        x["token_mask"], o.gamma),
                    frozenset({"forget_logits", "forget_ref_logits", "forget_labels", "token_mask"}),
                    "UNDIAL (distil the reference with the true logit lowered by gamma)", family="distill",
                    hyper=("gamma",), tail=CONVERGES, limit=lambda o: o.gamma),
    "ce_u": _Term(lambda x, o: ce_u(x["forget_logits"], x["forget_labels"], x["token_mask"]),
                  frozenset({"forget_logits", "forget_labels", "token_mask"}),
                  "CE-U (cross-entropy to the model's own distribution without the true token)",
                  family="distill", tail=lambda o: 1.0),
    "rmu": _Term(lambda x, o: rmu(x["hidden"], x["rmu_control"], x["hidden_mask"]),
                 frozenset({"hidden", "hidden_mask", "rmu_control"}),
                 "RMU (steer one layer's forget activations to gamma times a random unit vector)",
                 family="representation", hyper=("gamma",), tail=NOT_APPLICABLE),
    "kto": _Term(lambda x, o: kto(x["logp"], x["logp_ref"], _kto_z0(x), o.beta),
                 frozenset({"logp", "logp_ref", "idk_logp", "idk_logp_ref"}),
                 "KTO (NPO repository's kto_sigmoid, IDK reference point)", family="kto", hyper=("beta",),
                 reduction="sum", tail=lambda o: o.beta, couples_examples=True),
}

def _replica_dims(x: Mapping[str, Tensor]) -> int:
    """Leading replica axes, read off a per-example tensor of shape ``(*replicas, n)``."""
    for key in ("logp", "idk_logp", "retain_logp"):
        if key in x:
            return x[key].ndim - 1
    return x["token_logp"].ndim - 2 if "token_logp" in x else 0


RETAIN_TERMS: dict[str, _Term] = {
    "nll": _Term(lambda x, o: nll(x["retain_logp"]), frozenset({"retain_logp"}), "retain NLL"),
    "kl": _Term(lambda x, o: kl(x["retain_logits"], x["retain_ref_logits"], x.get("retain_mask"),
                                batch_dims=_replica_dims(x)),
                frozenset({"retain_logits", "retain_ref_logits"}), "KL(π_ref ‖ π_θ) on retain data"),
    "hidden": _Term(lambda x, o: hidden_mse(x["retain_hidden"], x["retain_ref_hidden"], x["retain_hidden_mask"]),
                    frozenset({"retain_hidden", "retain_ref_hidden", "retain_hidden_mask"}),
                    "retain activations kept at the reference's (RMU)"),
}


class LossTerms(NamedTuple):
    loss: Tensor     #: forget + retain_weight · retain (what is minimised)
    forget: Tensor   #: the forget term
    retain: Tensor   #: the (unweighted) sum of retain terms; 0 when there are none


@dataclass(frozen=True)
class Objective:
    """A forget term plus optional weighted retain terms, with its hyperparameters.

    ``objective(inputs)`` takes a mapping holding (at least) the keys in :attr:`needs` and returns
    :class:`LossTerms`. Use :func:`get_objective` (or ``dataclasses.replace``) to change
    hyperparameters; they are validated on construction.
    """

    name: str
    forget: str
    retain: tuple[str, ...] = ()
    beta: float | Tensor = 0.1   # a tensor gives one β per replica (batched grids)
    gamma: float = 0.0           # SimNPO's margin, UNDIAL's logit penalty, RMU's steering coefficient
    retain_weight: float = 1.0
    beta2: float = 1.0           # SatImp's second exponent (the (1-p)^β2 factor)
    description: str = field(default="", compare=False)
    #: display label and colour, shared by every plot and table
    label: str = field(default="", compare=False)
    color: str = field(default="#333333", compare=False)
    #: row of this method in the NPO paper's Table 1 (the §4 synthetic experiment); None if it is not there
    paper_row: int | None = field(default=None, compare=False)
    #: the standard method sets this objective belongs to (see :data:`METHOD_SETS`)
    tags: frozenset[str] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        if self.forget not in FORGET_TERMS:
            raise ValueError(f"unknown forget term {self.forget!r}; choose from {sorted(FORGET_TERMS)}")
        for r in self.retain:
            if r not in RETAIN_TERMS:
                raise ValueError(f"unknown retain term {r!r}; choose from {sorted(RETAIN_TERMS)}")
        _positive("beta", self.beta)
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"gamma must be finite and >= 0, got {self.gamma!r}")
        if not (math.isfinite(self.retain_weight) and self.retain_weight >= 0):
            raise ValueError(f"retain_weight must be finite and >= 0, got {self.retain_weight!r}")
        if not (math.isfinite(self.beta2) and self.beta2 >= 0):
            raise ValueError(f"beta2 must be finite and >= 0, got {self.beta2!r}")

    @property
    def needs(self) -> frozenset[str]:
        """The input tensors this objective reads (see :data:`INPUT_KEYS`)."""
        out = set(FORGET_TERMS[self.forget].needs)
        for r in self.retain:
            out |= RETAIN_TERMS[r].needs
        return frozenset(out)

    @property
    def family(self) -> str:
        """Family of the forget term: ``"ga"``, ``"npo"`` (NPO and SimNPO), ``"idk"`` or ``"dpo"``."""
        return FORGET_TERMS[self.forget].family

    @property
    def uses_beta(self) -> bool:
        """Whether β changes this objective (GA, GA+RT, IDK+RT have none)."""
        return FORGET_TERMS[self.forget].uses_beta

    @property
    def hyper(self) -> tuple[str, ...]:
        """The hyperparameters the forget term reads (plus ``retain_weight`` when there is a retain term)."""
        return FORGET_TERMS[self.forget].hyper + (("retain_weight",) if self.retain else ())

    @property
    def tail(self) -> float | str:
        """Tail exponent ``a`` of the forget term's gradient weight (``W ~ c·p^a``, one token), or
        :data:`CONVERGES` / :data:`NOT_APPLICABLE`. Per-replica β gives a tensor."""
        t = FORGET_TERMS[self.forget].tail
        return t if isinstance(t, str) else t(self)

    @property
    def law(self) -> str:
        """The divergence law the tail predicts: ``"linear"`` (a = 0), ``"log"`` (a > 0, rate 1/a),
        ``"converges"`` or ``"n/a"``."""
        t = self.tail
        return t if isinstance(t, str) else ("linear" if float(t) == 0 else "log")

    def weight(self, logp: Tensor, logp_ref: Tensor) -> Tensor:
        """The forget term's per-example (per-token) gradient weight ``W`` (``∂L/∂log p_i = W_i/n``).

        Raises ``ValueError`` for terms that are not of the weight form (DPO, IDK, UNDIAL, CE-U, RMU, KTO
        read other inputs too)."""
        w = FORGET_TERMS[self.forget].weight
        if w is None:
            raise ValueError(f"{self.name}: its forget term is not of the form W(p)·∇log p")
        return w(logp, logp_ref, self)

    @property
    def sequence_reduction(self) -> str:
        """``"sum"`` or ``"token_mean"``: how a sequence setting reduces token log-probs into ``logp``."""
        return FORGET_TERMS[self.forget].reduction

    @property
    def couples_examples(self) -> bool:
        """Whether the forget term couples examples beyond a mean (see ``_Term.couples_examples``)."""
        return FORGET_TERMS[self.forget].couples_examples

    @property
    def retain_free(self) -> bool:
        return not self.retain

    @property
    def uses_reference(self) -> bool:
        return bool(self.needs & set(REFERENCE_OF.values()))

    @property
    def needs_ref_logits(self) -> bool:
        """True when a frozen reference *model* is needed in a sequence setting (reference logits or
        activations; per-example and per-token log-probs can be cached instead)."""
        return bool(self.needs & {"retain_ref_logits", "forget_ref_logits", "retain_ref_hidden"})

    def __call__(self, inputs: Mapping[str, Tensor]) -> LossTerms:
        missing = self.needs - set(inputs)
        if missing:
            raise KeyError(f"objective {self.name!r} needs inputs {sorted(missing)}")
        f = FORGET_TERMS[self.forget].fn(inputs, self)
        r = sum((RETAIN_TERMS[t].fn(inputs, self) for t in self.retain), torch.zeros_like(f))
        return LossTerms(f + self.retain_weight * r, f, r)


def _obj(name: str, forget: str, *retain: str, label: str, color: str, tags: str = "",
         paper_row: int | None = None, **hp) -> tuple[str, Objective]:
    desc = FORGET_TERMS[forget].description + "".join(f" + {RETAIN_TERMS[r].description}" for r in retain)
    return name, Objective(name, forget, tuple(retain), description=desc, label=label, color=color,
                           paper_row=paper_row, tags=frozenset(tags.split()), **hp)


#: The registry: every fact about a method lives in its entry. Pick objectives by name; never branch on
#: names. The order is the display order. Tags: ``synthetic`` = run by default in the §4 mixture study,
#: ``tofu-mini`` = run by default in the tofu-mini study.
OBJECTIVES: dict[str, Objective] = dict([
    _obj("ga", "ga", label="GA", color="#d62728", paper_row=1, tags="synthetic tofu-mini"),
    _obj("ga_rt", "ga", "nll", label="GA+RT", color="#ff7f0e", paper_row=2, tags="synthetic tofu-mini"),
    _obj("ga_kl", "ga", "kl", label="GA+KL", color="#e377c2", tags="synthetic tofu-mini"),
    _obj("npo", "npo", label="NPO", color="#1f77b4", paper_row=4, tags="synthetic tofu-mini"),
    _obj("npo_rt", "npo", "nll", label="NPO+RT", color="#2ca02c", paper_row=5, tags="synthetic tofu-mini"),
    _obj("npo_kl", "npo", "kl", label="NPO+KL", color="#17becf", tags="synthetic tofu-mini"),
    _obj("simnpo", "simnpo", label="SimNPO", color="#393b79", tags="synthetic tofu-mini", beta=2.5),
    _obj("simnpo_rt", "simnpo", "nll", label="SimNPO+RT", color="#637939", beta=2.5),
    _obj("idk_rt", "idk", "nll", label="IDK+RT", color="#7f7f7f", paper_row=3, tags="synthetic tofu-mini"),
    _obj("dpo", "dpo", label="DPO", color="#8c564b"),
    _obj("dpo_rt", "dpo", "nll", label="DPO+RT", color="#bcbd22", paper_row=6, tags="synthetic"),
    _obj("dpo_kl", "dpo", "kl", label="DPO+KL", color="#9467bd"),
    # the next objectives; defaults from open-unlearning's configs/trainer/{WGA,SatImp,UNDIAL,RMU}.yaml
    # (their forget weight γ and retain weight α folded into retain_weight = α/γ up to the step size)
    _obj("wga", "wga", label="WGA", color="#e6550d", beta=1.0),
    _obj("wga_rt", "wga", "nll", label="WGA+RT", color="#fd8d3c", tags="tofu-mini", beta=1.0),
    _obj("tnpo", "tnpo", label="TNPO", color="#6baed6"),
    _obj("satimp", "satimp", label="SatImp", color="#756bb1", beta=5.0, beta2=1.0),
    _obj("satimp_rt", "satimp", "nll", label="SatImp+RT", color="#9e9ac8", tags="tofu-mini", beta=5.0,
         beta2=1.0, retain_weight=10.0),
    _obj("undial", "undial", label="UNDIAL", color="#31a354", tags="tofu-mini", gamma=10.0),
    _obj("ce_u", "ce_u", label="CE-U", color="#a55194"),
    _obj("rmu", "rmu", "hidden", label="RMU", color="#843c39", tags="tofu-mini", gamma=300.0, retain_weight=1000.0),
    _obj("kto", "kto", label="KTO", color="#b5cf6b"),
])

def methods(tag: str | None = None, *, retain_free: bool | None = None, family: str | None = None,
            supplies: frozenset[str] | set[str] | None = None) -> tuple[str, ...]:
    """Registered method names in display order, optionally only those with ``tag`` / of ``family`` /
    with (``retain_free=False``) or without (``True``) a retain term / whose inputs a setting
    ``supplies`` (a set of :data:`INPUT_KEYS`)."""
    return tuple(n for n, o in OBJECTIVES.items()
                 if (tag is None or tag in o.tags) and (family is None or o.family == family)
                 and (retain_free is None or o.retain_free == retain_free)
                 and (supplies is None or o.needs <= set(supplies)))


def skipped(supplies: frozenset[str] | set[str], names=None) -> dict[str, tuple[str, ...]]:
    """``{method: the inputs it needs that the setting does not supply}`` over ``names`` (default: all)."""
    out = {}
    for n in (OBJECTIVES if names is None else names):
        missing = OBJECTIVES[n].needs - set(supplies)
        if missing:
            out[n] = tuple(sorted(missing))
    return out


def skip_note(setting: str, supplies: frozenset[str] | set[str], names=None) -> str:
    """One line: which registered methods ``setting`` cannot run, and the inputs each lacks ('' if none)."""
    gone = skipped(supplies, names)
    if not gone:
        return ""
    return f"{setting} skips " + "; ".join(f"{n} (no {', '.join(k)})" for n, k in gone.items())


def paper_table1() -> tuple[str, ...]:
    """The methods of the NPO paper's Table 1 (§4 synthetic), in the paper's row order."""
    rows = sorted((o.paper_row, n) for n, o in OBJECTIVES.items() if o.paper_row is not None)
    return tuple(n for _, n in rows)


def label(name: str) -> str:
    """Display label of a registered method (the name itself for anything else)."""
    return OBJECTIVES[name].label if name in OBJECTIVES else name


def color(name: str) -> str:
    """Plot colour of a registered method (dark grey for anything else)."""
    return OBJECTIVES[name].color if name in OBJECTIVES else "#333333"


def get_objective(name: str, **hyperparameters) -> Objective:
    """The registered objective ``name``, with any of ``beta``, ``gamma``, ``retain_weight`` replaced.

    ``None`` values keep the registered default. Raises ``ValueError`` for unknown names or invalid
    hyperparameters, listing the valid choices.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(OBJECTIVES))}")
    allowed = {"beta", "gamma", "retain_weight", "beta2"}
    bad = set(hyperparameters) - allowed
    if bad:
        raise ValueError(f"unknown hyperparameters {sorted(bad)}; allowed: {sorted(allowed)}")
    hp = {k: (v if isinstance(v, Tensor) else float(v)) for k, v in hyperparameters.items() if v is not None}
    return dataclasses.replace(OBJECTIVES[name], **hp)
