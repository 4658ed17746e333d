"""The run lifecycle shared by ``explainer train`` and ``explainer sweep``: start, lock, checkpoint,
resume, finish.

While ``explainer train --out RUN`` trains, the run folder ``RUN`` does not exist yet (it appears,
atomically, once the explanation is saved). Next to it are:

- ``RUN.lock``: the writer's pid and host (:func:`run_lock`);
- ``RUN.partial/resume.json``: how the run was started (model and its weights' sha256, task,
  every training setting, adversary, whether it replaces an existing run);
- ``RUN.partial/checkpoints/``: the two newest checkpoints (:func:`save_checkpoint`).

When the run is saved, ``RUN.partial`` is removed. If the process dies (or training stops on a NaN),
``RUN.partial`` stays, and ``--resume RUN`` continues from the newest good checkpoint with the
recorded settings (:func:`lifecycle`).

**Locks.** ``RUN.lock`` sits next to the run folder while a command writes it, created with
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

**Checkpoints** of a training state: any pytree of arrays (PRNG keys included), its step and
history. A checkpoint is one safetensors file, ``step-00000250.safetensors``, in a checkpoint folder:

- ``leaf.{i}``: the ``i``-th leaf of the state (``jax.tree.leaves`` order); PRNG keys are stored as
  their key data (``jax.random.key_data``) and rewrapped on load;
- ``history.{name}``: per-step training curves so far (float64);
- metadata: ``step``, the leaf kinds, free-form JSON ``meta`` and a sha256 of every tensor byte,
  so a flipped byte is noticed and the previous checkpoint used instead.

Files are written to a temporary name, flushed to disk and renamed, so a crash leaves either the old
checkpoint or the new one, never half of one. The newest ``keep`` (two) are kept.

The state's structure is not stored: loading takes a template (``like``), e.g. a freshly initialised
state, and checks every leaf's shape and dtype against it. Resuming from a checkpoint is exact:
the loop folds the step into its key, so the steps after a resume are the steps that would have run.

>>> import jax, jax.numpy as jnp
>>> state = {"w": jnp.ones(3), "key": jax.random.key(0), "step": jnp.asarray(5)}
>>> folder = tempfile.mkdtemp()
>>> _ = save_checkpoint(folder, state, 5, history={"loss": [1.0, 0.5]})
>>> ckpt = latest_checkpoint(folder, like=state)
>>> ckpt.step, ckpt.history["loss"], bool((ckpt.state["w"] == 1).all())
(5, [1.0, 0.5], True)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from explainer.errors import ExplainerError
from explainer.models.native import read_json, write_json

# --- the lock -----------------------------------------------------------------------------------

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


# --- checkpoints --------------------------------------------------------------------------------

KEEP = 2
_NAME = re.compile(r"^step-(\d{8,})\.safetensors$")


class Checkpoint(NamedTuple):
    """A loaded checkpoint: the restored state, its step, the history and ``meta`` saved with it."""

    state: Any
    step: int
    history: dict[str, list[Any]]
    meta: dict[str, Any]
    path: Path


def _is_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    return h.hexdigest()


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"step-{step:08d}.safetensors"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint in ``folder``, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(
    folder: str | os.PathLike,
    state: Any,
    step: int,
    history: dict[str, list[Any]] | None = None,
    meta: dict[str, Any] | None = None,
    keep: int = KEEP,
) -> Path:
    """Write ``state`` (any pytree of arrays) at ``step`` atomically; keep the newest ``keep`` files."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    kinds, shapes = [], []
    for i, leaf in enumerate(jax.tree.leaves(state)):
        if _is_key(leaf):
            kinds.append(f"key:{jax.random.key_impl(leaf)}")
            leaf = jax.random.key_data(leaf)
        else:
            kinds.append("array")
        value = np.asarray(jax.device_get(leaf))
        shapes.append(list(value.shape))  # safetensors stores a 0-d array as shape (1,)
        tensors[f"leaf.{i}"] = np.ascontiguousarray(value)
    for name, values in (history or {}).items():
        tensors[f"history.{name}"] = np.atleast_1d(np.asarray(values, np.float64))  # steps (× runs)
    metadata = {
        "format": "explainer-checkpoint/1",
        "step": str(int(step)),
        "kinds": json.dumps(kinds),
        "shapes": json.dumps(shapes),
        "meta": json.dumps(meta or {}),
        "sha256": _digest(tensors),
    }
    path = checkpoint_path(folder, step)
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for _, old in list_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)
    return path


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so a machine that dies keeps it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - folders cannot be opened on some systems
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, like: Any) -> Checkpoint:
    """Read one checkpoint into the structure of ``like``; raise if it is corrupt or does not fit."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as err:
        raise ExplainerError(f"checkpoint {path} is unreadable ({err})") from None
    if metadata.get("format") != "explainer-checkpoint/1" or metadata.get("sha256") != _digest(tensors):
        raise ExplainerError(f"checkpoint {path} is corrupt (its contents do not match its sha256)")
    try:
        kinds, shapes = json.loads(metadata["kinds"]), json.loads(metadata["shapes"])
        for i, shape in enumerate(shapes):
            tensors[f"leaf.{i}"] = tensors[f"leaf.{i}"].reshape(shape)
        step, meta = int(metadata["step"]), json.loads(metadata["meta"])
    except (KeyError, ValueError, TypeError) as err:
        raise ExplainerError(f"checkpoint {path} has bad metadata ({err})") from None
    template, treedef = jax.tree.flatten(like)
    if len(kinds) != len(template) or len(shapes) != len(template):
        raise ExplainerError(
            f"checkpoint {path} holds {len(kinds)} arrays but this training state has {len(template)}; "
            "it was written with other settings"
        )
    pairs = enumerate(zip(kinds, template, strict=True))
    leaves = [_restore_leaf(path, i, kind, tensors[f"leaf.{i}"], t) for i, (kind, t) in pairs]
    history = {k[len("history.") :]: v.tolist() for k, v in tensors.items() if k.startswith("history.")}
    return Checkpoint(jax.tree.unflatten(treedef, leaves), step, history, meta, path)


def _restore_leaf(path: Path, i: int, kind: str, value: np.ndarray, template: Any) -> Any:
    if kind.startswith("key:"):
        if not _is_key(template):
            raise ExplainerError(f"checkpoint {path}: leaf {i} is a PRNG key but this state has an array there")
        restored = jax.random.wrap_key_data(value, impl=kind[4:])
        want = (template.shape, template.dtype)
        got = (restored.shape, restored.dtype)
    else:
        want = (np.shape(template), np.asarray(template).dtype if not _is_key(template) else "key")
        got = (value.shape, value.dtype)
        restored = jax.numpy.asarray(value) if isinstance(template, jax.Array) else value
    if got != want:
        raise ExplainerError(
            f"checkpoint {path}: leaf {i} has shape/dtype {got} but this training state needs {want}; "
            "it was written with other settings"
        )
    return restored


def latest_checkpoint(folder: str | os.PathLike, like: Any) -> Checkpoint | None:
    """The newest checkpoint in ``folder`` that loads; a corrupt one is reported and skipped.

    Returns ``None`` when there is none. Raises when checkpoints exist but none of them loads.
    """
    found = list_checkpoints(folder)
    problems = []
    for _, path in found:
        try:
            return load_checkpoint(path, like)
        except ExplainerError as err:
            problems.append(str(err))
            print(f"warning: {err}; trying an older checkpoint", file=sys.stderr)
    if problems:
        raise ExplainerError(
            f"no usable checkpoint in {folder}: " + "; ".join(problems) + "; start again with --overwrite"
        )
    return None


# --- unfinished runs ----------------------------------------------------------------------------

RECORD_FILE = "resume.json"
CHECKPOINTS = "checkpoints"


def partial_path(run: str | os.PathLike) -> Path:
    run = Path(run)
    return run.with_name(run.name + ".partial")


def checkpoint_folder(run: str | os.PathLike) -> Path:
    return partial_path(run) / CHECKPOINTS


def describe(run: str | os.PathLike) -> str:
    """``last checkpoint at step N`` or ``no checkpoint yet``."""
    found = list_checkpoints(checkpoint_folder(run))
    return f"last checkpoint at step {found[0][0]}" if found else "no checkpoint yet"


def refuse_unfinished(run: str | os.PathLike) -> None:
    """Raise if ``run`` has an unfinished training that a new run would silently throw away."""
    if partial_path(run).exists():
        raise ExplainerError(
            f"run {str(run)!r} has an unfinished training in {partial_path(run)} ({describe(run)}); "
            f"continue it with `explainer train --resume {run}`, or pass --overwrite to start again"
        )


def start(run: str | os.PathLike, record: dict[str, Any], overwrite: bool) -> Path:
    """Create ``RUN.partial`` with its ``resume.json`` (discarding an old one only with ``overwrite``)."""
    partial = partial_path(run)
    if partial.exists():
        if not overwrite:
            refuse_unfinished(run)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    write_json(partial / RECORD_FILE, record)
    return checkpoint_folder(run)


def read_record(run: str | os.PathLike) -> dict[str, Any]:
    """The ``resume.json`` of an unfinished run, with a message saying why there is none."""
    run = Path(run)
    path = partial_path(run) / RECORD_FILE
    if not path.is_file():
        if (run / "explanation.json").is_file():
            raise ExplainerError(f"run {str(run)!r} has finished; there is nothing to resume")
        raise ExplainerError(
            f"{str(run)!r} is not an unfinished run ({path} does not exist); pass the --out of an "
            "`explainer train` that was interrupted"
        )
    record = read_json(path)
    keys = ("model", "task", "config", "adversary", "overwrite")
    if not isinstance(record, dict) or any(k not in record for k in keys):
        raise ExplainerError(f"{path} is incomplete (it needs {', '.join(keys)}); start again with --overwrite")
    return record


def finish(run: str | os.PathLike) -> None:
    """Remove ``RUN.partial`` once the run folder is saved."""
    shutil.rmtree(partial_path(run), ignore_errors=True)


def discard_if_empty(run: str | os.PathLike) -> None:
    """Remove ``RUN.partial`` when it holds no checkpoint (nothing to resume from)."""
    if not list_checkpoints(checkpoint_folder(run)):
        finish(run)


@contextlib.contextmanager
def lifecycle(
    run: str | os.PathLike,
    record: dict[str, Any],
    *,
    resume: bool,
    overwrite: bool,
    check_same: Callable[[Any, dict[str, Any]], None],
    check_free: Callable[[Any, bool], None],
    command: str,
) -> Iterator[Path]:
    """One run's life on disk, shared by ``explainer train`` and ``explainer sweep``.

    Holds the lock ``RUN.lock``; continues ``RUN.partial`` (``resume``: after
    ``check_same(run, record)``) or starts it (after ``check_free(run, overwrite)``, checked again
    now that the lock is held); yields the checkpoint folder. When the body returns (it has saved
    the run), ``RUN.partial`` goes; when it fails, the checkpoints stay and the message says how to
    continue (``explainer COMMAND --resume RUN``), or ``RUN.partial`` goes when it holds none.
    """
    with run_lock(run):
        if resume:
            check_same(run, record)
            checkpoints = checkpoint_folder(run)
        else:
            check_free(run, overwrite)
            checkpoints = start(run, record, overwrite)
        try:
            yield checkpoints
        except BaseException:
            if not any(checkpoints.rglob("step-*.safetensors")):
                finish(run)
            else:
                print(
                    f"{command} stopped; what it trained is kept in {checkpoints}: continue it with "
                    f"`explainer {command} --resume {run}`",
                    file=sys.stderr,
                )
            raise
        finish(run)
