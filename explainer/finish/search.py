"""The exact searches of the finishing passes: repair, trim, prune and searches of one size.

A needed unit whose gate closed early may never get a gradient back (saturated attention in
compiled models is the usual reason: its softmax is flat in the unit). An exact search on the
finished (binary) mask finds it cheaply: :func:`repair` adds back the excluded units whose return
lowers the KL most, until the explanation is within budget. :func:`trim` drops units the budget
can lose, :func:`prune` those whose removal costs nothing (a sweep's rungs); :func:`best_subset`
and :func:`best_of_size` score every set of one size where there are few enough.

Masks are scored by a :class:`~explainer.finish.oracle.KLOracle` (a fixed subset of the training
prompts, one fixed replacement: the results are deterministic). Where a round of every candidate
is cheap (:func:`~explainer.finish.oracle.exact`: at most
:data:`~explainer.finish.oracle.EXACT_UNITS` units, at most
:data:`~explainer.finish.oracle.EXACT_FLOPS` to score them) every candidate is evaluated, one unit a
round, so a unit that gradients cannot see is still found (the models whose answers are known keep
their exact searches). Elsewhere rounds move blocks of units and are at most :data:`MAX_ROUNDS`:
a round of :func:`trim` screens only the best :data:`~explainer.finish.oracle.RANK_BOUND`
candidates by attribution, and a round of :func:`repair` or :func:`prune` scores only the first 1,
2, 4, ... units of the orders the KL's gradient predicts (two backward passes, at most two masks
per doubling: the sweep polishes every rung with both). So no pass evaluates a number of masks
that grows with the number of units, beyond the doublings' logarithm
(:attr:`KLOracle.evaluations` counts them).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np

from explainer.finish.oracle import (
    SHORTLIST,
    KLOracle,
    _kl_rows,
    candidates,
    exact,
    extended,
    screened,
    shortlist,
    within,
)

Block = tuple[np.ndarray, float]  # units a round changes, and the KL after the change
DOUBLINGS = 4  # prefix lengths a bounded round scores at a time
MAX_ROUNDS = 8  # rounds of a search that is not exact (blocks of units)


def _rounds(oracle: KLOracle) -> int:
    """Rounds a search may take: as many as it needs on an :func:`~explainer.finish.oracle.exact`
    model, else :data:`MAX_ROUNDS`."""
    return oracle.n_units + 1 if exact(oracle) else MAX_ROUNDS


def _with(flat: np.ndarray, units: np.ndarray, value: float) -> np.ndarray:
    rows = np.repeat(flat[None], len(units), axis=0)
    rows[np.arange(len(units)), units] = value
    return rows


def trim(
    oracle: KLOracle,
    flat: np.ndarray,
    budget: float,
    ld_floor: float | None = None,
    check: KLOracle | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Drop, one at a time, the kept unit whose removal raises the KL least, while the KL stays
    within ``budget`` (and, with ``ld_floor``, the logit difference recovered on the same prompts
    stays at least ``ld_floor``): the finished explanation becomes minimal for its budget (no
    single unit can go). A unit that only matters together with another (a cancelling pair) is
    never dropped alone.

    The floor matters on confident models, where the KL saturates: a KL of 0.01 nats can hide a
    logit difference a sixth lower. With ``check`` (an oracle on other prompts, or other
    replacements), a removal must also stay within the budget and floor there: the oracle's
    prompts and their one replacement each are what the removals are chosen on, and a small
    explanation can fit them alone.

    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> from explainer.tasks import resolve_task
    >>> from explainer.scrub import Scrubber
    >>> folder = resolve_model("planted-distractor")
    >>> task = resolve_task(None, folder)
    >>> oracle = KLOracle(Scrubber.build(load_model(folder), task.train_data()), task.train_data())
    >>> flat, dropped = trim(oracle, np.ones(oracle.n_units, np.float32), 0.01)
    >>> {site: np.flatnonzero(v).tolist() for site, v in oracle.split(flat).items()}  # from all kept: the truth
    {'blocks.0.attn.in': [0], 'unembed.in': [1]}
    """
    flat, dropped = np.asarray(flat, np.float32).copy(), []
    rounds, large = _rounds(oracle), not exact(oracle)  # a large model: blocks of units, few rounds
    while (kept := np.flatnonzero(flat > 0.5)).size and rounds > 0:
        rounds -= 1
        kept = candidates(oracle, flat, kept, 0.0)
        rows = _with(flat, kept, 0.0)
        kls = oracle.kl(rows)
        if ld_floor is not None:
            kls = np.where(oracle.logit_diff_recovered(rows) >= ld_floor, kls, np.inf)
        if check is not None:  # the best removal that also holds on the check's prompts
            for i in np.argsort(kls, kind="stable"):
                if kls[i] > budget or within(check, rows[i], budget, ld_floor):
                    break
                kls[i] = np.inf
        best = int(np.argmin(kls))
        if kls[best] > budget:
            break
        block = _block(oracle, flat, kept, kls, budget, ld_floor, check) if large else [int(kept[best])]
        flat[block] = 0.0
        dropped.extend(block)
    return flat, dropped


