"""One decoding pass: a new character for each of R rows, over their cached keys and values,
written so that a compiler can run it at the speed of reading the weights once.

A batch-1 eager pass of the 14M model took 6-10 ms on a 2-core CPU where reading its 57 MB
of weights once takes 1.3-2.1 ms: MKL's product of one row with a weight matrix that is
not in cache streams it at a third of the bandwidth, and growing the cache with
``torch.cat`` copied it every character. Here every linear layer is written as what it is
for one row, a dot product of each weight row with the input (``rowwise_linear``):
compiled by inductor, the loop takes one weight row at a time and streams the weights
near the bandwidth (3.0 ms a pass against 8.1 plain: results/decoding/).

Attention is written out the same way (products and sums, no matmul): the new position's
key and value join the cached ones inside the pass, and the caller writes them into its
cache after it, so the pass reads its inputs and writes nothing (a compiled graph that
wrote into a cache handed to it copied the whole cache each call).

``generate`` and the repl use it, one row at a time (``RowCache``, ``Decoder``). The server
walks the same blocks (``walk_blocks``) through its C++ row kernels instead
(``kernel_pass``, used by ``chat/slots.py``), not through inductor: inside a whole pass of
several rows, inductor lays the products out feature-major and vectorises across the rows,
which made such a pass slow and its rows' bits depend on the row count
(results/decoding/README.md). Without a compiler the same pass runs eagerly with
``F.linear`` (``decode_pass(..., linear=F.linear)``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import time
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from trainlab.chat.model import GPT, pair_rows, rotate

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def rowwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (R, K) times ``weight`` (N, K) transposed, plus ``bias``: (R, N), written as N * R dot
    products, weight row outermost. Eagerly this builds an (N, R, K) product and is slow;
    compiled, it is one loop that reads each weight row once for all R rows, and each dot
    product is summed in an order that does not depend on R or on the thread count."""
    out = (weight[:, None, :] * x[None, :, :]).sum(-1).t()  # (R, N)
    return out if bias is None else out + bias


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def walk_blocks(model: GPT, tokens: torch.Tensor, positions: torch.Tensor, before: torch.Tensor, linear: Linear,
                attend: Attend, norm: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
    """One new token per row through every block: ``tokens`` (R,) at ``positions`` (R,), each
    after the token ``before`` (R,; ``vocab_size``: none). ``attend(i, q, k, v)`` gets block i's
    new queries, keys and values (R, H, hd) each and returns what the queries read (R, H, hd);
    it owns the cache. ``norm(module, x)`` applies a norm layer (default: the module itself).
    Returns the logits (R, V). The arithmetic of ``GPT.forward``."""
    norm = norm or (lambda module, x: module(x))
    cfg = model.cfg
    R = tokens.shape[0]
    H, D = cfg.nhead, cfg.d_model
    hd = D // H
    x, rot = model.embed(tokens[:, None], positions[:, None], before)  # (R, 1, D)
    x = x[:, 0]  # (R, D)
    for i, block in enumerate(model.blocks):
        attn = block.attn
        q, k, v = linear(norm(block.ln1, x), attn.qkv.weight, attn.qkv.bias).view(R, 3, H, hd).unbind(1)  # (R, H, hd) each
        if attn.qk_norm:
            q, k = norm(attn.q_norm, q), norm(attn.k_norm, k)
        if rot is not None:
            cos, sin = rot[0][:, 0], rot[1][:, 0]  # (R, 1, hd)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = attend(i, q, k, v)  # (R, H, hd)
        x = x + linear(y.reshape(R, D), attn.proj.weight, attn.proj.bias)
        h = norm(block.ln2, x)
        mlp = block.mlp
        if mlp.kind == "swiglu":
            h = F.silu(linear(h, mlp.gate.weight, mlp.gate.bias)) * linear(h, mlp.up.weight, mlp.up.bias)
        elif mlp.kind == "relu2":
            h = F.relu(linear(h, mlp.up.weight, mlp.up.bias)).square()
        else:
            h = F.gelu(linear(h, mlp.up.weight, mlp.up.bias))
        x = x + linear(h, mlp.down.weight, mlp.down.bias)
    logits = linear(norm(model.ln_f, x), model.head.weight, None)  # (R, V)
    c = cfg.logit_softcap
    return c * torch.tanh(logits / c) if c else logits


def decode_pass(model: GPT, tokens: torch.Tensor, positions: torch.Tensor, before: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, linear: Linear = rowwise_linear
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``walk_blocks`` over each row's cached ``keys`` and ``values`` (L, R, H, S, hd) at the
    positions below its own (the rest of the S are ignored), and itself. Returns (logits (R, V),
    the new keys and values (L, R, H, hd) each), which the caller stores at ``positions``:
    the pass reads its inputs and writes nothing."""
    S = keys.shape[3]
    scale = 1.0 / math.sqrt(model.cfg.d_model // model.cfg.nhead)
    seen = (torch.arange(S, device=tokens.device)[None, :] < positions[:, None])[:, None, :]  # (R, 1, S)
    new_k, new_v = [], []

    def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        new_k.append(k)
        new_v.append(v)
        cached = (q[:, :, None, :] * keys[i]).sum(-1) * scale  # (R, H, S)
        own = (q * k).sum(-1, keepdim=True) * scale  # (R, H, 1)
        w = torch.softmax(torch.cat([cached.masked_fill(~seen, float("-inf")), own], dim=-1), dim=-1)  # (R, H, S+1)
        return (w[..., :S, None] * values[i]).sum(-2) + w[..., S:] * v  # (R, H, hd)

    logits = walk_blocks(model, tokens, positions, before, linear, attend)
    return logits, torch.stack(new_k), torch.stack(new_v)  # (R, V), (L, R, H, hd) x 2


def kernel_pass(model: GPT, kernels, tokens: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                before: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
    """One new token for the cache rows ``rows`` (R,) of ``cache_k`` and ``cache_v`` (L, slots,
    H, ctx, hd), the whole pass one call of the row kernels (``chat/kernels.py``: ``RowsModel``,
    each block a ``rows_block``): each row's new key and value is written at its position, then
    its query attends to positions 0..position. The arithmetic of ``walk_blocks``, with no
    Python inside the pass, the embedding included. A row's logits (R, V) depend on nothing but the row: not on R, the
    other rows or the thread count."""
    logits = rows_model(model, kernels).step_tokens(tokens, before, rows, positions, cache_k, cache_v)  # (R, V)
    c = model.cfg.logit_softcap
    return c * torch.tanh(logits / c) if c else logits


_NONE = torch.empty(0)  # what RowsModel reads as "the model has none"
_ROWS_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rows_model(model: GPT, kernels):
    """The model's weights held by the row kernels (``kernels.RowsModel``), made once per model
    and kernels module: its embedding tables are the model's own tensors, its linear layers'
    weights packed copies (panels of outputs). A model whose weights change after this (a
    server's never do) must be given to ``forget_rows_model`` before its next pass: checking
    every parameter's version at each pass cost 0.15 ms of a 3 ms pass."""
    held = _ROWS_MODELS.get(model)
    if held is not None and held[0] is kernels:
        return held[1]
    cfg = model.cfg

    def t(x: torch.Tensor | None) -> torch.Tensor:
        return _NONE if x is None else x.detach()

    blocks, eps = [], []
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        gate = mlp.gate if mlp.kind == "swiglu" else None
        blocks.append([t(block.ln1.weight), t(getattr(block.ln1, "bias", None)), t(attn.qkv.weight), t(attn.qkv.bias),
                       t(attn.q_norm.weight if attn.qk_norm else None), t(attn.k_norm.weight if attn.qk_norm else None),
                       t(attn.proj.weight), t(attn.proj.bias), t(block.ln2.weight), t(getattr(block.ln2, "bias", None)),
                       t(mlp.up.weight), t(mlp.up.bias), t(gate.weight if gate is not None else None),
                       t(gate.bias if gate is not None else None), t(mlp.down.weight), t(mlp.down.bias)])
        eps += [norm_eps(block.ln1), norm_eps(attn.q_norm) if attn.qk_norm else 0.0, norm_eps(block.ln2)]
    held = kernels.RowsModel(blocks, eps, t(model.ln_f.weight), t(getattr(model.ln_f, "bias", None)), norm_eps(model.ln_f),
                             t(model.head.weight), 1.0 / math.sqrt(cfg.d_model // cfg.nhead), MLP_KINDS[cfg.mlp],
                             cfg.norm == "rmsnorm")
    held.set_embedding(t(model.tok.weight), t(model.pair.weight if cfg.pair_embedding else None),
                       t(model.pos.weight if cfg.positions == "learned" else None),
                       t(model.rot_cos if cfg.positions == "rotary" else None),
                       t(model.rot_sin if cfg.positions == "rotary" else None), cfg.vocab_size,
                       pair_rows(cfg) if cfg.pair_embedding else 0)
    _ROWS_MODELS[model] = (kernels, held)
    return held


def forget_rows_model(model: GPT) -> None:
    """Drop what ``rows_model`` holds for ``model`` (its packed weights), after they changed."""
    _ROWS_MODELS.pop(model, None)


MLP_KINDS = {"gelu": 0, "relu2": 1, "swiglu": 2}  # rows_block's mlp_kind


def norm_eps(norm: torch.nn.Module) -> float:
    """A norm layer's epsilon, as torch applies it (RMSNorm's None: the dtype's own)."""
    return norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps


SPAN_STEP = 64  # the cached positions a pass reads come in multiples of this (one compiled graph serves all)


def span_for(cached: int, context: int) -> int:
    """The positions of the cache a pass reads when ``cached`` of them are in use: enough for
    all of them, in whole ``SPAN_STEP``s (and at least one), at most the context."""
    return min(context, max(SPAN_STEP, -(-cached // SPAN_STEP) * SPAN_STEP))


def slides(model: GPT) -> bool:
    """Whether a full cache of ``model`` slides (``slide_cache``) rather than being rebuilt
    from its recent part: rotary positions, whose keys can be turned to new positions."""
    return model.cfg.positions == "rotary"


def slide_cache(model: GPT, keys: torch.Tensor, values: torch.Tensor, length: int, drop: int) -> int:
    """Drop the oldest ``drop`` of the ``length`` positions held in ``keys`` and ``values``
    (..., positions, hd), in place: the rest move to positions 0.. and their keys are turned
    back by ``drop`` positions (a rotation by -drop angles, since rotary keys hold their
    position as an angle). Returns the new length. The values, and every key's content, stay
    as they were computed, with the context they had: where rebuilding the window would run
    the kept part through the model again (3 positions of work for every new character when
    a quarter is dropped), this is a copy and a rotation, as llama.cpp's context shift does."""
    keep = length - drop
    cos, sin = model.rot_cos[drop], model.rot_sin[drop]  # (hd,): the angles of ``drop`` positions
    keys[..., :keep, :] = rotate(keys[..., drop:length, :], cos, -sin)  # a new tensor: no overlap
    values[..., :keep, :] = values[..., drop:length, :].clone()
    return keep


class RowCache:
    """Keys and values of one sequence in fixed-shape buffers, (L, 1, H, ctx + 1, hd) each, for
    ``generate`` and the repl: a new position is written in place, where growing the cache with
    ``torch.cat`` copied all of it for every character (a quarter of an eager pass's time)."""

    def __init__(self, model: GPT) -> None:
        cfg = model.cfg
        p = next(model.parameters())
        # one position more than the context, never read: a pass reads a slice of the positions,
        # and a slice of all of them would have other strides than the shorter ones, which a
        # compiled graph is specialised to (it compiled again, 20-40 s, when the cache filled)
        shape = (cfg.num_layers, 1, cfg.nhead, cfg.context_len + 1, cfg.d_model // cfg.nhead)
        self.keys = torch.zeros(shape, device=p.device, dtype=p.dtype)  # (L, 1, H, ctx + 1, hd)
        self.values = torch.zeros(shape, device=p.device, dtype=p.dtype)
        self.length = 0
        self.last = model.cfg.vocab_size  # the token at the last position (vocab_size: none yet)

    def fill(self, model: GPT, tokens: list[int]) -> torch.Tensor:
        """Start over from ``tokens`` (at most the context) in one pass of the model: the logits
        after the last one (V,)."""
        idx = torch.tensor([tokens], device=self.keys.device)  # (1, T)
        logits, cache = model(idx)
        T = len(tokens)
        for i, (k, v) in enumerate(cache):
            self.keys[i, :, :, :T] = k
            self.values[i, :, :, :T] = v
        self.length, self.last = T, tokens[-1]
        return logits[0, -1]

    def slide(self, model: GPT, drop: int) -> None:
        """Drop the oldest ``drop`` positions (``slide_cache``); the next step goes on after the rest."""
        self.length = slide_cache(model, self.keys, self.values, self.length, drop)

    def step(self, decode: Callable, token: int) -> torch.Tensor:
        """``token`` at the next position through ``decode`` (a ``decode_pass``): its logits (V,).
        The pass reads the cache up to the next multiple of ``SPAN_STEP`` past the cached
        positions, not the whole context."""
        device = self.keys.device
        pos = self.length
        if getattr(decode, "kernels", None) is not None:  # the row kernels write the new key and value themselves
            logits = kernel_pass(decode.model, decode.kernels, torch.tensor([token], device=device),
                                 torch.tensor([0], device=device), torch.tensor([pos], device=device),
                                 torch.tensor([self.last], device=device), self.keys, self.values)
            self.length, self.last = pos + 1, token
            return logits[0]
        span = span_for(pos, self.keys.shape[3] - 1)
        logits, k, v = decode(torch.tensor([token], device=device), torch.tensor([pos], device=device),
                              torch.tensor([self.last], device=device), self.keys[:, :, :, :span],
                              self.values[:, :, :, :span])
        self.keys[:, :, :, pos] = k  # (L, 1, H, hd)
        self.values[:, :, :, pos] = v
        self.length, self.last = pos + 1, token
        return logits[0]


def compile_cache_dir(root: Path, model: GPT) -> Path:
    """Where compiled decoding passes of models shaped like ``model`` are kept under ``root``:
    one folder per model shape, dtype, torch version and CPU, so a cache is never read by a
    build it was not made for."""
    from trainlab.engine.precision import cpu_summary

    p = next(model.parameters())
    key = json.dumps({"model": asdict(model.cfg), "dtype": str(p.dtype), "device": p.device.type,
                      "torch": torch.__version__, "cpu": cpu_summary()}, sort_keys=True)
    return root / hashlib.sha256(key.encode()).hexdigest()[:16]


class Decoder:
    """``decode_pass`` of one model as a command runs it: through the row kernels
    (``chat/kernels.py``, the server's; ``kernels=True``) or compiled by inductor (``prepare``,
    at start-up) where that works and agrees with the plain pass, else the plain pass with
    ``F.linear`` (one line says why). Compiled code is specialised to the thread count:
    ``prepare`` compiles for the current one, and the commands then keep it (their thread
    tuner is off); the row kernels follow whatever count is set."""

    def __init__(self, model: GPT, compiled: bool = True, cache_root: Path | None = None,
                 kernels: bool = False) -> None:
        self.model, self.cache_root = model, cache_root
        p = next(model.parameters())
        self.compiled: Callable | None = None
        self.kernels = None  # the row kernels' module, once ``prepare`` has built and checked them
        self.wanted_kernels = kernels and cache_root is not None and p.device.type == "cpu" and p.dtype == torch.float32
        self.wanted = (compiled or kernels) and p.device.type == "cpu" and p.dtype == torch.float32
        self.note = "decoding: plain pass"
        if compiled and not self.wanted:
            self.note += (f" (compiled decoding is for fp32 weights on a CPU; these are {str(p.dtype)[6:]} on "
                          f"{p.device.type})")

    def __call__(self, tokens, positions, before, keys, values):
        if self.compiled is not None:
            return self.compiled(tokens, positions, before, keys, values)
        return decode_pass(self.model, tokens, positions, before, keys, values, linear=F.linear)

    def prepare(self) -> str:
        """Compile, check the compiled pass against the plain one on random inputs, and keep it
        only if it agrees; one line on what was done, also kept in ``note``."""
        if not self.wanted:
            return self.note
        t0 = time.perf_counter()
        if self.wanted_kernels:
            from trainlab.chat.kernels import load_kernels

            self.kernels, note = load_kernels(self.cache_root)
            why = note if self.kernels is None else self._check_kernels()
            if why is None:
                self.note = f"decoding: {note}"
                return self.note
            self.kernels = None
            self.note = f"decoding: {why}; compiling instead"
        for attempt in (1, 2):
            try:
                self.compiled = self._compile()
                break
            except Exception as e:  # noqa: BLE001 (no compiler, a damaged cache: the plain pass serves)
                self.compiled = None
                torch._dynamo.reset()
                if attempt == 1 and self.cache_dir is not None and self.cache_dir.exists():
                    shutil.rmtree(self.cache_dir, ignore_errors=True)  # a damaged cache is rebuilt, never trusted
                    continue
                why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                self.note = f"decoding: plain pass (compiling failed: {why})"
                return self.note
        where = f", cache {self.cache_dir}" if self.cache_root is not None else ""
        self.note = f"decoding: compiled in {time.perf_counter() - t0:.1f} s{where}"
        return self.note

    @property
    def cache_dir(self) -> Path | None:
        return None if self.cache_root is None else compile_cache_dir(self.cache_root, self.model)

    def _check_kernels(self) -> str | None:
        """None where the row kernels' pass (``self.kernels``) agrees with the plain one on a
        random cache (as a compiled pass must), else why not."""
        model = self.model
        try:
            g = torch.Generator(device="cpu").manual_seed(0)
            cache = RowCache(model)
            cache.keys.copy_(torch.randn(cache.keys.shape, generator=g))
            cache.values.copy_(torch.randn(cache.values.shape, generator=g))
            V, ctx = model.cfg.vocab_size, model.cfg.context_len
            pos = ctx // 2
            with torch.no_grad():
                plain = decode_pass(model, torch.tensor([1 % V]), torch.tensor([pos]), torch.tensor([2 % V]),
                                    cache.keys[:, :, :, :pos], cache.values[:, :, :, :pos], linear=F.linear)[0]
                cache.length, cache.last = pos, 2 % V
                got = cache.step(self, 1 % V)[None]
        except Exception as e:  # noqa: BLE001 (a model the kernels do not take: the next route serves)
            return "row kernels not used (" + ((str(e).strip().splitlines() or [type(e).__name__])[0][:200]) + ")"
        if not torch.allclose(got, plain, rtol=1e-3, atol=1e-3 * float(plain.abs().max())):
            return f"row kernels not used (they differ from the plain pass by {float((got - plain).abs().max()):.2e})"
        return None

    def _compile(self) -> Callable:
        import os

        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache_dir)
        model = self.model
        fn = torch.compile(functools.partial(decode_pass, model), dynamic=False, fullgraph=True)
        cache = RowCache(model)
        g = torch.Generator(device="cpu").manual_seed(0)
        cache.keys.copy_(torch.randn(cache.keys.shape, generator=g))
        cache.values.copy_(torch.randn(cache.values.shape, generator=g))
        V, ctx = model.cfg.vocab_size, model.cfg.context_len
        span = span_for(1, ctx)
        keys, values = cache.keys[:, :, :, :span], cache.values[:, :, :, :span]
        for t in (keys, values):  # one graph for every span (a compile takes 20-30 s for the 14M model)
            torch._dynamo.maybe_mark_dynamic(t, 3)
        args = (torch.tensor([1 % V]), torch.tensor([span // 2]), torch.tensor([2 % V]), keys, values)
        with torch.no_grad():
            plain = decode_pass(model, *args, linear=F.linear)[0]
            got = fn(*args)[0]
        if not torch.allclose(got, plain, rtol=1e-3, atol=1e-3 * float(plain.abs().max())):
            gap = float((got - plain).abs().max())
            raise RuntimeError(f"the compiled pass differs from the plain one by {gap:.2e}")
        return fn
