"""Data parallelism, and optionally the model's weights sharded too (FSDP-style), over a device mesh.

One :class:`DataParallel` describes where a training step runs. With one device (an ordinary CPU
machine, or ``devices = 1``) it does nothing at all, so that code path and its results are exactly
those of a single-device run. With ``n > 1`` devices it builds a :class:`jax.sharding.Mesh` over the
first ``n`` of them with one axis, ``batch``:

- the prompts drawn for a step, the full model's reference logits and the replacement activations
  are split along ``batch`` (``with_sharding_constraint`` inside the jitted step);
- the gates, the optimiser state, ``log λ``, the adversary and the training prompts themselves are
  replicated;
- the model's weights are replicated too, unless ``runtime.shard_weights`` (``--shard-weights``)
  asks for them to be sharded over the same axis (below).

The loss is a mean over the batch, so XLA inserts the all-reduce of the gradients itself; there is
no ``pmap`` and no hand-written collective. Every device draws the same batch indices (one PRNG key,
replicated), so an ``n``-device run computes what the one-device run computes, up to the order of
floating-point reductions.

**Sharded weights** (``shard_weights``, FSDP-style, for models whose training step does not fit on
one device). Before the step runs, every weight matrix of the model (every array with two or more
axes) is placed with a :class:`~jax.sharding.NamedSharding` split along its largest axis that the
device count divides (:func:`weight_spec`): the embedding and unembedding along the vocabulary or
``d_model``, the MLP along ``d_mlp``, the attention along ``d_model`` or the heads. A weight none
of whose axes divides stays replicated, as do the vectors (biases, norms) and everything that is
not the model: the gates and the optimiser state are a few numbers per residual dimension, so they
stay whole on every device. The batch is still split along the same axis. Nothing else changes in
the step: GSPMD inserts the collectives each use of a weight needs (gathering it, or reducing the
partial products of its shards), so a device stores ``1/n`` of each split weight. A device count
that divides no weight's axis is refused (:meth:`DataParallel.put_weights`), as is
``shard_weights`` on one device.

:func:`explainer.explain` and the sweep shard the model this way as soon as it is loaded
(:meth:`DataParallel.shard_model`), so the weights stay split for everything after: the means and
bases built from them, training, the finishing passes and the scorer (:mod:`explainer.score`,
whose CPU threads then each run a program over every device of the mesh). Loading itself still
reads the whole model onto the default device once, before it is split. A model passed to
:func:`~explainer.train.step.make_step` unsharded is left where it is and the step shards a copy.

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
    """Where a training step runs: ``mesh`` is ``None`` on one device (then every method is the identity);
    ``shard_weights``: the model's weight matrices are split over the mesh (:meth:`put_weights`).

    >>> dp = data_parallel(1, batch_size=64)
    >>> dp.n_devices, dp.mesh is None
    (1, True)
    """

    mesh: Mesh | None
    shard_weights: bool = False

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

    def put_weights(self, scrubber: Any) -> Any:
        """Outside ``jit``: every array of ``scrubber`` on every device of the mesh, except that with
        ``shard_weights`` its ``model``'s weight matrices are split by :func:`weight_spec`
        (:meth:`shard_model`)."""
        if self.mesh is None or not self.shard_weights:
            return self.put_replicated(scrubber)
        return self._place(scrubber, lambda path: bool(path) and getattr(path[0], "name", None) == "model")

    def shard_model(self, model: Any) -> Any:
        """Outside ``jit``: ``model``'s weight matrices split over the mesh by :func:`weight_spec`,
        its other arrays replicated (``model`` itself when weights are not sharded).

        Raises :class:`ExplainerError` when no weight has an axis the device count divides."""
        if self.mesh is None or not self.shard_weights:
            return model
        return self._place(model, lambda path: True)

    def _place(self, tree: Any, in_model: Callable[[tuple], bool]) -> Any:
        n = self.n_devices
        arrays, rest = eqx.partition(tree, lambda x: eqx.is_array(x) and not isinstance(x, jax.core.Tracer))
        specs = jax.tree_util.tree_map_with_path(
            lambda path, x: weight_spec(x.shape, n) if in_model(path) else PartitionSpec(), arrays
        )
        if all(s == PartitionSpec() for s in jax.tree.leaves(specs, is_leaf=_is_spec)):
            weights = [x for p, x in jax.tree_util.tree_leaves_with_path(arrays) if in_model(p) and x.ndim >= 2]
            shapes = sorted({d for x in weights for d in x.shape})
            fits = [k for k in range(2, len(jax.devices()) + 1) if any(d % k == 0 for d in shapes)]
            hint = f"use --devices {fits[-1]}, which divides one, or " if fits else ""
            raise ExplainerError(
                f"--shard-weights over {n} devices: no weight of the model has an axis that {n} divides "
                f"(axis sizes {shapes}); {hint}drop --shard-weights to replicate the weights"
            )
        placed = jax.tree.map(
            lambda x, s: jax.device_put(x, NamedSharding(self.mesh, s)), arrays, specs, is_leaf=_is_spec
        )
        return eqx.combine(placed, rest)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def weight_spec(shape: tuple[int, ...], n: int) -> PartitionSpec:
    """How a weight of ``shape`` is split over ``n`` devices: along its largest axis that ``n``
    divides (the first of equal ones); replicated when it has fewer than two axes or none divides.

    >>> tuple(weight_spec((50304, 768), 4))  # an embedding: along the vocabulary
    ('batch', None)
    >>> tuple(weight_spec((50257, 768), 4))  # GPT-2's odd vocabulary: along d_model
    (None, 'batch')
    >>> tuple(weight_spec((12, 768, 64), 4))  # an attention matrix: along d_model
    (None, 'batch', None)
    >>> weight_spec((10, 10), 4) == weight_spec((768,), 4) == PartitionSpec()  # replicated
    True
    """
    if len(shape) < 2:
        return PartitionSpec()
    fits = [i for i, d in enumerate(shape) if d % n == 0 and d >= n]
    if not fits:
        return PartitionSpec()
    axis = max(fits, key=lambda i: (shape[i], -i))
    return PartitionSpec(*(AXIS if i == axis else None for i in range(len(shape))))


def data_parallel(devices: int | None, batch_size: int, shard_weights: bool = False) -> DataParallel:
    """The layout of a training step over ``devices`` devices (``None``: all) at ``batch_size``,
    with the model's weights sharded over them when ``shard_weights`` is set.

    The batch is split evenly, so ``batch_size`` must be a multiple of the device count.
    """
    chosen = select_devices(devices)
    n = len(chosen)
    if n == 1:
        if shard_weights:
            platform = chosen[0].platform
            hint = (
                "; on CPU, start with XLA_FLAGS=--xla_force_host_platform_device_count=4 to split the host"
                if platform == "cpu"
                else ""
            )
            raise ExplainerError(
                f"--shard-weights splits the weights across devices, but the step runs on one {platform} device; "
                f"use --devices N with N > 1 or drop --shard-weights{hint}"
            )
        return DataParallel(None)
    if batch_size % n:
        multiple = -(-batch_size // n) * n
        raise ExplainerError(
            f"batch_size {batch_size} does not split evenly across {n} devices; "
            f"use batch_size {multiple} (a multiple of {n}) or a device count that divides {batch_size} (--devices)"
        )
    return DataParallel(Mesh(np.array(chosen), (AXIS,)), shard_weights)


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
