"""Encoder-decoder transformers for multiplication: a plain one and a latent-bottleneck one.

Both share every piece: token embedding, learned positions, pre-LayerNorm encoder and
decoder blocks, the output head tied to the token embedding. They differ only in what
the decoder's cross-attention reads ("memory"):

    SimpleTransformer   memory = encoder output                     (B, S, D)
    LatentTransformer   memory = num_latent learned vectors that
                        cross-attended to the encoder output          (B, K, D)
                        [+ (1 - bottleneck_factor) * encoder output]  (B, K+S, D) if factor < 1

so any difference in what they learn comes from the bottleneck alone.

Two options, both off by default (so configs and checkpoints from before build the same
models):

- ``abacus``: a place-value embedding (McLeish et al. 2024), one table shared by both
  operands and the answer, added to the token and position embeddings. Operand digit j
  of a W-digit operand has place W-1-j; decoder position t gets the place of the answer
  digit it writes there (``answer_places``: 2W-1-t in padded natural order, t in
  reversed); ``*`` and ``<eos>`` get a place of their own ("none", index 2W). So the
  10^k digits of a, b and the answer start from one shared vector.
- ``carry_loss``: a linear head on the decoder's last states (``running_sums=True`` in
  ``forward``) that names each answer column's running sum during training (Bai et al.
  2025); the answer is still decoded by the token head alone.

``grad_checkpointing`` runs every block (encoder, latent, decoder) through
``torch.utils.checkpoint`` (non-reentrant) while training with gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainlab.engine.dropout import Dropout
from trainlab.multiply.config import BOS, EOS, PAD, Seq2SeqConfig


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``kv`` is None."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.nhead = cfg.nhead
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor | None = None, key_mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        k, v = self.keys_values(x if kv is None else kv)
        return self.attend(x, k, v, key_mask, causal)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.nhead, D // self.nhead).transpose(1, 2)  # (B, H, T, Dh)

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of ``kv`` (B, S, D), each (B, H, S, Dh): what a decoding cache keeps."""
        k, v = self.kv(kv).split(kv.shape[-1], dim=2)
        return self.heads(k), self.heads(v)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
               causal: bool = False) -> torch.Tensor:
        """``x`` (B, T, D) attending to keys and values (B, H, S, Dh)."""
        B, T, D = x.shape
        q = self.heads(self.q(x))  # (B, H, T, Dh)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S), True = attend
        if T == 1 and not (self.training and self.dropout):
            # one query (a decoding step): three plain ops run 1.6-3x faster on a CPU than the
            # fused kernel at these sizes (1,024 rows, 1-13 keys); decoding spent 40% of its time there
            att = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, 1, S)
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            y = att.softmax(-1) @ v  # (B, H, 1, Dh)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
            )  # (B, H, T, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), key_mask=key_mask))
        return x + self.mlp(self.ln2(x))


class CrossBlock(nn.Module):
    """Optional causal self-attention, then cross-attention to memory, then MLP.

    The decoder uses all three; a latent block (``self_attn=False``) lets its latent
    vectors read the encoder output without attending to each other.
    """

    def __init__(self, cfg: Seq2SeqConfig, self_attn: bool) -> None:
        super().__init__()
        self.self_attn = Attention(cfg) if self_attn else None
        self.ln1 = nn.LayerNorm(cfg.d_model) if self_attn else None
        self.ln2, self.cross = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.ln3, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None) -> torch.Tensor:
        if self.self_attn is not None:
            x = x + self.drop(self.self_attn(self.ln1(x), causal=True))
        x = x + self.drop(self.cross(self.ln2(x), kv=memory, key_mask=memory_mask))
        return x + self.mlp(self.ln3(x))

    def step(self, x: torch.Tensor, cache: dict[str, Any], memory_mask: torch.Tensor | None) -> torch.Tensor:
        """``forward`` for one new position ``x`` (B, 1, D) of a decoder block, in eval mode:
        its self-attention reads the keys and values of the positions before it from
        ``cache["self"]`` (and adds its own), its cross-attention those of the memory from
        ``cache["cross"]`` (made once, ``SimpleTransformer.decoding_cache``)."""
        h = self.ln1(x)
        k, v = self.self_attn.keys_values(h)  # (B, H, 1, Dh)
        if cache["self"] is not None:
            k, v = torch.cat([cache["self"][0], k], 2), torch.cat([cache["self"][1], v], 2)  # (B, H, t+1, Dh)
        cache["self"] = (k, v)
        x = x + self.self_attn.attend(h, k, v)  # every cached position is before this one: no mask
        x = x + self.cross.attend(self.ln2(x), *cache["cross"], memory_mask)
        return x + self.mlp(self.ln3(x))


