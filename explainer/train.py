"""The training loop: hard-concrete gates trained by optax, one jitted step.

Loss per step (DESIGN.md, data flow)::

    D(ref ‖ S_m) + λ·size(m) + μ·D(S_m ‖ S_{m∨a})

``λ`` is fixed (``lam``) or learned by dual ascent (``kl_budget``, ``target_size``); the last term
is present only when an adversary is passed in. The adversary is any object with the
:class:`InLoopAdversary` methods; the ``adversary`` package provides them.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from explainer.config import TrainConfig
from explainer.masks import Gates, Mask
from explainer.metrics import kl_divergence
from explainer.scrub import Replacement, Scrubber
from explainer.tasks.base import Batch

LOG_LAMBDA_RANGE = (math.log(1e-6), math.log(1e4))
DUAL_BACKOFF = 10.0


@runtime_checkable
class InLoopAdversary(Protocol):
    """What the loop needs from an adversary trained alongside the explanation.

    ``state`` is any pytree. ``update`` runs the adversary's ascent steps against the current
    (sampled, gradient-free) keep mask and returns the new state and its gap;
    ``gap`` is ``D(S_m ‖ S_{m∨a})`` for the current state, differentiable in ``keep``.
    """

    def init(self, key: PRNGKeyArray, n_units: dict[str, int]) -> Any: ...

    def update(
        self, state: Any, scrubber: Scrubber, batch: Batch, keep: Mask, replacement: Replacement, key: PRNGKeyArray
    ) -> tuple[Any, Float[Array, ""]]: ...

    def gap(
        self, state: Any, scrubber: Scrubber, batch: Batch, keep: Mask, replacement: Replacement, key: PRNGKeyArray
    ) -> Float[Array, ""]: ...


class TrainState(eqx.Module):
    gates: Gates
    opt_state: Any
    log_lambda: Float[Array, ""]
    adversary: Any
    step: Array
    key: PRNGKeyArray


def _dual_update(config: TrainConfig, log_lambda, kl_deterministic, size):
    """Dual ascent on log λ with a bounded step (tanh), so one batch cannot swing it far.

    The KL budget constrains the explanation itself, so it is compared with the KL of the gates'
    deterministic (noise-free) value, not with the sampled gates' KL: that one is spiky (mostly
    zero, sometimes several nats when a needed gate happens to close) and overstates the KL of
    the finished explanation.
    """
    if config.mode == "kl_budget":
        direction = jnp.tanh((config.kl_budget - kl_deterministic) / config.kl_budget)
    elif config.mode == "target_size":
        direction = jnp.tanh(size - config.target_size)
    else:
        return log_lambda
    # Back off faster than we push: a λ that overshoots closes gates of a serial pathway together,
    # and a pathway whose gates are all closed gets no gradient to reopen.
    rate = jnp.where(direction > 0, config.dual_lr, DUAL_BACKOFF * config.dual_lr)
    return jnp.clip(log_lambda + rate * direction, *LOG_LAMBDA_RANGE)


def make_step(scrubber: Scrubber, data: Batch, config: TrainConfig, optimizer, adversary=None):
    """The jitted training step ``state -> (state, metrics)``, and a dict counting its traces.

    The step is traced once per run: shapes never change between steps.
    """
    n = len(data)
    counter = {"traces": 0}

    @eqx.filter_jit
    def step(state: TrainState) -> tuple[TrainState, dict[str, Array]]:
        counter["traces"] += 1  # a Python side effect: runs only while tracing
        key = jax.random.fold_in(state.key, state.step)
        k_batch, k_repl, k_gate, k_adv = jax.random.split(key, 4)
        index = jax.random.randint(k_batch, (config.batch_size,), 0, n)
        batch = data.take(index)
        ref, repl = scrubber.reference(batch, k_repl)
        lam = jnp.exp(state.log_lambda)

        adv_state, adv_gap = state.adversary, jnp.zeros(())
        if adversary is not None:
            keep_now = jax.lax.stop_gradient(state.gates.sample(k_gate))
            adv_state, adv_gap = adversary.update(adv_state, scrubber, batch, keep_now, repl, k_adv)

        def loss_fn(gates: Gates):
            keep = gates.sample(k_gate)
            kl = kl_divergence(ref, scrubber.logits(batch.clean, keep, repl)).mean()
            size = gates.expected_size()
            loss = kl + lam * size
            gap = jnp.zeros(())
            if adversary is not None:
                gap = adversary.gap(adv_state, scrubber, batch, keep, repl, k_adv)
                loss = loss + config.adversary_weight * gap
            return loss, (kl, size, gap)

        (loss, (kl, size, gap)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(state.gates)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int step counts with floats
            updates, opt_state = optimizer.update(grads, state.opt_state, state.gates)
        gates = eqx.apply_updates(state.gates, updates)
        kl_det = jnp.zeros(())
        if config.mode == "kl_budget":
            det = state.gates.deterministic()
            kl_det = kl_divergence(ref, scrubber.logits(batch.clean, det, repl)).mean()
        log_lambda = _dual_update(config, state.log_lambda, kl_det, size)
        new = TrainState(gates, opt_state, log_lambda, adv_state, state.step + 1, state.key)
        metrics = {"loss": loss, "kl": kl, "kl_deterministic": kl_det, "size": size, "lambda": lam,
                   "gap": gap, "adversary_gap": adv_gap}
        return new, metrics

    return step, counter


def init_state(scrubber: Scrubber, config: TrainConfig, optimizer, adversary=None) -> TrainState:
    key = jax.random.key(config.seed)
    k_adv, k_run = jax.random.split(key)
    gates = Gates.init(scrubber.n_units, config.init_logit)
    log_lambda = math.log(config.lam if config.mode == "lambda" and config.lam > 0 else config.init_lambda)
    if config.mode == "lambda" and config.lam == 0:
        log_lambda = -math.inf
    adv = adversary.init(k_adv, scrubber.n_units) if adversary is not None else None
    return TrainState(
        gates,
        optimizer.init(eqx.filter(gates, eqx.is_array)),
        jnp.asarray(log_lambda, jnp.float32),
        adv,
        jnp.zeros((), jnp.int32),
        k_run,
    )


def train_gates(
    scrubber: Scrubber,
    data: Batch,
    config: TrainConfig,
    adversary: InLoopAdversary | None = None,
    progress: bool = True,
) -> tuple[Gates, dict[str, list[float]]]:
    """Train the gates; returns them with the per-step history (loss, kl, size, lambda, gap)."""
    optimizer = optax.adam(config.lr)
    state = init_state(scrubber, config, optimizer, adversary)
    step, counter = make_step(scrubber, data, config, optimizer, adversary)
    records: list[dict[str, Array]] = []
    with _progress(progress, config.steps) as advance:
        for i in range(config.steps):
            state, metrics = step(state)
            records.append(metrics)
            if (i + 1) % 50 == 0 or i + 1 == config.steps:
                m = jax.device_get(metrics)
                advance(i + 1, f"kl {float(m['kl']):.4f}  size {float(m['size']):.1f}")
    history = {k: np.asarray(jax.device_get([r[k] for r in records]), np.float64).tolist() for k in records[0]}
    history["traces"] = [counter["traces"]]
    return state.gates, history


class _progress:
    """A rich progress bar on stderr (or nothing), as a context manager yielding ``advance``."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda done, text: None
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.description}"), TimeRemainingColumn(), console=Console(stderr=True),
            transient=True,
        )
        self.bar.__enter__()
        task = self.bar.add_task("", total=self.total)
        return lambda done, text: self.bar.update(task, completed=done, description=text)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False


def finish(gates: Gates, config: TrainConfig) -> dict[str, np.ndarray]:
    """Threshold the gates into the finished (binary) explanation."""
    if config.mode != "target_size":
        return {site: np.asarray(v) for site, v in gates.binary().items()}
    sites = sorted(gates.logits)
    flat = np.concatenate([np.asarray(gates.logits[s]) for s in sites])
    order = np.argsort(-flat, kind="stable")[: config.target_size]
    chosen = np.zeros(flat.shape, bool)
    chosen[order] = True
    out, start = {}, 0
    for s in sites:
        n = gates.logits[s].shape[0]
        out[s] = chosen[start : start + n]
        start += n
    return out
