"""Unfinished runs: what ``explainer train --resume RUN`` continues from.

While ``explainer train --out RUN`` trains, the run folder ``RUN`` does not exist yet (it appears,
atomically, once the explanation is saved). Next to it are:

- ``RUN.lock``: the writer's pid and host (:mod:`explainer.lock`);
- ``RUN.partial/resume.json``: how the run was started (model and its weights' sha256, task,
  every training setting, adversary, whether it replaces an existing run);
- ``RUN.partial/checkpoints/``: the two newest checkpoints (:mod:`explainer.checkpoint`).

When the run is saved, ``RUN.partial`` is removed. If the process dies (or training stops on a NaN),
``RUN.partial`` stays, and ``--resume RUN`` continues from the newest good checkpoint with the
recorded settings.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from explainer.checkpoint import list_checkpoints
from explainer.errors import ExplainerError
from explainer.models.native import read_json, write_json

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
    from explainer.lock import run_lock

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
