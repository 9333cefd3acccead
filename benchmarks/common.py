"""Helpers shared by benchmark scripts."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainlab.allocator import use_tcmalloc
from trainlab.config import flat_settings
from trainlab.engine.precision import cpu_summary

# in-process figures with the malloc the trainlab command runs with (tcmalloc where installed:
# src/trainlab/allocator.py); the machine line says which. Only when a benchmark script is the
# program: a test importing these helpers must not be restarted
if Path(sys.argv[0]).resolve().parent == Path(__file__).resolve().parent:
    use_tcmalloc()


def scratch_dir(prefix: str) -> str:
    """A fresh folder for a benchmark's runs, removed when the benchmark exits (a normal end, an
    error or Ctrl+C): what a benchmark keeps is what it prints and writes to its ``--out``, while
    its runs' checkpoints take up to hundreds of MB each and piled up in /tmp run after run (39 GB
    on the development machine by 2026-12-05). ``TRAINLAB_KEEP_SCRATCH=1`` keeps them to look at."""
    path = tempfile.mkdtemp(prefix=prefix)
    if os.environ.get("TRAINLAB_KEEP_SCRATCH", "") in ("", "0"):
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    else:
        print(f"scratch runs kept in {path} (TRAINLAB_KEEP_SCRATCH)", file=sys.stderr)
    return path


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


def fitted_seconds_per_step(task, cfg, n: int = 10, warmup: int = 5) -> tuple[float, str, dict[str, float]]:
    """(seconds a step, precision) as the run will train, on the CPU: the engine's own fitting
    (``trainlab tune --budget-minutes`` uses the same)."""
    from trainlab.engine.step import fitted_seconds_per_step as engine_fitted

    return engine_fitted(task, cfg, None, n, warmup)


def seconds_per_step(task, cfg, n: int = 12, warmup: int = 3) -> float:
    """Mean seconds of one optimizer step of every member of ``task`` (after ``warmup`` steps),
    on the CPU, through the engine's own step."""
    from trainlab.engine.step import seconds_per_step as engine_seconds

    return engine_seconds(task, cfg, None, n, warmup)


def memory_bandwidth(nbytes: int = 256 * 2**20) -> float:
    """Bytes per second this machine reads ``nbytes`` again and again: a sum over a buffer of
    that size (every thread), after one read, the fastest of 10. At the default 256 MB, far
    past any cache, it is the memory's; at a model's size it is the floor of a pass that reads
    those weights every time, since part of them stays in a large L3 between passes (here,
    one process: 57 MB read at 42-58 GB/s where 256 MB read at 29-43; a one-row pass beat a
    floor taken at 256 MB).

    Not a copy counted as its read alone (what this measured until 2026-12-03): a copy also
    writes, and reads each destination line before writing it, so its "read" ran at 0.35-0.5
    of what reading alone does here (14-18 against 29-43 GB/s), and a served stream beat that
    floor (1.06 of it)."""
    import time

    src = torch.ones(max(1, nbytes // 4), dtype=torch.float32)  # its pages touched
    src.sum()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t)
    return src.numel() * 4 / best


def matmul_rate(n: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` on this machine, the fastest of 10."""
    import time

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def decoding_floor(model) -> str:
    """One line: the time a pass over the model's weights takes at the machine's measured read
    bandwidth, and the characters per second that allows, one character a pass."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = memory_bandwidth(weights)
    per_pass = weights / bw
    return (f"floor: {weights / 1e6:.1f} MB of weights over {bw / 1e9:.1f} GB/s (that many bytes read again and "
            f"again) = {1000 * per_pass:.2f} ms a pass ({1 / per_pass:,.0f} characters/s); fp32 matmul rate "
            f"{matmul_rate() / 1e9:.0f} GFLOP/s")


@torch.no_grad()
def span_loss(model, corpus, split: str, ctx: int, most: int | None = None) -> float:
    """Mean loss over every non-overlapping window of a span (the first ``most`` of them):
    the precise figure that a few sampled batches (nanoGPT's estimate, --eval-batches)
    approximate."""
    data = corpus.val if split == "val" else corpus.train
    starts = np.arange(0, len(data) - ctx, ctx)[:most]
    model.eval()
    total = 0.0
    for i in range(0, len(starts), 256):
        b = corpus.windows(split, starts[i:i + 256], ctx)
        logits, _ = model(b["x"])
        total += float(F.cross_entropy(logits.flatten(0, 1), b["y"].flatten(), reduction="sum"))
    return total / (len(starts) * ctx)


def train_for_minutes(kind: str, preset: str, flags: dict, minutes: float):
    """An ordinary run of ``preset`` with ``flags`` under the engine's own time budget
    (``--minutes``, engine/budget.py): ``minutes`` of wall time from this call to its report,
    the step count fitted from the run's own measured pace, the schedule ending at the last
    step. Returns (summary, configs, task, steps, seconds per step of its last fit)."""
    import time

    from trainlab import runs

    started = time.monotonic()
    values = runs.settings(kind, preset, flags={**flags, "minutes": minutes, "max_steps": None})
    summary = runs.train(kind, values, echo=lambda line: None, started=started)
    cfgs, task = runs.checked_task(kind, flat_settings(summary.config))
    pace = next(f["pace"] for f in reversed(summary.budget["fits"]) if "pace" in f)
    return summary, cfgs, task, summary.step, pace


TINYSHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def add_model_args(ap, checkpoint_help: str = "a chat run (default: a chatgot-14m trained for one step)") -> None:
    """--checkpoint, --runs-dir and --text, as the decoding benchmarks take them."""
    ap.add_argument("--checkpoint", help=checkpoint_help)
    ap.add_argument("--runs-dir", default=None)
    ap.add_argument("--text", type=Path, default=TINYSHAKESPEARE, help="the corpus a model made here trains on")


def model_run(args, prefix: str, preset: str = "chatgot-14m") -> tuple[str, str]:
    """(runs folder, checkpoint) from ``add_model_args``' flags: a ``preset`` model trained for
    one step in a fresh folder where none is given."""
    runs = args.runs_dir or scratch_dir(prefix)
    return runs, args.checkpoint or untrained_14m(runs, args.text, preset)


def untrained_14m(runs_dir: str, text, preset: str = "chatgot-14m") -> str:
    """A run of ``preset`` (default the 14M model) trained for one step in ``runs_dir`` (its
    id): decoding speed does not depend on what the weights have learned, so the benchmarks of
    decoding serve it."""
    import subprocess
    import sys

    name = "bench" if preset == "chatgot-14m" else f"bench-{preset}"
    if (Path(runs_dir) / "chat" / name / "checkpoints").is_dir():  # made by an earlier run of a benchmark
        return name
    subprocess.run([sys.executable, "-m", "trainlab", "chat", "train", "--text", str(text), "--runs-dir", runs_dir,
                    "--preset", preset, "--max-steps", "1", "--run-name", name, "--no-progress",
                    "--eval-every", "1000", "--sample-every", "0", "--precision", "fp32", "--batch-size", "4"],
                   check=True, capture_output=True)
    return name
