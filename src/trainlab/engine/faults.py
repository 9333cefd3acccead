"""Deterministic faults for tests and the crash benchmark, off unless asked for.

``TRAINLAB_FAULTS`` holds comma-separated ``name=S`` items, read when a fault point is
reached; S counts optimizer updates done, as checkpoint names do:

- ``interrupt=S``: behave as if Ctrl+C arrived during the S-th update (the loop stops
  at S, evaluates, saves and reports, exactly as for a real SIGINT);
- ``kill=S``: SIGKILL this process once S updates are done (after that step's logging,
  evaluation and checkpoint, if it has them);
- ``kill_in_save=S``: SIGKILL this process in the middle of writing the checkpoint of
  step S (after its first file).

Real signals do the killing, so what is tested is what a crash does. Nothing else in
the package reads this variable.
"""

from __future__ import annotations

import os
import signal

ENV = "TRAINLAB_FAULTS"


def _parse(text: str) -> dict[str, set[int]]:
    faults: dict[str, set[int]] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, step = item.partition("=")
        faults.setdefault(name.strip(), set()).add(int(step))
    return faults


def fires(name: str, step: int) -> bool:
    text = os.environ.get(ENV)
    return bool(text) and step in _parse(text).get(name, set())


def kill_if(name: str, step: int) -> None:
    if fires(name, step):
        os.kill(os.getpid(), signal.SIGKILL)
