"""The global batch of each step, and on an accelerator the next one made while this one trains.

A task's ``batch(step)`` is a pure function of (seed, step), built on the host in numpy. On a
GPU a step of a small model takes milliseconds, so building the batch and copying it from
pageable memory (where ``non_blocking=True`` does nothing) would sit on the critical path.
There ``Batches`` builds the next step's batch on one side thread while the current step
runs, in pinned memory, so its copy to the device does not block the host. The batch for a
step is the same whichever path made it, so a resume (which asks for a step out of order)
stays exact: a prefetched batch is used only for the step it was made for.

On a CPU the side thread would take one of the cores training uses (2 here), so it is off
there: each batch is built when its step asks for it, as before.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

Batch = dict[str, torch.Tensor]


class Batches:
    def __init__(self, make: Callable[[int], Batch], device: torch.device, prefetch: bool | None = None) -> None:
        """``make``: the task's ``batch``; ``prefetch``: build ahead (default: on accelerators)."""
        self.make = make
        self.pin = device.type == "cuda"
        self.prefetch = device.type != "cpu" if prefetch is None else prefetch
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="batches") if self.prefetch else None
        self._ahead: tuple[int, Future] | None = None

    def _build(self, step: int) -> Batch:
        batch = self.make(step)
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin else batch

    def __call__(self, step: int) -> Batch:
        """Step ``step``'s global batch (on the host; pinned on CUDA); the next one is started."""
        if self._pool is None:
            return self._build(step)
        ahead, self._ahead = self._ahead, None
        batch = ahead[1].result() if ahead is not None and ahead[0] == step else self._build(step)
        self._ahead = (step + 1, self._pool.submit(self._build, step + 1))
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
