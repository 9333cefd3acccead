"""Run folders, TensorBoard writers, the runs index and its cleanup.

Layout: ``<runs_dir>/<task>/<run_id>/`` holds one TensorBoard log folder per member
(so their curves overlay), ``checkpoints/``, ``run.json`` (id, task, status, tag,
config) and whatever the task reports (``report.md``, plots). ``<runs_dir>/index.json``
lists every run.

The index is JSON rather than SQLite: it holds a few hundred small rows, people read
it, and every row is a copy of a ``run.json`` in the run's own folder, so a damaged
index is rebuilt from the folders instead of being a single point of failure. It is
rewritten whole (temp file, fsync, rename) under an exclusive ``flock`` on
``index.lock``, so two runs starting at once cannot lose each other's rows.

A run being trained holds an exclusive ``flock`` on its own ``.lock`` file. The OS
drops it when the process dies, however it dies, so "status: running" with a free
lock means the process was killed; such a run is resumable, and a run whose lock is
held can be neither resumed twice nor removed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from trainlab.config import UsageError
from trainlab.engine.checkpoint import Checkpoint, latest_checkpoint
from trainlab.engine.errors import CheckpointError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locking, documented in docs/robust-training.md
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("trainlab")

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch: "abc\n" is no name
RUN_FILE = "run.json"
INDEX_FILE = "index.json"
INDEX_LOCK = "index.lock"
RUN_LOCK = ".lock"
TEST_TAG = "test"
STATUSES = ("created", "running", "finished", "interrupted", "failed")


def now_iso() -> str:
    """Local time to the microsecond: runs started within one second still sort in order."""
    return datetime.now().isoformat(timespec="microseconds")


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on ``path`` for the duration of the block (blocking)."""
    with open(path, "a+") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@dataclass
