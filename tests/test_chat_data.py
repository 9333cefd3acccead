"""Character vocabulary, corpus loading (in memory and memory-mapped), the contiguous split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainlab.chat import data as chat_data
from trainlab.chat.data import CharVocab, TextCorpus
from trainlab.config import UsageError

TEXT = "Hello, wörld!\nZoë said: 日本語 is fine.\n" * 20


def test_vocab_round_trip_and_persistence():
    v = CharVocab.from_text(TEXT)
    assert v.chars == "".join(sorted(set(TEXT)))
    assert v.decode(v.encode(TEXT)) == TEXT
    again = CharVocab.from_json(v.to_json())
    assert again.chars == v.chars and json.loads(v.to_json())["kind"] == "char"
    assert np.array_equal(again.encode(TEXT), v.encode(TEXT))
    assert v.dtype == np.uint8
    big = CharVocab("".join(chr(c) for c in range(0x100, 0x100 + 300)))
    assert big.dtype == np.uint16 and big.decode(big.encode(big.chars)) == big.chars


def test_unknown_characters_are_reported_not_crashing():
    v = CharVocab.from_text("abc \n")
    ids, lacking = v.encode_known("a€b€c✓")
    assert v.decode(ids) == "abc" and lacking == "€✓"
    with pytest.raises(KeyError):
        v.encode("a€")
    with pytest.raises(ValueError):
        CharVocab("ba")


def test_split_is_contiguous_and_windows_stay_inside_their_span():
    c = TextCorpus.from_text(TEXT, val_fraction=0.25)
    n = len(TEXT)
    assert len(c.train) + len(c.val) == n and len(c.train) == round(n * 0.75)
    assert c.vocab.decode(c.train) + c.vocab.decode(c.val) == TEXT
    rng = np.random.default_rng(0)
    starts = c.random_starts("train", 5000, 16, rng)
    assert starts.min() >= 0 and starts.max() + 17 <= len(c.train)  # never reads into val
    b = c.windows("train", starts[:4], 16)
    assert b["x"].shape == (4, 16) and b["y"].shape == (4, 16)
    assert np.array_equal(b["x"][:, 1:], b["y"][:, :-1])  # target = input shifted by one
    assert c.vocab.decode(b["x"][0]) == TEXT[starts[0]:starts[0] + 16]


def test_large_corpus_is_memory_mapped_and_identical(tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    monkeypatch.setattr(chat_data, "CHUNK_BYTES", 7)  # multi-byte characters straddle chunk edges
    plain = TextCorpus.load(path, 0.1)
    mapped = TextCorpus.load(path, 0.1, cache_dir=tmp_path / "cache", mmap_bytes=10)
    assert isinstance(mapped.tokens, np.memmap) and not isinstance(plain.tokens, np.memmap)
    assert mapped.vocab.chars == plain.vocab.chars and mapped.sha256 == plain.sha256
    assert np.array_equal(np.asarray(mapped.tokens), plain.tokens)
    assert np.array_equal(np.asarray(mapped.val), plain.val)
    cache = next((tmp_path / "cache").iterdir())
    before = cache.stat().st_mtime_ns
    TextCorpus.load(path, 0.1, cache_dir=tmp_path / "cache", mmap_bytes=10)  # reuses the cache
    assert cache.stat().st_mtime_ns == before and len(list((tmp_path / "cache").iterdir())) == 1


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"caf\xe9 au lait", "is not UTF-8"),
])
def test_bad_corpus_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        TextCorpus.load(path)


def test_missing_or_folder_corpus(tmp_path):
    with pytest.raises(UsageError, match="cannot read"):
        TextCorpus.load(tmp_path / "nope.txt")
    with pytest.raises(UsageError, match="cannot read"):
        TextCorpus.load(tmp_path)


def test_too_short_for_the_context():
    c = TextCorpus.from_text("x" * 100, val_fraction=0.1)
    c.check_windows(8)
    with pytest.raises(UsageError, match="too short"):
        c.check_windows(10)  # val holds 10 characters, a window needs 11


@pytest.mark.parametrize("context", [16, 100, 200])
def test_a_shuffled_pass_reads_every_character_once(context):
    c = TextCorpus.from_text(TEXT * 3, val_fraction=0.1)
    n = len(c.train)
    k, offsets = c.pass_windows("train", context)
    seen = set()
    for seed in range(6):
        starts = c.pass_starts("train", context, np.random.default_rng(seed))
        assert len(starts) == k == len(set(starts.tolist()))
        assert starts.min() >= 0 and starts.max() + context + 1 <= n  # never reads into val
        ordered = np.sort(starts)
        assert np.all(np.diff(ordered) == context)  # side by side: each target character once
        assert ordered[0] < offsets <= context
        seen.add(tuple(starts.tolist()))
    assert len(seen) == 6  # each pass its own offset and order
    # the windows tile all but less than two windows' worth of the span
    assert n - k * context < 2 * context + 1


def test_a_span_too_short_for_two_windows_gives_one():
    c = TextCorpus.from_text("abcdefghij" * 5, val_fraction=0.2)  # 40 train characters
    assert c.pass_windows("train", 30) == (1, 10)
    starts = c.pass_starts("train", 30, np.random.default_rng(0))
    assert len(starts) == 1 and 0 <= starts[0] <= len(c.train) - 31
