"""The one greedy decoder (batched, left-padded, with a KV cache), and the degeneracy check.

Used by the evaluation (ROUGE answers) and by the collapse detector of unlearning runs. Prompts are
encoded exactly as in training (:func:`full_scale.data.encode_prompt`), sorted by length and
left-padded per batch; position ids follow the attention mask, so a padded row decodes the same
tokens as the row alone. The first forward reads the whole prompt and keeps its keys and values;
every later step feeds one token per row. A row stops at EOS (not included) and leaves the batch:
its row is dropped from the inputs and from the KV cache, so later steps compute only unfinished
rows, and decode the same tokens (tests compare with one-at-a-time decoding). This is what
``model.generate(do_sample=False)`` does, token for token, without its configuration surface.
"""

from __future__ import annotations

import inspect

import torch

from .data import encode_prompt
from .logprobs import position_ids_from_mask


def _device(model):
    return next(model.parameters()).device


def _cache_names(model) -> tuple[str, dict]:
    """The name of the KV-cache argument and output (``cache``; ``past_key_values`` in earlier
    transformers 5.x releases), and ``logits_to_keep=1`` when the model takes it (the prompt's other
    logits are never read)."""
    params = inspect.signature(getattr(model, "module", model).forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    return name, ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


@torch.no_grad()
def _decode_batch(model, prompts: list[list[int]], eos_id: int, pad_id: int, max_new_tokens: int) -> list[list[int]]:
    dev = _device(model)
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=dev)
    pos = position_ids_from_mask(mask)
    cache_name, keep = _cache_names(model)
    new: list[list[int]] = [[] for _ in prompts]
    alive = list(range(len(prompts)))  # batch row -> prompt; finished rows leave the batch (and the cache)
    cache = None
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_name: cache}, **keep)
        cache = out[cache_name]
        nxt = out.logits[:, -1].argmax(-1)
        tokens = nxt.tolist()
        going = [r for r, t in enumerate(tokens) if t != eos_id]
        for r in going:
            new[alive[r]].append(tokens[r])
        if not going:
            break
        if len(going) < len(alive):
            sel = torch.tensor(going, device=dev)
            cache.batch_select_indices(sel)
            nxt, mask, pos = nxt[sel], mask[sel], pos[sel]
            alive = [alive[r] for r in going]
        ids = nxt[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
    return new


def generation_budget(prompt_lengths: list[int], max_new_tokens: int, total_length: int | None) -> int:
    """New tokens one batch may generate: ``max_new_tokens``, or with a total budget (tofu's
    ``generate(max_length=200)``), ``total_length`` minus the batch's longest prompt (at least 0)."""
    if total_length is None:
        return max_new_tokens
    return max(0, total_length - max(prompt_lengths))


def greedy_ids(model, tokenizer, fmt, questions: list[str], *, batch_size: int = 16,
               max_new_tokens: int = 128, total_length: int | None = None) -> list[list[int]]:
    """Greedy answer token ids (EOS excluded) to each question, in the order given.

    Batches are length-sorted (the answers do not depend on the batch), except with ``total_length``
    (a total budget, tofu's convention): then an answer's budget depends on its batch's longest prompt,
    so batches are taken in the order given, as tofu's data loader does."""
    prompts = [encode_prompt(tokenizer, q, fmt) for q in questions]
    order = list(range(len(prompts))) if total_length is not None else \
        sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            budget = generation_budget([len(prompts[i]) for i in idx], max_new_tokens, total_length)
            if budget == 0:
                continue
            rows = _decode_batch(model, [prompts[i] for i in idx], tokenizer.eos_token_id, tokenizer.pad_token_id,
                                 budget)
            for i, row in zip(idx, rows):
                out[i] = row
    finally:
        model.train(was_training)
    return out


def greedy_generate(model, tokenizer, fmt, questions: list[str], batch_size: int = 16,
                    max_new_tokens: int = 128, total_length: int | None = None) -> list[str]:
    """Greedy answers as text, decoded without special tokens (TOFU's ``batch_decode``)."""
    ids = greedy_ids(model, tokenizer, fmt, questions, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     total_length=total_length)
    return [tokenizer.decode(a, skip_special_tokens=True) for a in ids]


def is_degenerate(ids: list[int], min_len: int = 1) -> bool:
    """Empty output, a 3-gram occurring 3+ times, or one token making up over half of 8+ tokens."""
    if len(ids) < min_len:
        return True
    grams: dict[tuple, int] = {}
    for i in range(len(ids) - 2):
        g = tuple(ids[i:i + 3])
        grams[g] = grams.get(g, 0) + 1
        if grams[g] >= 3:
            return True
    if len(ids) >= 8:
        top = max(ids.count(t) for t in set(ids))
        if top > len(ids) / 2:
            return True
    return False
