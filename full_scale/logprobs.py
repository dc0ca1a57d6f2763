"""Per-example sequence log-likelihoods from a causal LM batch (the adapter between models and losses).

``sequence_logprobs`` returns, per example, the **sum** of ``log π(token)`` over the answer tokens
(labels != -100) and their count. NPO, DPO and SimNPO use the summed log-likelihood (SimNPO divides
by the count itself); the per-token mean is ``sum / count``. Shift by one: the logit at position
``t`` predicts token ``t + 1``. Position ids are derived from the attention mask, so right- and
left-padded batches give the same numbers. Log-softmax is taken in fp32 even for bf16 models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import IGNORE_INDEX


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over the attended tokens of each row (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def forward_logits(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``(B, T, V)`` logits with padding-consistent position ids."""
    return forward(model, input_ids, attention_mask)[0]


def forward(model, input_ids: Tensor, attention_mask: Tensor,
            hidden_layer: int | None = None) -> tuple[Tensor, Tensor | None]:
    """``(logits (B, T, V), hidden states (B, T, d) after decoder layer ``hidden_layer`` (0-based) or None)``."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False, output_hidden_states=hidden_layer is not None)
    return out.logits, (None if hidden_layer is None else out.hidden_states[hidden_layer + 1])


def shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits[:, :-1], targets, mask)``: aligned predictions, targets and answer mask ``(B, T-1)``."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return logits[:, :-1], targets, mask


def token_logprobs_from_logits(logits: Tensor, labels: Tensor, ce_dtype: str = "float32") -> tuple[Tensor, Tensor]:
    """``(per-token answer log-probs (B, T-1), 0 off the answer; answer mask (B, T-1))``. The log-softmax is
    taken in float32 (``ce_dtype="float32"``), or in the logits' own dtype (``"model"``: tofu's bf16
    ``get_batch_loss``, a dialect's ``eval_ce_dtype``)."""
    lg, targets, mask = shifted(logits, labels)
    lg = lg.float() if ce_dtype == "float32" else lg
    tok = -F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1).clamp_min(0),
                           reduction="none").view(targets.shape)
    return tok.float() * mask, mask


def logprobs_from_logits(logits: Tensor, labels: Tensor, ce_dtype: str = "float32") -> tuple[Tensor, Tensor]:
    """``(sum of answer-token log-probs, answer token count)``, each ``(B,)``, from ``(B, T, V)`` logits."""
    tok, mask = token_logprobs_from_logits(logits, labels, ce_dtype)
    return tok.sum(-1), mask.sum(-1)


def sequence_logprobs(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example summed answer log-likelihood ``(B,)`` and answer token count ``(B,)``."""
    return logprobs_from_logits(forward_logits(model, input_ids, attention_mask), labels)


def token_logits(model, input_ids: Tensor, attention_mask: Tensor,
                 labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward for the KL terms: ``(logp_sum, count, answer_logits (B, T-1, V), answer_mask (B, T-1))``.

    ``answer_logits`` are the shifted logits whose targets are answer tokens (masked by
    ``answer_mask``), i.e. what :func:`npo_sim.losses.kl` takes as ``logits`` / ``mask``.
    """
    logits = forward_logits(model, input_ids, attention_mask)
    lp, n = logprobs_from_logits(logits, labels)
    lg, _, mask = shifted(logits, labels)
    return lp, n, lg, mask


@torch.no_grad()
def batched_sequence_logprobs(model, batches) -> tuple[Tensor, Tensor]:
    """:func:`sequence_logprobs` over an iterable of padded batches (no grad), concatenated on CPU."""
    sums, counts = [], []
    for b in batches:
        s, c = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"])
        sums.append(s.float().cpu())
        counts.append(c.cpu())
    return torch.cat(sums), torch.cat(counts)
