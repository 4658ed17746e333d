"""Checkpoints of a training state: any pytree of arrays (PRNG keys included), its step and history.

A checkpoint is one safetensors file, ``step-00000250.safetensors``, in a checkpoint folder:

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

>>> import jax, jax.numpy as jnp, tempfile
>>> state = {"w": jnp.ones(3), "key": jax.random.key(0), "step": jnp.asarray(5)}
>>> folder = tempfile.mkdtemp()
>>> _ = save_checkpoint(folder, state, 5, history={"loss": [1.0, 0.5]})
>>> ckpt = latest_checkpoint(folder, like=state)
>>> ckpt.step, ckpt.history["loss"], bool((ckpt.state["w"] == 1).all())
(5, [1.0, 0.5], True)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from explainer.errors import ExplainerError

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