def _block(oracle, flat, kept, kls, budget, ld_floor, check) -> list[int]:
    """On a large set, the most of the cheapest single removals (1, 2, 4, ... of them, the longest
    first) that can go together within the budget (and floor, and ``check``): at least the best one."""
    order = np.argsort(kls, kind="stable")
    free = kept[order][kls[order] <= budget]
    for length in _doubling(free.size)[::-1]:
        trial = flat.copy()
        trial[free[:length]] = 0.0
        if within(oracle, trial, budget, ld_floor) and (check is None or within(check, trial, budget, ld_floor)):
            return [int(u) for u in free[:length]]
    return [int(free[0])]


def nearest_drop(oracle: KLOracle, flat: np.ndarray, budget: float, ld_floor: float | None = None) -> np.ndarray | None:
    """``flat`` less the kept unit whose removal comes nearest what :func:`trim` keeps to: among
    removals within the KL budget, the one with the highest logit difference recovered (the lowest
    KL without ``ld_floor``); when none is within it, the one with the lowest KL. ``None`` when
    ``flat`` keeps no unit.
    """
    kept = np.flatnonzero(np.asarray(flat) > 0.5)
    if kept.size == 0:
        return None
    kept = candidates(oracle, flat, kept, 0.0)
    rows = _with(np.asarray(flat, np.float32), kept, 0.0)
    kls = oracle.kl(rows)
    inside = kls <= budget
    if inside.any() and ld_floor is not None:
        best = int(np.argmax(np.where(inside, oracle.logit_diff_recovered(rows), -np.inf)))
    else:
        best = int(np.argmin(kls))
    return rows[best]


def _ranked(
    oracle: KLOracle, flat: np.ndarray, units: np.ndarray, value: float, most: int, further: Callable[[Block], bool]
) -> list[Block]:
    """The first 1, 2, 4, ... (at most ``most``) of ``units`` set to ``value``, with the KL of each
    such change, in the two orders the KL's gradient predicts it lowers most: the gradient at
    ``flat`` (attribution patching) and halfway along the change (every one of ``units`` at the
    midpoint: the midpoint rule for the change's integral, which still tells units apart where
    ``flat`` is a minimum of the KL, as with every unit kept). Two backward passes (on the screen).

    The lengths are scored :data:`DOUBLINGS` at a time (one vmapped pass of both orders), the
    shortest first, and longer ones only while ``further`` accepts a longest change scored so far
    (a removal that still costs nothing, a return that still helps): a round that finds a few
    units scores a few masks."""
    units = np.asarray(units)
    now = (np.asarray(flat) > 0.5).astype(np.float32)
    halfway = now.copy()
    halfway[units] = (now[units] + value) / 2
    lengths = _doubling(min(units.size, most))
    orders = [
        units[np.argsort(oracle.gradient(point)[units] * (value - now[units]), kind="stable")]
        for point in ((now, halfway) if lengths else ())
    ]
    changes: list[Block] = []
    for start in range(0, len(lengths), DOUBLINGS):
        part = lengths[start : start + DOUBLINGS]
        kls = _kl_rows(oracle, np.concatenate([_prefixes(now, order, part, value) for order in orders]))
        batch = [(order[:length], float(kl)) for order, kls_of in zip(orders, np.split(kls, 2), strict=True)
                 for length, kl in zip(part, kls_of, strict=True)]  # fmt: skip
        changes += batch
        if not any(further(change) for change in batch if change[0].size == part[-1]):
            break
    return changes


