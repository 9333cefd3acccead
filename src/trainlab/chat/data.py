"""Character corpora: vocabulary, compact token arrays, a contiguous train/val split.

Format. Any UTF-8 text; the original used TV transcripts written as ``NAME: line``,
tinyshakespeare writes ``NAME:`` on a line of its own with the speech below. The
vocabulary is the sorted set of characters of the whole corpus, saved as
``vocab.json`` beside every checkpoint; a character's id is its position in it. There
are no special tokens: a character LM trains on full windows only, so nothing is ever
padded and no id is shared.

Split. Train is the first ``1 - val_fraction`` of the characters, val the rest: two
contiguous spans, so no validation window overlaps a training one. (Random windows
split at random would put the same lines on both sides and flatter the val loss.)

Windows. A training batch is ``batch_size`` windows of ``context_len + 1`` characters
inside the train span; the input is the first ``context_len``, the target the last
``context_len`` (shifted by one). ``--windows random`` draws each window's offset anywhere,
from ``rng(seed, step)``. ``--windows shuffled`` reads the text in passes: pass ``p`` cuts
the span into ``context_len``-character windows from an offset below ``context_len``, both
the offset and the order drawn from ``rng(seed, 1, p)``, and window ``i`` of the run is the
``i % K``-th of pass ``i // K`` (``K`` windows a pass). Every character is then a target
once a pass, where random offsets read some parts of the text several times as often as
others. Either way a run's data position is its step count.

Storage. Tokens are uint8 when the vocabulary fits in 256 ids, else uint16. A corpus
larger than ``MMAP_BYTES`` is decoded in chunks into a cache file named by its sha256
(``<cache_dir>/<sha256>.<dtype>``) and memory-mapped, so a large text never sits in
memory as a Python string.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from trainlab.config import UsageError

MMAP_BYTES = 64 * 2**20
CHUNK_BYTES = 8 * 2**20


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


class CharVocab:
    """Characters <-> ids; ids are positions in the sorted character list."""

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise ValueError("vocabulary characters must be unique and sorted")
        if not 0 < len(chars) <= 2**16:
            raise ValueError(f"a vocabulary needs 1 to 65536 characters, got {len(chars)}")
        self.chars = chars
        self._cps = _codepoints(chars)  # sorted, so searchsorted maps a character to its id
        self._array = np.array(list(chars))

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> type:
        return np.uint8 if self.size <= 256 else np.uint16

    def encode_known(self, text: str) -> tuple[np.ndarray, str]:
        """(ids of the characters the vocabulary has, the distinct ones it lacks in order seen)."""
        cps = _codepoints(text)
        pos = np.searchsorted(self._cps, cps)
        known = self._cps[np.minimum(pos, len(self._cps) - 1)] == cps
        lacking = "".join(dict.fromkeys(chr(c) for c in cps[~known].tolist()))
        return pos[known].astype(self.dtype), lacking

    def encode(self, text: str) -> np.ndarray:
        ids, lacking = self.encode_known(text)
        if lacking:
            raise KeyError(f"characters not in the vocabulary: {lacking!r}")
        return ids

    def decode(self, ids) -> str:
        return "".join(self._array[np.asarray(ids, dtype=np.int64)].tolist())

    def to_json(self) -> str:
        return json.dumps({"kind": "char", "chars": self.chars}, indent=2, ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str) -> "CharVocab":
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("kind") != "char" or not isinstance(data.get("chars"), str):
            raise ValueError("not a character vocabulary")
        return cls(data["chars"])


def _read_error(path: Path, e: Exception) -> UsageError:
    if isinstance(e, UnicodeDecodeError):
        return UsageError(f"--text: {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} cannot be decoded)")
    return UsageError(f"--text: cannot read {path}: {getattr(e, 'strerror', None) or e}")


def _chunks(path: Path):
    """(raw bytes, decoded text) chunks of a UTF-8 file; a character split across chunks is joined."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    with open(path, "rb") as f:
        while True:
            raw = f.read(CHUNK_BYTES)
            yield raw, decoder.decode(raw, final=not raw)
            if not raw:
                return


