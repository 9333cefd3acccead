"""Multiplication problems computed from an index, never stored as a list.

The problem space is every ordered pair ``(a, b)`` whose operands have between
``min_digits`` and ``max_digits`` digits (0 is not a 1-digit operand, so 1 to 3
digits is 999 x 999 = 998,001 pairs). Pair ``i`` is ``a = lo + i // width``,
``b = lo + i % width``; nothing per example is held in memory.

Split. Each ordered pair is hashed (splitmix64 of ``a << 32 | b``, a fixed salt,
independent of the training seed); the hash's fraction decides test, val or
train. The split of a pair therefore never depends on the digit range or the
seed: ``12*34`` is in the same split in a 1-2 digit run and a 2-3 digit run, and
the three splits never overlap. ``7*8`` and ``8*7`` are distinct problems and may
fall in different splits: inferring one from the other is commutativity, a
thing worth learning, not a leak.

Token format (the minGPT-adder way: fixed widths so positions mean something)::

    source  (encoder):  a's digits zero-padded to max_digits, '*', b's likewise
                        12*345 with max_digits 3  ->  0 1 2 * 3 4 5
    decoder input:      <bos> d0 d1 ... d(L-1)  <eos> <pad> ...
    target:             d0 d1 ... d(L-1) <eos> <pad> ...

Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``*`` 3, digits 0-9 are ids 4-13; so no
special token shares an id with a digit. PAD targets are ignored by the loss.

Answer order. ``natural`` (the default) writes the product most significant digit
first; ``reversed`` writes it least significant digit first (12*345 = 4140 becomes
``0 4 1 4 <eos>``). For decoder-only models reversed is the known winner (Lee et al.
2023, "Teaching Arithmetic to Small Transformers"): each digit then depends only on
lower digits and a carry just produced. Our encoder-decoder presumably needs that help
less, since its bidirectional encoder can work on the whole product before the
first digit is written, and our own probe (benchmarks/multiply_answer_order.py,
2-digit x 2-digit, plain model, 1,500 steps) favoured natural: exact-match on the
training slice 15.0% vs 8.4% (seed 0) and 6.6% vs 6.6% (seed 1); held-out digit
accuracy 70.1% vs 54.3% and 59.1% vs 51.3%. At 3-digit x 3-digit it held up
(benchmarks/multiply_accuracy.py, preset multiply-3digit, plain model): natural
reached 5.3% val exact-match after 15 minutes of its own training and 15.3% test
exact-match (95% CI 14.6-16.0%, 10,000 problems) after 25, where reversed had 1.6%
after about 15 minutes. One seed each; hence a default, not a rule. With the running-sum
loss (``--carry-loss``, issue 27) the order flips: reversed 72% against natural's 48% in
3-minute probes on 2 seeds (results/multiply-options/), so the ``multiply-3digit`` preset
now writes answers reversed, with the loss and ``--abacus``.

Answer width. By default a product is written with as many digits as it has, so in
natural order the first answer position is the 10^5 place of 123*999 = 122877 but the
10^4 place of 123*456 = 56088: the model must settle the length before anything else.
``answer_pad`` writes every product with 2 * max_digits digits, leading zeros kept
(``056088``), so each position always holds one place value, as the operands' already
do; the answer is still the product itself, with no intermediate steps. At 3x3 (plain
model, Muon, 6 minutes) it raised test exact-match from 12.7% to 16.2% (one seed),
and the ``multiply-3digit`` preset uses it.

Class mix. In a 1-3 digit range, 81% of the problems have two 3-digit operands, so a
uniform draw shows the short ones (which expose single partial products) rarely.
``class_power`` draws an operand-length class (digits of a, digits of b) with
probability proportional to its size to that power, then a problem uniformly within
it: 1 is the uniform draw, 0.75 (the ``multiply-3digit`` preset) gives 3x3 problems 68%
of the draws. Only training batches are reweighted; evaluation sets stay uniform.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from trainlab.multiply.config import (
    BOS,
    DIGIT0,
    EOS,
    PAD,
    SPLITS,
    TIMES,
    MultiplyDataConfig,
)

_SPLIT_SALT = np.uint64(0x5EED_CAFE_F00D_D00D)
# ranges of up to this many problems have their splits counted exactly (a second or less);
# past it (4-digit operands and up: 10^8 to 10^18 problems) the counts are the expected ones,
# since every draw and every evaluation set is found by hashing candidates, not by listing
EXACT_COUNT_LIMIT = 1 << 24


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each element (uint64 in, uint64 out)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def split_ids(a: np.ndarray, b: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 train, 1 val, 2 test for each ordered pair; depends on the pair alone."""
    key = (a.astype(np.uint64) << np.uint64(32)) | b.astype(np.uint64)
    u = (_splitmix64(key ^ _SPLIT_SALT) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    out = np.zeros(u.shape, dtype=np.int8)
    out[u < test_fraction + val_fraction] = 1
    out[u < test_fraction] = 2
    return out


class MultiplicationDataset:
    """Every ``a*b`` in a digit range, addressed by index; see the module docstring."""

    def __init__(self, cfg: MultiplyDataConfig, pad_width: int | None = None) -> None:
        """``pad_width``: operand width of the token format (default ``max_digits``); a
        model trained on 3 digits reads 1-digit problems as ``00a*00b``."""
        self.cfg = cfg
        self.pad_width = pad_width or cfg.max_digits
        self.lo = 1 if cfg.min_digits == 1 else 10 ** (cfg.min_digits - 1)
        self.hi = 10**cfg.max_digits - 1
        self.width = self.hi - self.lo + 1
        self.size = self.width * self.width
        self.src_len = 2 * self.pad_width + 1
        self.tgt_len = 2 * self.pad_width + 1  # longest product plus <eos>
        digits = np.arange(cfg.min_digits, cfg.max_digits + 1)
        lo = 10 ** (digits - 1)  # the smallest number of each length (1 for one digit)
        span = 10**digits - lo  # how many numbers have each length
        weight = (np.outer(span, span).astype(np.float64) ** cfg.class_power).ravel()  # per (a, b) length class
        self._classes = (lo, span, weight / weight.sum())
        self._counts: dict[str, int] | None = None
        self.counts_exact = self.size <= EXACT_COUNT_LIMIT

    def __len__(self) -> int:
        return self.size

    # -- index <-> pair -------------------------------------------------------------
    def pairs(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64)
        return self.lo + idx // self.width, self.lo + idx % self.width

    def split_of(self, idx: np.ndarray) -> np.ndarray:
        a, b = self.pairs(idx)
        return split_ids(a, b, self.cfg.val_fraction, self.cfg.test_fraction)

    def contains(self, a: int, b: int) -> bool:
        return self.lo <= a <= self.hi and self.lo <= b <= self.hi

    # -- splits ---------------------------------------------------------------------
    def _chunks(self, chunk: int = 1 << 18) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(indices, their split ids) over the whole space, a chunk at a time (bounded memory)."""
        for start in range(0, self.size, chunk):
            idx = np.arange(start, min(start + chunk, self.size), dtype=np.int64)
            yield idx, self.split_of(idx)

    def iter_split(self, split: str) -> Iterator[np.ndarray]:
        """Every index of one split, in index order, a chunk at a time."""
        sid = SPLITS.index(split)
        for idx, ids in self._chunks():
            yield idx[ids == sid]

    def split_counts(self) -> dict[str, int]:
        """Problems in each split: counted exactly up to ``EXACT_COUNT_LIMIT`` problems, past it
        the expected counts (``counts_exact`` says which): the split of a pair is a uniform
        hash, so they are off by about their square root, a relative 10^-4 or less there."""
        if self._counts is None:
            if self.counts_exact:
                counts = sum(np.bincount(ids, minlength=3) for _, ids in self._chunks())
            else:
                v, t = self.cfg.val_fraction, self.cfg.test_fraction
                counts = [round(self.size * (1 - v - t)), int(self.size * v), int(self.size * t)]
            self._counts = dict(zip(SPLITS, (int(c) for c in counts)))
        return self._counts

    def sample(self, split: str, n: int, rng: np.random.Generator, by_class: bool = False) -> np.ndarray:
        """n indices drawn with replacement from one split: uniformly, or with ``by_class``
        (training batches) weighted by operand-length class as ``cfg.class_power`` says."""
        sid = SPLITS.index(split)
        if self.split_counts()[split] == 0:
            raise ValueError(f"the {split} split of this digit range is empty")
        weighted = by_class and self.cfg.class_power != 1.0  # 1: the plain draw, the stream runs were made with
        out: list[np.ndarray] = []
        have = 0
        while have < n:
            m = int((n - have) * 1.3) + 16
            cand = self._draw_by_class(m, rng) if weighted else rng.integers(0, self.size, size=m, dtype=np.int64)
            cand = cand[self.split_of(cand) == sid]
            out.append(cand)
            have += len(cand)
        return np.concatenate(out)[:n]

    def _draw_by_class(self, m: int, rng: np.random.Generator) -> np.ndarray:
        """m indices of any split: a class (digits of a, digits of b) drawn with probability
        proportional to size ** class_power, then a and b uniformly among numbers of those lengths."""
        lo, span, prob = self._classes
        cls = rng.choice(len(prob), size=m, p=prob)
        da, db = cls // len(lo), cls % len(lo)
        a = lo[da] + rng.integers(0, span[da])
        b = lo[db] + rng.integers(0, span[db])
        return (a - self.lo) * self.width + (b - self.lo)

    def subset(self, split: str, n: int, seed: int = 0) -> np.ndarray:
        """A fixed set of up to n distinct indices of one split (sorted), for evaluation."""
        total = self.split_counts()[split]
        if n >= total:
            return np.concatenate(list(self.iter_split(split)))
        rng = np.random.default_rng([seed, 0xE7A1])
        chosen = np.zeros(0, dtype=np.int64)
        while len(chosen) < n:
            chosen = np.unique(np.concatenate([chosen, self.sample(split, n, rng)]))
        return np.sort(rng.choice(chosen, size=n, replace=False))

    # -- tensors --------------------------------------------------------------------
    def encode(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        a, b = self.pairs(idx)
        return encode_pairs(torch.from_numpy(a), torch.from_numpy(b), self.pad_width, self.cfg.answer_order,
                            self.cfg.answer_pad)


def _digits_lsd_first(x: torch.Tensor, n: int) -> torch.Tensor:
    powers = 10 ** torch.arange(n, dtype=torch.int64)
    return (x.unsqueeze(1) // powers) % 10  # (B, n)


def encode_pairs(a: torch.Tensor, b: torch.Tensor, max_digits: int, answer_order: str, answer_pad: bool = False
                 ) -> dict[str, torch.Tensor]:
    """Vectorised tokenisation of a batch of problems (see the module docstring);
    ``answer_pad`` writes every product with 2 * max_digits digits.

    Returns ``src`` (B, 2W+1), ``tgt_in`` and ``tgt_out`` (B, 2W+1), ``a``, ``b``, and
    ``running_sum`` (B, 2W+1): at each answer digit's position, the running sum of its
    column (``running_sums``), 0 at <eos> and padding.
    """
    a = a.to(torch.int64)
    b = b.to(torch.int64)
    w = max_digits
    times = torch.full((a.shape[0], 1), TIMES, dtype=torch.int64)
    src = torch.cat([_digits_lsd_first(a, w).flip(1) + DIGIT0, times, _digits_lsd_first(b, w).flip(1) + DIGIT0], 1)

    p = a * b
    n = 2 * w
    d = _digits_lsd_first(p, n)  # (B, n), least significant first
    if answer_pad:
        length = torch.full_like(p, n)  # (B,)
    else:
        length = (p.unsqueeze(1) >= 10 ** torch.arange(n, dtype=torch.int64)).sum(1).clamp(min=1)  # (B,)
    k = torch.arange(n + 1).unsqueeze(0)  # (1, n+1)
    sums = running_sums(a, b, w)  # (B, n), least significant first, like d
    if answer_order == "reversed":
        ans, col = d, sums
    else:
        place = (length.unsqueeze(1) - 1 - k[:, :n]).clamp(min=0)  # (B, n): the place each position writes
        ans, col = d.gather(1, place), sums.gather(1, place)
    ans = torch.cat([ans, torch.zeros_like(ans[:, :1])], 1) + DIGIT0  # (B, n+1)
    col = torch.cat([col, torch.zeros_like(col[:, :1])], 1)  # (B, n+1)
    length = length.unsqueeze(1)
    tgt_out = torch.where(k < length, ans, torch.where(k == length, EOS, PAD))
    tgt_in = torch.cat([torch.full_like(tgt_out[:, :1], BOS), tgt_out[:, :-1]], 1)
    running_sum = torch.where(k < length, col, 0)
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out, "a": a, "b": b, "running_sum": running_sum}


def running_sums(a: torch.Tensor, b: torch.Tensor, w: int) -> torch.Tensor:
    """Long multiplication's column sums, least significant place first (B, 2w): place p holds
    the sum of the partial products a_i * b_j with i + j = p plus the carry into p, so its
    last digit is the product's digit p and the rest (its tens) is the carry out. What the
    ``--carry-loss`` head is trained to name."""
    da, db = _digits_lsd_first(a, w), _digits_lsd_first(b, w)  # (B, w) each
    partial = da.unsqueeze(2) * db.unsqueeze(1)  # (B, w, w): a_i * b_j
    place = torch.arange(w).unsqueeze(1) + torch.arange(w).unsqueeze(0)  # (w, w): i + j
    columns = torch.zeros(a.shape[0], 2 * w, dtype=torch.int64)
    columns.index_add_(1, place.flatten(), partial.flatten(1))  # (B, 2w)
    out = torch.empty_like(columns)
    carry = torch.zeros_like(columns[:, 0])
    for p in range(2 * w):  # at most 18 columns: a loop reads plainer than a scan
        out[:, p] = columns[:, p] + carry
        carry = out[:, p] // 10
    return out


def decode_answer(tokens: list[int] | torch.Tensor, answer_order: str) -> int | None:
    """The integer a generated answer stands for, or None if it is not a number.

    Reads digits up to the first <eos>; a missing <eos>, or any non-digit before it,
    makes the answer invalid.
    """
    digits: list[int] = []
    for t in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens):
        if t == EOS:
            break
        if not DIGIT0 <= t < DIGIT0 + 10:
            return None
        digits.append(t - DIGIT0)
    else:
        return None
    if not digits:
        return None
    if answer_order == "reversed":
        digits.reverse()
    return int("".join(map(str, digits)))


def digit_count(x: np.ndarray | torch.Tensor) -> np.ndarray:
    x = np.asarray(x)
    return np.floor(np.log10(np.maximum(x, 1))).astype(np.int64) + 1