def _doubling(n: int) -> list[int]:
    """1, 2, 4, ... up to and including ``n``."""
    lengths, length = [], 1
    while length < n:
        lengths.append(length)
        length *= 2
    return lengths + [n] if n > 0 else []


def best_subset(oracle: KLOracle, flat: np.ndarray, size: int, max_sets: int) -> tuple[np.ndarray, float] | None:
    """The ``size`` units among those ``flat`` keeps whose set has the least KL, with that KL, by
    scoring every such set (ranked on the oracle's screen, the best :data:`SHORTLIST` of them in
    full: :func:`shortlist`); ``None`` when there are more than ``max_sets`` of them or ``flat``
    keeps no more than ``size`` units.

    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> from explainer.tasks import resolve_task
    >>> from explainer.scrub import Scrubber
    >>> folder = resolve_model("planted-distractor")
    >>> task = resolve_task(None, folder)
    >>> oracle = KLOracle(Scrubber.build(load_model(folder), task.train_data()), task.train_data())
    >>> flat = np.zeros(oracle.n_units, np.float32)
    >>> flat[[0, 3, 11]] = 1.0  # the truth, units 0 and 11, and a distractor
    >>> mask, kl = best_subset(oracle, flat, 2, max_sets=10)
    >>> np.flatnonzero(mask).tolist(), round(kl, 6)
    ([0, 11], 0.0)
    """
    units = np.flatnonzero(np.asarray(flat) > 0.5)
    if len(units) <= size or not searchable(len(units), size, max_sets):
        return None
    sets = list(itertools.combinations(units.tolist(), size))
    rows = np.zeros((len(sets), oracle.n_units), np.float32)
    for row, chosen in zip(rows, sets, strict=True):
        row[list(chosen)] = 1.0
    kls = shortlist(oracle, rows)
    best = int(np.argmin(kls))
    return rows[best], float(kls[best])


def _prefixes(flat: np.ndarray, order: np.ndarray, lengths: list[int], value: float) -> np.ndarray:
    rows = np.repeat(flat[None], len(lengths), axis=0)
    for row, length in zip(rows, lengths, strict=True):
        row[order[:length]] = value
    return rows


