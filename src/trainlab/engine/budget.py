"""A time budget (``--minutes M``): the run's step count fitted so that the whole command, from
the moment its process started to the final checkpoint and report, ends within M minutes.

How the minutes are spent, and measured rather than assumed:

- the clock starts when the process did (``process_age``: interpreter start-up and imports
  count), so what a user times from outside is what the budget holds;
- the first fit comes after a few real training steps (``FIT_AFTER``), once every automatic
  choice (precision, micro-batch, compile) is made: the pace is the mean of those steps (the
  odd slow step is part of what the minutes must hold).
  An evaluation (``PROBE_PART`` of its batches, where the task can run a part, scaled by the
  share that ran) and a sample are timed once there (their results thrown away, the RNG left
  as it was), and a real checkpoint is saved and timed, so every pause has a measured cost;
- ``plan`` then gives the step count, and the evaluation, sample and checkpoint cadence, so
  that steps + pauses + the end (the last evaluation, the report's own evaluations, the
  final checkpoint, writing the report, exiting) fill what is left. Each kind of pause may
  take at most its ``SHARES`` of the budget, so most of the time goes to training;
- the LR schedule (``train_config.lr_lambda``) reads its horizon when it is asked, so the
  fitted count is where cosine or WSD ends: the run ends decayed, not cut;
- a shared machine drifts: at each of ``CHECKS`` of the planned steps (the first early, all
  before a WSD decay starts, where one more comes at its last step before the decay) the pace
  since the last fit is measured and the plan refitted if it moved by more than ``DRIFT``, or
  if the plan would end more than ``HOLD`` of the budget away from the deadline at that pace
  (drifts below ``DRIFT`` add up); a refit places the checks still ahead at those shares of
  its own plan. Every fit is recorded in the run
  (run.json, the report).

The fitted numbers go into the run's saved settings, so a resumed run continues to its
recorded step count exactly; one interrupted before its refit refits on resume (its step
count may then differ from an unbroken run's: the budget is measured, not replayed).

``fit_steps`` is the one rule that turns seconds into steps: ``trainlab tune`` and
``multiply compare`` (``runs.steps_for_minutes``) and the benchmarks use it too.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from trainlab.config import ConfigError

FIT_AFTER = 5  # training steps timed before the first fit (the first is slow: allocations, caches)
# shares of the steps (from the first fit to the planned end) at which the pace is measured
# again: a shared machine drifts, and the first steps of a run are not its later ones (kernels
# for new shapes are built as they first appear)
CHECKS = (0.15, 0.4, 0.65, 0.85)
CHECK_GAP = 0.1  # after a refit, the next check comes at least this share of the steps later
DRIFT = 0.05  # a pace that moved by more than this is refitted
# ... and so is a plan whose end, at the pace now, would miss the deadline by more than this share
# of the budget: small drifts that each kept the plan add up (a 1-minute run ended 3.5% early)
HOLD = 0.01
SHARES = {"eval": 0.05, "sample": 0.01, "save": 0.01}  # most of the budget each kind of pause may take
# writing the report (plots) and the process's own exit: small and not measurable from inside
# the run, so a constant, checked by benchmarks/minutes_accuracy.py
END_SECONDS = 1.0
# the part of an evaluation timed at the first fit (where the task can run a part), its time
# scaled by the share that ran: a whole one thrown away was 1-2% of a one-minute budget
PROBE_PART = 0.2
_IMPORTED = time.monotonic()


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc, so interpreter start-up and
    imports count); elsewhere, since this module was imported."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, ticks after boot
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started)
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def fit_steps(seconds: float, seconds_per_step: float, least: int = 1) -> int:
    """How many steps of ``seconds_per_step`` fit in ``seconds`` (at least ``least``)."""
    if not (seconds_per_step > 0 and math.isfinite(seconds_per_step)):
        raise ValueError(f"a step must take a positive time, got {seconds_per_step}")
    return max(least, int(max(0.0, seconds) / seconds_per_step))


def seconds_to_end(step: int, steps: int, pace: float, costs: dict[str, float], every: dict[str, int],
                   end: float) -> float:
    """What the run from ``step`` to its last step ``steps`` takes: the steps at ``pace``, the
    pauses at multiples of their cadence before the last step, and ``end`` (the pauses at the
    last step itself, the report, the exit)."""
    pauses = sum(costs.get(k, 0.0) * ((steps - 1) // n - step // n) for k, n in every.items() if n > 0)
    return (steps - step) * pace + pauses + end


@dataclass
class Plan:
    """The end step and the cadence of pauses a fit chose."""

    steps: int
    every: dict[str, int]  # eval / sample / save -> every N steps (0: never, for samples)
    seconds: float  # what the plan expects to spend from the fit to the process's end


def plan(step: int, left: float, pace: float, costs: dict[str, float], asked: dict[str, int], budget: float,
         end: float) -> Plan:
    """The last step, and how often to evaluate, sample and save, so that the steps after
    ``step`` at ``pace`` seconds each, the pauses between and ``end`` (seconds after the last
    step) take no more than ``left`` seconds. ``asked``: the cadence the settings ask for;
    a pause is made rarer (never more frequent) where it would take more than its ``SHARES``
    of ``budget``. The pauses at the last step itself are part of ``end``."""
    def cadence(steps: int) -> dict[str, int]:
        every = {}
        for kind, n in asked.items():
            cost = costs.get(kind, 0.0)
            if n <= 0 or cost <= 0:
                every[kind] = n
                continue
            most = int(SHARES.get(kind, 0.05) * budget / cost)  # pauses of this kind the budget affords
            k = max(n, steps + 1 if most < 1 else -(-steps // most))
            if k <= steps < 2 * k and steps - k < k // 2:  # one pause just before the one at the end: drop it
                k = steps + 1
            every[kind] = k
        return every

    def spend(steps: int, every: dict[str, int]) -> float:
        return seconds_to_end(step, steps, pace, costs, every, end)

    steps = step + fit_steps(left - end, pace)
    for _ in range(6):  # the cadence depends on the count and the count on the pauses: a few rounds settle it
        over = spend(steps, cadence(steps)) - left
        move = -math.ceil(over / pace) if over > 0 else math.floor(-over / pace)
        if move == 0:
            break
        steps = max(step + 1, steps + move)
    for _ in range(1000):  # then step by step to the last count that fits (a pause more may cost a step)
        if spend(steps + 1, cadence(steps + 1)) > left:
            break
        steps += 1
    while steps > step + 1 and spend(steps, cadence(steps)) > left:
        steps -= 1
    every = cadence(steps)
    return Plan(steps, every, spend(steps, every))


@dataclass
class Budget:
    """One run's budget as it trains: where it stands, what was measured, every fit.
    ``state_dict`` goes into the checkpoint (the loop state)."""

    minutes: float
    deadline: float  # time.monotonic() by which the process should have ended
    fits: list[dict[str, Any]] = field(default_factory=list)
    fit_at: int | None = None  # the step of the first fit (None: done)
    refit_at: int | None = None  # the step of the check (None: done, or not planned yet)
    spent_before: float = 0.0  # wall seconds of earlier attempts (a resumed run)
    asked: dict[str, int] = field(default_factory=dict)  # the cadence of pauses the settings asked for
    extension: bool = False  # minutes added to a finished run: its LR schedule stays as it ended
    # this process's step times after its first step: their mean is the pace (not a median: the
    # odd slow step is part of what the minutes must hold)
    step_seconds: list[float] = field(default_factory=list)
    seen_first: bool = False
    mark: int = 0  # len(step_seconds) at the last fit
    checks: list[int] = field(default_factory=list)  # steps of the checks still to come

    @classmethod
    def start(cls, minutes: float, step: int, saved: dict[str, Any] | None, started: float) -> "Budget":
        """A budget for a run at ``step``: a new one (``saved`` None), or the one a checkpoint
        holds. ``started``: the monotonic time the clock counts from (the process's start)."""
        if not saved:
            return cls(minutes, started + 60 * minutes, fit_at=step + FIT_AFTER)
        spent = float(saved.get("spent", 0.0))
        b = cls(float(saved["minutes"]), started + 60 * float(saved["minutes"]) - spent,
                [dict(f) for f in saved.get("fits", [])], saved.get("fit_at"), saved.get("refit_at"), spent,
                {k: int(v) for k, v in saved.get("asked", {}).items()}, bool(saved.get("extension", False)))
        b.checks = [int(c) for c in saved.get("checks", [])]
        if b.fit_at is not None:  # stopped before its first fit: fit again from here
            b.fit_at = step + FIT_AFTER
        elif b.refit_at is not None:  # stopped before its check: check it soon after the resume
            b.refit_at = max(b.refit_at, step + FIT_AFTER)
        return b

    def extend(self, minutes: float, step: int, started: float) -> None:
        """A finished budgeted run given new minutes: fit them as a new budget from here."""
        self.minutes, self.deadline, self.spent_before = minutes, started + 60 * minutes, 0.0
        self.fit_at, self.refit_at, self.extension = step + FIT_AFTER, None, True
        self.fits.append({"kind": "extension", "minutes": minutes, "at_step": step})

    def add_step(self, seconds: float) -> None:
        if self.seen_first and (self.fit_at is not None or self.refit_at is not None):
            self.step_seconds.append(seconds)  # kept only while a fit or check is still to come
        self.seen_first = True

    def pace(self) -> float:
        """Mean seconds a step: of the steps since the last fit when there are a few, else of
        every step this process timed after its first (the pace now, not the start's)."""
        times = self.step_seconds
        recent = times[self.mark:] if len(times) - self.mark >= FIT_AFTER else times
        return sum(recent) / len(recent) if recent else 0.0

    def due(self, step: int) -> str | None:
        """"fit" or "refit" when one is due after ``step``, else None."""
        if self.fit_at is not None and step >= self.fit_at:
            return "fit"
        if self.refit_at is not None and step >= self.refit_at:
            return "refit"
        return None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def spent(self, started: float) -> float:
        return self.spent_before + time.monotonic() - started

    def state_dict(self, started: float) -> dict[str, Any]:
        return {"minutes": self.minutes, "fits": self.fits, "fit_at": self.fit_at, "refit_at": self.refit_at,
                "spent": round(self.spent(started), 3), "asked": self.asked, "extension": self.extension,
                "checks": self.checks}

    def fit(self, kind: str, step: int, pace: float, costs: dict[str, float], asked: dict[str, int],
            end: float, current: int | None, warmup: int, decay_from: Callable[[int], float]) -> Plan | None:
        """Fit (``kind`` "fit") or check (``kind`` "refit") the plan at ``step``; returns the new
        plan, or None when a check found the pace within ``DRIFT`` of the fit's. Refuses a
        budget too small for the warm-up and one evaluation, naming the least that fits."""
        left = self.left()
        # the pace of the plan in force: checks that kept it are not plans (drift below 5% at each
        # of three checks added up to 3.4% over a 5-minute run when each was compared with the last)
        last = next((f for f in reversed(self.fits) if "pace" in f and f.get("refitted", True)), None)
        record = {"kind": kind, "at_step": step, "pace": round(pace, 6), "left": round(left, 3),
                  "costs": {k: round(v, 4) for k, v in costs.items()}, "end": round(end, 3)}
        self.fit_at, self.mark = None, len(self.step_seconds)
        if kind == "refit":
            self.refit_at = self.checks.pop(0) if self.checks else None
            while self.refit_at is not None and self.refit_at <= step:
                self.refit_at = self.checks.pop(0) if self.checks else None
            on_time = current is None or abs(
                seconds_to_end(step, current, pace, costs, last.get("every", asked) if last else asked, end) - left
            ) <= HOLD * 60 * self.minutes
            if last is not None and abs(pace / last["pace"] - 1) <= DRIFT and on_time:
                self.fits.append({**record, "steps": current, "refitted": False})
                return None
        p = plan(step, left, pace, costs, asked, 60 * self.minutes, end)
        if kind == "fit" and (p.steps < max(warmup, step + 1) or p.seconds > left):
            need = 60 * self.minutes - left + (max(warmup, step + 1) - step) * pace + end
            raise BudgetTooSmall(f"{self.minutes:g} minutes is too little here: the warm-up ({warmup} steps at "
                                 f"{pace:.3g} s) and one evaluation need at least {math.ceil(need / 6) / 10:g} minutes")
        self.fits.append({**record, "steps": p.steps, "every": p.every, **({"refitted": True} if kind == "refit" else {})})
        # the checks: at CHECKS of the steps from the last fit to the planned end, all before a WSD
        # decay begins. A refit places those still ahead anew: left where the first plan put them,
        # a run whose first pace was 30% slow (1,152 steps planned, then 1,581) had its last check
        # at 62% of its steps, and a slowdown after it ended the run 5% late. A check measures the
        # pace since the last fit, so after a refit the next one comes CHECK_GAP of the steps later
        start = next((f["at_step"] for f in reversed(self.fits) if f["kind"] == "fit"), step)
        at = {start + max(FIT_AFTER, round(c * (p.steps - start))) for c in CHECKS}
        # ... and, before a WSD decay, one more at its last step: the shares past it are dropped, and
        # chat-quick's 40% decay left the last 58% of its steps unchecked (three runs 3.5-4.4% late
        # on an AVX2 EPYC whose pace moved 10-15% within a run)
        decay = decay_from(p.steps)
        if decay < p.steps:
            at.add(math.ceil(decay) - 1)
        at = sorted(at)
        soonest = step + (0 if kind == "fit" else max(FIT_AFTER, round(CHECK_GAP * (p.steps - start))))
        at = [c for c in at if soonest <= c < min(p.steps, decay_from(p.steps))]
        self.refit_at, self.checks = (at[0], at[1:]) if at else (None, [])
        return p


class BudgetTooSmall(ConfigError):
    """--minutes that cannot hold the warm-up and one evaluation on this machine."""

    def __init__(self, message: str) -> None:
        super().__init__("minutes", message)
