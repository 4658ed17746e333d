"""Ground truth of a compiled model, found from its weights and checked by scrubbing.

For a model whose weights are readable (tracr, planted), the truth of a site is the set of units its
reader *uses for the task*: the residual dimensions with a nonzero row in the reader's weights
(``W_Q``/``W_K``/``W_V`` for ``blocks.{l}.attn.in``, ``W_in`` for ``blocks.{l}.mlp.in``, ``W_U``
for ``unembed.in``), less those whose resampling from the prompts' counterfactuals never changes
the logits at the last position. A dimension a reader reads can still be idle for the task: it
may hold the same value on every prompt and its counterfactual (the ``one`` direction, positions
when all prompts have one length), or it may only matter jointly with units that already pin the
answer down.

:func:`prune` removes such units one at a time (backward elimination: a unit goes when scrubbing
it as well keeps every prompt's KL within ``tol``), repeating until nothing more can go.
:func:`check` measures the three properties a ground truth must have: faithful (keeping exactly
it, KL ≈ 0), minimal (dropping any one unit costs KL) and closed (adding any other unit changes
nothing).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from explainer.models.transformer import Transformer
from explainer.tasks.base import Batch

Truth = dict[str, list[int]]
TOL = 1e-5  # nats: a unit is idle when scrubbing it moves no prompt's KL beyond this


def reader_units(model: Transformer) -> Truth:
    """Per site, the residual dimensions its reader's weights touch (nonzero rows).

    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> reader_units(load_model(resolve_model("planted-distractor")))["unembed.in"]
    [1]
    """
    out: Truth = {}
    for layer, block in enumerate(model.blocks):
        qkv = jnp.concatenate([block.attn.W_Q, block.attn.W_K, block.attn.W_V], axis=-1)
        out[f"blocks.{layer}.attn.in"] = _nonzero_rows(jnp.moveaxis(qkv, 1, 0).reshape(qkv.shape[1], -1))
        if block.mlp is not None:
            out[f"blocks.{layer}.mlp.in"] = _nonzero_rows(block.mlp.W_in)
    out["unembed.in"] = _nonzero_rows(model.W_U)
    return out


def _nonzero_rows(matrix: jax.Array) -> list[int]:
    return [int(i) for i in np.flatnonzero(np.abs(np.asarray(matrix)).max(axis=1) > 0)]


class _Scorer:
    """KL per prompt of the scrubbed model for any keep mask, jitted once for the model."""

    def __init__(self, model: Transformer, batch: Batch):
        from explainer.metrics import kl_divergence
        from explainer.scrub import Scrubber

        scrubber = Scrubber.build(model, batch)
        full, repl = scrubber.reference(batch, jax.random.key(0))
        self.n_units = scrubber.n_units

        @eqx.filter_jit
        def kl(keep):
            return kl_divergence(full, scrubber.logits(batch.clean, keep, repl))

        self._kl = kl

    def kl(self, truth: Truth) -> np.ndarray:
        keep = {s: jnp.asarray(np.isin(np.arange(n), truth.get(s, [])), jnp.float32) for s, n in self.n_units.items()}
        return np.asarray(self._kl(keep), dtype=np.float64)


def prune(model: Transformer, batch: Batch, candidates: Truth | None = None, tol: float = TOL) -> Truth:
    """The smallest subset of ``candidates`` (default :func:`reader_units`) backward elimination finds
    that keeps every prompt's KL within ``tol``. Sites are visited from the last to the first.

    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> from explainer.tasks import resolve_task
    >>> folder = resolve_model("planted-joint")
    >>> prune(load_model(folder), resolve_task(None, folder).batch)
    {'blocks.0.attn.in': [0], 'blocks.0.mlp.in': [1, 2], 'unembed.in': [3]}
    """
    scorer = _Scorer(model, batch)
    truth = {s: list(u) for s, u in (candidates or reader_units(model)).items()}
    changed = True
    while changed:
        changed = False
        for site in reversed(list(truth)):
            for unit in list(truth[site]):
                fewer = {**truth, site: [u for u in truth[site] if u != unit]}
                if scorer.kl(fewer).max() <= tol:
                    truth, changed = fewer, True
    return {s: sorted(u) for s, u in truth.items()}


def check(model: Transformer, batch: Batch, truth: Truth) -> dict[str, object]:
    """How good a ground truth is: ``kl_max`` keeping exactly it, the KL mean of dropping each unit
    (``drop``, the smallest is ``drop_min``), and the largest KL of adding any other unit
    (``add_max``). A sound truth has ``kl_max`` and ``add_max`` near 0 and ``drop_min`` well above
    the training KL budget."""
    scorer = _Scorer(model, batch)
    drop = {}
    for site, units in truth.items():
        for unit in units:
            drop[f"{site}:{unit}"] = float(scorer.kl({**truth, site: [u for u in units if u != unit]}).mean())
    add_max = 0.0
    for site, n in scorer.n_units.items():
        for unit in sorted(set(range(n)) - set(truth.get(site, []))):
            more = {**truth, site: sorted(truth.get(site, []) + [unit])}
            add_max = max(add_max, float(scorer.kl(more).max()))
    return {
        "kl_max": float(scorer.kl(truth).max()),
        "drop": drop,
        "drop_min": min(drop.values(), default=float("inf")),
        "add_max": add_max,
    }
