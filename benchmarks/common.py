"""Helpers shared by benchmark scripts."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from trainlab.engine.precision import cpu_summary


def print_machine() -> None:
    """The line every benchmark starts with: figures mean little without the machine they
    came from (bf16 is 100x slower than fp32 on one CPU and 2-3x faster on another)."""
    print(f"machine: {cpu_summary()}; torch {torch.__version__}", flush=True)


def precision_of(output: str) -> str:
    """The precision a `trainlab ... train` run trained in, read from its output: what
    --precision auto chose (and the timings), or the mode its members were built with."""
    chosen = re.findall(r"^(\S+): --precision auto: (.*)$", output, re.M)
    if chosen:
        return "; ".join(f"{name} auto -> {what}" for name, what in chosen)
    modes = sorted(set(re.findall(r"parameters, precision (\w+)", output)))
    return "/".join(modes) or "?"


def tb_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """[(step, value)] of one tag of a run member's TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def seconds_per_step(task, cfg, n: int = 12, warmup: int = 3) -> float:
    """Mean seconds of one optimizer step of every member of ``task`` (after ``warmup`` steps),
    on the CPU, through the engine's own step."""
    from trainlab.engine.step import seconds_per_step as engine_seconds

    return engine_seconds(task, cfg, None, n, warmup)
