"""Scoring keep masks: the faithfulness of a mask on a batch of prompts, in chunks.

The one place that turns a scrubber, prompts and a binary keep mask into the faithfulness numbers
of :func:`explainer.metrics.faithfulness`; evaluation, rewrites and runs all read it.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from explainer.masks import Mask
from explainer.metrics import faithfulness
from explainer.scrub import Scrubber
from explainer.tasks.base import Batch


def evaluate_keep(scrubber: Scrubber, batch: Batch, keep: Mask, seed: int = 0, chunk: int = 512) -> dict[str, float]:
    """Faithfulness of a (binary) keep mask on ``batch``, in chunks, as plain floats."""

    @eqx.filter_jit
    def run(scrubber, part: Batch, key):
        full, repl = scrubber.reference(part, key)
        return full, scrubber.logits(part.clean, keep, repl)

    fulls, scrubbed = [], []
    key = jax.random.key(seed)
    for start in range(0, len(batch), chunk):
        part = batch.take(jnp.arange(start, min(start + chunk, len(batch))))
        full, logits = run(scrubber, part, jax.random.fold_in(key, start))
        fulls.append(full)
        scrubbed.append(logits)
    return faithfulness(jnp.concatenate(fulls), jnp.concatenate(scrubbed), batch.answers, batch.wrong_answers)
