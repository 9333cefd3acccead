"""What a comparison reports, as a reviewer would accept it: proportions with Wilson
intervals, the paired difference of two models on the same problems (exact McNemar, the
Agresti-Min interval), and over seeds a test that pools the paired problems of every seed
with a bootstrap interval over seeds and problems.

Why these. Exact-match is a proportion: Wilson's interval (scipy's ``binomtest``) stays
sound near 0% and 100%, where the textbook one collapses. Both models answer the same
problems, so they are compared pairwise: only the problems they disagree on carry evidence
(b: only the first right, c: only the second), and McNemar's exact test asks whether c and
b differ more than a fair coin would make them. The interval of a paired difference is
Agresti and Min's (2005): the Wald interval of the matched pairs after adding 1/2 to each
cell of the 2x2 table, which keeps its coverage at small counts and at 0 or n discordant.

Over seeds. Each seed is one draw of training noise and a handful of seeds is all a CPU
affords, so no test on the per-seed differences alone is sound: a t-test on two seeds
that differ by the same amount has no spread and reports p = 0. The test here pools the
paired problems of every seed (stratified by seed: a problem's answers are paired within
its seed's two models) into one exact McNemar test on the summed discordant counts, which
is exact under the null that neither model is better on any seed. The effect's interval
is a two-stage bootstrap, as Agarwal et al. (2021) recommend for few runs: seeds drawn
with replacement, then each drawn seed's problems with replacement (a multinomial of its
b, c and agreeing counts). The verdict needs both: p < alpha, and an interval on one side
of 0, so seeds that disagree in sign get no verdict however many problems they pool.

A test split too small to tell the models apart gets no verdict either: with n problems,
even every one going one way gives p = 2 / 2**n, so fewer than ``min_problems()`` (6 at
alpha 0.05) can never reach significance, and more seeds re-ask the same problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

ALPHA = 0.05


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound near 0% and 100%). Written out rather than
    taken from scipy (``binomtest(...).proportion_ci(method="wilson")``, which the tests check
    it against): importing ``scipy.stats`` took 0.7-0.85 s, and every run's report pays it."""
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = successes / n, z * z / n
    centre = (p + z2 / 2) / (1 + z2)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n)) / (1 + z2)
    # at 0 and n successes the bounds are 0 and 1 exactly, not a rounding away
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


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
    return Paired(n, float(first.mean()), float(second.mean()), b, c, diff, agresti_min(b, c, n, z),
                  mcnemar_exact(b, c))


def agresti_min(b: int, c: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a paired difference of proportions, (c - b) / n, by Agresti and Min
    (2005): the Wald interval of matched pairs with 1/2 added to each of the four cells."""
    b2, c2, n2 = b + 0.5, c + 0.5, n + 2.0
    d = (c2 - b2) / n2
    se = math.sqrt(max(0.0, (b2 + c2) - (c2 - b2) ** 2 / n2)) / n2
    return max(-1.0, d - z * se), min(1.0, d + z * se)


def min_problems(alpha: float = ALPHA) -> int:
    """The fewest paired problems that can give an exact McNemar p < ``alpha``: n with every
    one of them going one way has p = 2 / 2**n."""
    n = 1
    while 2 * 0.5**n >= alpha:
        n += 1
    return n


@dataclass
class OverSeeds:
    """Paired problems pooled over seeds (second minus first): per-seed differences, their mean
    and sd, the summed discordant counts, the pooled exact McNemar p, and the two-stage
    bootstrap's 95% interval of the mean difference."""

    diffs: list[float]
    mean: float
    sd: float
    b: int
    c: int
    p: float
    ci: tuple[float, float]


def over_seeds(seeds: list[Paired], reps: int = 4000, seed: int = 0) -> OverSeeds:
    """The test over seeds from each seed's paired counts (module docstring: why this one)."""
    if not seeds:
        raise ValueError("over_seeds needs at least one seed")
    diffs = [s.diff for s in seeds]
    b, c = sum(s.b for s in seeds), sum(s.c for s in seeds)
    sd = float(np.std(diffs, ddof=1)) if len(seeds) > 1 else math.nan
    return OverSeeds(diffs, float(np.mean(diffs)), sd, b, c, mcnemar_exact(b, c), bootstrap_interval(seeds, reps, seed))


def bootstrap_interval(seeds: list[Paired], reps: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean paired difference over seeds, resampling seeds and
    then each drawn seed's problems (seeded: the same figures every time)."""
    rng = np.random.default_rng(seed)
    # each seed's problems as a multinomial over (only second right, only first right, agree)
    probs = np.array([[s.c / s.n, s.b / s.n, 1 - (s.b + s.c) / s.n] for s in seeds])  # (S, 3)
    sizes = np.array([s.n for s in seeds])  # (S,)
    drawn = rng.integers(len(seeds), size=(reps, len(seeds)))  # (reps, S): seeds with replacement
    counts = rng.multinomial(sizes[drawn], np.clip(probs[drawn], 0, 1))  # (reps, S, 3)
    means = ((counts[..., 0] - counts[..., 1]) / sizes[drawn]).mean(axis=1)  # (reps,)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def verdict(first: str, second: str, p: float, diff: float, alpha: float = ALPHA, *,
            ci: tuple[float, float] | None = None, problems: int | None = None) -> str:
    """One sentence: is ``second`` better, worse, or not distinguishable from ``first``? With
    ``problems`` (the distinct test problems) under ``min_problems``, no verdict: the split is
    too small; with ``ci`` spanning 0, none either: the seeds disagree."""
    if problems is not None and problems < min_problems(alpha):
        return (f"no verdict: {problems} test problem{'s' if problems != 1 else ''} cannot tell {second} and "
                f"{first} apart (even all going one way gives p >= {alpha:g}; at least {min_problems(alpha)} "
                f"are needed, and far more to see a difference of a few points)")
    if math.isnan(p) or p >= alpha or diff == 0:
        return f"{second} and {first} are not distinguishable at p < {alpha:g} (p {p_relation(p)})"
    if ci is not None and ci[0] <= 0.0 <= ci[1]:
        return (f"{second} and {first} are not distinguishable: the pooled test gives p {p_relation(p)} but the seeds "
                f"disagree (bootstrap 95% interval {ci[0] * 100:+.1f} to {ci[1] * 100:+.1f} points spans 0)")
    better = "better" if diff > 0 else "worse"
    return f"{second} is {better} than {first} at p < {alpha:g} (p {p_relation(p)}; {diff * 100:+.1f} points)"


def format_p(p: float) -> str:
    """A p-value as text. An exact test of thousands of one-sided disagreements gives a p below
    the smallest double, which comes back as 0.0: that prints as a bound, never as "p = 0"."""
    if math.isnan(p):
        return "n/a"
    if p < 1e-300:
        return "< 1e-300"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def p_relation(p: float) -> str:
    """What follows "p" in a sentence: "= 0.012", or "< 1e-300" for an underflowed one."""
    text = format_p(p)
    return text if text.startswith("<") else f"= {text}"
