"""Run folders and TensorBoard writers.

Layout: ``<runs_dir>/<task>/<run_id>/`` holds one TensorBoard log folder per member
(so their curves overlay), ``checkpoints/``, ``run.json`` (id, task, status, tag,
config) and whatever the task reports (``report.md``, plots).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainlab.config import UsageError

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RUN_FILE = "run.json"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Run:
    id: str
    task: str
    dir: Path

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    def info(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def update(self, **fields: Any) -> None:
        data = self.info()
        data.update(fields)
        write_json_atomic(self.dir / RUN_FILE, data)

    def writer(self, member: str, purge_step: int | None = None):  # -> SummaryWriter
        from torch.utils.tensorboard import SummaryWriter  # slow import; only when training

        return SummaryWriter(log_dir=str(self.dir / member), purge_step=purge_step)


def new_run(runs_dir: str | Path, task: str, name: str = "", tag: str = "", config: dict | None = None) -> Run:
    """Create a fresh run folder; an existing run is never reused or overwritten."""
    if name and not RUN_NAME.match(name):
        raise UsageError(f"--run-name: {name!r} must be 1-64 letters, digits, '.', '_' or '-', not starting with a symbol")
    root = Path(runs_dir) / task
    run_id = name or f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    path = root / run_id
    try:
        root.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    except FileExistsError:
        raise UsageError(f"--run-name: a run named {run_id!r} already exists in {root}; pick another name") from None
    except OSError as e:
        raise UsageError(f"--runs-dir: cannot create {path}: {e.strerror}") from None
    run = Run(run_id, task, path)
    write_json_atomic(
        path / RUN_FILE,
        {"id": run_id, "task": task, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "created",
         "tag": tag, "config": config or {}},
    )
    return run


def find_run(runs_dir: str | Path, task: str, ref: str) -> Run:
    """A run by id (under ``<runs_dir>/<task>/``) or by the path of its folder."""
    root = Path(runs_dir) / task
    candidates = []
    if RUN_NAME.match(ref):
        candidates.append(root / ref)
    candidates.append(Path(ref))
    for c in candidates:
        if (c / RUN_FILE).is_file():
            return Run(c.name, task, c)
    raise UsageError(f"no run {ref!r} (looked for a run id under {root} and for a run folder at that path)")
