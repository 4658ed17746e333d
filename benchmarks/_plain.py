"""The baseline every speed ratio is measured against: one plain training step of the model."""

from __future__ import annotations

import equinox as eqx
import optax

from explainer.scrub import last


def plain_step(model, batch, lr: float, remat: bool = False):
    """Forward + backward of the model's own loss (cross-entropy of the first answer at the last
    position) and an adam update of every parameter; returns ``(step, state)``."""
    optimizer = optax.adam(lr)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_fn(params):
        logits = last(eqx.combine(params, static)(batch.clean, remat=remat, last=True))  # as the scrubber
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch.answers[:, 0]).mean()

    @eqx.filter_jit
    def step(state):
        params, opt_state = state
        _, grads = eqx.filter_value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state

    return step, (params, optimizer.init(params))
