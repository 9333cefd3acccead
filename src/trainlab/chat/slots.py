"""The server's decoding of many streams at once (``trainlab chat serve``): a cache of one row
per stream (``SlotCache``), a prompt's pass into its row (``prefill_row``), and one pass that
gives every row in use its next token: written out in PyTorch (``decode_rows``), or through
the row kernels of ``chat/kernels.py`` where they hold (``decode_slots``).

What a server promises: a stream's text for a given seed is the same alone, among others
and at any thread count. The row kernels keep each row's numbers independent of the other
rows by construction, and ``kernels_exact`` checks it on the machine; the PyTorch pass keeps
it by computing shapes that depend on no row's content (and ``check_exactness`` checks which
trimmed shapes keep it on this machine). The server checks at warm-up and uses what holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainlab.chat.config import GPTConfig
from trainlab.chat.decoding import kernel_pass, slide_cache
from trainlab.chat.model import GPT, attend_written_out

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

    def slide(self, model: GPT, row: int, drop: int) -> None:
        """Drop the oldest ``drop`` positions of ``row`` (``decoding.slide_cache``): its next
        token goes in after the rest. Elementwise, so the row's bits depend on it alone."""
        n = self.lengths[row]
        self.lengths[row] = slide_cache(model, self.k[:, row], self.v[:, row], n, drop)
        self.tokens[row, :n - drop] = self.tokens[row, drop:n].clone()

    def shape_for(self, rows_used: int, positions: int) -> tuple[int, int]:
        """(rows, key positions) a pass computes when rows 0..rows_used-1 may be in use and the
        furthest position read is positions-1: the whole cache, or trimmed to quanta."""
        ctx = self.k.shape[3]
        if not self.trimmed:
            return self.slots, ctx
        return (min(self.slots, _power_of_two_at_least(rows_used, MIN_ROWS)),
                min(ctx, _power_of_two_at_least(positions, MIN_SPAN)))


def _serve_forward(model: GPT, tokens: torch.Tensor, positions: torch.Tensor, store, mask: torch.Tensor,
                   before: torch.Tensor | None) -> torch.Tensor:
    """``tokens`` (B, T) at ``positions`` (B, T), after ``before`` (B,; see ``GPT.embed``), through
    every block, as ``GPT.forward`` does but attending through ``attend_written_out`` (which keeps
    a row's bits at any thread count): ``store(i, k, v)``
    keeps block i's new keys and values (B, H, T, hd) and returns all that its queries attend
    to. Returns the logits (B, T, V)."""
    x, rot = model.embed(tokens, positions, before)  # (B, T, D)
    for i, block in enumerate(model.blocks):
        x, _ = block(x, rot=rot, attend=lambda q, k, v, i=i: attend_written_out(q, *store(i, k, v), mask))  # (B, T, D)
    return model.logits(x)


PREFILL_CHUNK = 256  # most prompt positions in one pass (see prefill_row)
PREFILL_QUANTUM = 16  # a pass's positions come in whole multiples of this (see prefill_row)


