"""Diversity of generated text, on word tokens (runs of letters and digits, or single
punctuation marks; case kept).

- ``distinct_n`` (Li et al. 2016): distinct n-grams / all n-grams. 1.0 = no n-gram
  repeats; a model stuck in a loop drives it toward 0.
- ``repeat_4``: the share of 4-gram occurrences that repeat an earlier 4-gram of the
  same text, i.e. ``1 - distinct_4`` (Welleck et al. 2019's seq-rep-4).

A text too short to hold one n-gram scores NaN for that n (not defined): 0 would read as a
model stuck in a loop. TensorBoard leaves such points out.
"""

from __future__ import annotations

import math
import re

WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return WORD.findall(text)


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams; NaN (not defined) for fewer than n words: 0 would read
    as 'nothing but repetition', the opposite of what a short sample shows."""
    grams = ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else math.nan


def repeat_rate(tokens: list[str], n: int = 4) -> float:
    """Share of repeated n-grams; NaN (not defined) for fewer than n words, like ``distinct_n``."""
    grams = ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else math.nan


def diversity(text: str) -> dict[str, float]:
    toks = words(text)
    return {"distinct_1": distinct_n(toks, 1), "distinct_2": distinct_n(toks, 2), "distinct_3": distinct_n(toks, 3),
            "repeat_4": repeat_rate(toks, 4)}
