"""Free-running evaluation of multiplication models, in one place: the task's evaluations
during training, ``multiply evaluate`` and ``ask`` (``inference.py``), the end-of-run test
score and ``multiply compare`` all decode and score problems through these functions.

Decoding is greedy and free-running: the model reads its own previous digits, never the
answer's, and stops at EOS or at the longest answer the range allows, so it cannot learn
the answer's length from anywhere but the operands."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainlab.config import UsageError
from trainlab.engine.task import Evaluation
from trainlab.multiply.data import MultiplicationDataset, decode_answer, digit_count
from trainlab.multiply.models import SimpleTransformer, greedy_decode
from trainlab.stats import wilson_interval


@dataclass
class DecodeResult:
    a: np.ndarray
    b: np.ndarray
    predicted: list[int | None]  # None: not a well-formed number
    correct: np.ndarray  # bool per problem
    digit_hits: int
    digit_total: int


def decode_problems(model: SimpleTransformer, dataset: MultiplicationDataset, idx: np.ndarray,
                    batch_size: int = 1024) -> DecodeResult:
    """Free-running greedy answers to the problems ``idx``, and how right they are."""
    order = dataset.cfg.answer_order
    width = 2 * dataset.pad_width if dataset.cfg.answer_pad else 0  # digits compared, as written
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds: list[int | None] = []
    hits = total = 0
    for start in range(0, len(idx), batch_size):
        enc = dataset.encode(idx[start:start + batch_size])
        out = greedy_decode(model, enc["src"].to(device)).cpu()
        for row, a, b in zip(out.tolist(), enc["a"].tolist(), enc["b"].tolist()):
            p = decode_answer(row, order)
            preds.append(p)
            truth = str(a * b).zfill(width)
            guess = "" if p is None else str(p).zfill(width)
            if order == "reversed":
                truth, guess = truth[::-1], guess[::-1]
            hits += sum(x == y for x, y in zip(truth, guess))
            total += max(len(truth), len(guess))
    model.train(was_training)
    a, b = dataset.pairs(idx)
    correct = np.array([p == x * y for p, x, y in zip(preds, a.tolist(), b.tolist())], dtype=bool)
    return DecodeResult(a, b, preds, correct, hits, total)


def summarize(result: DecodeResult, n_mistakes: int = 3) -> Evaluation:
    """Exact-match overall and per operand-length class, digit accuracy, a few mistakes."""
    metrics = {
        "exact_match": float(result.correct.mean()) if len(result.correct) else 0.0,
        "digit_accuracy": result.digit_hits / max(1, result.digit_total),
    }
    da, db = digit_count(result.a), digit_count(result.b)
    for x in sorted(set(da.tolist())):
        for y in sorted(set(db.tolist())):
            sel = (da == x) & (db == y)
            if sel.any():
                metrics[f"exact_match_{x}x{y}"] = float(result.correct[sel].mean())
    lines = []
    for i in np.flatnonzero(~result.correct)[:n_mistakes]:
        got = "(no number)" if result.predicted[i] is None else str(result.predicted[i])
        lines.append(f"{result.a[i]}*{result.b[i]} = {result.a[i] * result.b[i]}, model said {got}")
    return Evaluation(metrics, lines)


def evaluate_members(models: dict[str, SimpleTransformer], dataset: MultiplicationDataset, split: str, n: int,
                     seed: int) -> dict[str, dict[str, float]]:
    """Exact-match (with its Wilson interval) and digit accuracy of every model on the same
    ``n`` problems of ``split``, drawn with ``seed``."""
    idx = dataset.subset(split, n, seed=seed)
    if len(idx) == 0:
        raise UsageError(f"the {split} split of digits {dataset.cfg.min_digits}-{dataset.cfg.max_digits} is empty")
    out = {}
    for name, model in models.items():
        r = decode_problems(model, dataset, idx)
        k = int(r.correct.sum())
        lo, hi = wilson_interval(k, len(idx))
        out[name] = {"n": len(idx), "correct": k, "exact_match": k / len(idx), "ci_low": lo, "ci_high": hi,
                     "digit_accuracy": r.digit_hits / max(1, r.digit_total)}
    return out
