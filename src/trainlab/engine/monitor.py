"""Watching a run: the loss trend and its spikes, LR cuts on a plateau, and an honest ETA.

All three keep their state in plain numbers and lists, saved in every checkpoint, so a
resumed run continues their windows, counters and smoothing exactly.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

# the ETA reports the plain median until it has this many step times
ETA_WARMUP = 10
# a spike needs this many losses of history (or a full window, if it is shorter)
MIN_HISTORY = 20


class LossTrend:
    """A moving average over the last ``window`` losses, an EMA, and spike detection.

    A loss is a spike when it is not finite, or when it lies more than ``sigma``
    standard deviations above the window's mean. Spikes enter the window clipped to
    that bound: one wild value cannot inflate the spread enough to hide the next, and
    a real, lasting rise in the loss still moves the window (and stops counting as
    spikes) within a few dozen steps.
    """

    def __init__(self, window: int, sigma: float) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.sigma = sigma
        self.alpha = 2.0 / (window + 1)  # the EMA whose span matches the window
        self.ema: float | None = None
        self.spikes = 0

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    def observe(self, loss: float) -> str | None:
        """Record one step's loss; returns None, or why it is a spike."""
        if not math.isfinite(loss):
            self.spikes += 1
            return f"loss is {loss}"
        why, kept = None, loss
        if len(self.values) >= min(MIN_HISTORY, self.values.maxlen or MIN_HISTORY):
            mean = sum(self.values) / len(self.values)
            spread = math.sqrt(sum((v - mean) ** 2 for v in self.values) / len(self.values))
            sd = max(spread, 1e-8 + 1e-4 * abs(mean))  # a flat window must not flag every wobble
            bound = mean + self.sigma * sd
            if loss > bound:
                self.spikes += 1
                why = f"loss {loss:.4g} is {(loss - mean) / sd:.1f} sd above the {len(self.values)}-step mean {mean:.4g}"
                kept = bound
        self.values.append(kept)
        self.ema = loss if self.ema is None else self.ema + self.alpha * (loss - self.ema)
        return why

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "ema": self.ema, "spikes": self.spikes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values.clear()
        self.values.extend(float(v) for v in state["values"])  # a changed window keeps the newest
        self.ema = None if state["ema"] is None else float(state["ema"])
        self.spikes = int(state["spikes"])


class Plateau:
    """ReduceLROnPlateau for a schedule: cuts a scale that multiplies the warmup/cosine LR.

    After ``patience`` evaluations in a row without the val loss improving on its best
    by a relative ``threshold``, the LR is multiplied by ``factor``, but never below
    ``min_lr`` (a cut that would go below it stops there; at it, no more cuts).
    ``patience`` 0 turns it off."""

    def __init__(self, patience: int, factor: float, min_lr: float, threshold: float = 1e-3) -> None:
        self.patience, self.factor, self.min_lr, self.threshold = patience, factor, min_lr, threshold
        self.best: float | None = None
        self.bad = 0  # evaluations since the last improvement (or cut)
        self.scale = 1.0
        self.cuts = 0

    def observe(self, val_loss: float, lr_now: float) -> bool:
        """After an evaluation; True when the LR is cut (``scale`` then holds the new factor)."""
        if self.patience == 0 or not math.isfinite(val_loss):
            return False
        if self.best is None or val_loss < self.best - self.threshold * abs(self.best):
            self.best, self.bad = val_loss, 0
            return False
        self.bad += 1
        if self.bad < self.patience:
            return False
        self.bad = 0
        new_lr = max(lr_now * self.factor, self.min_lr)
        if not 0 < new_lr < lr_now:
            return False
        self.scale *= new_lr / lr_now
        self.cuts += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad, "scale": self.scale, "cuts": self.cuts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = None if state["best"] is None else float(state["best"])
        self.bad, self.scale, self.cuts = int(state["bad"]), float(state["scale"]), int(state["cuts"])


class Eta:
    """Time left, from the median of recent training-step times, smoothed.

    The loop records only the time of training steps, so an evaluation, a sample or a
    checkpoint never reads as a slow step; the median shrugs off the odd stall or
    outlier, and an EMA over the medians keeps the figure from twitching. Pauses
    (evaluation, sampling, saving) are averaged per kind, and the ETA adds the ones
    still due at their measured cost.
    """

    def __init__(self, window: int = 50, smoothing: float = 0.1) -> None:
        self.times: deque[float] = deque(maxlen=window)
        self.smoothing = smoothing
        self.smoothed: float | None = None
        self.pauses: dict[str, list[float]] = {}  # kind -> [total seconds, count]

    def add_step(self, seconds: float) -> None:
        self.times.append(seconds)
        median = statistics.median(self.times)
        if len(self.times) < ETA_WARMUP:  # too few steps to smooth: the slow first ones would linger
            self.smoothed = median
        else:
            self.smoothed += self.smoothing * (median - self.smoothed)

    def add_pause(self, kind: str, seconds: float) -> None:
        total = self.pauses.setdefault(kind, [0.0, 0])
        total[0] += seconds
        total[1] += 1

    def seconds_per_step(self) -> float | None:
        return self.smoothed

    def eta(self, remaining_steps: int | None, pauses_due: dict[str, int] | None = None) -> float | None:
        """Seconds to go; None without a step rate or a step count to reach."""
        if self.smoothed is None or remaining_steps is None:
            return None
        pauses = sum(total / n * pauses_due.get(kind, 0) for kind, (total, n) in self.pauses.items()
                     if n) if pauses_due else 0.0
        return self.smoothed * max(remaining_steps, 0) + pauses

    def rate(self) -> str:
        """The speed, for runs without --max-steps."""
        if not self.smoothed:
            return "?"
        return f"{1 / self.smoothed:.2f} it/s" if self.smoothed < 1 else f"{self.smoothed:.2f} s/it"

    def state_dict(self) -> dict[str, Any]:
        return {"times": list(self.times), "smoothed": self.smoothed,
                "pauses": {k: list(v) for k, v in self.pauses.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.times.clear()
        self.times.extend(float(t) for t in state.get("times", []))
        self.smoothed = None if state.get("smoothed") is None else float(state["smoothed"])
        self.pauses = {k: [float(v[0]), int(v[1])] for k, v in state.get("pauses", {}).items()}


def due(step: int, max_steps: int | None, every: int) -> int:
    """How many of the multiples of ``every`` in (step, max_steps], plus the final one at
    max_steps when it is not a multiple: the evaluations (or saves, samples) still to come."""
    if max_steps is None or every <= 0 or step >= max_steps:
        return 0
    return max_steps // every - step // every + (max_steps % every != 0)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def budget_lines(budget: dict[str, Any] | None) -> list[str]:
    """A --minutes run's budget for its report: the minutes, each fit, the time it took."""
    if not budget:
        return []
    fits = []
    for f in budget.get("fits", []):
        if f.get("kind") == "extension":
            fits.append(f"extended by {f['minutes']:g} minutes at step {f['at_step']:,}")
        elif f.get("kind") == "refit" and not f.get("refitted"):
            fits.append(f"checked at step {f['at_step']:,} ({f['pace']:.3g} s a step): kept")
        else:
            fits.append(f"{f['kind']} at step {f['at_step']:,}: {f['steps']:,} steps at {f['pace']:.3g} s a step")
    wall = budget.get("to_report")
    took = f"; {wall:.1f} s from the command's start to this report" if wall else ""
    return [f"Time budget: {budget['minutes']:g} minutes{took}. Fits: " + "; ".join(fits) + "."]
