"""How many threads a small, repeated forward pass should use, found by timing it.

Batch-1 decoding moves little data per call, so OpenMP's threads cost more than they
bring once the cores are busy: beside a training job on 2 cores, one 14M-model forward
took 316 ms with 2 threads and 6.4 ms with 1 (4.6 ms with 2 on a quiet machine). No fixed
count is right for both, so ``ThreadTuner`` times the step it wraps under each candidate
count now and then, and keeps the fastest: at the start, every ``every`` steps, and at
once when steps turn three times slower than usual (another job started).

Thread counts can change the numbers: some kernels split a reduction across threads for
some shapes, so 1 and 2 threads may round a row differently. The server checks this at
warm-up (``chat.slots.check_exactness``) and pins the thread count where they differ, so a
stream's text never depends on the count it was given; ``generate`` and ``repl`` promise
no such thing.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import torch


class ThreadTuner:
    """Wraps a step (``run(fn)``) and sets ``torch.set_num_threads`` to the fastest candidate."""

    def __init__(self, candidates: list[int] | None = None, every: int = 500, probe: int = 5,
                 margin: float = 0.1, enabled: bool = True) -> None:
        cores = os.cpu_count() or 1
        self.candidates = candidates or sorted({1, max(1, cores // 2), cores})
        self.every, self.probe, self.margin, self.enabled = every, probe, margin, enabled and len(self.candidates) > 1
        self.current = self.initial = torch.get_num_threads()
        self.steps = 0
        self.recent: list[float] = []  # the last steps at the current count
        self._plan: list[int] = []  # counts still to try in the probe under way, one per step
        self._seen: dict[int, list[float]] = {}
        if self.enabled:
            self._start_probe()

    def _start_probe(self) -> None:
        self._plan = [c for c in self.candidates for _ in range(self.probe)]
        self._seen = {}

    def run(self, fn: Callable[[], Any]) -> Any:
        if not self.enabled:
            return fn()
        count = self._plan[0] if self._plan else self.current
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        self.steps += 1
        if self._plan:
            self._plan.pop(0)
            self._seen.setdefault(count, []).append(dt)
            if not self._plan:
                self._decide()
        else:
            self.recent = (self.recent + [dt])[-50:]
            usual = statistics.median(self.recent)
            if self.steps % self.every == 0 or (len(self.recent) >= 10 and dt > 3 * usual and
                                                 statistics.median(self.recent[-5:]) > 3 * usual):
                self.recent = []
                self._start_probe()
        return out

    def whole(self, fn: Callable[[], Any]) -> Any:
        """``fn`` at the process's own thread count, whatever suits the tuned steps: for a
        compute-bound pass between them (a prompt's), which one thread would take twice as
        long over (a tuned decoding step is memory-bound and often fastest on one)."""
        if torch.get_num_threads() != self.initial:
            torch.set_num_threads(self.initial)
        return fn()

    def restore(self) -> None:
        """The process's thread count as it was before: the count is global, and whatever
        trains in this process next must not inherit what suited decoding."""
        if torch.get_num_threads() != self.initial:
            torch.set_num_threads(self.initial)

    def _decide(self) -> None:
        times = {c: statistics.median(v) for c, v in self._seen.items()}
        best = min(times, key=times.get)
        if best != self.current and times[best] < (1 - self.margin) * times.get(self.current, float("inf")):
            self.current = best
        elif self.current not in times:
            self.current = best
        torch.set_num_threads(self.current)
