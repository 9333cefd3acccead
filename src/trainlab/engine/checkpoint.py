"""Self-describing checkpoint folders, written atomically, read as untrusted input.

A checkpoint is a folder ``step_0000200/`` holding tensors (``*.pt``) and readable
files (``*.json``: model config, run config, vocabulary) side by side, plus
``meta.json`` with the step and a sha256 of every other file. It is written into
a hidden temporary folder, every file fsynced, then renamed into place and the
parent fsynced: a crash leaves either the old set of checkpoints or the new one,
never a half-written folder under a real name. ``meta.json`` is written last, so a
folder without a valid one is not a checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Any, TypeVar

import torch

from trainlab.engine import faults
from trainlab.engine.errors import CheckpointError

log = logging.getLogger("trainlab")
T = TypeVar("T")

META = "meta.json"
FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def step_dirname(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(
    root: Path, step: int, tensors: dict[str, Any], texts: dict[str, str], task: str, keep: int = 3,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write one checkpoint folder atomically and prune all but the newest ``keep`` (by step;
    ``keep`` < 0: all but this one; 0: none).

    ``tensors`` maps relative file names to objects for ``torch.save`` (state dicts of
    tensors, numbers, strings, lists); ``texts`` maps relative names to file contents.
    """
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = root / step_dirname(step)
    tmp = root / f".tmp-{step_dirname(step)}-{os.getpid()}"
    sums: dict[str, str] = {}
    for name, obj in tensors.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        sums[name] = _write_bytes(tmp / name, buf.getvalue())
        faults.kill_if("kill_in_save", step)
    for name, text in texts.items():
        sums[name] = _write_bytes(tmp / name, text.encode("utf-8"))
    meta = {"format": FORMAT_VERSION, "task": task, "step": step, "saved_at": time.time(), **(extra_meta or {}),
            "sha256": sums}
    _write_bytes(tmp / META, json.dumps(meta, indent=2).encode("utf-8"))
    for sub in {p.parent for p in tmp.rglob("*") if p.is_file()}:
        _fsync_dir(sub)
    if final.exists():  # the same step saved twice (e.g. a save step that is also the last)
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            remove_checkpoint(old)
    elif keep < 0:  # this one alone: an older step's folder may be the newer one of a run's own history
        for old in list_checkpoints(root):
            if old != final:
                remove_checkpoint(old)
    return final


