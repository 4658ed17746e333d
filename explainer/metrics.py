"""Divergences and task metrics. Everything reads the logits at the last position, in float32
(a bfloat16 model's logits are cast first).

- ``kl``: KL(full ‖ scrubbed) per example, in nats; reported as mean, p90, p99 and max, since a
  mean can hide a few prompts where the explanation fails badly.
- ``logit_diff``: mean logit of the answers minus mean logit of the wrong answers, per example.
- ``logit_diff_recovered``: mean scrubbed logit difference / mean full-model logit difference.
- ``accuracy``: share of prompts whose best answer beats every wrong answer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

Logits = Float[Array, "batch vocab"]
DIVERGENCES = ("kl", "reverse_kl", "symmetric")  # the kinds of :func:`divergence`


def kl_divergence(ref: Logits, other: Logits) -> Float[Array, " batch"]:
    """KL(softmax(ref) ‖ softmax(other)) per example, in nats.

    >>> x = jnp.array([[0.0, 1.0]])
    >>> float(kl_divergence(x, x)[0])
    0.0
    """
    ref_logp = jax.nn.log_softmax(ref.astype(jnp.float32), axis=-1)  # float32 whatever the model's dtype
    logp = jax.nn.log_softmax(other.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)


def divergence(kind: str, ref: Logits, other: Logits) -> Float[Array, " batch"]:
    """``kl`` = KL(ref ‖ other), ``reverse_kl`` = KL(other ‖ ref), ``symmetric`` = their mean."""
    if kind == "kl":
        return kl_divergence(ref, other)
    if kind == "reverse_kl":
        return kl_divergence(other, ref)
    if kind == "symmetric":
        return 0.5 * (kl_divergence(ref, other) + kl_divergence(other, ref))
    raise ValueError(f"unknown divergence {kind!r}; valid: {', '.join(DIVERGENCES)}")


def logit_diff(
    logits: Logits, answers: Int[Array, "batch n_answers"], wrong: Int[Array, "batch n_wrong"]
) -> Float[Array, " batch"]:
    """Mean answer logit minus mean wrong-answer logit, per example."""
    logits = logits.astype(jnp.float32)
    right = jnp.take_along_axis(logits, answers, axis=-1).mean(-1)
    return right - jnp.take_along_axis(logits, wrong, axis=-1).mean(-1)


def correct(logits: Logits, answers: Int[Array, "batch n_answers"], wrong: Int[Array, "batch n_wrong"]):
    """Per prompt, whether its best answer logit beats every wrong-answer logit."""
    right = jnp.take_along_axis(logits, answers, axis=-1).max(-1)
    return right > jnp.take_along_axis(logits, wrong, axis=-1).max(-1)


def accuracy(logits: Logits, answers: Int[Array, "batch n_answers"], wrong: Int[Array, "batch n_wrong"]):
    """Share of prompts whose best answer logit beats every wrong-answer logit.

    >>> float(accuracy(jnp.array([[2.0, 1.0]]), jnp.array([[0]]), jnp.array([[1]])))
    1.0
    """
    return jnp.mean(correct(logits, answers, wrong))


def task_loss(logits: Float[Array, "batch vocab"], answers: Int[Array, "batch n_answers"]) -> Float[Array, " batch"]:
    """``−log`` of the probability the model puts on the answers, per prompt.

    >>> round(float(task_loss(jnp.array([[0.0, 0.0]]), jnp.array([[0]]))[0]), 4)
    0.6931
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jax.scipy.special.logsumexp(jnp.take_along_axis(logp, answers, axis=-1), axis=-1)


def prompt_stats(full: Logits, logits: Logits, answers, wrong) -> Float[Array, "batch 4"]:
    """Per prompt: KL(full ‖ logits), logit difference, whether the answer wins (0/1) and the task
    loss; what :func:`summarise` reads."""
    wins = correct(logits, answers, wrong).astype(jnp.float32)
    columns = (kl_divergence(full, logits), logit_diff(logits, answers, wrong), wins)
    return jnp.stack([*columns, task_loss(logits, answers)], axis=-1).astype(jnp.float32)


def summarise(stats, full_stats) -> dict[str, float]:
    """Every faithfulness number of one explanation, and the task ``loss`` (``loss_full``: the full
    model's), as plain floats (JSON-ready), from its :func:`prompt_stats` and the full model's."""
    kl = np.asarray(stats[:, 0], np.float64)
    scrubbed_ld = float(jnp.asarray(stats[:, 1], jnp.float32).mean())
    full_ld = float(jnp.asarray(full_stats[:, 1], jnp.float32).mean())
    return {
        "kl_mean": float(kl.mean()),
        "kl_p90": float(np.quantile(kl, 0.9)),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
        "logit_diff": scrubbed_ld,
        "logit_diff_full": full_ld,
        "logit_diff_recovered": scrubbed_ld / full_ld if full_ld != 0 else float("nan"),
        "accuracy": float(jnp.asarray(stats[:, 2], jnp.float32).mean()),
        "accuracy_full": float(jnp.asarray(full_stats[:, 2], jnp.float32).mean()),
        "loss": float(jnp.asarray(stats[:, 3], jnp.float32).mean()),
        "loss_full": float(jnp.asarray(full_stats[:, 3], jnp.float32).mean()),
    }


def faithfulness(full: Logits, scrubbed: Logits, answers, wrong) -> dict[str, float]:
    """Every faithfulness number for one explanation, as plain floats (JSON-ready)."""
    scores = summarise(prompt_stats(full, scrubbed, answers, wrong), prompt_stats(full, full, answers, wrong))
    return {k: v for k, v in scores.items() if k not in ("loss", "loss_full")}


def truth_scores(kept: dict[str, list[int]], truth: dict[str, list[int]]) -> dict[str, float]:
    """Precision, recall and F1 of kept units against a ground-truth explanation.

    A rewrite's remainder (``.mlp.rest``) is not a residual unit, so it is left out of the count.

    >>> truth_scores({"unembed.in": [1, 2]}, {"unembed.in": [1]})
    {'precision': 0.5, 'recall': 1.0, 'f1': 0.6666666666666666, 'exact': False}
    """
    got = {(s, u) for s, units in kept.items() if not s.endswith(".mlp.rest") for u in units}
    want = {(s, u) for s, units in truth.items() for u in units}
    hits = len(got & want)
    precision = hits / len(got) if got else float(not want)
    recall = hits / len(want) if want else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "exact": got == want}
