"""Helpers shared by benchmark scripts."""

from __future__ import annotations

import time
from pathlib import Path

from trainlab.engine.loop import make_member


def tb_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """[(step, value)] of one tag of a run member's TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def seconds_per_step(task, cfg, n: int = 12, warmup: int = 3) -> float:
    """Mean seconds of one optimizer step of every member of ``task`` (after ``warmup`` steps)."""
    members = [make_member(k, m, cfg) for k, m in task.build_models().items()]
    for i in range(n + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        batch = task.batch(i)
        for m in members:
            loss = task.loss(m.name, m.model, batch, i).loss
            m.optimizer.zero_grad()
            loss.backward()
            m.optimizer.step()
    return (time.perf_counter() - t0) / n
