"""Optimal ablation (Li & Janson, 2024): replace excluded units by the best constant, not a guess.

An explanation's excluded units are replaced by a constant per site, position and unit, chosen to
make the scrubbed model as close as possible to the full model: it minimises the mean
``KL(full ‖ scrubbed)`` over the task's training prompts *for that keep mask* (the optimum depends
on what is kept). This separates "the excluded units carry no information the task needs" from
"the replacement we picked happens to be off-distribution", which is what makes published
faithfulness numbers swing with the ablation.

The constants start at the ``mean`` ablation's per-position means and are fitted by Adam on
minibatches; several masks are fitted at once under ``vmap``. The fit runs in ``SEGMENTS`` stretches
and keeps, per mask, the constants with the lowest KL on the fitting prompts seen at the start or
after any stretch: Adam's first steps move every constant by about the learning rate whatever the
gradient's size, which on a model with sharp nonlinearities (the tracr-compiled ones) can leave the
constants far worse than the means they started at. So the fitted constants are never worse than
the means on the prompts they were fitted on.

A mask *trained* with ``ablation="optimal"`` learns its constants jointly with the gates (the
same Adam, descending the training loss: :func:`explainer.train.step.make_step`), so the mask is
chosen against constants fitted to it, not against the means. The run keeps those constants;
when the finished mask is evaluated or attacked they are a second starting point of the fit
(:func:`for_mask`): it starts from whichever of the means and the learned constants scores
better on the fitting prompts, so the result is still never worse than the means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from explainer.errors import ExplainerError
from explainer.metrics import kl_divergence
from explainer.scrub import Scrubber, SiteMeans, broadcast_constants, last
from explainer.tasks.base import Batch

STEPS = 300
LR = 0.05
BATCH = 64
CHUNK = 8  # masks fitted per compiled call (padded)
SEGMENTS = 6  # stretches of the fit after which the constants are scored on the fitting prompts


def _reference(scrubber: Scrubber, tokens: Int[Array, "n seq"], chunk: int = 256) -> Float[Array, "n vocab"]:
    run = eqx.filter_jit(lambda model, t: last(model(t, last=True)))
    return jnp.concatenate([run(scrubber.model, tokens[i : i + chunk]) for i in range(0, tokens.shape[0], chunk)])


@eqx.filter_jit
def _fit(
    scrubber: Scrubber,
    tokens: Int[Array, "n seq"],
    full: Float[Array, "n vocab"],
    masks: dict[str, Float[Array, "k units"]],
    params: dict[str, Float[Array, "k seq ..."]],
    opt_state: Any,
    key: Array,
    steps: int,
    lr: float,
    batch: int,
) -> tuple[dict[str, Float[Array, "k seq ..."]], Any]:
    """``steps`` Adam steps on minibatches of ``tokens`` from ``params``, one per mask (vmapped)."""
    optimizer = optax.adam(lr)

    def loss(p, keep, tok, ref):
        repl = broadcast_constants(p, tok.shape[0])
        return kl_divergence(ref, scrubber.logits(tok, keep, repl)).mean()

    def body(carry, i):
        p, state = carry
        index = jax.random.randint(jax.random.fold_in(key, i), (batch,), 0, tokens.shape[0])
        tok, ref = tokens[index], full[index]
        grads = jax.vmap(jax.grad(loss), in_axes=(0, 0, None, None))(p, masks, tok, ref)
        with jax.numpy_dtype_promotion("standard"):
            updates, state = jax.vmap(optimizer.update)(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), jnp.arange(steps))
    return params, opt_state


@eqx.filter_jit
def _fit_kl(
    scrubber: Scrubber,
    tokens: Int[Array, "n seq"],
    full: Float[Array, "n vocab"],
    masks: dict[str, Float[Array, "k units"]],
    params: dict[str, Float[Array, "k seq ..."]],
) -> Float[Array, " k"]:
    """Mean KL of each mask under its constants on ``tokens`` (the fitting objective, whole)."""

    def one(p, keep):
        repl = broadcast_constants(p, tokens.shape[0])
        return kl_divergence(full, scrubber.logits(tokens, keep, repl)).mean()

    return jax.vmap(one)(params, masks)


def _pick(better: Array, a: dict[str, Array], b: dict[str, Array]) -> dict[str, Array]:
    """Per mask (leading axis), ``a`` where ``better`` else ``b``."""
    return jax.tree.map(lambda x, y: jnp.where(better.reshape(-1, *([1] * (x.ndim - 1))), x, y), a, b)


def _fit_best(scrubber, tokens, full, masks, means, starts, key, steps, lr, batch) -> dict[str, Array]:
    """Fit in ``SEGMENTS`` stretches from the better of ``means`` and ``starts`` (stacked per mask,
    or ``None``); per mask, the constants with the lowest KL on ``tokens``."""
    k = next(iter(masks.values())).shape[0]
    params = {s: jnp.broadcast_to(c, (k, *c.shape)) for s, c in means.items()}
    best_kl = _fit_kl(scrubber, tokens, full, masks, params)
    if starts is not None:
        other_kl = _fit_kl(scrubber, tokens, full, masks, starts)
        params, best_kl = _pick(other_kl < best_kl, starts, params), jnp.minimum(other_kl, best_kl)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = jax.vmap(optax.adam(lr).init)(params)
    best = params
    lengths = [steps // SEGMENTS + (i < steps % SEGMENTS) for i in range(SEGMENTS)]
    for i, length in enumerate(n for n in lengths if n > 0):
        params, opt_state = _fit(
            scrubber, tokens, full, masks, params, opt_state, jax.random.fold_in(key, i), length, lr, batch
        )
        kl = _fit_kl(scrubber, tokens, full, masks, params)
        best, best_kl = _pick(kl < best_kl, params, best), jnp.minimum(kl, best_kl)
    return best


def fit_constants(
    scrubber: Scrubber,
    data: Batch,
    masks: Sequence[dict[str, Any]],
    steps: int = STEPS,
    lr: float = LR,
    batch_size: int = BATCH,
    seed: int = 0,
    starts: Sequence[dict[str, Any] | None] | None = None,
) -> list[SiteMeans]:
    """The optimal-ablation constants of each keep mask (one dict ``{site: [seq, d_model]}`` each),
    never worse than the starting means on ``data`` (see the module docstring).

    ``scrubber`` must use ``ablation="optimal"`` (its constants, the means, are the starting
    point); ``data`` are the prompts to fit on (the task's training prompts); ``starts``, one per
    mask (or ``None``), are other constants to start from where they score better (those learned
    with the mask).

    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> from explainer.tasks import resolve_task
    >>> folder = resolve_model("planted-distractor")
    >>> task = resolve_task(None, folder)
    >>> scrubber = Scrubber.build(load_model(folder), task.train_data(), ["unembed.in"], "optimal")
    >>> [c] = fit_constants(scrubber, task.train_data(), [{"unembed.in": np.zeros(10)}], steps=20)
    >>> c["unembed.in"].shape
    (4, 10)
    """
    if scrubber.ablation != "optimal" or scrubber.means is None:
        raise ExplainerError(f"fit_constants needs a Scrubber built with ablation 'optimal', not {scrubber.ablation!r}")
    masks = list(masks)
    full = _reference(scrubber, data.clean)
    key = jax.random.key(seed)
    means = scrubber.means
    others = [None] * len(masks) if starts is None else list(starts)
    if len(others) != len(masks):
        raise ExplainerError(f"fit_constants got {len(others)} starting constants for {len(masks)} masks")
    out: list[SiteMeans] = []
    for start in range(0, len(masks), CHUNK):
        group, alt = masks[start : start + CHUNK], others[start : start + CHUNK]
        width = 1 << (len(group) - 1).bit_length()  # pad to a power of two: few compiles, little waste
        padded, alt = group + [group[-1]] * (width - len(group)), alt + [alt[-1]] * (width - len(alt))
        stacked = {s: jnp.asarray(np.stack([np.asarray(m[s], np.float32) for m in padded])) for s in scrubber.sites}
        begin = None  # the means alone, or per mask the other start (the means where there is none)
        if any(c is not None for c in alt):
            begin = {s: jnp.stack([jnp.asarray((means if c is None else c)[s]) for c in alt]) for s in means}
        fitted = _fit_best(scrubber, data.clean, full, stacked, means, begin, key, steps, lr, batch_size)
        out += [{s: v[i] for s, v in fitted.items()} for i in range(len(group))]
    return out


def fit_optimal(
    scrubber: Scrubber,
    data: Batch,
    keep: dict[str, Any],
    seed: int = 0,
    start: dict[str, Any] | None = None,
    **options: Any,
) -> Scrubber:
    """``scrubber`` with its constants fitted for ``keep`` (see :func:`fit_constants`; ``start``:
    constants learned with the mask, a second starting point)."""
    [constants] = fit_constants(scrubber, data, [keep], seed=seed, starts=[start], **options)
    return eqx.tree_at(lambda s: s.means, scrubber, constants)


def for_mask(
    scrubber: Scrubber, data: Batch, keep: dict[str, Any], seed: int = 0, start: dict[str, Any] | None = None
) -> Scrubber:
    """The scrubber to evaluate ``keep`` with: fitted for it under ``optimal`` (from the means, or
    ``start`` where that scores better), else unchanged."""
    return fit_optimal(scrubber, data, keep, seed, start) if scrubber.ablation == "optimal" else scrubber
