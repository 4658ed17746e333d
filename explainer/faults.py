"""Numerical faults: a NaN or inf in a loss term or a gradient stops training at the step it appeared.

The jitted step is wrapped so that it also returns one boolean per loss term, and per trained
parameter group (a non-finite gradient shows up as non-finite parameters after the optax update),
saying "this is not finite". The flags stay on the device with the step's metrics and are read in
blocks (at every progress update and before every checkpoint), so the check adds no host round
trip per step, yet the error still names the first bad step and every term that went bad in it.
A checkpoint is only written after the steps before it were checked, so every checkpoint is good.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from explainer.errors import ExplainerError

# loss terms first (the likeliest origin), the total last; then the parameters a gradient updates
TERM_ORDER = ("kl", "size", "adversary_objective", "gap", "kl_deterministic", "lambda", "loss")
PARAMETERS = {"gates": "gate logits (a gradient was not finite)", "adversary": "adversary (a gradient was not finite)"}


def _all_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


def checked_step(step: Callable) -> tuple[Callable, list[str]]:
    """Wrap a ``(state, *args) -> (state, metrics)`` step: its metrics gain ``faults``, one flag per name.

    Returns the wrapped (jitted) step and the names of its flags, in flag order. A flag covers the
    whole term, so a vmapped step (one state per penalty of a sweep) still has one flag per name.
    """
    names: list[str] = []

    @eqx.filter_jit
    def wrapped(state, *args):
        new, metrics = step(state, *args)
        terms = sorted(metrics, key=lambda k: (TERM_ORDER.index(k) if k in TERM_ORDER else len(TERM_ORDER), k))
        flags = [~jnp.all(jnp.isfinite(metrics[k])) for k in terms]
        groups = [g for g in PARAMETERS if getattr(new, g, None) is not None]
        flags += [~_all_finite(getattr(new, g)) for g in groups]
        names[:] = terms + [PARAMETERS[g] for g in groups]
        return new, {**metrics, "faults": jnp.stack(flags)}

    return wrapped, names


class History:
    """Per-step metrics: kept on the device as the steps run, moved to the host (and checked) in blocks.

    >>> h = History({"kl": [0.5]}, ["kl"])
    >>> h.append({"kl": jnp.asarray(0.25), "faults": jnp.asarray([False])})
    >>> h.flush(); h.values
    {'kl': [0.5, 0.25]}
    """

    def __init__(self, done: dict[str, list[Any]], names: list[str]):
        self.values = {k: list(v) for k, v in done.items()}
        self.names = names
        self.pending: list[dict[str, Any]] = []

    @property
    def steps(self) -> int:
        return max((len(v) for v in self.values.values()), default=0)

    def append(self, metrics: dict[str, Any]) -> None:
        """One step's metrics: device arrays, or host arrays already moved (a threaded sweep's)."""
        self.pending.append(metrics)

    def flush(self, where: str = "") -> None:
        """Move pending metrics to the host; raise at the first step with a non-finite flag."""
        if not self.pending:
            return
        first = self.steps
        host = jax.device_get(self.pending)
        self.pending = []
        for offset, metrics in enumerate(host):
            bad = np.asarray(metrics["faults"])
            if bad.any():
                raise _fault_error(
                    first + offset + 1, metrics, [n for n, b in zip(self.names, bad, strict=True) if b], where
                )
            for k, v in metrics.items():
                if k != "faults":
                    self.values.setdefault(k, []).append(np.asarray(v, np.float64).tolist())


def _fault_error(step: int, metrics: dict[str, Any], bad: list[str], where: str) -> ExplainerError:
    term = bad[0]
    value = metrics.get(term)
    what = f"the {term} went NaN or inf"
    if value is not None:
        v = np.asarray(value, np.float64).reshape(-1)
        first = int(np.flatnonzero(~np.isfinite(v))[0]) if not np.isfinite(v).all() else 0
        what = f"the {term} term is {v[first]}" + (f" (run {first} of the batch)" if len(v) > 1 else "")
    also = f" (also not finite: {', '.join(bad[1:])})" if len(bad) > 1 else ""
    return ExplainerError(
        f"training stopped at step {step}: {what}{also}. {where}Lower the learning rate (lr) or the "
        "adversary_weight in a --config file, or check the model's weights and prompts"
    )
