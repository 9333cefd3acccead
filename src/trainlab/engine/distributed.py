"""Training on several processes: PyTorch's DistributedDataParallel under ``torchrun``.

``torchrun --nproc_per_node N -m trainlab chat train ...`` starts N copies of the same
command and tells each its place through RANK, LOCAL_RANK and WORLD_SIZE. ``setup``
reads them and joins the process group (gloo on CPU, NCCL on CUDA, one GPU per process).
Without those variables, or with WORLD_SIZE 1, nothing here does anything.

How the work is divided:

- Every rank builds the same global batch from (seed, step), the batch the user asked
  for, and trains on its own contiguous slice of it (``shard``), so the ranks read
  disjoint examples and together read the batch a single process would have read.
- DDP averages the gradients during the backward pass; the loop corrects that average
  for slices of unequal loss weight (``engine/loop.py``), so the update is the one the
  whole batch gives in one process.
- Rank 0 alone writes: TensorBoard, checkpoints, run.json and the runs index. It also
  evaluates and samples, and sends the metrics to the other ranks, so that every rank
  takes the same plateau LR cuts.
- Decisions that must be the same everywhere are agreed on by a small all-reduce: an
  out-of-memory on any rank makes every rank retry with more micro-batches, a stop
  request (Ctrl+C, SIGTERM) on any rank stops all of them after the same step. The
  non-finite skip needs no message: the loss is all-reduced and the gradients are the
  same on every rank after DDP, so every rank reaches the same verdict.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def current() -> Dist:
    if not dist.is_available() or not dist.is_initialized():
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))


def setup(device: str = "auto") -> Dist:
    """Join the process group torchrun describes in the environment (once); returns this
    process's place. NCCL when training on CUDA, gloo otherwise."""
    if dist.is_available() and dist.is_initialized():
        return current()
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Dist()
    local_rank = _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available() and device not in ("cpu", "mps")
    if cuda:
        torch.cuda.set_device(local_rank)
    # generous: rank 0 evaluates and saves while the others wait in a collective
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return current()


def barrier(d: Dist) -> None:
    """Wait for every rank: no rank leaves (which torchrun takes for the job's end) while
    rank 0 is still saving or writing the report."""
    if d.active:
        dist.barrier()


def teardown() -> None:
    """Leave the process group while the interpreter is whole. Whatever still holds it (a
    DDP wrapper in a reference cycle, say) is collected first: a process group destroyed
    during the interpreter's own shutdown aborts the process (SIGABRT, "terminate called
    without an active exception"), and torchrun then fails a run that trained to its end."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def device_for(device: torch.device, d: Dist) -> torch.device:
    """Each process on a machine gets its own GPU."""
    if d.active and device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return device


def shard(batch: dict[str, torch.Tensor], d: Dist) -> dict[str, torch.Tensor]:
    """This rank's contiguous slice of the global batch (sizes differ by at most one)."""
    if not d.active:
        return batch
    return {k: torch.tensor_split(v, d.world)[d.rank] for k, v in batch.items()}


def all_sum(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The element-wise sum over ranks, as a float64 tensor on ``device``."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device).clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank (a small picklable object)."""
    if not d.active:
        return obj
    box = [obj if d.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, d: Dist) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
    if not d.active:
        return [obj]
    out = [None] * d.world if d.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def wrap(model: torch.nn.Module, device: torch.device, d: Dist) -> torch.nn.Module:
    """The model DDP trains (rank 0's weights are copied to every rank), or the model itself."""
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)