class Run:
    id: str
    task: str
    dir: Path
    _lock: Any = field(default=None, repr=False, compare=False)

    @property
    def root(self) -> Path:
        """The runs folder this run is indexed in."""
        return self.dir.parent.parent

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def key(self) -> str:
        return f"{self.task}/{self.id}"

    def info(self) -> dict[str, Any]:
        """run.json, or {} when it is unreadable or not of the shape this project writes."""
        try:
            data = json.loads((self.dir / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if valid_info(data) else {}

    def update(self, **fields: Any) -> None:
        """Change fields of run.json and the run's index row together."""
        data = self.info()
        data.update(fields, updated=now_iso())
        write_json_atomic(self.dir / RUN_FILE, data)
        RunsIndex(self.root).upsert(index_row(self, data))

    def acquire(self) -> None:
        """Take the run's lock for as long as this process trains it."""
        if fcntl is None or self._lock is not None:
            return
        f = open(self.dir / RUN_LOCK, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UsageError(f"run {self.key} is in use by process {holder}; stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock = f

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing drops the flock
            self._lock = None

    def in_use(self) -> bool:
        """Whether some live process (this one included) holds the run's lock."""
        if self._lock is not None:
            return True
        if fcntl is None or not (self.dir / RUN_LOCK).exists():
            return False
        with open(self.dir / RUN_LOCK, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return False

    def effective_status(self, info: dict[str, Any] | None = None) -> str:
        """Stored status, except that 'running' with nobody holding the lock is 'failed'."""
        status = (info if info is not None else self.info()).get("status", "failed")
        if status in ("running", "created") and not self.in_use():
            return "failed"
        return status

    def writer(self, member: str, purge_step: int | None = None):  # -> SummaryWriter
        from torch.utils.tensorboard import SummaryWriter  # slow import; only when training

        log_dir = self.dir / member
        _wait_for_a_newer_second(log_dir)
        return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


_INFO_TYPES = {"id": str, "task": str, "created": str, "updated": str, "status": str, "tag": str, "summary": str,
               "step": int, "max_steps": (int, type(None)), "members": list, "config": dict, "pid": int,
               "device": str}


def valid_info(data: Any) -> bool:
    """Whether a run.json holds what this project writes (a hand-edited or damaged one may not:
    ``"created": [1]`` must not break sorting or the index)."""
    if not isinstance(data, dict):
        return False
    for key, kind in _INFO_TYPES.items():
        value = data.get(key)
        if key in data and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            return False
    return all(isinstance(m, str) for m in data.get("members", []))


def _wait_for_a_newer_second(log_dir: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with the
    creation time in whole seconds. A resumed writer must sort after the files it purges
    from, so if the newest existing file is from this very second, wait for the next."""
    stamps = []
    for p in log_dir.glob("events.out.tfevents.*"):
        try:
            stamps.append(int(p.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    if stamps:
        while int(time.time()) <= max(stamps):
            time.sleep(0.05)


def index_row(run: Run, info: dict[str, Any]) -> dict[str, Any]:
    """What the index keeps of a run; paths are relative to the runs folder."""
    rel = run.dir.relative_to(run.root).as_posix()
    return {
        "id": run.id,
        "task": run.task,
        "created": info.get("created", ""),
        "updated": info.get("updated", info.get("created", "")),
        "status": info.get("status", ""),
        "tag": info.get("tag", ""),
        "step": info.get("step", 0),
        "max_steps": info.get("max_steps"),
        "summary": info.get("summary", ""),
        "dir": rel,
        "logs": [f"{rel}/{m}" for m in info.get("members", [])],
        "checkpoints": f"{rel}/checkpoints",
    }


class RunsIndex:
    """``<runs_dir>/index.json``: one row per run, keyed ``task/id``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / INDEX_FILE

    @contextmanager
    def _locked(self) -> Iterator[None]:
        check_runs_dir(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with file_lock(self.root / INDEX_LOCK):
                yield
        except PermissionError as e:
            raise UsageError(f"--runs-dir: {self.root} is not writable ({e.strerror})") from None
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
            raise UsageError(f"--runs-dir: {self.root} is on a read-only filesystem") from None

    def _read_unlocked(self) -> dict[str, dict[str, Any]]:
        if self.path.is_dir() or self.path.is_symlink():  # not ours: keep it, aside, and rebuild
            aside = self.path.with_name(f"{INDEX_FILE}.not-a-file-{time.strftime('%Y%m%d-%H%M%S')}")
            self.path.rename(aside)
            log.warning("runs index %s was not a file; moved it to %s and rebuilt the index", self.path, aside.name)
            return self._rebuild_unlocked(warn=True)
        if not self.path.exists():
            return self._rebuild_unlocked(warn=False)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            rows = data["runs"]
            if not isinstance(rows, dict) or not all(isinstance(r, dict) for r in rows.values()):
                raise ValueError("rows are not objects")
            return rows
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("runs index %s is damaged (%s); rebuilding it from the run folders", self.path,
                        e.__class__.__name__)
            return self._rebuild_unlocked(warn=True)

    def _rebuild_unlocked(self, warn: bool) -> dict[str, dict[str, Any]]:
        rows = {run.key: index_row(run, run.info()) for run in scan_runs(self.root)}
        if rows or warn:
            self._write_unlocked(rows)
        return rows

    def _write_unlocked(self, rows: dict[str, dict[str, Any]]) -> None:
        write_json_atomic(self.path, {"format": 1, "runs": dict(sorted(rows.items()))})

    def rows(self) -> dict[str, dict[str, Any]]:
        """Every row; a missing runs folder has none (and is not created), and a folder this
        process may not write is read as it is, from the run folders if the index needs a rebuild."""
        check_runs_dir(self.root)
        if not self.root.is_dir():
            return {}
        if not os.access(self.root, os.W_OK):
            return {run.key: index_row(run, run.info()) for run in scan_runs(self.root)}
        with self._locked():
            return self._read_unlocked()

    def upsert(self, row: dict[str, Any]) -> None:
        with self._locked():
            rows = self._read_unlocked()
            rows[f"{row['task']}/{row['id']}"] = row
            self._write_unlocked(rows)

    def remove(self, keys: list[str]) -> None:
        with self._locked():
            rows = self._read_unlocked()
            for k in keys:
                rows.pop(k, None)
            self._write_unlocked(rows)

    def rebuild(self) -> dict[str, dict[str, Any]]:
        with self._locked():
            return self._rebuild_unlocked(warn=True)


def check_runs_dir(root: str | Path) -> None:
    """The runs folder may be missing (it is made on the first run) but must not be a file."""
    p = Path(root)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--runs-dir: {p} is not a folder")


def scan_runs(root: str | Path, task: str | None = None) -> list[Run]:
    """Every run folder (one holding a valid run.json) under ``root``, oldest first; a folder
    whose run.json is damaged is skipped with a warning (``runs rm`` still takes it by id)."""
    root = Path(root)
    found = []
    tasks = [root / task] if task else sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for tdir in tasks:
        if not tdir.is_dir() or not RUN_NAME.fullmatch(tdir.name):
            continue
        for d in sorted(tdir.iterdir()):
            if d.is_dir() and not d.is_symlink() and RUN_NAME.fullmatch(d.name) and (d / RUN_FILE).is_file():
                run = Run(d.name, tdir.name, d)
                if run.info():
                    found.append(run)
                else:
                    log.warning("skipping run folder %s: its %s is damaged", d, RUN_FILE)
    return sorted(found, key=lambda r: (r.info().get("created", ""), r.id))


def new_run(runs_dir: str | Path, task: str, name: str = "", tag: str = "", config: dict | None = None,
            summary: str = "") -> Run:
    """Create a fresh run folder and index row; an existing run is never reused or overwritten."""
    if name and not RUN_NAME.fullmatch(name):
        raise UsageError(f"--run-name: {name!r} must be 1-64 letters, digits, '.', '_' or '-', not starting with a symbol")
    check_runs_dir(runs_dir)
    root = Path(runs_dir) / task
    run_id = name or f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    path = root / run_id
    if root.exists() and not root.is_dir():
        raise UsageError(f"--runs-dir: {root} is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    except FileExistsError:
        raise UsageError(f"--run-name: a run named {run_id!r} already exists in {root}; pick another name "
                         f"(or continue it with --resume {run_id})") from None
    except OSError as e:
        raise UsageError(f"--runs-dir: cannot create {path}: {e.strerror}") from None
    run = Run(run_id, task, path)
    now = now_iso()
    write_json_atomic(
        path / RUN_FILE,
        {"id": run_id, "task": task, "created": now, "updated": now, "status": "created", "tag": tag,
         "summary": summary, "config": config or {}},
    )
    run.acquire()
    RunsIndex(runs_dir).upsert(index_row(run, run.info()))
    return run


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is a real folder within ``root`` (not a link, not out via '..')."""
    if path.is_symlink():
        return False
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def is_run_folder(path: Path, root: Path) -> bool:
    """Whether ``path`` is a run's own folder, exactly two levels below the runs folder ``root``:
    never the runs folder itself or a task folder, whatever files they hold."""
    if not inside(path, root):
        return False
    resolved, top = path.resolve(), root.resolve()
    return resolved.parent.parent == top and RUN_NAME.fullmatch(resolved.name) is not None


def find_run(runs_dir: str | Path, task: str | None, ref: str) -> Run:
    """A run by id (``id`` or ``task/id`` under ``runs_dir``) or by the path of its folder."""
    root = Path(runs_dir)
    candidates: list[Path] = []
    parts = ref.strip("/").split("/")
    if len(parts) == 1 and RUN_NAME.fullmatch(ref):
        tasks = [task] if task else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        candidates += [root / t / ref for t in tasks]
    elif len(parts) == 2 and all(RUN_NAME.fullmatch(p) for p in parts) and (task is None or parts[0] == task):
        candidates.append(root / parts[0] / parts[1])
    hits = [c for c in candidates if (c / RUN_FILE).is_file()]
    if len(hits) > 1:
        raise UsageError(f"run id {ref!r} is in several tasks ({', '.join(h.parent.name for h in hits)}); "
                         f"write it as task/id")
    if not hits and ref and (Path(ref) / RUN_FILE).is_file():
        hits = [Path(ref).resolve()]  # "." inside a run folder has no name until resolved
    if not hits:
        where = root / task if task else root
        raise UsageError(f"no run {ref!r} (looked for a run id under {where} and for a run folder at that path)")
    path = hits[0]
    info = Run(path.name, path.parent.name, path).info()
    if not info or not RUN_NAME.fullmatch(path.name) or info.get("task", path.parent.name) != path.parent.name:
        raise UsageError(f"{ref!r} is not a run folder (<runs folder>/<task>/<run id> with a valid {RUN_FILE})")
    found_task = str(info.get("task") or path.parent.name)
    if task is not None and found_task != task:
        raise UsageError(f"run {ref!r} belongs to task {found_task!r}, not {task!r}")
    return Run(path.name, found_task, path)


# -- cleanup -----------------------------------------------------------------------------

def resolve_checkpoint(runs_dir: str | Path, task: str, ref: str, best: bool = False) -> Checkpoint:
    """``ref`` is a run id, a run folder, or one checkpoint folder; ``best``: the run's
    best-by-validation checkpoint instead of its newest. Checksums are verified."""
    p = Path(ref)
    if (p / "meta.json").is_file():
        if best:
            raise UsageError("--best: takes a run, not one checkpoint folder")
        ckpt = Checkpoint(p, task)
        ckpt.verify()
        return ckpt
    run = find_run(runs_dir, task, ref)
    folder = run.checkpoints / "best" if best else run.checkpoints
    ckpt = latest_checkpoint(folder, task)
    if ckpt is None:
        raise CheckpointError(f"run {run.id} has no usable checkpoint in {folder}")
    return ckpt


def parse_age(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not m:
        raise UsageError(f"--older-than: expected a number and a unit s|m|h|d|w (e.g. 7d), got {text!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def _age_seconds(run: Run, info: dict[str, Any]) -> float:
    stamp = info.get("updated") or info.get("created")
    try:
        t = datetime.fromisoformat(str(stamp)).timestamp()
    except (TypeError, ValueError):
        t = (run.dir / RUN_FILE).stat().st_mtime
    return time.time() - t


def remove_runs(runs_dir: str | Path, runs: list[Run], dry_run: bool = False) -> None:
    """Delete the runs' folders (events, checkpoints, reports) and their index rows, after
    checking every one of them (``dry_run``: only check).

    Each folder is first renamed to a hidden name beside it, so a crash mid-delete leaves
    no half-run that looks whole; the rows go after the folders."""
    root = Path(runs_dir)
    for run in runs:
        if not is_run_folder(run.dir, root):
            raise UsageError(f"refusing to remove {run.dir}: it is not a run folder (<runs folder>/<task>/<run id>) "
                             f"of {root}")
        if run.in_use():
            raise UsageError(f"run {run.key} is in use by a running process; stop it first")
    if dry_run:
        return
    for run in runs:
        trash = run.dir.with_name(f".trash-{run.id}-{os.getpid()}")
        run.dir.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    RunsIndex(root).remove([r.key for r in runs])


def select_test_runs(runs_dir: str | Path, older_than: float | None = None) -> list[Run]:
    """Runs tagged 'test' (per their own run.json), idle, and older than the age if given."""
    chosen = []
    for run in scan_runs(runs_dir):
        info = run.info()
        if info.get("tag") != TEST_TAG or run.in_use():
            continue
        if older_than is not None and _age_seconds(run, info) < older_than:
            continue
        chosen.append(run)
    return chosen


def clean_test_runs(runs_dir: str | Path, older_than: float | None = None, dry_run: bool = False) -> list[Run]:
    """Remove test-tagged runs (never untagged ones) and index rows whose folder is gone."""
    runs = select_test_runs(runs_dir, older_than)
    if not dry_run:
        remove_runs(runs_dir, runs)
        index = RunsIndex(runs_dir)
        if index.path.exists():
            orphans = [k for k, r in index.rows().items() if not (Path(runs_dir) / str(r.get("dir", k)) / RUN_FILE).is_file()]
            if orphans:
                index.remove(orphans)
    return runs


class NullWriter:
    """What ranks other than 0 log to."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class ReadOnlyRun(Run):
    """The run as ranks past 0 see it: they train it and write nothing (rank 0 does)."""

    def update(self, **fields: Any) -> None:
        pass

    def writer(self, member: str, purge_step: int | None = None) -> NullWriter:
        return NullWriter()
