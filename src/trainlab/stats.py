"""What a comparison reports, as a reviewer would accept it: proportions with Wilson
intervals, the paired difference of two models on the same problems (exact McNemar), and
the difference over seeds (mean, sd, a paired t-test, a t interval).

Why these. Exact-match is a proportion: Wilson's interval stays sound near 0% and 100%,
where the textbook one collapses. Both models answer the same problems, so they are
compared pairwise: only the problems they disagree on carry evidence (b: only the first
right, c: only the second), and McNemar's exact test asks whether c and b differ more
than a fair coin would make them. A single training run is one draw of seed noise, so the
verdict rests on the difference over seeds (each seed's difference is one observation),
tested with a paired t-test; with one seed only, McNemar's test is all there is, and the
report says so. scipy provides the exact distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0% and 100%)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under the null the c of the b + c discordant pairs
    are Binomial(b + c, 1/2). 1.0 when there is no discordant pair."""
    from scipy.stats import binomtest

    n = b + c
    return 1.0 if n == 0 else float(binomtest(c, n, 0.5).pvalue)


@dataclass
class Paired:
    """Two models on the same n problems: accuracies, discordant counts, the difference
    (second minus first) with a 95% interval, and McNemar's exact p."""

    n: int
    first: float
    second: float
    b: int  # first right, second wrong
    c: int  # first wrong, second right
    diff: float
    ci: tuple[float, float]
    p: float


def paired(first: np.ndarray, second: np.ndarray, z: float = 1.96) -> Paired:
    """``first`` and ``second``: correct (bool) per problem, in the same order."""
    first, second = np.asarray(first, bool), np.asarray(second, bool)
    if first.shape != second.shape or first.size == 0:
        raise ValueError("paired needs two equally long, non-empty arrays")
    n = first.size
    b = int((first & ~second).sum())
    c = int((~first & second).sum())
    diff = (c - b) / n
    # the variance of a paired difference of proportions (Agresti & Caffo's Wald form)
    se = math.sqrt(max(0.0, (b + c) - (c - b) ** 2 / n)) / n
    return Paired(n, float(first.mean()), float(second.mean()), b, c, diff, (diff - z * se, diff + z * se),
                  mcnemar_exact(b, c))


@dataclass
class OverSeeds:
    """Per-seed differences (second minus first): mean, sd, a paired t-test and its 95% interval."""

    diffs: list[float]
    mean: float
    sd: float
    p: float
    ci: tuple[float, float]


def over_seeds(diffs: list[float]) -> OverSeeds:
    """The t-test over seeds. With one seed there is no spread to test: p is NaN. When every
    seed gives the same difference the spread is 0: p is 0 if it is not 0, else 1."""
    from scipy.stats import t as student

    d = np.asarray(diffs, float)
    mean = float(d.mean())
    if d.size < 2:
        return OverSeeds(list(diffs), mean, math.nan, math.nan, (math.nan, math.nan))
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        return OverSeeds(list(diffs), mean, 0.0, 1.0 if mean == 0 else 0.0, (mean, mean))
    se = sd / math.sqrt(d.size)
    tval = mean / se
    p = float(2 * student.sf(abs(tval), d.size - 1))
    half = float(student.ppf(0.975, d.size - 1)) * se
    return OverSeeds(list(diffs), mean, sd, p, (mean - half, mean + half))


def verdict(first: str, second: str, p: float, diff: float, alpha: float = ALPHA) -> str:
    """One sentence: is ``second`` better, worse, or not distinguishable from ``first``?"""
    if math.isnan(p) or p >= alpha or diff == 0:
        return f"{second} and {first} are not distinguishable at p < {alpha:g} (p = {_p(p)})"
    better = "better" if diff > 0 else "worse"
    return f"{second} is {better} than {first} at p < {alpha:g} (p = {_p(p)}; {diff * 100:+.1f} points)"


def _p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"
