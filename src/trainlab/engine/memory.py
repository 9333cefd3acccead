"""Memory: out-of-memory recovery by micro-batching, and the figures logged about it.

The optimization batch is what the user asked for and never changes. When a step runs
out of memory it is retried with the batch cut into twice as many micro-batches, whose
gradients are accumulated, so every sample is used once and the update is the one the
whole batch would have given. After ``recover_after`` steps without trouble the loop
tries half as many micro-batches again; a try that fails at once doubles the wait
before the next. One example at a time that still does not fit ends the run with a
clear message (``OutOfMemory``). An evaluation that runs out of memory is run again a
training micro-batch at a time, then in halves of that.
"""

from __future__ import annotations

import gc
import os
import resource
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from trainlab.config import UsageError

_CPU_OOM = ("can't allocate memory", "not enough memory", "cannot allocate memory")


class OutOfMemory(RuntimeError):
    """Even micro-batches of one example do not fit."""


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's failure
    (a RuntimeError from DefaultCPUAllocator)."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e).lower() for s in _CPU_OOM)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def split_batch(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """``parts`` micro-batches along dim 0, as even as the size allows (views, no copies)."""
    if parts == 1:
        return [batch]
    pieces = {k: torch.tensor_split(v, parts) for k, v in batch.items()}
    return [{k: p[i] for k, p in pieces.items()} for i in range(parts)]


class MicroBatches:
    """How many micro-batches each optimization batch is cut into, and when to try fewer."""

    def __init__(self, recover_after: int, floor: int = 1) -> None:
        self.recover_after = recover_after
        self.floor = floor  # never fewer micro-batches than this: --micro-batch asked for more (speed)
        self.tuned = False  # --micro-batch auto has timed the candidates
        self.count = floor
        self.calm = 0  # steps without an out-of-memory since the count last changed
        self.wait = recover_after  # calm steps needed before trying fewer micro-batches
        self.trying = False  # the count was just lowered: not yet known to fit
        self.ooms = 0
        self.eval_limit: int | None = None  # examples per evaluation batch, once evaluation ran out of memory

    def on_oom(self, batch_size: int, step: int) -> None:
        """Twice as many micro-batches, or OutOfMemory when they are one example each."""
        self.ooms += 1
        if self.count >= batch_size:
            raise OutOfMemory(
                f"out of memory at step {step + 1} even one example at a time (batch {batch_size} in "
                f"{self.count} micro-batches); try --grad-checkpointing, a smaller model or context, "
                f"or another device")
        if self.trying:  # the try at fewer micro-batches failed: wait longer before the next
            self.wait *= 2
        self.count = min(2 * self.count, batch_size)
        self.calm, self.trying = 0, False

    def on_eval_oom(self, batch_size: int, step: int) -> None:
        """Evaluation ran out of memory: evaluate a training micro-batch at a time (which fit
        with gradients), then half as many as the last try."""
        self.ooms += 1
        if self.eval_limit == 1:
            raise OutOfMemory(f"out of memory evaluating at step {step} even one example at a time")
        fits = -(-batch_size // self.count)
        self.eval_limit = max(1, fits if self.eval_limit is None or self.eval_limit > fits else self.eval_limit // 2)

    def on_success(self) -> None:
        if self.trying:  # fewer micro-batches fit after all
            self.trying, self.wait = False, self.recover_after
        self.calm += 1
        if self.count > self.floor and self.calm >= self.wait:
            self.count, self.calm, self.trying = max(self.floor, self.count // 2), 0, True

    def set_floor(self, floor: int) -> None:
        """At least ``floor`` micro-batches from now on (more after an out-of-memory)."""
        self.floor = floor
        self.count = max(self.count, floor)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "calm": self.calm, "wait": self.wait, "trying": self.trying, "ooms": self.ooms,
                "eval_limit": self.eval_limit, "floor": self.floor, "tuned": self.tuned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.calm = int(state["count"]), int(state["calm"])
        self.wait, self.trying, self.ooms = int(state["wait"]), bool(state["trying"]), int(state["ooms"])
        self.eval_limit = None if state.get("eval_limit") is None else int(state["eval_limit"])
        self.floor, self.tuned = int(state.get("floor", 1)), bool(state.get("tuned", False))


def micro_batch_counts(examples: int, smallest: int = 4) -> list[int]:
    """The micro-batch counts ``--micro-batch auto`` times: 1, 2, 4, ... while a micro-batch
    keeps at least ``smallest`` examples (tiny ones waste the matrix units)."""
    counts, c = [1], 2
    while examples / c >= smallest:
        counts.append(c)
        c *= 2
    return counts


def fastest(timings: dict[int, float], margin: float = 0.03) -> int:
    """The count with the lowest time; a larger count must win by ``margin`` (timing noise
    should not cut batches for nothing)."""
    best = min(timings)
    for count in sorted(timings):
        if timings[count] < timings[best] * (1 - margin):
            best = count
    return best


def rss_bytes() -> int:
    """This process's resident memory now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024