class TextCorpus:
    """A tokenized text and its contiguous split; see the module docstring."""

    def __init__(self, tokens: np.ndarray, vocab: CharVocab, sha256: str, val_fraction: float,
                 source: str = "") -> None:
        self.tokens, self.vocab, self.sha256, self.source = tokens, vocab, sha256, source
        self.split_at = int(round(len(tokens) * (1.0 - val_fraction)))
        self.train = tokens[:self.split_at]
        self.val = tokens[self.split_at:]

    @classmethod
    def from_text(cls, text: str, val_fraction: float = 0.1, vocab: CharVocab | None = None) -> "TextCorpus":
        vocab = vocab or CharVocab.from_text(text)
        return cls(vocab.encode(text), vocab, hashlib.sha256(text.encode("utf-8")).hexdigest(), val_fraction)

    @classmethod
    def load(cls, path: str | Path, val_fraction: float = 0.1, cache_dir: str | Path | None = None,
             mmap_bytes: int = MMAP_BYTES) -> "TextCorpus":
        """Read a UTF-8 file; past ``mmap_bytes`` (and with a ``cache_dir``) memory-map it."""
        path = Path(path)
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise IsADirectoryError(21, "not a regular file")
            if size == 0:
                raise UsageError(f"--text: {path} is empty")
            if cache_dir is None or size <= mmap_bytes:
                raw = path.read_bytes()
                corpus = cls.from_text(raw.decode("utf-8"), val_fraction)
            else:
                corpus = cls._load_mapped(path, val_fraction, Path(cache_dir))
        except (OSError, UnicodeDecodeError) as e:
            raise _read_error(path, e) from None
        corpus.source = str(path)
        return corpus

    @classmethod
    def _load_mapped(cls, path: Path, val_fraction: float, cache_dir: Path) -> "TextCorpus":
        digest, seen, n = hashlib.sha256(), np.zeros(0, dtype="<u4"), 0
        for raw, text in _chunks(path):  # pass 1: checksum, character set, length
            digest.update(raw)
            cps = _codepoints(text)
            seen = np.union1d(seen, np.unique(cps))
            n += len(cps)
        vocab = CharVocab("".join(chr(c) for c in seen.tolist()))
        sha = digest.hexdigest()
        dtype = np.dtype(vocab.dtype)
        cache = cache_dir / f"{sha}.{dtype.name}"
        if not (cache.is_file() and cache.stat().st_size == n * dtype.itemsize):
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".tmp-{os.getpid()}-{cache.name}")
            out = np.memmap(tmp, dtype=dtype, mode="w+", shape=(n,))
            at = 0
            for _, text in _chunks(path):  # pass 2: encode into the cache file
                ids = vocab.encode(text)
                out[at:at + len(ids)] = ids
                at += len(ids)
            out.flush()
            del out
            os.replace(tmp, cache)
        tokens = np.memmap(cache, dtype=dtype, mode="r", shape=(n,))
        return cls(tokens, vocab, sha, val_fraction)

    def check_windows(self, context_len: int) -> None:
        """Both spans must hold at least one full window of ``context_len + 1`` characters."""
        need = context_len + 1
        if len(self.train) < need or len(self.val) < need:
            raise UsageError(
                f"--text: {self.source or 'the corpus'} is too short: {len(self.tokens):,} characters give "
                f"{len(self.train):,} train and {len(self.val):,} val, and each needs at least {need} "
                f"(--context-len {context_len} + 1)")

    def windows(self, split: str, starts: np.ndarray, context_len: int) -> dict[str, torch.Tensor]:
        """Input and target windows at ``starts`` (offsets into the split's span)."""
        data = self.train if split == "train" else self.val
        rows = np.stack([np.asarray(data[s:s + context_len + 1]) for s in starts.tolist()]).astype(np.int64)
        t = torch.from_numpy(rows)  # (B, T+1)
        return {"x": t[:, :-1], "y": t[:, 1:]}

    def random_starts(self, split: str, n: int, context_len: int, rng: np.random.Generator) -> np.ndarray:
        data = self.train if split == "train" else self.val
        return rng.integers(0, len(data) - context_len, size=n)

    def pass_windows(self, split: str, context_len: int) -> tuple[int, int]:
        """(K, offsets): a pass over ``split`` is K windows, from an offset below ``offsets``.
        The last window of a pass starts at most at ``len - context_len - 1``, as a random one
        does; a span too short for two windows gives one, anywhere."""
        n = len(self.train if split == "train" else self.val)
        k = max(1, (n - 1 - context_len) // context_len)
        return k, min(context_len, n - k * context_len)

    def pass_starts(self, split: str, context_len: int, rng: np.random.Generator) -> np.ndarray:
        """The starts of one pass over ``split``, in the order it reads them (module docstring)."""
        k, offsets = self.pass_windows(split, context_len)
        offset = int(rng.integers(0, offsets))
        return offset + context_len * rng.permutation(k)

    def info(self) -> dict:
        return {"sha256": self.sha256, "characters": int(len(self.tokens)), "train_characters": int(len(self.train)),
                "val_characters": int(len(self.val)), "vocab_size": self.vocab.size}