def repair(oracle: KLOracle, flat: np.ndarray, budget: float, max_added: int = 8) -> tuple[np.ndarray, list[int]]:
    """Add back excluded units, most helpful first, until the KL is within ``budget`` (or nothing
    helps, or ``max_added`` units were added).

    Each round orders the excluded units, scores the returns of the first 1, 2, 4, ... of them
    together (one vmapped pass), and takes the fewest that reach the budget, or else the prefix
    with the lowest KL. On an :func:`~explainer.finish.oracle.exact` model the order is every
    excluded unit's return scored alone (:func:`shortlist`: the best on the screen exactly; past the
    shortlist, the units whose return helps on the screen, in its order:
    :func:`~explainer.finish.oracle.extended`); elsewhere it is the two orders the KL's gradient
    predicts (:func:`_ranked`: two backward passes, and a round scores at most two masks per
    doubling). A unit that alone reaches the budget is thus added alone, and a long repair costs a
    few rounds rather than one per unit. Once within the budget, each added unit the budget can do
    without is taken out again, the last added first (at most ``max_added`` masks, and at most
    :data:`~explainer.finish.oracle.SHORTLIST` elsewhere): a doubled prefix can hold a unit that
    only ranked near the needed ones.
    """
    flat, added = np.asarray(flat, np.float32).copy(), []
    current = float(oracle.kl(flat)[0])
    rounds = _rounds(oracle)
    while current > budget and len(added) < max_added and rounds > 0:
        rounds -= 1
        excluded, room = np.flatnonzero(flat < 0.5), max_added - len(added)
        if exact(oracle):
            changes = _returns(oracle, flat, excluded, current, room)
        else:
            changes = _ranked(
                oracle, flat, excluded, 1.0, room, lambda c, kl=current: c[1] > budget and _lowers(c[1], kl)
            )
        if not changes:
            break
        reach = [change for change in changes if change[1] <= budget]
        if reach:  # the fewest units that reach the budget
            units, kl = min(reach, key=lambda change: (change[0].size, change[1]))
        else:  # else the lowest KL
            units, kl = min(changes, key=lambda change: change[1])
        if not _lowers(kl, current):
            break
        flat[units] = 1.0
        added.extend(int(u) for u in units)
        current = kl
    if current <= budget:  # a doubled prefix can hold units the budget does not need: the last first
        for unit in list(reversed(added))[: None if exact(oracle) else SHORTLIST]:
            trial = flat.copy()
            trial[unit] = 0.0
            kl = float(oracle.kl(trial)[0])
            if kl <= budget:
                flat, current = trial, kl
                added.remove(unit)
    return flat, added


def _returns(oracle: KLOracle, flat: np.ndarray, excluded: np.ndarray, current: float, room: int) -> list[Block]:
    """An exact repair round's changes: the best 1, 2, 4, ... (at most ``room``) returns of
    ``excluded`` units, each scored alone first, with their KLs (none when no return helps)."""
    scores, screen = screened(oracle, _with(flat, excluded, 1.0))
    order = np.argsort(scores, kind="stable")
    good = order[_lowers(scores[order], current)]
    if good.size == 0:
        return []
    helpful = excluded[extended(oracle, flat, good, scores, screen, _lowers)]
    lengths = _doubling(min(helpful.size, room))
    kls = np.concatenate([[scores[order[0]]], _kl_rows(oracle, _prefixes(flat, helpful, lengths[1:], 1.0))])
    return [(helpful[:length], float(kl)) for length, kl in zip(lengths, kls, strict=True)]


def _lowers(kl, base: float):
    """``kl`` (a number or an array) is below ``base`` by more than float noise: a return that helps."""
    return kl < base - 1e-9


def no_worse(kl: float, base: float) -> bool:
    """``kl`` is at most ``base``, up to a relative tolerance of 1e-6 (float noise)."""
    return bool(kl <= base + 1e-6 * max(1.0, abs(base)))


def prune(oracle: KLOracle, flat: np.ndarray) -> np.ndarray:
    """Drop kept units whose removal costs nothing (KL), until every kept unit costs something.

    On an :func:`~explainer.finish.oracle.exact` model each round scores every kept unit's removal
    alone (:func:`shortlist`), then drops the free ones (cheapest first; past the shortlist, those
    free on the screen, in its order: :func:`~explainer.finish.oracle.extended`) in the largest
    block of 1/1, 1/2, 1/4, ... of them whose joint removal does as well as dropping the cheapest
    one alone (one vmapped pass, on every prompt), so a rung with many spare units takes a few
    rounds rather than one per unit. Elsewhere a round orders the kept units by the removal the
    KL's gradient predicts to cost least (:func:`_ranked`: two orders, two backward passes) and
    drops the longest of the first 1, 2, 4, ... of them whose joint removal costs nothing (one
    vmapped pass); the prune stops at a round where none does.

    "Costs nothing" is measured against the lowest KL the prune has reached, not the last one: a
    removal within float noise of it may raise the KL a little, and a chain of such removals, each
    measured from the one before, would raise it by a little every round.
    """
    flat = np.asarray(flat, np.float32).copy()
    lowest = float(oracle.kl(flat[None])[0])  # the lowest KL reached: what "costs nothing" means
    rounds = _rounds(oracle)
    while (kept := np.flatnonzero(flat > 0.5)).size and rounds > 0:
        rounds -= 1
        block = _free_block(oracle, flat, kept, lowest) if exact(oracle) else _free_prefix(oracle, flat, kept, lowest)
        if block is None:
            break
        units, kl = block
        flat[units] = 0.0
        lowest = min(lowest, kl)
    return flat


