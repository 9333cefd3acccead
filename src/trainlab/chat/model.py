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
which a small model trained for a minute learns much from (README, "Recipes for a time
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
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainlab.chat.config import GPTConfig
from trainlab.engine.dropout import Dropout
from trainlab.engine.dropout import dropout as drop

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per block: keys and values, (B, H, T, hd) each
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


def causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Causal attention written out: (B, H, T, hd) queries over as many keys. The softmax is
    taken in fp32, as the fused kernels accumulate it, and cast back for the product with v."""
    T = q.shape[2]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)  # (T, T)
    att = torch.softmax(att.masked_fill(future, float("-inf")), dim=-1, dtype=torch.float32).to(v.dtype)
    att = drop(att, dropout)  # (B, H, T, T)
    return att @ v  # (B, H, T, hd)


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
        self.dropout = cfg.dropout
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
                rot: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, D = x.shape
        q, k, v = self.heads(x, rot)
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
                rot: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.attn(self.ln1(x), cache, rot)
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


# -- decoding many sequences at once (trainlab chat serve) -------------------------------------
# A trimmed pass computes 4, 8, 16, ... rows and attends over 64, 128, 256, ... positions:
# powers of two, since those shapes gave each row the same bits as the whole cache here
# (a span of 192 did not, for a 32-position prefill chunk)
MIN_ROWS = 4
MIN_SPAN = 64


def _power_of_two_at_least(n: int, least: int) -> int:
    p = least
    while p < n:
        p *= 2
    return p


class SlotCache:
    """Keys and values of up to ``slots`` sequences, one row each, for decoding them together.
    Row r holds its sequence's positions 0..lengths[r]-1; what lies past that is stale.

    ``trimmed``: whether a pass may compute fewer rows than the cache has (the rows up to the
    last one in use: 4, 8, 16, ...) and attend over fewer positions than the context (up to
    the furthest one in use: 64, 128, 256, ...). A row's numbers are the same either way only where
    the CPU's kernels give a row the same bits for every such shape, which ``trims_exactly``
    checks on this machine before a server turns it on."""

    def __init__(self, cfg: GPTConfig, slots: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, trimmed: bool = False) -> None:
        slots = -(-slots // 8) * 8  # whole eights of rows: matmuls of such row counts do not depend on threads
        shape = (cfg.num_layers, slots, cfg.nhead, cfg.context_len, cfg.d_model // cfg.nhead)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, S, H, ctx, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # each row's tokens at their positions: a pair-embedding model's next pass reads the one before
        self.tokens = torch.zeros(slots, cfg.context_len, device=device, dtype=torch.long)  # (S, ctx)
        self.lengths = [0] * slots
        self.trimmed = trimmed

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def shape_for(self, rows_used: int, positions: int) -> tuple[int, int]:
        """(rows, key positions) a pass computes when rows 0..rows_used-1 may be in use and the
        furthest position read is positions-1: the whole cache, or trimmed to quanta."""
        ctx = self.k.shape[3]
        if not self.trimmed:
            return self.slots, ctx
        return (min(self.slots, _power_of_two_at_least(rows_used, MIN_ROWS)),
                min(ctx, _power_of_two_at_least(positions, MIN_SPAN)))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention written out: (B, H, T, hd) queries over (B, H, S, hd) keys where ``mask`` allows.
    Not ``scaled_dot_product_attention``: its CPU kernel's result changes in the last bit with
    the thread count, and a served stream must not change with the threads it gets."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, S)
    return torch.softmax(att.masked_fill(~mask, float("-inf")), dim=-1) @ v  # (B, H, T, hd)


def _serve_forward(model: GPT, tokens: torch.Tensor, positions: torch.Tensor, store, mask: torch.Tensor,
                   before: torch.Tensor | None) -> torch.Tensor:
    """``tokens`` (B, T) at ``positions`` (B, T), after ``before`` (B,; see ``GPT.embed``), through
    every block, as ``GPT.forward`` does; ``store(i, k, v)`` keeps block i's new keys and values
    (B, H, T, hd) and returns all that its queries attend to. Returns the logits (B, T, V)."""
    x, rot = model.embed(tokens, positions, before)  # (B, T, D)
    B, T, D = x.shape
    for i, block in enumerate(model.blocks):
        q, k, v = block.attn.heads(block.ln1(x), rot)  # (B, H, T, hd) each
        keys, values = store(i, k, v)
        y = _attend(q, keys, values, mask).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        x = x + block.attn.proj(y)
        x = x + block.mlp(block.ln2(x))
    return model.logits(x)


PREFILL_CHUNK = 256  # most prompt positions in one pass (see prefill_row)


def prefill_chunks(T: int) -> list[tuple[int, int, int]]:
    """(start, real positions, padded size) of each pass of a T-position prompt: passes of
    ``PREFILL_CHUNK``, the last one padded to a power of two (at least 16)."""
    out, start = [], 0
    while start < T:
        real = min(PREFILL_CHUNK, T - start)
        out.append((start, real, min(PREFILL_CHUNK, _power_of_two_at_least(real, 16))))
        start += real
    return out


@torch.no_grad()
def prefill_row(model: GPT, tokens: list[int], cache: SlotCache, row: int) -> torch.Tensor:
    """Run ``tokens`` (at most the context) through ``model`` and keep their keys and values in
    ``row``; returns the logits after the last token (V,).

    The prompt goes in passes of at most ``PREFILL_CHUNK`` positions, the last one padded to a
    power of two (``prefill_chunks``): CPU matmuls of some row counts (11, say) round
    differently with 1 and 2 threads, those of a multiple of 8 rows did not in any shape
    tried, and a stream's text must not depend on the thread count it was given; one pass
    of a whole 200-character prompt costs 40% less than seven of 32. A trimmed cache attends
    over the positions up to the chunk's end (64, 128, 256, ...), not the whole context."""
    device = next(model.parameters()).device
    T, ctx = len(tokens), model.cfg.context_len
    if not 0 < T <= ctx:
        raise ValueError(f"a prompt of {T} positions does not fit the context of {ctx}")
    logits = None
    for start, real, C in prefill_chunks(T):
        span = cache.shape_for(1, start + C)[1]
        keys = torch.arange(span, device=device)
        chunk = tokens[start:start + real] + [0] * (C - real)  # the padding is computed and never used
        pos = torch.arange(start, start + C, device=device).clamp(max=ctx - 1)  # (C,)

        def store(i, k, v, start=start, real=real, span=span):
            cache.k[i, row, :, start:start + real] = k[0, :, :real]
            cache.v[i, row, :, start:start + real] = v[0, :, :real]
            return cache.k[i, row:row + 1, :, :span], cache.v[i, row:row + 1, :, :span]  # (1, H, span, hd)

        seen = keys[None, :] <= torch.arange(start, start + C, device=device)[:, None]  # (C, span): causal
        before = torch.tensor([tokens[start - 1]], device=device) if start else None
        logits = _serve_forward(model, torch.tensor([chunk], device=device), pos[None], store, seen,
                                before)[0, real - 1]
    cache.tokens[row, :T] = torch.tensor(tokens, device=device)
    cache.lengths[row] = T
    return logits


@torch.no_grad()
def decode_rows(model: GPT, tokens: torch.Tensor, cache: SlotCache, decoding: list[bool] | None = None) -> torch.Tensor:
    """One new token for the rows of ``cache`` that are ``decoding`` (default: all), each at
    position ``lengths[r]``, which must be below the context; ``tokens`` (S,); returns the next
    logits (R, V) of the first R rows (R = S unless the cache is trimmed).

    Every row of the pass is computed, decoding or not: the shapes depend on no row's content,
    so a row's numbers do not depend on what the other rows hold or how many are in use, nor
    (``_attend``) on the thread count: a stream alone and among others gets the same text from
    the same seed. A row that is not decoding is left as it was: its cache is not written, and
    its position (which may have reached the context: a prompt just prefilled to the full
    window) is not embedded, so its logits are computed from position 0 and are meaningless.
    Lengths are not advanced here: the caller advances the rows it uses."""
    S, ctx = cache.slots, model.cfg.context_len
    device = tokens.device
    decoding = [True] * S if decoding is None else list(decoding) + [False] * (S - len(decoding))
    used = [r for r in range(S) if decoding[r]]
    for r in used:
        if not 0 <= cache.lengths[r] < ctx:
            raise ValueError(f"row {r} is at position {cache.lengths[r]}, outside the context of {ctx}")
    R, span = cache.shape_for(max(used, default=0) + 1, max((cache.lengths[r] + 1 for r in used), default=1))
    pos = torch.tensor([cache.lengths[r] if decoding[r] else 0 for r in range(R)], device=device)  # (R,)
    rows = torch.tensor(used, device=device, dtype=torch.long)  # (U,)

    def store(i, k, v):
        cache.k[i, rows, :, pos[rows]] = k[rows, :, 0]  # each decoding row's new key at its own position
        cache.v[i, rows, :, pos[rows]] = v[rows, :, 0]
        return cache.k[i, :R, :, :span], cache.v[i, :R, :, :span]  # (R, H, span, hd)

    seen = (torch.arange(span, device=device)[None, :] <= pos[:, None])[:, None, None, :]  # (R, 1, 1, span)
    # the token before each row's new one (none at position 0: a row that is not decoding)
    before = torch.where(pos > 0, cache.tokens[:R].gather(1, (pos - 1).clamp(min=0)[:, None])[:, 0],
                         model.cfg.vocab_size)  # (R,)
    cache.tokens[rows, pos[rows]] = tokens[rows]
    return _serve_forward(model, tokens[:R, None], pos[:, None], store, seen, before)[:, 0]  # (R, V)


@dataclass
class Exactness:
    """What this machine's kernels keep exact for one model (``check_exactness``)."""

    trimmed: bool  # a trimmed pass gives each row the bits of the whole-cache pass
    threads: bool  # 1 and 2 threads give the same bits


def check_exactness(model: GPT, threads: tuple[int, ...] = (1, 2)) -> Exactness:
    """Whether a trimmed pass gives every row the very bits of the whole-cache pass, at each
    thread count, and whether the thread counts agree: rows at several positions (prompts of
    several lengths, so every prefill shape and span a cache may use), decoded with the row
    counts and spans a trimmed cache may use, against the whole 8-row, full-context pass.
    Kernels pick their blocking by shape (and thread count), not by value, so shapes are
    what is checked; a server runs this at warm-up and uses only what holds."""
    cfg = model.cfg
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    previous = torch.get_num_threads()
    trimmed_ok, by_threads = True, []
    try:
        for n in threads:
            torch.set_num_threads(n)
            g = torch.Generator().manual_seed(0)
            outs_n = []
            for rows_used, furthest in ((1, 2), (3, min(cfg.context_len - 1, 70)), (5, cfg.context_len - 1)):
                lengths = [int(x) for x in torch.randint(1, furthest, (8,), generator=g)]
                lengths[rows_used - 1] = furthest - 1
                toks = torch.randint(0, cfg.vocab_size, (8,), generator=g).to(device)
                outs = []
                for trimmed in (False, True):
                    cache = SlotCache(cfg, 8, device, dtype=dtype, trimmed=trimmed)
                    for r in range(8):
                        prefill_row(model, [(r * 7 + i) % cfg.vocab_size for i in range(lengths[r])], cache, r)
                    outs.append(decode_rows(model, toks, cache, [r < rows_used for r in range(8)])[:rows_used])
                trimmed_ok = trimmed_ok and torch.equal(outs[0], outs[1])
                outs_n.append(outs[0])
            by_threads.append(outs_n)
    finally:
        torch.set_num_threads(previous)
    same_threads = all(all(torch.equal(a, b) for a, b in zip(by_threads[0], o)) for o in by_threads[1:])
    return Exactness(trimmed_ok, same_threads)
