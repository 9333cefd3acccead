"""What ``--precision auto`` and ``--micro-batch auto`` measured, kept per machine.

Timing fp32 against bf16 (and micro-batch counts) takes a pass per candidate and round: 0.9 s
of a 1-minute chat run, 1.9 s of a 1-minute multiply run, where bf16 is only 1.3x faster and
five rounds are needed. The same model, batch and settings on the same machine time the same,
so a run keeps what it measured under ``RUNS/.timings/<key>.json`` and the next run with the
same key decides by it without timing again. The key holds everything the timed pass depends
on: the member's model (its structure and config), the batch's shapes, the candidates, the
device, the CPU (``cpu_summary``), torch's version and its thread count. A file that does not
read back as written is ignored and timed anew; delete the folder to time everything again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from trainlab.engine.precision import cpu_summary
from trainlab.engine.tracking import write_json_atomic

FOLDER = ".timings"


def timing_key(model: torch.nn.Module, batch: dict[str, torch.Tensor], modes: tuple[str, ...], counts: list[int],
               device: torch.device, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a timed pass depends on, as plain JSON."""
    cfg = getattr(model, "cfg", None)
    return {"model": repr(model), "config": repr(cfg) if cfg is not None else None,
            "parameters": [[name, list(p.shape), str(p.dtype)] for name, p in model.named_parameters()],
            "batch": {k: [list(v.shape), str(v.dtype)] for k, v in sorted(batch.items())},
            "modes": list(modes), "counts": list(counts), "device": str(device), "machine": cpu_summary(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), **(extra or {})}


def _path(runs_dir: str | Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(runs_dir) / FOLDER / f"{digest}.json"


def load_timings(runs_dir: str | Path, key: dict[str, Any]) -> dict[tuple[str, int], float] | None:
    """The timings kept for ``key`` (seconds per (precision, micro-batch count)), or None."""
    path = _path(runs_dir, key)
    try:
        data = json.loads(path.read_text())
        if data["key"] != key:
            return None
        timings = {(str(mode), int(count)): float(t) for mode, count, t in data["timings"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    want = {(mode, count) for mode in key["modes"] for count in key["counts"]}
    return timings if set(timings) == want and all(t > 0 for t in timings.values()) else None


def save_timings(runs_dir: str | Path, key: dict[str, Any], timings: dict[tuple[str, int], float]) -> Path | None:
    """Keep ``timings`` for ``key``; None where the runs folder cannot take it (not an error:
    the next run times again)."""
    path = _path(runs_dir, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"key": key, "timings": [[mode, count, t] for (mode, count), t in timings.items()]})
    except OSError:
        return None
    return path
