"""Step timing and an ETA that evaluation and checkpoint pauses do not distort."""

from __future__ import annotations

import statistics
from collections import deque


class StepTimer:
    """Median of the recent pure training-step times.

    Only the time spent in training steps is recorded (the loop leaves evaluation,
    sampling and saving out), and the median ignores the odd slow step, so the ETA
    neither jumps after an evaluation nor drifts on one stall.
    """

    def __init__(self, window: int = 50) -> None:
        self.times: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self.times.append(seconds)

    def seconds_per_step(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    def eta(self, remaining_steps: int | None) -> float | None:
        sps = self.seconds_per_step()
        if sps is None or remaining_steps is None:
            return None
        return sps * max(remaining_steps, 0)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