def memory_figures(device: torch.device) -> dict[str, float]:
    """MiB figures for TensorBoard: process RSS; on CUDA also allocated now and the peak
    since the last call (the peak counter is reset, so each log interval shows its own)."""
    mib = 2.0 ** 20
    figures = {"rss_mib": rss_bytes() / mib}
    if device.type == "cuda":
        figures["gpu_allocated_mib"] = torch.cuda.memory_allocated(device) / mib
        figures["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / mib
        torch.cuda.reset_peak_memory_stats(device)
    return figures


BYTES_PER_PARAMETER = 16  # fp32 weights and gradients, and AdamW's two moments


# Random fills a model's initialisation makes. On the meta device they have nothing to fill,
# and torch runs some of them there through its reference implementations, whose first use
# imports the compiler stack: 1.2 s of a 1-minute run's start-up, and of every generate's.
_FILLS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_,
                    torch.Tensor.exponential_, torch.Tensor.random_, torch.Tensor.log_normal_,
                    torch.Tensor.cauchy_, torch.Tensor.geometric_})


class _NoFills(TorchFunctionMode):
    """While a model is built on the meta device, ``torch.nn.init``'s functions and the
    tensor's random fills do nothing, and ``torch.arange`` and ``torch.tensor`` make CPU
    tensors: the tables of positions a model computes from them (rotary angles, place
    values) are buffers, not parameters, a few KB, and arithmetic on meta tensors would
    import the compiler stack as well. (So models initialise through ``torch.nn.init``, not
    ``torch.randn(...) * std``.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.arange, torch.tensor) and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        if func in _FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def parameter_count(build: Callable[[], torch.nn.Module],
                    count: Callable[[torch.nn.Module], int] | None = None) -> int | None:
    """Parameters of the model ``build()`` makes (all of them, or what ``count`` says of it),
    counted on the meta device, where nothing is allocated; None if the model cannot be built
    there. A tensor whose byte size overflows 64 bits counts as more than any machine holds."""
    try:
        with torch.device("meta"), _NoFills():
            model = build()
    except RuntimeError as e:
        return 2**63 if "overflow" in str(e).lower() else None
    except NotImplementedError:
        return None
    return count(model) if count else sum(p.numel() for p in model.parameters())


def device_memory_bytes(device: torch.device) -> int | None:
    """All the memory of ``device`` (not what is free now): a model past it can never train."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_model_fits(build: Callable[[], torch.nn.Module], device: torch.device, what: str = "the model") -> None:
    """Refuse, before anything is allocated, a model whose weights, gradients and optimizer
    state alone exceed the device's memory (``--d-model 1000000000`` would otherwise end in
    an allocator traceback, or take the machine into swap)."""
    n = parameter_count(build)
    have = device_memory_bytes(device)
    if n is None or have is None:
        return
    need = n * BYTES_PER_PARAMETER
    if need > have:
        raise UsageError(f"{what} would have {n:,} parameters: about {need / 2**30:,.1f} GiB for weights, "
                         f"gradients and optimizer state, more than the {have / 2**30:,.1f} GiB of memory of "
                         f"{device.type}; make it smaller (--d-model, --num-layers, --dim-feedforward, ...)")
