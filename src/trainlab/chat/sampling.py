"""Sampling: one pure function from logits to the next character, and a streaming generator.

``next_token`` applies, in this order:

1. repetition penalty (CTRL, Keskar et al. 2019): every distinct token among the last
   ``repetition_window`` ones has its logit divided by ``repetition_penalty`` when
   positive and multiplied by it when negative, so a penalty always makes a token
   less likely (dividing a negative logit, the original's bug, made it more likely);
2. temperature: logits / T; T = 0 means greedy (the top token after the penalty);
3. top-k: only the k highest logits survive (0: off);
4. top-p (nucleus): only the smallest set of tokens whose probabilities add up to at
   least p survives (1: off); the top token always survives;

then draws from the softmax with the caller's ``torch.Generator`` (seedable), on CPU
so that a seed gives the same text on any device.

Stopping (``stop_at``), checked after every character once ``min_new_tokens`` are out:
``line`` ends at a newline, ``paragraph`` at a blank line, ``sentence`` at ``.``, ``!``
or ``?`` (optionally followed by a closing quote or bracket) followed by whitespace;
the boundary whitespace is not part of the text. ``none``, or no boundary before
``max_new_tokens``, ends at the length limit.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from trainlab.chat.config import SamplingConfig

SENTENCE_END = ".!?"
CLOSERS = "\"')]"


# -- the four steps, each on a (V,) tensor of logits ----------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0 or recent.numel() == 0:
        return logits
    out = logits.clone()
    ids = recent.unique()
    seen = out[ids]
    out[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return out


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


TOP_P_SLACK = 1e-9  # mass sums that equal p up to rounding count as reaching it


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``p``; drop the rest.

    Masses are summed in float64 (float32 sums drift by ~1e-7, so on exact ties the kept set
    could be a token too large or too small), and a sum within ``TOP_P_SLACK`` of ``p``
    reaches it: 100 equal logits at p 0.25 keep exactly 25. Tokens of equal probability are
    ranked by id, lowest first (a stable sort), so which of several tied tokens are kept at
    the edge is fixed, not arbitrary."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, stable=True)
    probs = torch.softmax(sorted_logits.double(), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= p - TOP_P_SLACK  # never the first: its mass-before is 0
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, recent: torch.Tensor, cfg: SamplingConfig,
               generator: torch.Generator | None = None) -> int:
    """The next token id from one position's logits (V,), in the documented order."""
    logits = apply_repetition_penalty(logits.detach().float().cpu(), recent.cpu(), cfg.repetition_penalty)
    if cfg.temperature == 0:
        return int(torch.argmax(logits))
    logits = apply_top_p(apply_top_k(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def batchable(cfg: SamplingConfig) -> bool:
    """Whether ``sample_rows`` takes a row with these settings: plain temperature sampling or
    greedy, no repetition penalty, top-k or top-p (the defaults); others go row by row."""
    return (cfg.repetition_penalty == 1.0 or cfg.repetition_window == 0) and cfg.top_k <= 0 and cfg.top_p >= 1.0


def sample_rows(logits: torch.Tensor, temperatures: Sequence[float],
                generators: Sequence[torch.Generator]) -> list[int]:
    """``next_token`` for rows whose settings are ``batchable``, as a few operations over all
    of them (R, V) where ``next_token`` takes about 15 a row: the same token, and the same
    draws from each row's generator, as row by row (tested), so a row's text does not depend
    on the rows beside it. A draw is ``multinomial``'s own: the argmax of the probabilities
    over exponential noise from the row's generator.

    Why: a server's sampling runs right after a pass that streamed the weights through every
    cache, and each small torch op then costs 5-10x what it does warm (and may hand the GIL
    to the HTTP thread)."""
    logits = logits.detach().float().cpu()  # (R, V)
    out = [0] * logits.shape[0]
    greedy = [i for i, t in enumerate(temperatures) if t == 0]
    drawn = [i for i, t in enumerate(temperatures) if t != 0]
    if greedy:
        for i, tok in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
            out[i] = tok
    if drawn:
        temps = torch.tensor([temperatures[i] for i in drawn], dtype=torch.float32)[:, None]  # (D, 1)
        probs = torch.softmax(logits[drawn] / temps, dim=-1)  # (D, V)
        noise = torch.empty_like(probs)
        for j, i in enumerate(drawn):
            noise[j].exponential_(generator=generators[i])
        for i, tok in zip(drawn, (probs / noise).argmax(dim=-1).tolist()):
            out[i] = tok
    return out


def stop_length(text: str, stop_at: str, min_chars: int) -> int | None:
    """If ``text`` (generated so far) just reached a ``stop_at`` boundary: the length to keep."""
    if stop_at == "none" or not text:
        return None
    if stop_at == "line" and text[-1] == "\n":
        keep = len(text) - 1
    elif stop_at == "paragraph" and text.endswith("\n\n"):
        keep = len(text) - 2
    elif stop_at == "sentence" and text[-1].isspace():
        body = text[:-1].rstrip(CLOSERS)
        if not body or body[-1] not in SENTENCE_END:
            return None
        keep = len(text) - 1
    else:
        return None
    return keep if keep >= min_chars else None


def settle(text: str, generated: int, cfg: SamplingConfig, stops: Sequence[str] = ()) -> tuple[int, str | None]:
    """Where a completion stands after its latest character: (how much of ``text`` may be sent,
    the finish reason or None). ``generate`` and the server's jobs follow this one rule.

    A stop string ends it before the string, a ``stop_at`` boundary where the boundary begins,
    ``max_new_tokens`` (``generated`` so far) with the whole text ("length"). Until then, text
    that may still turn out to be part of a stop is held back: trailing whitespace (a boundary
    may be under way) and the longest tail that begins a stop string. Nothing sent is ever
    taken back."""
    for s in stops:
        at = text.find(s)
        if at >= 0:
            return at, "stop"
    end = stop_length(text, cfg.stop_at, cfg.min_new_tokens)
    if end is not None:
        return end, "stop"
    if generated >= cfg.max_new_tokens:
        return len(text), "length"
    ready = len(text.rstrip()) if cfg.stop_at != "none" else len(text)
    for s in stops:  # the longest tail that begins a stop string is held back
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                ready = min(ready, len(text) - k)
                break
    return ready, None


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


@torch.no_grad()
def generate(model, prompt: list[int], cfg: SamplingConfig, decode: Callable[[int], str],
             generator: torch.Generator, fallback_start: int = 0, tuner=None, decoder=None) -> Iterator[str]:
    """Stream the completion of ``prompt`` (token ids) piece by piece.

    Where it ends and what may go out yet is ``settle``'s rule, the server's too: text that
    may still be a boundary is held back, so nothing streamed is ever taken back. The model sees at most its
    context: the prompt's last window goes in as one pass, then each character is one
    ``decoder`` pass (a ``chat.decoding.Decoder``; default: the plain pass) over a
    fixed-shape cache. When the cache fills, its oldest quarter goes: a rotary model's cache
    slides (``decoding.slide_cache``: the rest kept as computed, its keys turned back, no
    pass), a learned-position model's is rebuilt from the last three quarters of the text
    in one window's pass (its positions cannot turn), every ``context_len / 4`` characters.
    The server does the same. ``tuner`` (an ``engine.threads.ThreadTuner``) picks the
    thread count of the one-character steps by timing them."""
    from trainlab.chat.decoding import Decoder, RowCache, slides

    step = tuner.run if tuner is not None else (lambda fn: fn())
    whole = tuner.whole if tuner is not None else (lambda fn: fn())  # a prompt's pass: every thread
    decoder = decoder if decoder is not None else Decoder(model, compiled=False)
    was_training = model.training
    model.eval()
    ctx = model.cfg.context_len
    keep = max(1, ctx - ctx // 4)
    sliding = slides(model)
    tokens = list(prompt) or [fallback_start]
    cache = RowCache(model)
    try:
        logits = whole(lambda: cache.fill(model, tokens[-ctx:]))
        text, sent = "", 0
        for generated in range(1, cfg.max_new_tokens + 1):
            tok = next_token(logits.float(), torch.tensor(tokens[-cfg.repetition_window:] if cfg.repetition_window
                                                          else [], dtype=torch.long), cfg, generator)
            tokens.append(tok)
            text += decode(tok)
            ready, finish = settle(text, generated, cfg)
            if ready > sent:
                yield text[sent:ready]
                sent = ready
            if finish is not None:
                break
            if cache.length >= ctx and not sliding:
                logits = whole(lambda: cache.fill(model, tokens[-keep:]))
            else:
                if cache.length >= ctx:
                    cache.slide(model, max(1, ctx - keep))  # a context under 4 still drops one
                logits = step(lambda: cache.step(decoder, tok))
    finally:
        model.train(was_training)
        if tuner is not None:
            tuner.restore()
