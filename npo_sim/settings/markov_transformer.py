"""Model B of the Markov setting: a tiny decoder-only transformer in plain torch.

Tokens are the ``K`` chain states plus one BOS token (id ``K``). For a sequence ``x_0..x_{L-1}`` the
input is ``[BOS, x_0, .., x_{L-2}]`` and position ``t`` predicts ``x_t`` over the ``K`` states, so
``L`` next-state distributions are scored per sequence, exactly as for the tabular model (initial
distribution + ``L-1`` transitions). Sequences are right-padded; causal attention means padding never
affects a valid position, and padded positions are masked out of every sum.

The unlearning loop (:func:`npo_sim.unlearn.run`) works on a flat list of tensors, so the module is
evaluated functionally (``torch.func.functional_call``) with those tensors as its parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..runio import UserError


@dataclass(frozen=True)
class TransformerConfig:
    """Size and pretraining recipe of the tiny transformer (validated; errors in the config's own words)."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    pretrain_epochs: int = 5
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 128
    weight_decay: float = 0.01
    #: "pre": LayerNorm before each sub-layer (GPT-2); "post": after each residual sum (the original
    #: transformer, and the SimNPO authors' synthetic model)
    norm: str = "pre"

    def __post_init__(self) -> None:
        if self.norm not in ("pre", "post"):
            raise UserError(f"transformer: norm must be 'pre' or 'post', got {self.norm!r}")
        if self.d_model < 1 or self.n_layers < 1 or self.n_heads < 1 or self.d_model % self.n_heads:
            raise UserError(f"transformer: need d_model divisible by n_heads >= 1 and n_layers >= 1, "
                            f"got d_model {self.d_model}, n_heads {self.n_heads}, n_layers {self.n_layers}")
        if self.pretrain_epochs < 1 or self.pretrain_batch < 1 or not self.pretrain_lr > 0:
            raise UserError("transformer: pretrain_epochs, pretrain_batch and pretrain_lr must be positive")
        if not self.weight_decay >= 0:
            raise UserError(f"transformer: weight_decay must be >= 0, got {self.weight_decay}")


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, norm: str = "pre") -> None:
        super().__init__()
        self.heads, self.post = heads, norm == "post"
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def _attend(self, x: Tensor) -> Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(B, L, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(a.transpose(1, 2).reshape(B, L, d))

    def forward(self, h: Tensor) -> Tensor:
        if self.post:
            h = self.ln1(h + self._attend(h))
            return self.ln2(h + self.mlp(h))
        h = h + self._attend(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class TinyTransformer(nn.Module):
    """Decoder: token + learned position embeddings, ``n_layers`` pre- (or post-) LayerNorm blocks, a final
    LayerNorm and a state head."""

    def __init__(self, n_states: int, max_len: int, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_states = n_states
        self.tok = nn.Embedding(n_states + 1, cfg.d_model)  # id n_states is BOS
        self.pos = nn.Embedding(max_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg.d_model, cfg.n_heads, cfg.norm) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, n_states)

    def forward(self, seqs: Tensor) -> Tensor:
        """``(B, L)`` states -> ``(B, L, K)`` logits; position ``t`` predicts ``seqs[:, t]``."""
        B, L = seqs.shape
        bos = torch.full((B, 1), self.n_states, dtype=seqs.dtype, device=seqs.device)
        inp = torch.cat([bos, seqs[:, :-1]], dim=1)
        h = self.tok(inp) + self.pos(torch.arange(L, device=seqs.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


class TransformerModel:
    """The transformer as a Markov-setting model: functions of a parameter list (see ``markov_chains.TabularModel``)."""

    kind = "transformer"

    def __init__(self, n_states: int, max_len: int, cfg: TransformerConfig, seed: int) -> None:
        torch.manual_seed(seed)
        self.cfg = cfg
        self.n_states = n_states
        self.net = TinyTransformer(n_states, max_len, cfg)
        self.names = [n for n, _ in self.net.named_parameters()]

    def logits(self, params: Sequence[Tensor], seqs: Tensor) -> Tensor:
        return functional_call(self.net, dict(zip(self.names, params)), (seqs,))

    def next_logprobs(self, params: Sequence[Tensor], data, chunk: int = 2048) -> Tensor:
        """``(n, L, K)`` next-state log-probabilities for every prefix of every sequence in ``data``."""
        parts = [F.log_softmax(self.logits(params, data.seqs[i:i + chunk]), -1) for i in range(0, len(data), chunk)]
        return torch.cat(parts)

    def contexts(self, data) -> tuple[Tensor, Tensor, Tensor]:
        """Every prefix is its own context: (chain-row index, validity weight, one-hot next state), flattened."""
        K = self.n_states
        return (data.rows.reshape(-1), data.mask.reshape(-1).double(),
                F.one_hot(data.seqs, K).double().mul(data.mask.unsqueeze(-1)).reshape(-1, K))

    def context_logprobs(self, params: Sequence[Tensor], data) -> Tensor:
        return self.next_logprobs(params, data).reshape(-1, self.n_states)

    def seq_logp(self, params: Sequence[Tensor], data) -> Tensor:
        """Per-sequence summed token log-probability (padding excluded)."""
        lp = F.log_softmax(self.logits(params, data.seqs), -1).gather(-1, data.seqs.unsqueeze(-1)).squeeze(-1)
        return (lp * data.mask).sum(-1)

    retain_logp = seq_logp

    def retain_logits(self, params: Sequence[Tensor], data) -> tuple[Tensor, Tensor]:
        return self.logits(params, data.seqs), data.mask.float()

    def pretrain(self, data, seed: int) -> tuple[list[Tensor], float]:
        """Token-averaged cross-entropy, AdamW, ``pretrain_epochs`` epochs from a fresh init.

        Returns the trained parameters (detached copies) and the last epoch's mean token loss.
        """
        torch.manual_seed(seed)
        net = TinyTransformer(self.n_states, self.net.pos.num_embeddings, self.cfg)
        opt = torch.optim.AdamW(net.parameters(), lr=self.cfg.pretrain_lr, weight_decay=self.cfg.weight_decay)
        gen = torch.Generator().manual_seed(seed)
        n, bs = len(data), self.cfg.pretrain_batch
        last = float("nan")
        for _ in range(self.cfg.pretrain_epochs):
            perm = torch.randperm(n, generator=gen)
            tot, cnt = 0.0, 0.0
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                seqs, mask = data.seqs[idx], data.mask[idx].float()
                tok = F.cross_entropy(net(seqs).transpose(1, 2), seqs, reduction="none")
                loss = (tok * mask).sum() / mask.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot, cnt = tot + loss.item() * mask.sum().item(), cnt + mask.sum().item()
            last = tot / cnt
        return [p.detach().clone() for p in net.parameters()], last