class SimpleTransformer(nn.Module):
    """Plain encoder-decoder; the decoder cross-attends to the whole encoder output."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        self.src_pos = nn.Embedding(cfg.src_len, D)
        self.tgt_pos = nn.Embedding(cfg.tgt_len, D)
        self.drop = Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.ln_enc = nn.LayerNorm(D)
        self.decoder = nn.ModuleList(CrossBlock(cfg, self_attn=True) for _ in range(cfg.n_dec))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: digits read and written alike
        if cfg.abacus:
            W = cfg.operand_width
            self.place_emb = nn.Embedding(2 * W + 1, D)  # places 0 .. 2W-1, and 2W: none
            self.register_buffer("src_place", source_places(W), persistent=False)  # (S,)
            self.register_buffer("tgt_place", target_places(W, cfg.answer_places, cfg.tgt_len), persistent=False)
        if cfg.carry_loss > 0:
            self.sum_head = nn.Linear(D, cfg.running_sum_classes)  # training only: each column's running sum
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual branches start small (GPT-2)
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def num_parameters(self) -> int:
        """Parameters that answer a problem: the training-only running-sum head is left out, so
        --carry-loss does not make a member look bigger than the model it leaves behind."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("sum_head."))

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output and its key mask: (B, S, D), (B, S) with True = a real token."""
        B, S = src.shape
        key_mask = src != PAD  # (B, S)
        x = self.tok_emb(src) + self.src_pos(torch.arange(S, device=src.device))  # (B, S, D)
        if self.cfg.abacus:
            x = x + self.place_emb(self.src_place[:S])
        x = self.drop(x)
        for block in self.encoder:
            x = self.run_block(block, x, key_mask)
        return self.ln_enc(x), key_mask

    def memory(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the decoder cross-attends to, and its key mask."""
        return self.encode(src)

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None) -> torch.Tensor:
        """Next-token logits (B, T, V) for every decoder position."""
        return self.head(self.decode_states(tgt_in, memory, memory_mask))  # (B, T, V)

    def decode_states(self, tgt_in: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None
                      ) -> torch.Tensor:
        """The decoder's last states (B, T, D), normalised: what the heads read."""
        B, T = tgt_in.shape
        x = self.tok_emb(tgt_in) + self.tgt_pos(torch.arange(T, device=tgt_in.device))  # (B, T, D)
        if self.cfg.abacus:
            x = x + self.place_emb(self.tgt_place[:T])
        x = self.drop(x)
        for block in self.decoder:
            x = self.run_block(block, x, memory, memory_mask)
        return self.ln_f(x)  # (B, T, D)

    def decoding_cache(self, memory: torch.Tensor) -> list[dict[str, Any]]:
        """Per decoder block, the cross-attention's keys and values of ``memory`` (made once)
        and room for its self-attention's: what ``decode_next`` reads and grows."""
        return [{"cross": block.cross.keys_values(memory), "self": None} for block in self.decoder]

    def decode_next(self, tok: torch.Tensor, t: int, cache: list[dict[str, Any]],
                    memory_mask: torch.Tensor | None) -> torch.Tensor:
        """Next-token logits (B, V) after feeding ``tok`` (B,) at decoder position ``t``, the
        positions before it held in ``cache``: what ``decode`` gives at its last position, in
        one position's work instead of all of them (eval mode)."""
        x = self.tok_emb(tok)[:, None] + self.tgt_pos.weight[t]  # (B, 1, D)
        if self.cfg.abacus:
            x = x + self.place_emb(self.tgt_place[t])
        for block, c in zip(self.decoder, cache):
            x = block.step(x, c, memory_mask)
        return self.head(self.ln_f(x))[:, 0]  # (B, V)

    def run_block(self, block: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
        """``block(*args)``, through activation checkpointing when it is on and gradients flow."""
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, own_guesses: bool = False,
                running_sums: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits (B, T, V). ``own_guesses``: scheduled sampling, parallel form:
        one teacher-forced pass without gradient gives the model's greedy guess at every
        position, and the decoder then reads those guesses (shifted right behind <bos>)
        instead of the true digits. ``running_sums`` (with ``carry_loss``): also the running-sum
        head's logits (B, T, C). All in ``forward``, so DistributedDataParallel sees it."""
        memory, memory_mask = self.memory(src)
        if own_guesses:
            with torch.no_grad():
                guess = self.decode(tgt_in, memory.detach(), memory_mask).argmax(-1)  # (B, T)
            tgt_in = torch.cat([tgt_in[:, :1], guess[:, :-1]], 1)
        states = self.decode_states(tgt_in, memory, memory_mask)  # (B, T, D)
        if running_sums:
            if not hasattr(self, "sum_head"):
                raise ValueError("running_sums needs a model built with carry_loss > 0")
            return self.head(states), self.sum_head(states)
        return self.head(states)


class LatentTransformer(SimpleTransformer):
    """The same encoder and decoder with ``num_latent`` learned vectors between them."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__(cfg)
        self.latents = nn.Parameter(nn.init.normal_(torch.empty(cfg.num_latent, cfg.d_model), std=0.02))
        self.latent_blocks = nn.ModuleList(CrossBlock(cfg, self_attn=False) for _ in range(cfg.latent_layers))
        self.ln_latent = nn.LayerNorm(cfg.d_model)
        for block in self.latent_blocks:
            block.apply(self._init)

    def memory(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        enc, enc_mask = self.encode(src)  # (B, S, D), (B, S)
        z = self.latents.unsqueeze(0).expand(src.shape[0], -1, -1)  # (B, K, D)
        for block in self.latent_blocks:
            z = self.run_block(block, z, enc, enc_mask)
        z = self.ln_latent(z)
        if self.cfg.bottleneck_factor >= 1.0:
            return z, None  # the bottleneck: the decoder sees the K latents only
        leak = (1.0 - self.cfg.bottleneck_factor) * enc  # (B, S, D)
        ones = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
        return torch.cat([z, leak], 1), torch.cat([ones, enc_mask], 1)  # (B, K+S, D), (B, K+S)


def source_places(w: int) -> torch.Tensor:
    """Place value of each source position, ``a`` (w digits, most significant first), ``*``,
    ``b``: e.g. w = 3: 2 1 0 none 2 1 0, with none = 2w."""
    digits = torch.arange(w - 1, -1, -1)  # (w,)
    return torch.cat([digits, torch.tensor([2 * w]), digits])  # (2w+1,)


def target_places(w: int, answer_places: str, length: int) -> torch.Tensor:
    """Place value of the answer digit each decoder position writes (``length`` positions; the
    last one writes <eos>: none = 2w)."""
    t = torch.arange(length)
    if answer_places == "msd":
        places = 2 * w - 1 - t
    elif answer_places == "lsd":
        places = t.clone()
    else:
        raise ValueError(f"abacus needs fixed answer places, got {answer_places!r}")
    return torch.where((t < 2 * w) & (places >= 0), places, torch.tensor(2 * w))  # (length,)


def build_model(cfg: Seq2SeqConfig) -> SimpleTransformer:
    return (LatentTransformer if cfg.kind == "latent" else SimpleTransformer)(cfg)


@torch.no_grad()
def greedy_decode(model: SimpleTransformer, src: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Free-running greedy decoding until every row has produced <eos>.

    The model is never told the answer's length: ``max_len`` is only a safety cap,
    by default the decoder's position budget (longest possible product + <eos>).
    Returns (B, L) generated tokens without <bos>; PAD after a row's <eos>.
    """
    max_len = max_len or model.cfg.tgt_len
    memory, memory_mask = model.memory(src)
    cache = model.decoding_cache(memory)  # each step then costs one position, not all before it
    B = src.shape[0]
    tok = torch.full((B,), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    out: list[torch.Tensor] = []
    for t in range(max_len):
        nxt = model.decode_next(tok, t, cache, memory_mask).argmax(-1)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        out.append(nxt)
        done |= nxt == EOS
        if bool(done.all()):
            break
        tok = nxt
    return torch.stack(out, 1)