def prefill_chunks(T: int) -> list[tuple[int, int, int]]:
    """(start, real positions, padded size) of each pass of a T-position prompt: passes of
    ``PREFILL_CHUNK``, the last one padded to a whole ``PREFILL_QUANTUM``."""
    out, start = [], 0
    while start < T:
        real = min(PREFILL_CHUNK, T - start)
        out.append((start, real, min(PREFILL_CHUNK, -(-real // PREFILL_QUANTUM) * PREFILL_QUANTUM)))
        start += real
    return out


def prefill_shapes(context_len: int) -> list[tuple[int, int]]:
    """(start, padded size) of every prefill pass a prompt may need under ``context_len``: the
    shapes whose rounding ``check_exactness`` checks."""
    return sorted({(start, C) for T in range(1, context_len + 1) for start, _, C in prefill_chunks(T)})


def _prefill_chunk(model: GPT, tokens: list[int], cache: SlotCache, row: int, start: int, real: int,
                   C: int) -> torch.Tensor:
    """Positions start..start+real-1 of ``tokens`` in one pass of C positions (the rest padding)
    into ``row`` of ``cache``, attending to the row's earlier positions: the logits after the
    last real one (V,)."""
    device, ctx = cache.k.device, model.cfg.context_len
    span = cache.shape_for(1, start + C)[1]
    keys = torch.arange(span, device=device)
    chunk = tokens[start:start + real] + [0] * (C - real)  # the padding is computed and never used
    pos = torch.arange(start, start + C, device=device).clamp(max=ctx - 1)  # (C,)

    def store(i, k, v):
        cache.k[i, row, :, start:start + real] = k[0, :, :real]
        cache.v[i, row, :, start:start + real] = v[0, :, :real]
        return cache.k[i, row:row + 1, :, :span], cache.v[i, row:row + 1, :, :span]  # (1, H, span, hd)

    seen = keys[None, :] <= torch.arange(start, start + C, device=device)[:, None]  # (C, span): causal
    before = torch.tensor([tokens[start - 1]], device=device) if start else None
    return _serve_forward(model, torch.tensor([chunk], device=device), pos[None], store, seen, before)[0, real - 1]


@torch.no_grad()
def prefill_row(model: GPT, tokens: list[int], cache: SlotCache, row: int) -> torch.Tensor:
    """Run ``tokens`` (at most the context) through ``model`` and keep their keys and values in
    ``row``; returns the logits after the last token (V,).

    The prompt goes in passes of at most ``PREFILL_CHUNK`` positions, the last one padded to a
    whole ``PREFILL_QUANTUM`` (``prefill_chunks``): CPU matmuls of some row counts (11, say)
    round differently with 1 and 2 threads, those of a multiple of 8 rows did not in any shape
    tried (``check_exactness`` checks every size on the machine), and a stream's text must not
    depend on the thread count it was given. One pass of a whole 200-character prompt costs 40%
    less than seven of 32, and padding it to 208 rather than the next power of two (256) saves
    a fifth of it; so does a refill of 192 kept positions. A trimmed cache attends over the
    positions up to the next power of two past the chunk's end (64, 128, 256, ...), not the
    whole context."""
    T, ctx = len(tokens), model.cfg.context_len
    if not 0 < T <= ctx:
        raise ValueError(f"a prompt of {T} positions does not fit the context of {ctx}")
    logits = None
    for start, real, C in prefill_chunks(T):
        logits = _prefill_chunk(model, tokens, cache, row, start, real, C)
    cache.tokens[row, :T] = torch.tensor(tokens, device=cache.tokens.device)
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
    return Exactness(trimmed_ok, same_threads and prefill_exact(model, threads, trimmed=trimmed_ok))


@torch.no_grad()
def prefill_exact(model: GPT, threads: tuple[int, ...] = (1, 2), trimmed: bool = False) -> bool:
    """Whether every prefill pass shape (``prefill_shapes``) gives the same bits, logits and
    kept keys and values, at each thread count, in a cache ``trimmed`` or not: a prompt's
    pass runs at whatever count the server has at the time."""
    cfg = model.cfg
    p = next(model.parameters())
    previous = torch.get_num_threads()
    seen: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
    try:
        for n in threads:
            torch.set_num_threads(n)
            for start, C in prefill_shapes(cfg.context_len):
                g = torch.Generator().manual_seed(start * 1009 + C)
                real = min(C, cfg.context_len - start)
                tokens = [int(t) for t in torch.randint(0, cfg.vocab_size, (start + real,), generator=g)]
                cache = SlotCache(cfg, 8, p.device, p.dtype, trimmed=trimmed)
                cache.k[:, 0, :, :start] = torch.randn(cache.k[:, 0, :, :start].shape, generator=g).to(p.dtype)
                cache.v[:, 0, :, :start] = torch.randn(cache.v[:, 0, :, :start].shape, generator=g).to(p.dtype)
                out = (_prefill_chunk(model, tokens, cache, 0, start, real, C), cache.k[:, 0].clone(), cache.v[:, 0].clone())
                if (start, C) not in seen:
                    seen[start, C] = out
                elif not all(torch.equal(a, b) for a, b in zip(seen[start, C], out)):
                    return False
    finally:
        torch.set_num_threads(previous)
    return True


def decode_slots(model: GPT, kernels, tokens: torch.Tensor, cache: SlotCache, rows: list[int]) -> torch.Tensor:
    """What ``decode_rows`` does for a server's tick, through ``kernel_pass``: a new token
    for each of ``rows`` of ``cache`` (their next tokens in ``tokens``, (slots,)), each at its
    own position ``lengths[r]``, which must be below the context. Only those rows are
    computed. Returns their logits (len(rows), V); lengths are left to the caller."""
    ctx = model.cfg.context_len
    for r in rows:
        if not 0 <= cache.lengths[r] < ctx:
            raise ValueError(f"row {r} is at position {cache.lengths[r]}, outside the context of {ctx}")
    device = tokens.device
    idx = torch.tensor(rows, device=device, dtype=torch.long)  # (R,)
    pos = torch.tensor([cache.lengths[r] for r in rows], device=device, dtype=torch.long)  # (R,)
    before = torch.where(pos > 0, cache.tokens[idx, (pos - 1).clamp(min=0)], model.cfg.vocab_size)  # (R,)
    cache.tokens[idx, pos] = tokens[idx]  # a pair-embedding model's next pass reads it
    return kernel_pass(model, kernels, tokens[idx], idx, pos, before, cache.k, cache.v)


def kernels_exact(model: GPT, kernels, threads: tuple[int, ...] = (1, 2)) -> bool:
    """Whether ``decode_slots`` gives each row the same bits alone, among others and at each
    thread count on this machine: 8 rows at several positions, decoded all together and in
    subsets, at every count in ``threads``. What the kernels are written to keep; a server
    checks it at warm-up and uses them only where it holds."""
    cfg = model.cfg
    p = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    cache = SlotCache(cfg, 8, p.device, p.dtype)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    cache.tokens.copy_(torch.randint(0, cfg.vocab_size, cache.tokens.shape, generator=g))
    lengths = [int(x) for x in torch.randint(1, cfg.context_len, (8,), generator=g)]
    lengths[0], lengths[-1] = 1, cfg.context_len - 1
    tokens = torch.randint(0, cfg.vocab_size, (8,), generator=g)
    previous = torch.get_num_threads()

    def run(rows: list[int], n: int) -> torch.Tensor:
        torch.set_num_threads(n)
        scratch = SlotCache(cfg, 8, p.device, p.dtype)
        scratch.k.copy_(cache.k)
        scratch.v.copy_(cache.v)
        scratch.tokens.copy_(cache.tokens)
        scratch.lengths = list(lengths)
        return decode_slots(model, kernels, tokens, scratch, rows)

    try:
        with torch.no_grad():
            whole = run(list(range(8)), threads[0])
            for n in threads:
                for rows in ([0], [7], [5, 2], [1, 3, 4, 6], list(range(8))):
                    if not torch.equal(run(rows, n), whole[rows]):
                        return False
    finally:
        torch.set_num_threads(previous)
    return True