def _free_block(oracle: KLOracle, flat: np.ndarray, kept: np.ndarray, lowest: float) -> Block | None:
    """An exact prune round: the units to drop and the KL without them (``None``: none is free)."""
    kls, screen = screened(oracle, _with(flat, kept, 0.0))
    order = np.argsort(kls, kind="stable")
    cheap = order[[no_worse(float(k), lowest) for k in kls[order]]]
    if cheap.size == 0:
        return None
    free = kept[extended(oracle, flat, cheap, kls, screen, no_worse)]
    lengths = _doubling(free.size)[::-1][:-1]  # the longest first; a single free unit is known
    joint = _kl_rows(oracle, _prefixes(flat, free, lengths, 0.0))
    bar = min(lowest, float(kls[order[0]]))  # a block must do as well as dropping the best one alone
    ok = [i for i, k in enumerate(joint) if no_worse(float(k), bar)]
    length, kl = (lengths[ok[0]], float(joint[ok[0]])) if ok else (1, float(kls[order[0]]))
    return free[:length], kl


def _free_prefix(oracle: KLOracle, flat: np.ndarray, kept: np.ndarray, lowest: float) -> Block | None:
    """A bounded prune round: the longest prefix of the gradient's orders whose removal costs
    nothing (:func:`_ranked`), and the KL without it (``None``: no prefix is free)."""

    def costs_nothing(change: Block) -> bool:
        return no_worse(change[1], lowest)

    free = [change for change in _ranked(oracle, flat, kept, 0.0, kept.size, costs_nothing) if costs_nothing(change)]
    return max(free, key=lambda c: (c[0].size, -c[1])) if free else None


def searchable(n_units: int, size: int, max_sets: int) -> bool:
    """Whether :func:`best_of_size` scores the sets of ``size`` of ``n_units`` units: at most
    ``max_sets`` of them, and ``size`` in range.

    >>> searchable(20, 2, 190), searchable(20, 2, 189), searchable(20, 21, 10**6)
    (True, False, False)
    """
    return 0 <= size <= n_units and math.comb(n_units, size) <= max_sets


def best_of_size(oracle: KLOracle, size: int, max_sets: int, block: int = 1024) -> np.ndarray | None:
    """The flat mask of exactly ``size`` units with the least KL, by scoring every such set, or
    ``None`` when there are more than ``max_sets`` of them (or ``size`` is out of range).

    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> from explainer.tasks import resolve_task
    >>> from explainer.scrub import Scrubber
    >>> folder = resolve_model("planted-distractor")
    >>> task = resolve_task(None, folder)
    >>> oracle = KLOracle(Scrubber.build(load_model(folder), task.train_data()), task.train_data())
    >>> np.flatnonzero(best_of_size(oracle, 2, max_sets=1000)).tolist()
    [0, 11]
    """
    n = oracle.n_units
    if not searchable(n, size, max_sets):
        return None
    best, best_kl = np.zeros(n, np.float32), np.inf
    sets = itertools.combinations(range(n), size)
    while part := list(itertools.islice(sets, block)):
        rows = np.zeros((len(part), n), np.float32)
        for row, units in zip(rows, part, strict=True):
            row[list(units)] = 1.0
        kls = oracle.kl(rows)
        if kls.min() < best_kl:
            best, best_kl = rows[int(np.argmin(kls))], float(kls.min())
    return best
