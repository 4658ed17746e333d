"""Data parallelism: each training step's batch split across devices, everything else replicated.

One :class:`DataParallel` describes where a training step runs. With one device (an ordinary CPU
machine, or ``devices = 1``) it does nothing at all, so that code path and its results are exactly
those of a single-device run. With ``n > 1`` devices it builds a :class:`jax.sharding.Mesh` over the
first ``n`` of them with one axis, ``batch``:

- the prompts drawn for a step, the full model's reference logits and the replacement activations
  are split along ``batch`` (``with_sharding_constraint`` inside the jitted step);
- the gates, the optimiser state, ``log λ``, the adversary and the training prompts themselves are
  replicated.

The loss is a mean over the batch, so XLA inserts the all-reduce of the gradients itself; there is
no ``pmap`` and no hand-written collective. Every device draws the same batch indices (one PRNG key,
replicated), so an ``n``-device run computes what the one-device run computes, up to the order of
floating-point reductions.

On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before JAX starts) makes four
host devices. Several hosts join through :func:`init_distributed` (``jax.distributed``).

Independent work (the states of a sweep's ladder, the candidate masks an oracle scores) runs in
threads instead, one per core (:func:`cpu_workers`, :func:`thread_map`): XLA runs each call of these
small programs on one core and releases the interpreter lock while it runs, so threads use every
core where one vmapped call would use one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from explainer.errors import ExplainerError

AXIS = "batch"
COORDINATOR_ENV = "EXPLAINER_COORDINATOR"
NUM_PROCESSES_ENV = "EXPLAINER_NUM_PROCESSES"
PROCESS_ID_ENV = "EXPLAINER_PROCESS_ID"


def cpu_workers() -> int:
    """Threads independent work may run on: the cores this process may use when JAX computes on the
    CPU, else 1 (on an accelerator one vmapped batch keeps the device busy)."""
    if jax.default_backend() != "cpu":
        return 1
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, len(cores))


_POOLS: dict[int, ThreadPoolExecutor] = {}


def thread_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> list[Any]:
    """``[fn(x) for x in items]``, in order, on up to ``workers`` threads (in this one when
    ``workers`` is 1 or there is one item). The pools are kept, one per thread count.

    >>> thread_map(lambda x: x * x, range(5), 2)
    [0, 1, 4, 9, 16]
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="explainer")
    return list(_POOLS[workers].map(fn, items))


