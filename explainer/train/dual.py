"""Dual ascent on log λ: the size penalty learned from a constraint, as an optax-style pair.

Under a KL budget λ rises while the explanation's KL is within the budget (it can afford to lose
units) and falls once it is over; under a target size λ rises while the expected size is above the
target and falls below it. Training (:func:`explainer.train.step.make_step`) and the ladders of sizes
(:mod:`explainer.frontier.ladder`) both learn λ this way, one state or a batch of them at once.

λ is learned on a log scale so that a step moves it by a fraction of itself, from 1e-6 to 1e4. The
step is bounded (``tanh`` of how far the constraint is off), so one batch cannot swing λ far, and
it backs off faster than it pushes (:data:`DUAL_BACKOFF`): a λ that overshoots closes gates of a
serial pathway together, and a pathway whose gates are all closed gets no gradient to reopen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

LOG_LAMBDA_RANGE = (math.log(1e-6), math.log(1e4))
DUAL_BACKOFF = 10.0


class DualAscent(NamedTuple):
    """``init(lam)``: the log λ to start from (one penalty or a batch; λ = 0 gives ``-inf``, no
    penalty). ``update(log_lambda, measured, target=None, rise=None)``: log λ after one step, from
    the ``measured`` quantity the constraint bounds (the KL under ``kl_budget``, the expected size
    under ``target_size``) and its ``target`` (default: the pair's); ``rise`` scales the upward
    step (per state of a batch)."""

    init: Callable[[Any], np.ndarray]
    update: Callable[..., Any]


def dual_ascent(lr: float, mode: str, target: float | int | None = None, backoff: float = DUAL_BACKOFF) -> DualAscent:
    """The dual ascent on log λ of penalty ``mode`` at rate ``lr`` towards ``target``; under any
    other mode (a fixed λ) ``update`` returns log λ as it is.

    >>> dual = dual_ascent(0.1, "target_size", target=3)
    >>> start = dual.init(0.1)
    >>> bool(dual.update(start, 5.0) > start), bool(dual.update(start, 1.0) < start)
    (True, True)
    """

    def init(lam: Any) -> np.ndarray:
        logs = [math.log(v) if v > 0 else -math.inf for v in np.ravel(lam)]
        return np.asarray(logs, np.float32).reshape(np.shape(lam))

    def update(log_lambda: Any, measured: Any, target: Any = target, rise: Any = None) -> Any:
        if mode == "kl_budget":  # up while the KL is within the budget
            direction = jnp.tanh((target - measured) / target)
        elif mode == "target_size":  # up while the explanation is larger than the target
            direction = jnp.tanh(measured - target)
        else:
            return log_lambda
        rate = jnp.where(direction > 0, lr if rise is None else rise * lr, backoff * lr)
        return jnp.clip(log_lambda + rate * direction, *LOG_LAMBDA_RANGE)

    return DualAscent(init, update)
