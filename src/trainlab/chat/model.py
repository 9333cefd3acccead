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

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainlab.chat.config import GPTConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per block: keys and values, (B, H, T, hd) each


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


# -- decoding many sequences at once (trainlab chat serve) -------------------------------------
class SlotCache:
    """Keys and values of up to ``slots`` sequences, one row each, for decoding them together.
    Row r holds its sequence's positions 0..lengths[r]-1; what lies past that is stale."""

    def __init__(self, cfg: GPTConfig, slots: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        slots = -(-slots // 8) * 8  # whole eights of rows: matmuls of such row counts do not depend on threads
        shape = (cfg.num_layers, slots, cfg.nhead, cfg.context_len, cfg.d_model // cfg.nhead)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, S, H, ctx, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * slots

    @property
    def slots(self) -> int:
        return len(self.lengths)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention written out: (B, H, T, hd) queries over (B, H, S, hd) keys where ``mask`` allows.
    Not ``scaled_dot_product_attention``: its CPU kernel's result changes in the last bit with
    the thread count, and a served stream must not change with the threads it gets."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, S)
    return torch.softmax(att.masked_fill(~mask, float("-inf")), dim=-1) @ v  # (B, H, T, hd)


def _serve_forward(model: GPT, x: torch.Tensor, store, mask: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T, D), embedded, through every block, as ``GPT.forward`` does; ``store(i, k, v)``
    keeps block i's new keys and values (B, H, T, hd) and returns all that its queries attend
    to. Returns the logits (B, T, V)."""
    B, T, D = x.shape
    H = model.cfg.nhead
    for i, block in enumerate(model.blocks):
        q, k, v = block.attn.qkv(block.ln1(x)).split(D, dim=2)  # (B, T, D) each
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        keys, values = store(i, k, v)
        y = _attend(q, keys, values, mask).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        x = x + block.attn.proj(y)
        x = x + block.mlp(block.ln2(x))
    return model.head(model.ln_f(x))


PREFILL_CHUNK = 32  # prompt positions per pass (see prefill_row)


@torch.no_grad()
def prefill_row(model: GPT, tokens: list[int], cache: SlotCache, row: int) -> torch.Tensor:
    """Run ``tokens`` (at most the context) through ``model`` and keep their keys and values in
    ``row``; returns the logits after the last token (V,).

    The prompt goes in ``PREFILL_CHUNK`` positions at a time, the last chunk padded: CPU
    matmuls of some row counts (11, say) round differently with 1 and 2 threads, those of a
    multiple of 8 rows did not in any shape tried, and a stream's text must not depend on
    the thread count it was given."""
    device = next(model.parameters()).device
    T, ctx, C = len(tokens), model.cfg.context_len, PREFILL_CHUNK
    keys = torch.arange(ctx, device=device)
    logits = None
    for start in range(0, T, C):
        real = min(C, T - start)
        chunk = tokens[start:start + real] + [0] * (C - real)  # the padding is computed and never used
        pos = torch.arange(start, start + C, device=device).clamp(max=ctx - 1)  # (C,)
        x = model.tok(torch.tensor([chunk], device=device)) + model.pos(pos)  # (1, C, D)

        def store(i, k, v, start=start, real=real):
            cache.k[i, row, :, start:start + real] = k[0, :, :real]
            cache.v[i, row, :, start:start + real] = v[0, :, :real]
            return cache.k[i, row:row + 1], cache.v[i, row:row + 1]  # (1, H, ctx, hd)

        seen = keys[None, :] <= torch.arange(start, start + C, device=device)[:, None]  # (C, ctx): causal
        logits = _serve_forward(model, x, store, seen)[0, real - 1]
    cache.lengths[row] = T
    return logits


@torch.no_grad()
def decode_rows(model: GPT, tokens: torch.Tensor, cache: SlotCache, decoding: list[bool] | None = None) -> torch.Tensor:
    """One new token for the rows of ``cache`` that are ``decoding`` (default: all), each at
    position ``lengths[r]``, which must be below the context; ``tokens`` (S,); returns the next
    logits (S, V).

    Every row is computed, decoding or not: the shapes never change, so a row's numbers do not
    depend on what the other rows hold or how many are in use, nor (``_attend``) on the
    thread count: a stream alone and among others gets the same text from the same seed.
    A row that is not decoding is left as it was: its cache is not written, and its position
    (which may have reached the context: a prompt just prefilled to the full window) is not
    embedded, so its logits are computed from position 0 and are meaningless.
    Lengths are not advanced here: the caller advances the rows it uses."""
    S, ctx = cache.slots, model.cfg.context_len
    device = tokens.device
    decoding = [True] * S if decoding is None else list(decoding) + [False] * (S - len(decoding))
    for r in range(S):
        if decoding[r] and not 0 <= cache.lengths[r] < ctx:
            raise ValueError(f"row {r} is at position {cache.lengths[r]}, outside the context of {ctx}")
    pos = torch.tensor([n if d else 0 for n, d in zip(cache.lengths, decoding)], device=device)  # (S,)
    rows = torch.tensor([r for r in range(S) if decoding[r]], device=device, dtype=torch.long)  # (R,)
    x = model.tok(tokens[:, None]) + model.pos(pos)[:, None]  # (S, 1, D)

    def store(i, k, v):
        cache.k[i, rows, :, pos[rows]] = k[rows, :, 0]  # each decoding row's new key at its own position
        cache.v[i, rows, :, pos[rows]] = v[rows, :, 0]
        return cache.k[i], cache.v[i]  # (S, H, ctx, hd)

    seen = (torch.arange(ctx, device=device)[None, :] <= pos[:, None])[:, None, None, :]  # (S, 1, 1, ctx)
    return _serve_forward(model, x, store, seen)[:, 0]  # (S, V)