def select_devices(n: int | None = None) -> list[jax.Device]:
    """The first ``n`` devices JAX sees (all of them for ``None``).

    >>> len(select_devices(1))
    1
    """
    available = jax.devices()
    if n is None:
        return list(available)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ExplainerError(f"devices must be a positive integer (or unset for all), got {n!r}")
    if n > len(available):
        platform = available[0].platform
        hint = (
            f"; on CPU, start with XLA_FLAGS=--xla_force_host_platform_device_count={n} to split the host"
            if platform == "cpu"
            else ""
        )
        raise ExplainerError(
            f"--devices {n} asks for more devices than the {len(available)} {platform} device(s) JAX sees; "
            f"use --devices {len(available)} or fewer{hint}"
        )
    return list(available[:n])


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Where a training step runs: ``mesh`` is ``None`` on one device (then every method is the identity).

    >>> dp = data_parallel(1, batch_size=64)
    >>> dp.n_devices, dp.mesh is None
    (1, True)
    """

    mesh: Mesh | None

    @property
    def n_devices(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.devices.size)

    def _constrain(self, tree: Any, spec: PartitionSpec) -> Any:
        if self.mesh is None:
            return tree
        sharding = NamedSharding(self.mesh, spec)
        arrays, rest = eqx.partition(tree, eqx.is_array)
        arrays = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), arrays)
        return eqx.combine(arrays, rest)

    def shard(self, tree: Any) -> Any:
        """Inside ``jit``: split every array of ``tree`` along its leading (batch) axis."""
        return self._constrain(tree, PartitionSpec(AXIS))

    def replicate(self, tree: Any) -> Any:
        """Inside ``jit``: keep a full copy of every array of ``tree`` on every device."""
        return self._constrain(tree, PartitionSpec())

    def put_replicated(self, tree: Any) -> Any:
        """Outside ``jit``: copy every array of ``tree`` to every device of the mesh (tracers are left alone)."""
        if self.mesh is None:
            return tree
        sharding = NamedSharding(self.mesh, PartitionSpec())
        arrays, rest = eqx.partition(tree, lambda x: eqx.is_array(x) and not isinstance(x, jax.core.Tracer))
        return eqx.combine(jax.device_put(arrays, sharding), rest)


def data_parallel(devices: int | None, batch_size: int) -> DataParallel:
    """The layout of a training step over ``devices`` devices (``None``: all) at ``batch_size``.

    The batch is split evenly, so ``batch_size`` must be a multiple of the device count.
    """
    chosen = select_devices(devices)
    n = len(chosen)
    if n == 1:
        return DataParallel(None)
    if batch_size % n:
        multiple = -(-batch_size // n) * n
        raise ExplainerError(
            f"batch_size {batch_size} does not split evenly across {n} devices; "
            f"use batch_size {multiple} (a multiple of {n}) or a device count that divides {batch_size} (--devices)"
        )
    return DataParallel(Mesh(np.array(chosen), (AXIS,)))


def distributed_settings(environ: Mapping[str, str] | None = None, requested: bool = False) -> dict[str, Any] | None:
    """The arguments of ``jax.distributed.initialize`` asked for by ``environ``, or ``None``.

    ``EXPLAINER_COORDINATOR=host:port`` with ``EXPLAINER_NUM_PROCESSES`` and ``EXPLAINER_PROCESS_ID``
    names the cluster explicitly; ``requested`` (``explainer train --distributed``) without them
    lets JAX detect it (SLURM, Open MPI, Kubernetes, Cloud TPU).

    >>> distributed_settings({"EXPLAINER_COORDINATOR": "10.0.0.1:1234", "EXPLAINER_NUM_PROCESSES": "2",
    ...                       "EXPLAINER_PROCESS_ID": "0"})
    {'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 0}
    >>> distributed_settings({}) is None
    True
    """
    environ = os.environ if environ is None else environ
    coordinator = environ.get(COORDINATOR_ENV)
    if not coordinator:
        return {} if requested else None
    out: dict[str, Any] = {"coordinator_address": coordinator}
    for key, name in (("num_processes", NUM_PROCESSES_ENV), ("process_id", PROCESS_ID_ENV)):
        text = environ.get(name)
        if text is None:
            raise ExplainerError(f"{COORDINATOR_ENV} is set, so {name} must be too (an integer); export {name}=...")
        try:
            out[key] = int(text)
        except ValueError:
            raise ExplainerError(f"{name} must be an integer, got {text!r}") from None
    if not 0 <= out["process_id"] < out["num_processes"]:
        raise ExplainerError(
            f"{PROCESS_ID_ENV} must be in 0..{out['num_processes'] - 1} ({NUM_PROCESSES_ENV}), got {out['process_id']}"
        )
    return out


def init_distributed(
    environ: Mapping[str, str] | None = None,
    requested: bool = False,
    initialize: Callable[..., None] | None = None,
) -> bool:
    """Join a multi-host JAX cluster when ``environ`` or ``requested`` asks for it; returns whether it did.

    Must run before anything else touches JAX's devices. Every process then loads the same model and
    prompts and runs the same command; ``jax.devices()`` lists every host's devices and the batch is
    split across all of them. ``initialize`` stands in for ``jax.distributed.initialize`` in tests.
    """
    settings = distributed_settings(environ, requested)
    if settings is None:
        return False
    (initialize or jax.distributed.initialize)(**settings)
    return True