def remove_checkpoint(path: Path) -> None:
    """Rename out of the checkpoint namespace first (atomic), then delete: a crash
    mid-delete never leaves a half-deleted folder that still looks like a checkpoint."""
    doomed = path.with_name(f".del-{path.name}-{os.getpid()}")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Temp folders of saves a crash interrupted. Only one process writes a run's
    checkpoints (it holds the run's lock), so any leftover here is from a dead one."""
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith((".tmp-", ".old-", ".del-")):
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root`` with a meta file, oldest first (unverified)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


MAX_META_BYTES = 1 << 20
MAX_FILE_BYTES = 64 << 30  # no file of a checkpoint this project writes comes near it
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _confined(folder: Path, name: str) -> Path:
    """``folder / name`` when ``name`` is a plain relative path that stays inside ``folder``
    and names a regular file of a sane size; meta.json is untrusted input, and a name such
    as ``/dev/zero`` or ``../../etc/passwd`` must never be read."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or any(p in ("..", ".", "") for p in parts) or "\\" in name:
        raise CheckpointError(f"{folder}: {META} names a file outside the checkpoint ({name[:80]!r})")
    path = folder / name
    try:
        resolved = path.resolve(strict=True)
        resolved.relative_to(folder.resolve(strict=True))
        st = path.lstat()
    except (OSError, ValueError, RuntimeError):
        raise CheckpointError(f"{folder}: {META} names {name[:80]!r}, which is missing or outside the checkpoint") \
            from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{folder}: {name[:80]!r} is not a regular file")
    if st.st_size > MAX_FILE_BYTES:
        raise CheckpointError(f"{folder}: {name[:80]!r} is {st.st_size:,} bytes, more than a checkpoint file can be")
    return path


class Checkpoint:
    """A verified checkpoint folder; files are checked against meta.json when read."""

    def __init__(self, path: Path, task: str | None = None) -> None:
        self.path = Path(path)
        try:
            meta_path = self.path / META
            st = meta_path.stat()  # FileNotFoundError: not a checkpoint
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_META_BYTES:
                raise ValueError("not a small regular file")
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
            step = self.meta["step"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"step {step!r}")
            self.step = step
            sums = self.meta["sha256"]
            if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v)
                                                     for k, v in sums.items()):
                raise ValueError("sha256 is not a map of file names to digests")
            self.sums: dict[str, str] = dict(sums)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} is not a checkpoint (no {META})") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = str(e)[:80] if isinstance(e, ValueError) else e.__class__.__name__
            raise CheckpointError(f"{self.path}: unreadable {META} ({why})") from None
        if task is not None and self.meta.get("task") != task:
            raise CheckpointError(f"{self.path} belongs to task {str(self.meta.get('task'))[:40]!r}, not {task!r}")
        for name in self.sums:  # every name is checked before any file is read
            _confined(self.path, name)
        self._loaded: dict[str, Any] = {}

    def _read(self, name: str) -> bytes:
        if name not in self.sums:
            raise CheckpointError(f"{self.path}: has no file {name}")
        path = _confined(self.path, name)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"{self.path / name}: {e.strerror}") from None
        if hashlib.sha256(data).hexdigest() != self.sums[name]:
            raise CheckpointError(f"{self.path / name}: checksum mismatch (truncated or corrupted)")
        return data

    def verify(self) -> None:
        for name in self.sums:
            self._read(name)

    def text(self, name: str) -> str:
        return self._read(name).decode("utf-8")

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.text(name))
        except ValueError:
            raise CheckpointError(f"{self.path / name}: not valid JSON") from None

    def config(self, name: str, cls: type[T], section: str | None = None) -> T:
        """The dataclass ``cls`` from a saved JSON file (``section``: one key of it), checked by
        the class's own ``__post_init__``; unknown keys (from newer versions) are ignored."""
        raw = self.json(name)
        if section is not None:
            raw = raw.get(section, {}) if isinstance(raw, dict) else None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{self.path / name}: not a mapping of settings")
        from trainlab.config import build  # the same type and range checks a flag gets

        try:
            return build(cls, raw)
        except (ValueError, TypeError) as e:  # ConfigError is a ValueError
            raise CheckpointError(f"{self.path / name}: bad {section or 'settings'} ({str(e)[:160]})") from None

    def load_weights(self, model: torch.nn.Module, name: str, map_location: str | torch.device = "cpu") -> None:
        try:
            model.load_state_dict(self.tensors(name, map_location=map_location))
        except RuntimeError as e:
            raise CheckpointError(f"{self.path}: {name} does not fit the model "
                                  f"({str(e).splitlines()[0]})") from None

    def load_all(self) -> None:
        """Verify every file and load every ``*.pt`` now (kept for ``tensors``), so a
        checkpoint that would fail half-way through a restore is refused up front."""
        self.verify()
        for name in self.sums:
            if name.endswith(".pt"):
                self._loaded[name] = self.tensors(name)

    def tensors(self, name: str, map_location: str | torch.device = "cpu") -> Any:
        if name in self._loaded:
            obj = self._loaded.pop(name)  # each file is restored once; don't hold two copies
            return _to_device(obj, map_location)
        data = self._read(name)
        try:
            # weights_only: a checkpoint is untrusted input and must not run code
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad pickles
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise CheckpointError(f"{self.path / name}: refused to load ({first[:160]})") from None


def latest_checkpoint(root: Path, task: str | None = None) -> Checkpoint | None:
    """The newest checkpoint under ``root`` whose files all verify; damaged ones are skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            ckpt = Checkpoint(path, task)
            ckpt.verify()
            return ckpt
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint: %s", e)
            continue
    return None


def _to_device(obj: Any, device: str | torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    return obj


def resume_checkpoint(root: Path, task: str) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``root`` that verifies and loads in full, and
    (folder, reason) for each newer one that did not."""
    damaged: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(root)):
        try:
            ckpt = Checkpoint(path, task)
            ckpt.load_all()
            return ckpt, damaged
        except CheckpointError as e:
            damaged.append((path, str(e)))
    return None, damaged


def move_aside(path: Path) -> Path:
    """Rename a damaged checkpoint ``damaged-step_...``: kept for inspection, never
    overwritten by a resumed run's saves, never pruned, never picked again."""
    aside = path.with_name(f"damaged-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(aside)
    return aside
