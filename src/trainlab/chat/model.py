"""A GPT decoder for characters: pre-norm blocks, causal self-attention through
``scaled_dot_product_attention``, an MLP, optional weight tying.

Two blocks, by model options. The classic one (the defaults) is GPT-2's: learned
positions, LayerNorm, an exact-GELU MLP. The modern pieces, each its own option:
``positions rotary`` (RoPE: each head's queries and keys rotated by their position, pairs
(i, i + hd/2) as Llama writes it), ``norm rmsnorm``, ``qk_norm`` (RMSNorm on each head's
queries and keys before the rotation, as Qwen3), ``mlp relu2`` or ``swiglu``,
``zero_init`` (output projections start at zero), ``logit_softcap`` (c * tanh(logits / c)),
``tie_weights false`` for an untied head, and ``pair_embedding`` (below). Rotary, RMSNorm,
SwiGLU and no biases are Llama's block, and with QK-norm Qwen3's, so ``chat/export.py``
hands such a model to transformers with the same logits.

``pair_embedding`` adds to each position's input a learned vector for the pair (previous
character, this character), read from a table of vocab * (vocab + 1) rows (hashed into
``PAIR_ROWS_MAX`` past that): the first position of a window has no previous character
(the extra "none" row), as in training, where windows start anywhere. The model sees
character bigrams from its first layer instead of assembling them through attention,
which a small model trained for a minute learns much from (docs/chat.md, "Recipes for a time
budget"). A pass that continues a cache needs the character before its first one
(``before``). The table starts at zero, so the model starts as it would without it.

Generation keeps a key/value cache per block, so each new character costs one
position's worth of compute instead of a whole window's.

``grad_checkpointing`` runs each block through ``torch.utils.checkpoint`` (non-reentrant)
when training: only the blocks' inputs are kept for the backward pass, which recomputes
the rest. The weights and their names are the same either way.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainlab.chat.config import GPTConfig
from trainlab.engine.dropout import Dropout
from trainlab.engine.dropout import dropout as drop

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per block: keys and values, (B, H, T, hd) each
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, v) -> (B, H, T, hd)
RMS_EPS = 1e-6  # RMSNorm's epsilon (Llama's and Qwen3's default, which the export writes)
PAIR_ROWS_MAX = 2**16  # past this the pair table is hashed: a 3,000-character vocabulary would need 9M rows

# Under bf16 autocast an RMSNorm gets bf16 input and its fp32 weight, and torch warns once that
# it cannot take its fused kernel. The path it takes was no slower here (fused and unfused
# forward and backward of (4096, 192) timed side by side), so the warning says nothing a user
# can act on, and it printed in the middle of every bf16 run's start.
warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight", category=UserWarning)


def pair_rows(cfg: GPTConfig) -> int:
    """Rows of the pair embedding: one per (previous or none, current) pair, at most ``PAIR_ROWS_MAX``."""
    return min(cfg.vocab_size * (cfg.vocab_size + 1), PAIR_ROWS_MAX)


def pair_ids(cfg: GPTConfig, idx: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
    """The pair-table row of every position of ``idx`` (B, T): its character and the one before,
    ``before`` (B,) for the first position (``vocab_size``, or None: none, a window's start)."""
    V = cfg.vocab_size
    first = torch.full_like(idx[:, :1], V) if before is None else before.reshape(-1, 1).to(idx.dtype)  # (B, 1)
    prev = torch.cat([first, idx[:, :-1]], dim=1)  # (B, T), V where there is none
    return (prev * V + idx) % pair_rows(cfg)  # (B, T)


def make_norm(cfg: GPTConfig, width: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=RMS_EPS)
    return nn.LayerNorm(width, bias=cfg.bias)


def rotary_tables(cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, (context, hd): frequency base ** (-2i / hd) for
    the pair (i, i + hd/2), each repeated for both halves."""
    hd = cfg.head_dim
    # in float32 and in this order, as transformers' Llama and Qwen3 compute them, so that an
    # exported model rotates by the very same numbers
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))  # (hd/2,)
    angles = torch.arange(cfg.context_len, dtype=torch.float)[:, None] * inv  # (ctx, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (ctx, hd)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` (B, H, T, hd) rotated by its positions' ``cos``/``sin`` (B or 1, 1, T, hd)."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, H, T, hd)
    return x * cos.to(x.dtype) + turned * sin.to(x.dtype)


def written_out_is_faster(q: torch.Tensor, dropout: float = 0.0) -> bool:
    """Whether a training pass should attend through ``causal_attend`` rather than
    ``scaled_dot_product_attention``: on a CPU with gradients on, in bf16 or fp16, or with
    dropout. With dropout the fused kernels do not run on a CPU anyway: PyTorch falls back to
    the written-out product with its own, dearer mask (engine/dropout.py). In bf16 the
    flash kernel's backward is far slower than plain matmuls at the chat presets' sizes: a
    forward and backward took 23.9 ms against 4.8 ms at chat-90s's (batch 64, 4 heads, context
    64, head width 48), 12.2 against 3.7 at chat-quick's, 28.9 against 26.1 at context 256 (an
    AMX Xeon, benchmarks/attention_paths.py). In fp32 (0.7-0.9x) and without gradients the
    fused kernel is the faster, so it stays there."""
    if q.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    return q.dtype in (torch.bfloat16, torch.float16) or dropout > 0


def attend_written_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                       dropout: float = 0.0) -> torch.Tensor:
    """Attention as three plain ops: (B, H, T, hd) queries over (B, H, S, hd) keys where
    ``allowed`` (broadcast to (B, H, T, S)) is true. The softmax is taken in fp32, as the fused
    kernels accumulate it, and cast back for the product with v. Training passes on a CPU use
    it where it is the faster (``written_out_is_faster``), and the server always: unlike
    ``scaled_dot_product_attention``'s CPU kernel, its result does not change with the thread
    count, and a served stream must not change with the threads it gets."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, S)
    att = torch.softmax(att.masked_fill(~allowed, float("-inf")), dim=-1, dtype=torch.float32).to(v.dtype)
    att = drop(att, dropout)  # (B, H, T, S)
    return att @ v  # (B, H, T, hd)


def causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Causal attention written out: (B, H, T, hd) queries over as many keys."""
    T = q.shape[2]
    seen = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T): a query sees itself and before
    return attend_written_out(q, k, v, seen, dropout)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.nhead = cfg.nhead
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=RMS_EPS)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=RMS_EPS)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.attention_dropout  # on the attention probabilities; the residual's is cfg.dropout
        self.resid_drop = Dropout(cfg.dropout)

    def heads(self, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor] | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of ``x`` (B, T, D), (B, H, T, hd) each, normed and rotated
        as the block says (``rot``: cos and sin of their positions, or None)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # (B, T, D) each
        q, k, v = (t.view(B, T, self.nhead, D // self.nhead).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rot is not None:
            q, k = rotate(q, *rot), rotate(k, *rot)
        return q, k, v

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                rot: tuple[torch.Tensor, torch.Tensor] | None = None, attend: Attend | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        B, T, D = x.shape
        q, k, v = self.heads(x, rot)
        if attend is not None:  # the caller's own attention (the server's, over its cache of many rows)
            y = attend(q, k, v).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
            return self.resid_drop(self.proj(y)), None
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)  # (B, H, P+T, hd)
            v = torch.cat([cache[1], v], dim=2)
        P = k.shape[2] - T  # positions already cached
        if P == 0 and written_out_is_faster(q, self.dropout if self.training else 0.0):
            y = causal_attend(q, k, v, self.dropout if self.training else 0.0)
        elif P == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        elif T == 1:  # one new query sees every position: no mask, which leaves the flash kernel usable on GPUs
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        else:  # new queries see every cached position and the new ones up to themselves
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)  # (T, P+T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.resid_drop(self.proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        if cfg.mlp == "swiglu":
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)
        elif self.kind == "relu2":
            h = F.relu(self.up(x)).square()
        else:
            h = F.gelu(self.up(x))
        return self.drop(self.down(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = make_norm(cfg, cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                rot: tuple[torch.Tensor, torch.Tensor] | None = None, attend: Attend | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The block on the residual stream ``x`` (B, T, D): attention over ``cache`` and the new
        positions (returning their keys and values), or through ``attend(q, k, v)`` when given
        (which sees the new queries, keys and values, (B, H, T, hd) each, and keeps what it needs)."""
        a, kv = self.attn(self.ln1(x), cache, rot, attend)
        x = x + a
        x = x + self.mlp(self.ln2(x))
        return x, kv


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pair_embedding:
            self.pair = nn.Embedding(pair_rows(cfg), cfg.d_model)
        if cfg.positions == "learned":
            self.pos = nn.Embedding(cfg.context_len, cfg.d_model)
        else:  # not saved: made from the config
            cos, sin = rotary_tables(cfg)
            self.register_buffer("rot_cos", cos, persistent=False)
            self.register_buffer("rot_sin", sin, persistent=False)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = make_norm(cfg, cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.tok.weight
        self.apply(self._init)
        if cfg.pair_embedding:
            nn.init.zeros_(self.pair.weight)  # no pair says anything yet
        # residual projections start smaller, so the residual stream's variance does
        # not grow with depth (GPT-2's scheme), or at zero (--zero-init)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                if cfg.zero_init:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def embed(self, idx: torch.Tensor, positions: torch.Tensor, before: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, tuple | None]:
        """Tokens ``idx`` (B, T) at ``positions`` (B or 1, T), after the tokens ``before`` (B,;
        ``vocab_size`` or None: none): the residual stream's start (B, T, D), and the rotation
        of each position (cos, sin (B or 1, 1, T, hd)) or None."""
        x = self.tok(idx)  # (B, T, D)
        if self.cfg.pair_embedding:
            x = x + self.pair(pair_ids(self.cfg, idx, before))  # (B, T, D)
        if self.cfg.positions == "learned":
            return x + self.pos(positions), None
        return x, (self.rot_cos[positions][:, None], self.rot_sin[positions][:, None])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm and head on the residual stream (B, T, D) -> (B, T, V)."""
        out = self.head(self.ln_f(x))
        c = self.cfg.logit_softcap
        return c * torch.tanh(out / c) if c else out

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, before: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, KVCache]:
        """Logits for every position of ``idx`` (B, T); with ``cache``, ``idx`` continues
        the cached positions, and ``before`` (B,) is the token before ``idx`` (a pair-embedding
        model needs it there). Returns (logits (B, T, V), the cache including ``idx``; empty
        when gradient checkpointing is at work)."""
        B, T = idx.shape
        start = 0 if not cache else cache[0][0].shape[2]
        if start + T > self.cfg.context_len:
            raise ValueError(f"{start + T} positions exceed the context length {self.cfg.context_len}")
        if start and before is None and self.cfg.pair_embedding:
            raise ValueError("a pair-embedding model continuing a cache needs the token before idx (before=)")
        pos = torch.arange(start, start + T, device=idx.device)[None]  # (1, T)
        x, rot = self.embed(idx, pos, before if start else None)
        x = self.drop(x)  # (B, T, D)
        new_cache: KVCache = []
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled() and not cache:
            # no cache is built here: keeping every block's keys and values would hold on to
            # much of the memory checkpointing saves, and training never reads them
            for block in self.blocks:
                x = checkpoint(_block_output, block, x, rot, use_reentrant=False)
        else:
            for i, block in enumerate(self.blocks):
                x, kv = block(x, cache[i] if cache else None, rot)
                new_cache.append(kv)
        return self.logits(x), new_cache  # (B, T, V)


def _block_output(block: Block, x: torch.Tensor, rot) -> torch.Tensor:
    return block(x, None, rot)[0]
