"""A GPT decoder for characters: pre-LayerNorm blocks, causal self-attention through
``scaled_dot_product_attention``, a GELU MLP, learned positions, optional weight tying.

Generation keeps a key/value cache per block, so each new character costs one
position's worth of compute instead of a whole window's.

``grad_checkpointing`` runs each block through ``torch.utils.checkpoint`` (non-reentrant)
when training: only the blocks' inputs are kept for the backward pass, which recomputes
the rest. The weights and their names are the same either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainlab.config import check_heads, in_range, non_negative, positive

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per block: keys and values, (B, H, T, hd) each


@dataclass
class GPTConfig:
    """Dimensions of the model; saved beside its weights as model_config.json."""

    d_model: int = field(default=384, metadata={"help": "width of every layer"})
    nhead: int = field(default=6, metadata={"help": "attention heads (must divide d_model)"})
    num_layers: int = field(default=8, metadata={"help": "transformer blocks"})
    dim_feedforward: int = field(default=0, metadata={"help": "MLP hidden size; 0 means 4 * d_model"})
    context_len: int = field(default=256, metadata={"help": "characters the model sees at once"})
    dropout: float = field(default=0.1, metadata={"help": "dropout probability"})
    tie_weights: bool = field(default=True, metadata={"help": "share the token embedding with the output head"})
    bias: bool = field(default=False, metadata={"help": "biases in linear layers and LayerNorms"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute each block's activations in the "
                                                                     "backward pass instead of keeping them: less "
                                                                     "memory for about a third more compute"})
    vocab_size: int = field(default=65, metadata={"cli": False})

    def __post_init__(self) -> None:
        for name in ("d_model", "nhead", "num_layers", "context_len", "vocab_size"):
            positive(name, getattr(self, name))
        non_negative("dim_feedforward", self.dim_feedforward)
        check_heads(self.d_model, self.nhead)
        in_range("dropout", self.dropout, 0, 1, high_open=True)

    @property
    def d_ff(self) -> int:
        return self.dim_feedforward or 4 * self.d_model


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.nhead = cfg.nhead
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # (B, T, D) each
        q, k, v = (t.view(B, T, self.nhead, D // self.nhead).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)  # (B, H, P+T, hd)
            v = torch.cat([cache[1], v], dim=2)
        P = k.shape[2] - T  # positions already cached
        if P == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # new queries see every cached position and the new ones up to themselves
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)  # (T, P+T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.resid_drop(self.proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.attn(self.ln1(x), cache)
        x = x + a
        x = x + self.mlp(self.ln2(x))
        return x, kv


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.tok.weight
        self.apply(self._init)
        # residual projections start smaller, so the residual stream's variance does
        # not grow with depth (GPT-2's scheme)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits for every position of ``idx`` (B, T); with ``cache``, ``idx`` continues
        the cached positions. Returns (logits (B, T, V), the cache including ``idx``; empty
        when gradient checkpointing is at work)."""
        B, T = idx.shape
        start = 0 if not cache else cache[0][0].shape[2]
        if start + T > self.cfg.context_len:
            raise ValueError(f"{start + T} positions exceed the context length {self.cfg.context_len}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.drop(self.tok(idx) + self.pos(pos))  # (B, T, D)
        new_cache: KVCache = []
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled() and not cache:
            # no cache is built here: keeping every block's keys and values would hold on to
            # much of the memory checkpointing saves, and training never reads them
            for block in self.blocks:
                x = checkpoint(_block_output, block, x, use_reentrant=False)
        else:
            for i, block in enumerate(self.blocks):
                x, kv = block(x, cache[i] if cache else None)
                new_cache.append(kv)
        return self.head(self.ln_f(x)), new_cache  # (B, T, V)


def _block_output(block: Block, x: torch.Tensor) -> torch.Tensor:
    return block(x)[0]
