"""Run locks: one process at a time writes a run folder.

``<run>.lock`` sits next to the run folder while a command writes it, created with
``O_CREAT | O_EXCL`` (atomic: of two processes, exactly one creates it) and holding the writer's
``pid`` and ``host``. A second writer refuses with a message naming the first. A lock left by a
process that died (same host, pid no longer running) is stale: it is taken over.

>>> import tempfile
>>> run = Path(tempfile.mkdtemp()) / "run"
>>> with run_lock(run):
...     run_lock(run).__enter__()
Traceback (most recent call last):
...
explainer.errors.ExplainerError: ...is being written by process ... on ...
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from explainer.errors import ExplainerError

UNREADABLE_GRACE_S = 10.0  # a lock file still empty after this long was left by a crash


def lock_path(run: str | os.PathLike) -> Path:
    run = Path(run)
    return run.with_name(run.name + ".lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: Path) -> dict | None:
    """The lock's contents, or ``None`` when it is unreadable (being written, or left empty)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _stale(path: Path) -> bool:
    holder = _holder(path)
    if holder is None:
        try:
            return time.time() - path.stat().st_mtime > UNREADABLE_GRACE_S
        except FileNotFoundError:
            return True
    return holder.get("host") == socket.gethostname() and not _alive(holder["pid"])


def _take_over(path: Path) -> None:
    """Remove a stale lock. It is renamed first and checked again: if another process took the
    lock over in between, the renamed file is its live lock, and is put back."""
    moved = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.replace(path, moved)
    except FileNotFoundError:
        return
    if not _stale(moved):
        with contextlib.suppress(FileExistsError):
            os.link(moved, path)
    moved.unlink(missing_ok=True)


def acquire(run: str | os.PathLike) -> Path:
    """Create the lock of ``run``; take over a stale one; raise if a live process holds it."""
    path = lock_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _stale(path):
                _take_over(path)
                continue
            holder = _holder(path) or {}
            raise ExplainerError(
                f"run {str(run)!r} is being written by process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} (lock file {path}); wait for it to finish, or choose another "
                "--out. If that process is gone, delete the lock file."
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
        return path
    raise ExplainerError(f"could not take the lock {path}; another process keeps replacing it")


def release(path: Path) -> None:
    holder = _holder(path)
    if holder is not None and holder.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(run: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of ``run`` for the duration of a ``with`` block."""
    path = acquire(run)
    try:
        yield path
    finally:
        release(path)
