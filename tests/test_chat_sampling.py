"""Sampling on hand-made logits, stopping rules, streaming, diversity metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from trainlab.chat.config import GPTConfig, SamplingConfig
from trainlab.chat.metrics import distinct_n, diversity, repeat_rate, words
from trainlab.chat.model import GPT
from trainlab.chat.sampling import (
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate,
    next_token,
    stop_length,
)
from trainlab.config import ConfigError

INF = float("inf")


def test_repetition_penalty_makes_seen_tokens_less_likely_whatever_their_sign():
    logits = torch.tensor([2.0, -2.0, 0.5, -1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 0.5, -1.0]  # positive divided, negative multiplied, unseen kept
    before, after = torch.softmax(logits, 0), torch.softmax(out, 0)
    assert after[0] < before[0] and after[1] < before[1]
    assert logits.tolist() == [2.0, -2.0, 0.5, -1.0]  # a pure function: the input is untouched


def test_top_k_keeps_the_k_largest():
    out = apply_top_k(torch.tensor([1.0, 4.0, 3.0, 2.0]), 2)
    assert out.tolist() == [-INF, 4.0, 3.0, -INF]
    assert apply_top_k(torch.tensor([1.0, 2.0]), 0).tolist() == [1.0, 2.0]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()
    keep = lambda p: torch.isfinite(apply_top_p(logits, p)).tolist()  # noqa: E731
    assert keep(0.4) == [False, True, False, False]
    assert keep(0.75) == [False, True, False, True]
    assert keep(0.85) == [True, True, False, True]
    assert keep(1.0) == [True] * 4


def test_temperature_zero_is_greedy_after_the_penalty():
    logits = torch.tensor([3.0, 2.9, 1.0])
    cfg = SamplingConfig(temperature=0)
    assert all(next_token(logits, torch.tensor([]), cfg, torch.Generator().manual_seed(s)) == 0 for s in range(5))
    penalised = SamplingConfig(temperature=0, repetition_penalty=2.0)
    assert next_token(logits, torch.tensor([0]), penalised) == 1


def test_documented_order_penalty_before_top_k():
    # penalty first: 3.0 -> 1.5 drops below 2.9, so top-1 keeps token 1; the other order would keep token 0
    cfg = SamplingConfig(temperature=1.0, top_k=1, repetition_penalty=2.0)
    g = torch.Generator().manual_seed(0)
    assert {next_token(torch.tensor([3.0, 2.9, 1.0]), torch.tensor([0]), cfg, g) for _ in range(20)} == {1}


def test_a_seed_reproduces_the_draws():
    logits = torch.zeros(50)
    cfg = SamplingConfig(temperature=1.0)
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (7, 7, 8))
    a = [next_token(logits, torch.tensor([]), cfg, g1) for _ in range(40)]
    b = [next_token(logits, torch.tensor([]), cfg, g2) for _ in range(40)]
    c = [next_token(logits, torch.tensor([]), cfg, g3) for _ in range(40)]
    assert a == b and a != c


@pytest.mark.parametrize("kw, flag", [
    ({"temperature": -0.1}, "--temperature"), ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"),
    ({"top_k": -1}, "--top-k"), ({"repetition_penalty": 0.9}, "--repetition-penalty"),
    ({"max_new_tokens": 0}, "--max-new-tokens"), ({"stop_at": "word"}, "--stop-at"),
    ({"repetition_window": -2}, "--repetition-window"),
])
def test_every_option_is_checked(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        SamplingConfig(**kw)


@pytest.mark.parametrize("text, stop_at, min_chars, keep", [
    ("Hello there. ", "sentence", 1, 12),
    ("Hello there.\n", "sentence", 1, 12),
    ('He said "no." ', "sentence", 1, 13),
    ("Wait! ", "sentence", 10, None),  # shorter than the minimum
    ("Mr.X", "sentence", 1, None),
    ("e.g. ", "sentence", 1, 4),
    ("one line\n", "line", 1, 8),
    ("one line\n", "sentence", 1, None),
    ("a\nb\n\n", "paragraph", 1, 3),
    ("a\nb\n", "paragraph", 1, None),
    ("Done. ", "none", 0, None),
])
def test_stop_boundaries(text, stop_at, min_chars, keep):
    assert stop_length(text, stop_at, min_chars) == keep


class Scripted(nn.Module):
    """A 'model' that puts all its mass on the next character of a script: its forward fills
    the cache, its ``decode`` (a decoding pass's signature) continues it."""

    def __init__(self, script: str, chars: str, context_len: int = 64) -> None:
        super().__init__()
        self.script, self.chars = script, chars
        self.cfg = GPTConfig(d_model=4, nhead=1, num_layers=1, context_len=context_len, vocab_size=len(chars))
        self.anchor = nn.Parameter(torch.zeros(1))
        self.seen = 0

    def forward(self, idx, cache=None, before=None):
        n = (cache[0][0].shape[2] if cache else 0) + idx.shape[1]
        self.seen += idx.shape[1]
        logits = torch.full((1, idx.shape[1], len(self.chars)), -10.0)
        logits[0, -1, self.chars.index(self.script[min(self.seen, len(self.script) - 1)])] = 10.0
        return logits, [(torch.zeros(1, 1, n, 1), torch.zeros(1, 1, n, 1))]

    def decode(self, tokens, positions, before, keys, values):
        logits, _ = self(tokens[:, None])
        return logits[:, 0], torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)


