"""Deterministic faults for tests and the crash benchmark, off unless asked for.

``TRAINLAB_FAULTS`` holds comma-separated ``name=S`` items, read when a fault point is
reached; S counts optimizer updates done, as checkpoint names do:

- ``interrupt=S``: behave as if Ctrl+C arrived during the S-th update (the loop stops
  at S, evaluates, saves and reports, exactly as for a real SIGINT);
- ``kill=S``: SIGKILL this process once S updates are done (after that step's logging,
  evaluation and checkpoint, if it has them);
- ``kill_in_save=S``: SIGKILL this process in the middle of writing the checkpoint of
  step S (after its first file);
- ``sigterm=S``: send this process a real SIGTERM once S updates are done (what a
  scheduler's stop does); ``sigterm_twice=S``: two of them at once (the second aborts);
- ``oom=S``: the first attempt of the S-th step (of every member) fails with the
  out-of-memory error CUDA raises;
- ``oom_above=N``: every micro-batch of more than N examples fails that way: a memory cap;
- ``nonfinite=S``: the loss of the S-th step (of every member) becomes NaN;
- ``spike=S``: the loss of the S-th step (of every member) is multiplied by 1000;
- ``nonfinite_grad=S``: after the S-th step's backward pass, a gradient holds inf;
- ``rank=R``: under torchrun, only the process of rank R has these faults (the others
  must then agree with it: one rank's out-of-memory is every rank's).

Real signals do the killing, so what is tested is what a crash does; the out-of-memory
and non-finite faults go through the same code paths as real ones. Nothing else in
the package reads this variable. ``damage_checkpoint`` below damages a saved checkpoint
the ways the crash tests and benchmark need.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "TRAINLAB_FAULTS"


def _parse(text: str) -> dict[str, set[int]]:
    faults: dict[str, set[int]] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, step = item.partition("=")
        faults.setdefault(name.strip(), set()).add(int(step))
    return faults


def plan() -> dict[str, set[int]]:
    """The faults asked for, {} normally; the loop reads this once per run, not per step."""
    planned = _parse(os.environ.get(ENV, ""))
    ranks = planned.pop("rank", None)
    if ranks is not None and int(os.environ.get("RANK", "0")) not in ranks:
        return {}
    return planned


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_if(name: str, step: int) -> None:
    if step in plan().get(name, ()):
        kill_now()


def signal_if(planned: dict[str, set[int]], step: int) -> None:
    """``sigterm`` and ``sigterm_twice``: called once ``step`` updates are done."""
    if planned and step in planned.get("sigterm", ()):
        os.kill(os.getpid(), signal.SIGTERM)
    if planned and step in planned.get("sigterm_twice", ()):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)


def raise_if_out_of_memory(planned: dict[str, set[int]], step: int, examples: int, first_try: bool) -> None:
    """``oom`` and ``oom_above``: called before each micro-batch's forward pass."""
    if not planned:
        return
    cap = min(planned.get("oom_above", ()), default=None)
    if (first_try and step + 1 in planned.get("oom", ())) or (cap is not None and examples > cap):
        import torch

        raise torch.OutOfMemoryError(f"{ENV}: out of memory injected at step {step + 1} ({examples} examples)")


def poison_loss(planned: dict[str, set[int]], step: int, loss):
    """``nonfinite``: the loss times NaN (its gradients turn NaN too); ``spike``: times 1000."""
    if planned and step + 1 in planned.get("nonfinite", ()):
        return loss * float("nan")
    if planned and step + 1 in planned.get("spike", ()):
        return loss * 1000.0
    return loss


def poison_grads(planned: dict[str, set[int]], step: int, model) -> None:
    """``nonfinite_grad``: one gradient entry set to inf, the loss left finite."""
    if planned and step + 1 in planned.get("nonfinite_grad", ()):
        grad = next(p.grad for p in model.parameters() if p.grad is not None)  # a test hook: cost is no matter
        grad.view(-1)[0] = float("inf")


def forge(folder: Path, name: str, data: bytes) -> None:
    """Replace one file of a checkpoint and its checksum, as an attacker (or a buggy tool)
    would, so that only the loader's own checks stand in the way."""
    import hashlib
    import json

    (folder / name).write_bytes(data)
    meta = json.loads((folder / "meta.json").read_text())
    meta["sha256"][name] = hashlib.sha256(data).hexdigest()
    (folder / "meta.json").write_text(json.dumps(meta))


# -- damaged checkpoints ---------------------------------------------------------------------
DAMAGE_KINDS = ("truncated", "bit-flipped", "wrong task", "malicious pickle")


class _RunsCode:
    """Unpickling this calls ``os.makedirs(target)``: a harmless stand-in for an attack."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def damage_checkpoint(folder: Path, kind: str, target: Path, file: str = "simple/model.pt") -> None:
    """Damage one checkpoint folder the way disks, tools and attackers do.

    ``malicious pickle`` writes a real torch archive whose unpickling would create the
    folder ``target``, and forges its checksum, so only ``weights_only`` stands between
    it and running; a test then asserts that ``target`` was never created."""
    import io
    import json

    import torch

    f = folder / file
    data = f.read_bytes()
    if kind == "truncated":
        f.write_bytes(data[: len(data) // 3])
    elif kind == "bit-flipped":
        f.write_bytes(data[:500] + bytes([data[500] ^ 0x10]) + data[501:])
    elif kind == "wrong task":
        meta = json.loads((folder / "meta.json").read_text())
        meta["task"] = "some-other-task"
        (folder / "meta.json").write_text(json.dumps(meta))
    elif kind == "malicious pickle":
        buf = io.BytesIO()
        torch.save({"w": _RunsCode(str(target))}, buf)
        forge(folder, file, buf.getvalue())
    else:
        raise ValueError(f"unknown damage {kind!r}; one of {DAMAGE_KINDS}")
