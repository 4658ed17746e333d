"""Baselines on the same units as our explanations, graded by the same code (:func:`grade_masks`).

Rankings score every unit; the set of size ``k`` is then the top ``k`` units:

- ``random``: uniform random scores (seeded);
- ``variance``: the full model's variance of the unit over the prompts, per position, averaged;
- ``attribution``: attribution patching on units, ``|mean ∂LD/∂keep|`` at the full model (keep = 1),
  which is the first-order estimate ``Σ_pos ∂LD/∂h · (h − r)`` of the logit difference lost by
  ablating the unit alone (``h`` clean, ``r`` the replacement);
- ``integrated_gradients``: the same gradient averaged over ``keep = α·1`` for ``α`` on a midpoint
  grid in (0, 1) (every unit interpolated at once from ablated to clean), as EAP-IG does.

Searches produce sets directly:

- ``acdc``: ACDC's procedure applied to units: start from every unit kept; visit units from the
  output backwards (sites in reverse forward order); exclude a unit for good when that raises
  ``KL(full ‖ scrubbed)`` by less than a threshold ``τ``. A ladder of thresholds (``thresholds``,
  run together under ``vmap``) gives sets of several sizes; the set for size ``k`` is the one of
  largest size ``≤ k`` (the empty set when there is none);
- ``exhaustive``: for each size, every set of that size, keeping the one of least mean KL (the
  true optimum on the fitting prompts); sizes with more than ``max_sets`` sets are left out.

Rankings and searches fit on the task's training prompts (at most ``FIT_PROMPTS``, one fixed
replacement); grading is on held-out prompts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from explainer.edges import WRITERS, n_writers
from explainer.errors import ExplainerError, did_you_mean
from explainer.masks import Layout
from explainer.score import IG_STEPS, attribution, fit_scorer, mean_kl
from explainer.scrub import Scrubber, capture
from explainer.tasks.base import Batch

RANKINGS = ("random", "variance", "attribution", "integrated_gradients")
SEARCHES = ("acdc", "exhaustive")
METHODS = RANKINGS + SEARCHES
ACDC_THRESHOLDS = tuple(float(t) for t in np.logspace(-5, 0, 11))
MAX_SETS = 50_000
SETS_PER_PASS = 4096  # candidate sets an exhaustive search holds at once
Mask = dict[str, np.ndarray]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ExplainerError(f"unknown baseline {method!r}; {did_you_mean(method, METHODS)}")


def _layout(scrubber: Scrubber) -> Layout:
    return Layout.of([(s, scrubber.n_units[s]) for s in scrubber.sites])


def _flat(scrubber: Scrubber, scores: dict[str, Any]) -> np.ndarray:
    return _layout(scrubber).flat(scores, np.float64)


def _unflat(scrubber: Scrubber, flat: np.ndarray) -> dict[str, np.ndarray]:
    return _layout(scrubber).split(flat)


def rank(method: str, scrubber: Scrubber, batch: Batch, key: PRNGKeyArray, **options: Any) -> dict[str, np.ndarray]:
    """Scores per unit (higher = more important) of a ranking baseline, ``{site: [units]}``.

    >>> import jax
    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> from explainer.tasks import resolve_task
    >>> folder = resolve_model("planted-distractor")
    >>> task = resolve_task(None, folder)
    >>> scrubber = Scrubber.build(load_model(folder), task.train_data())
    >>> scores = rank("attribution", scrubber, task.train_data(), jax.random.key(0))
    >>> int(scores["unembed.in"].argmax()), int(scores["blocks.0.attn.in"].argmax())
    (1, 0)
    """
    _check_method(method)
    if method not in RANKINGS:
        raise ExplainerError(f"{method!r} is a search, not a ranking; use baseline_masks (rankings: {RANKINGS})")
    k_repl, k_rand = jax.random.split(key)
    scorer = fit_scorer(scrubber, batch, k_repl)
    if method == "random":
        flat = np.asarray(jax.random.uniform(k_rand, (sum(scrubber.n_units.values()),)), np.float64)
        return _unflat(scrubber, flat)
    if method == "variance":
        units = scrubber.units
        tokens = scorer.ref.tokens
        _, cache = eqx.filter_jit(lambda m, t: capture(m, t, scrubber.sites, units))(scrubber.model, tokens)
        if units == "edges":  # an edge's variance is its writer's: [batch, seq, writers, d] -> [writers]
            writers = np.asarray(jnp.var(cache[WRITERS], axis=0).mean(axis=(0, 2)), np.float64)
            config = scrubber.model.config
            return {  # q/k/v sites are head-major: the writers' scores once per head
                s: np.tile(writers[: n_writers(config, s)], n // n_writers(config, s))
                for s, n in scrubber.n_units.items()
            }
        return {s: np.asarray(jnp.var(cache[s], axis=0).mean(axis=0), np.float64) for s in scrubber.sites}
    steps = int(options.get("steps", IG_STEPS)) if method == "integrated_gradients" else 1
    return _unflat(scrubber, attribution(scorer, steps))


def top_k(scrubber: Scrubber, scores: dict[str, Any], k: int) -> Mask:
    """The keep mask of the ``k`` highest-scoring units (ties: earlier site and unit first)."""
    flat = _flat(scrubber, scores)
    keep = np.zeros(flat.shape, np.float32)
    keep[np.argsort(-flat, kind="stable")[: int(k)]] = 1.0
    return _unflat(scrubber, keep)


# --- searches -------------------------------------------------------------------------------------


def acdc(
    scrubber: Scrubber, batch: Batch, key: PRNGKeyArray, thresholds: Sequence[float | int] = ACDC_THRESHOLDS
) -> list[Mask]:
    """ACDC on units, one keep mask per threshold (see the module docstring)."""
    score = fit_scorer(scrubber, batch, key)
    n = sum(scrubber.n_units.values())
    taus = np.asarray(thresholds, np.float64)
    masks = np.ones((len(taus), n), np.float32)
    current = score(masks, mean_kl)
    offsets = np.cumsum([0] + [scrubber.n_units[s] for s in scrubber.sites])
    order = [u for i in reversed(range(len(scrubber.sites))) for u in range(offsets[i], offsets[i + 1])]
    for unit in order:
        trial = masks.copy()
        trial[:, unit] = 0.0
        tried = score(trial, mean_kl)
        accept = tried - current < taus
        masks[accept] = trial[accept]
        current = np.where(accept, tried, current)
    return [_unflat(scrubber, m) for m in masks]


def _n_sets(n: int, k: int) -> int:
    return math.comb(n, k)


def exhaustive(
    scrubber: Scrubber, batch: Batch, sizes: Sequence[int], key: PRNGKeyArray, max_sets: int = MAX_SETS
) -> list[Mask | None]:
    """The least-KL keep mask of each size (``None`` for sizes with more than ``max_sets`` sets).

    >>> import jax
    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> from explainer.tasks import resolve_task
    >>> folder = resolve_model("planted-distractor")
    >>> task = resolve_task(None, folder)
    >>> scrubber = Scrubber.build(load_model(folder), task.train_data())
    >>> [best] = exhaustive(scrubber, task.train_data(), [2], jax.random.key(0))
    >>> {s: v.nonzero()[0].tolist() for s, v in best.items() if v.any()}
    {'blocks.0.attn.in': [0], 'unembed.in': [1]}
    """
    score = fit_scorer(scrubber, batch, key)
    n = sum(scrubber.n_units.values())
    out: list[Mask | None] = []
    for k in sizes:
        k = int(k)
        if k > n or _n_sets(n, k) > max_sets:
            out.append(None)
            continue
        best, best_kl = None, np.inf
        combos = itertools.combinations(range(n), k)
        while part := list(itertools.islice(combos, SETS_PER_PASS)):
            rows = np.zeros((len(part), n), np.float32)
            for row, units in zip(rows, part, strict=True):
                row[list(units)] = 1.0
            kls = score(rows, mean_kl)
            i = int(np.argmin(kls))
            if best is None or kls[i] < best_kl:
                best, best_kl = rows[i], kls[i]
        assert best is not None
        out.append(_unflat(scrubber, best))
    return out


def baseline_masks(
    method: str, scrubber: Scrubber, batch: Batch, sizes: Sequence[int], key: PRNGKeyArray, **options: Any
) -> list[Mask | None]:
    """One keep mask per size (``None`` where the method has none, e.g. exhaustive over its limit).

    Every baseline through one interface: rankings take their top ``k``; ``acdc`` the largest of
    its threshold ladder's sets with at most ``k`` units; ``exhaustive`` the optimum of size ``k``.
    ``options``: ``steps`` (integrated_gradients), ``thresholds`` (acdc), ``max_sets`` (exhaustive).
    """
    _check_method(method)
    if method in RANKINGS:
        scores = rank(method, scrubber, batch, key, **options)
        return [top_k(scrubber, scores, k) for k in sizes]
    if method == "exhaustive":
        return exhaustive(scrubber, batch, sizes, key, options.get("max_sets", MAX_SETS))
    found = acdc(scrubber, batch, key, options.get("thresholds", ACDC_THRESHOLDS))
    by_size = sorted(found, key=lambda m: sum(int(v.sum()) for v in m.values()))
    out: list[Mask | None] = []
    for k in sizes:
        fitting = [m for m in by_size if sum(int(v.sum()) for v in m.values()) <= k]
        out.append(fitting[-1] if fitting else {s: np.zeros(n, np.float32) for s, n in scrubber.n_units.items()})
    return out


def baseline_frontier(
    method: str,
    model: str = "planted-distractor",
    task: str | None = None,
    sizes: Sequence[int] | None = None,
    ablation: str = "resample",
    sites: Sequence[str] | None = None,
    budget: int = 2,
    seed: int = 0,
    ablations: Sequence[str] = (),
    progress: bool = False,
    units: str = "dims",
    **options: Any,
) -> dict[str, Any]:
    """A baseline's frontier: the same records and CPR/CMD as :func:`explainer.sweep`
    (``units="edges"``: over the edge graph, :mod:`explainer.edges`).

    ``sizes`` defaults to MIB's ladder (:func:`explainer.frontier.mib_ladder`). Records carry
    ``run: None`` (nothing is saved) and ``target`` (the size asked for); sizes a method has no
    set for are listed under ``skipped``.

    >>> f = baseline_frontier("attribution", "planted-distractor", sizes=[2], budget=1)
    >>> f["records"][0]["kept"], round(f["records"][0]["normalized_faithfulness"], 3)
    ({'blocks.0.attn.in': [0], 'unembed.in': [1]}, 1.0)
    """
    import time

    from explainer.frontier import mib_ladder
    from explainer.frontier.grade import grade_masks
    from explainer.models import load_model
    from explainer.tasks import resolve_task
    from explainer.zoo import resolve_model

    _check_method(method)
    started = time.perf_counter()
    folder = resolve_model(model)
    net = load_model(folder)
    the_task = resolve_task(task, folder)
    the_task.check(net.config)
    train = the_task.train_data()
    scrubber = Scrubber.build(net, train, sites, ablation, units=units)
    total = sum(scrubber.n_units.values())
    sizes = sorted({min(int(k), total) for k in (sizes if sizes is not None else mib_ladder(total))})
    masks = baseline_masks(method, scrubber, train, sizes, jax.random.key(seed), **options)
    fit_seconds = time.perf_counter() - started
    kept = [(k, m) for k, m in zip(sizes, masks, strict=True) if m is not None]
    result = grade_masks(
        scrubber,
        train,
        the_task.heldout_data(),
        [m for _, m in kept],
        budget,
        seed,
        ablations,
        progress=progress,
        budgets=[k for k, _ in kept],
    )
    for (k, _), record in zip(kept, result["records"], strict=True):
        record["run"], record["target"] = None, k
    return {
        **result,
        "method": method,
        "model": model,
        "task": the_task.name,
        "skipped": [k for k, m in zip(sizes, masks, strict=True) if m is None],
        "fit_seconds": fit_seconds,
        "seconds": time.perf_counter() - started,
    }