def run_script(script, **kw):
    chars = "".join(sorted(set(script)))
    model = Scripted(script, chars)
    cfg = SamplingConfig(temperature=0, **kw)
    prompt = [chars.index(script[0])]
    return list(generate(model, prompt, cfg, lambda i: chars[i], torch.Generator(), decoder=model.decode))


def test_streaming_stops_at_boundaries_and_never_takes_back_text():
    assert "".join(run_script("xHi there. Next one.\n", stop_at="sentence")) == "Hi there."
    assert "".join(run_script("xHi there. Next one.\nMore", stop_at="line")) == "Hi there. Next one."
    pieces = run_script("xa\nb\n\nc", stop_at="paragraph")
    assert "".join(pieces) == "a\nb"
    assert pieces == ["a", "\nb"]  # the newline waited until 'b' showed it was no boundary
    assert "".join(run_script("x" + "ab " * 20, max_new_tokens=7)) == "ab ab a"


def test_generation_runs_past_the_context_length():
    torch.manual_seed(0)
    model = GPT(GPTConfig(d_model=16, nhead=2, num_layers=1, context_len=8, vocab_size=5))
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=40)
    out = "".join(generate(model, [1, 2, 3], cfg, lambda i: "abcde"[i], torch.Generator().manual_seed(1)))
    again = "".join(generate(model, [1, 2, 3], cfg, lambda i: "abcde"[i], torch.Generator().manual_seed(1)))
    assert len(out) == 40 and out == again
    assert model.training  # generation restores the mode it found


def test_diversity_metrics_on_known_strings():
    assert words("Hi, hi.") == ["Hi", ",", "hi", "."]
    toks = words("the cat the cat")
    assert distinct_n(toks, 1) == 0.5 and math.isclose(distinct_n(toks, 2), 2 / 3) and distinct_n(toks, 3) == 1.0
    assert repeat_rate(words("a b c d a b c d"), 4) == pytest.approx(0.2)  # 5 four-grams, abcd twice
    short = diversity("one")  # too short for 2-grams: not defined (issue 19), where 0 read as 'all repeats'
    assert short["distinct_1"] == 1.0 and all(math.isnan(short[k]) for k in ("distinct_2", "distinct_3", "repeat_4"))
    loop = diversity("to be " * 30)
    assert loop["distinct_2"] < 0.05 and loop["repeat_4"] > 0.9


def test_settle_is_one_rule_for_stops_boundaries_length_and_what_is_held_back():
    from trainlab.chat.sampling import settle

    free = SamplingConfig(stop_at="none", max_new_tokens=50)
    assert settle("Hello wor", 9, free, ["world"]) == (6, None)  # "wor" may begin a stop: held back
    assert settle("Hello world!", 12, free, ["world"]) == (6, "stop")  # cut before the stop string
    assert settle("Hello ", 6, free) == (6, None)  # no boundary can come: nothing held back
    sentence = SamplingConfig(stop_at="sentence", max_new_tokens=50)
    assert settle("Hello ", 6, sentence) == (5, None)  # a space may be a boundary under way
    assert settle("Hi there. ", 10, sentence) == (9, "stop")
    assert settle("Hi there", 50, sentence) == (8, "length")  # max_new_tokens: all of it goes


def test_sample_rows_draws_what_next_token_draws_row_by_row():
    """The server's batched sampling gives each row the token next_token gives it alone, and
    leaves each row's generator where next_token leaves it, whatever rows share the batch:
    greedy and sampled rows mixed, 1 to 8 rows, sharp and flat distributions, over many draws."""
    from trainlab.chat.sampling import batchable, sample_rows

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        R = 1 + trial % 8
        logits = torch.randn(R, 65, generator=g) * float(torch.empty(1).uniform_(0.1, 8, generator=g))
        temps = [0.0 if (trial + i) % 5 == 0 else float(torch.empty(1).uniform_(0.2, 1.5, generator=g))
                 for i in range(R)]
        cfgs = [SamplingConfig(temperature=t) for t in temps]
        assert all(batchable(c) for c in cfgs)
        seeds = [trial * 10 + i for i in range(R)]
        alone = [torch.Generator().manual_seed(s) for s in seeds]
        batch = [torch.Generator().manual_seed(s) for s in seeds]
        for _ in range(3):  # the generators go on from where each left them
            want = [next_token(logits[i], torch.tensor([], dtype=torch.long), cfgs[i], alone[i]) for i in range(R)]
            assert sample_rows(logits, temps, batch) == want, (trial, temps)
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(alone, batch))
    assert not batchable(SamplingConfig(top_k=5)) and not batchable(SamplingConfig(top_p=0.9))
    assert not batchable(SamplingConfig(repetition_penalty=1.3))
