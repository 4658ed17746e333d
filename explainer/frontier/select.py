"""Selection: each rung of sizes made the best explanation found with *at most* its size.

:func:`at_most` drops units that buy nothing, replaces a rung no better than a smaller one by it,
searches rungs over the KL budget again: exactly where the sets are few (:data:`EXACT_SETS`), else
by restarts from open gates (:func:`open_restart`), and fills the room a rung has left with the
units that still lower its cost.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from explainer.finish.oracle import KLOracle
from explainer.finish.oracle import exact as every_candidate_scored
from explainer.finish.search import (
    best_of_size,
    best_subset,
    no_worse,
    prune,
    repair,
    searchable,
)
from explainer.frontier.grade import ATTACK_METHODS
from explainer.frontier.ladder import (
    PATIENCE,
    LadderProgram,
    Rung,
    _open,
    train_ladder,
)
from explainer.masks import Layout
from explainer.progress import Timings, say
from explainer.score import IG_STEPS, attribution, fit_scorer
from explainer.scrub import Scrubber
from explainer.tasks.base import Batch
from explainer.train.config import TrainConfig
from explainer.train.step import (
    InLoopAdversary,
)

# at_most scores every set of a stuck rung's size when there are at most this many (about the
# cost of an open restart's training)
EXACT_SETS = 1500
RESTART_TOGETHER = 2  # stuck rungs restarted at a time, as one batch


def polish(oracle, flat: np.ndarray, size: int, kl_budget: float) -> np.ndarray:
    """:func:`prune`, then :func:`~explainer.finish.search.repair` up to ``size`` units, then prune
    again.

    Continuation can leave a rung stuck below its size with gates closed for good (their units get
    no gradient back); the exact search of ``explain``'s repair step adds them back.
    """
    return grow(oracle, prune(oracle, flat), size, kl_budget)


def grow(oracle, flat: np.ndarray, size: int, kl_budget: float) -> np.ndarray:
    """:func:`~explainer.finish.search.repair` toward ``kl_budget`` up to ``size`` units, then
    :func:`prune` what it added where it added any (a doubled block can hold a unit that costs
    nothing). With a budget of 0, the units that still lower the KL while there is room."""
    room = size - int((flat > 0.5).sum())
    if room > 0:
        flat, added = repair(oracle, flat, kl_budget, max_added=room)
        if added:
            flat = prune(oracle, flat)
    return flat


def at_most(
    scrubber: Scrubber,
    train: Batch,
    rungs: Sequence[Rung],
    seed: int = 0,
    kl_budget: float = 0.01,
    restart: Callable[[Sequence[float]], list[Rung]] | None = None,
    exact_sets: int = EXACT_SETS,
    together: int = RESTART_TOGETHER,
    gap: Callable[[np.ndarray], float] | None = None,
    timings: Timings | None = None,
    progress: bool = False,
    rankings: Sequence[np.ndarray] = (),
) -> list[Rung]:
    """Each rung of a ladder of sizes as the best explanation found with *at most* its size.

    Candidates are ranked by what training optimised: the KL on the training prompts, plus, with
    an adversary in the loop (``gap``: a flat keep mask's adversarial gap on the training prompts,
    :func:`adversarial_gap`), that gap. So with an adversary a set that is faithful but fragile
    (dropping a cancelling pair costs no KL, re-including one of it costs a lot) never replaces a
    robust one, whether as the polished form of a rung, as the other way of training it, or as a
    smaller rung in the envelope. A set is attacked only where a comparison needs its gap
    (:class:`Costs`: a KL above the other set's whole cost settles it), and never where its KL is
    no lower than the empty explanation's (it explains nothing; its cost is its KL).

    From the smallest rung up: units whose removal does not raise the KL on the training prompts
    are dropped and, while the KL is above ``kl_budget`` and there is room below the rung's size,
    units are added back by exact search (:func:`polish`; a target size forces ``k`` units in even
    when fewer do the job, and continuation can leave gates closed for good). A rung trained both
    ways keeps the way whose *polished* explanation has the lower KL (before polishing, the way
    down looked better on induction's 4- and 48-unit rungs and was worse after); the other way is
    left unpolished where it learned nothing (a KL no lower than the empty explanation's). The rungs
    over budget below the smallest rung that meets it (all of them when none does) are searched
    again, the largest first, and the better of the two kept: by scoring every set of the rung's
    size where there are at most ``exact_sets`` (the exact optimum, for about the cost of a
    restart of that many steps), else by ``restart`` (``sweep``: trained from open gates, as
    ``explain``'s open restart), except a rung its ladder marked ``opened`` (a whole run from open
    gates at its size trained it: :func:`train_ladder`) and an empty one. Restarts train
    ``together`` rungs at a time, the largest first, as one batch (``restart`` takes their sizes;
    the second of two lifted ioi's 32-unit rung and paren's 39-unit rung). They stop after a batch
    whose largest rung misses the budget too (a smaller rung will not meet it where a larger one
    could not, and each batch is a whole training run); exact searches of smaller rungs still run.
    A restart that misses the budget can still lower the KL of a rung where training closed gates
    for good, or find a better set of the same size (tracr-sort's 25-unit rung, full and over
    budget: held-out KL 0.68 against 0.99). Searched rungs record ``exact_search`` or
    ``open_restart`` (1 when it won) in their history. A rung still over budget then gets, the
    largest first, the next larger rung's set when polishing left it no larger than this rung's
    size, or else the best set of its size among that rung's units when there are at most
    ``exact_sets`` such sets, if its KL is lower (``subset_search``, 1 when it won; none when
    ``exact_sets`` is 0, as with an adversary, since both rank sets by KL alone): without the
    adversary, tracr-sort's 2-unit rung learned nothing either way, and is beyond an exact search
    (33,411 pairs), while the best pair of its 5-unit rung's four units has KL 4.0 against the empty
    explanation's 10.0. On a model whose searches score every candidate
    (:func:`~explainer.finish.oracle.exact`), a rung with room left below its size then takes,
    while there is room, the returns that still lower the KL (:func:`grow` to a budget of 0: a rung
    is the best set of at most its size, and meeting the KL budget leaves room unused), where that
    lowers the cost (``filled``, 1 when it won; with an adversary, a return can cost more gap than
    it saves KL): on induction's edges with the adversary, the 14-edge rung had settled in a robust
    13-edge set. Elsewhere each fill is a bounded search and one more attack a rung, which bought
    small drops in KL for up to a sixth more selection time on the random models of
    ``benchmarks/growth.py`` (``benchmarks/results/growth.json``, ``sweep_filled``). Then a rung
    whose KL is no lower than that of a smaller rung buys nothing with its extra units, so it is
    replaced by that rung (keeping its own target and history). The full model's rung stays as it
    is. Baselines' searches are read the same way (``acdc``'s set for size ``k`` is its largest
    with at most ``k`` units).
    This is MIB's "at most ``k`` % of the units": without it, a rung no better than a smaller one
    puts a dominated point on the frontier, and the straight line to it from below lowers the
    area.

    ``rankings`` (scores per unit in the oracle's flat order, higher more important: attribution
    patching's, integrated gradients') give each rung a further candidate before any rung is
    searched again: of each ranking's top units, as many as the rung's size, the set with the
    lowest KL. Where it costs less than the rung's set beyond float noise, it is polished and,
    still lower, replaces it (``ranked`` in the rung's history, 1 when it won): training from
    either way can settle in a set of higher KL than a ranking's top units on the training prompts
    (induction's 14-edge rung without the adversary: ``benchmarks/results/peers.json``), at the
    price of one mask a ranking and a rung, and at most one more polish a rung.

    ``timings`` gains ``polish`` (the seconds of :func:`polish`) and, with ``gap``, ``select_attacks``
    (the attacks that rank sets). ``progress``: a line on stderr per polished set.
    """
    timings = Timings() if timings is None else timings
    oracle = KLOracle(scrubber, train, seed)
    total = sum(scrubber.n_units.values())
    order = sorted(range(len(rungs)), key=lambda i: (rungs[i].value, i))
    found: dict[int, tuple[Rung, np.ndarray, float]] = {}
    empty_kl = float(oracle.kl(np.zeros((1, oracle.n_units), np.float32))[0])
    costs = Costs(gap, timings, nothing=empty_kl)
    cost, holds = costs.of, costs.holds
    started = time.perf_counter()

    def tell(rung: Rung, before: np.ndarray, after: np.ndarray, kl_before: float, kl: float) -> None:
        if progress:
            n, m = int((before > 0.5).sum()), int((after > 0.5).sum())
            say(
                f"select: polished the {int(rung.value)}-unit rung's set: {n} → {m} units,"
                f" KL {kl_before:.4g} → {kl:.4g} [{time.perf_counter() - started:.0f}s]"
            )

    def polished(rung: Rung, flat: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """The rung's set (or ``flat``, a set for its size) polished, or as it was where polishing
        costs robustness."""
        flat = oracle.flat(rung.keep) if flat is None else flat
        if rung.value >= total:
            return flat, float(oracle.kl(flat[None])[0])
        with timings.phase("polish"):
            better = polish(oracle, flat, int(rung.value), kl_budget)
        kl, kl_before = float(oracle.kl(better[None])[0]), float(oracle.kl(flat[None])[0])
        tell(rung, flat, better, kl_before, kl)
        same = np.array_equal(better > 0.5, flat > 0.5)
        if gap is not None and not same and not holds(no_worse, (better, kl), (flat, kl_before)):
            return flat, kl_before  # pruning dropped what the adversary needs (a cancelling pair)
        return better, kl

    for i in order:
        rung = rungs[i]
        flat, kl = polished(rung)
        other = rung.alternative
        other_flat = oracle.flat(other.keep) if other is not None else None
        if (
            other is not None
            and rung.value < total
            and not np.array_equal(other_flat, oracle.flat(rung.keep))
            # an alternative that learned nothing (no better than the empty set) is no starting
            # point: polishing it is a search from scratch (ioi's 160-unit rung up: 31 s, to KL
            # 6.33 against the way down's 2.05)
            and not no_worse(empty_kl, float(oracle.kl(other_flat[None])[0]))
        ):
            flat2, kl2 = polished(other)
            if not holds(no_worse, (flat, kl), (flat2, kl2)):  # lower beyond float noise
                rung, flat, kl = other, flat2, kl2
        if 0 < rung.value < total and rankings:  # the rankings' best top set, polished if it wins
            tops = np.stack([_top(scores, int(rung.value)) for scores in rankings])
            top_kls = oracle.kl(tops)
            best = int(np.argmin(top_kls))
            won = holds(_lower, (tops[best], float(top_kls[best])), (flat, kl))
            if won:
                top, top_kl = polished(rung, tops[best])
                won = holds(_lower, (top, top_kl), (flat, kl))
                if won:
                    flat, kl = top, top_kl
            rung = Rung(rung.mode, rung.value, rung.gates, rung.keep, {**rung.history, "ranked": [float(won)]})
        found[i] = (rung, flat, kl)
    # the smallest rung that meets the budget (the full model when none does): only rungs below it
    # can be stuck for want of units that training closed for good
    limit = min([rungs[i].value for i in order if rungs[i].value < total and found[i][2] <= kl_budget] or [total])
    stuck = [i for i in order if found[i][2] > kl_budget and rungs[i].value < limit]
    restarting = restart is not None
    # the rungs a restart would train (none has few enough sets to score them all, and no whole run
    # from open gates at its size trained it; an empty rung has nothing to train), the largest first
    restartable = [
        i
        for i in reversed(stuck)
        if rungs[i].value > 0
        and not searchable(oracle.n_units, int(rungs[i].value), exact_sets)
        and "opened" not in rungs[i].history
    ]
    restarted: dict[int, Rung] = {}
    for i in reversed(stuck):  # the largest first: if it cannot meet the budget, no smaller rung can
        rung, flat, kl = found[i]
        exact = best_of_size(oracle, int(rung.value), exact_sets)
        # a batch's smaller rungs were trained with its largest: they are used even after it missed
        if exact is None and i not in restarted and (not restarting or i not in restartable):
            continue
        if exact is not None:  # every set of the rung's size scored: cheaper than a restart, and exact
            again, flat2, key = rung, exact, "exact_search"
        else:
            if i not in restarted:  # this rung and the next ones down, as one batch
                batch = restartable[restartable.index(i) :][:together]
                restarted.update(zip(batch, restart([rungs[j].value for j in batch]), strict=True))
            again = restarted[i]
            with timings.phase("polish"):
                flat2, key = polish(oracle, oracle.flat(again.keep), int(rung.value), kl_budget), "open_restart"
        kl2 = float(oracle.kl(flat2[None])[0])
        if exact is None and progress:  # the restart's set polished
            start = oracle.flat(again.keep)
            tell(again, start, flat2, float(oracle.kl(start[None])[0]), kl2)
        won = holds(lambda x, y: x < y, (flat2, kl2), (flat, kl))
        history = {key: [float(won)]}
        if won:
            rung, flat, kl = Rung(rung.mode, rung.value, again.gates, again.keep, again.history), flat2, kl2
        found[i] = (Rung(rung.mode, rung.value, rung.gates, rung.keep, {**rung.history, **history}), flat, kl)
        if exact is None and kl2 > kl_budget:
            restarting = False  # exact searches of smaller rungs are still cheap
    # a rung still over budget, the largest first: the best set of its size among the next larger
    # rung's units, where there are few enough such sets (a pair that works only together, which
    # training from either way missed and adding units one at a time cannot find)
    for below, above in reversed(list(itertools.pairwise(order)) if exact_sets > 0 else []):
        rung, flat, kl = found[below]
        if kl <= kl_budget or rung.value >= total or rung.value == 0:  # an empty rung has no choice
            continue
        _, above_flat, above_kl = found[above]
        if (above_flat > 0.5).sum() <= rung.value:  # polished down to this rung's size: take it whole
            subset: tuple[np.ndarray, float] | None = (above_flat, above_kl)
        else:
            subset = best_subset(oracle, above_flat, int(rung.value), exact_sets)
        if subset is None:
            continue
        won = not no_worse(kl, subset[1])  # lower beyond float noise
        if won:
            flat, kl = subset
        found[below] = (
            Rung(rung.mode, rung.value, rung.gates, rung.keep, {**rung.history, "subset_search": [float(won)]}),
            flat,
            kl,
        )
    # room below a rung's size: the returns that still lower the KL, where they lower the cost
    for i in order if every_candidate_scored(oracle) else ():
        rung, flat, kl = found[i]
        if not (flat > 0.5).sum() < rung.value < total:
            continue
        with timings.phase("polish"):
            filled = grow(oracle, flat, int(rung.value), 0.0)
        if np.array_equal(filled > 0.5, flat > 0.5):
            continue
        filled_kl = float(oracle.kl(filled[None])[0])
        won = holds(_lower, (filled, filled_kl), (flat, kl))
        if won:
            tell(rung, flat, filled, kl, filled_kl)
            flat, kl = filled, filled_kl
        history = {**rung.history, "filled": [float(won)]}
        found[i] = (Rung(rung.mode, rung.value, rung.gates, rung.keep, history), flat, kl)
    out: dict[int, Rung] = {}
    best, best_cost = None, math.inf
    for i in order:
        rung, flat, kl = found[i]
        keep = {s: np.asarray(v, np.float32) for s, v in oracle.split(flat).items()}
        if rung.value >= total or best is None or holds(_lower, (flat, kl), best_cost):
            best, best_cost = i, cost(flat, kl)
            out[i] = Rung(rung.mode, rung.value, rung.gates, keep, rung.history)
        else:
            out[i] = Rung(rung.mode, rung.value, out[best].gates, out[best].keep, rung.history)
    return [out[i] for i in range(len(rungs))]


def rankings_of(scrubber: Scrubber, train: Batch, seed: int = 0) -> list[np.ndarray]:
    """Attribution patching's and integrated gradients' scores per unit on ``train``, flat in the
    scrubber's unit order (what :func:`at_most`'s ``rankings`` takes), on one fitted scorer: one
    backward pass, then :data:`~explainer.score.IG_STEPS`. The scores of
    :func:`explainer.baselines.rank` with the same seed."""
    scorer = fit_scorer(scrubber, train, jax.random.split(jax.random.key(seed))[0])  # rank's replacement
    return [np.asarray(attribution(scorer, steps), np.float64) for steps in (1, IG_STEPS)]


def _lower(kl: float, bar: float) -> bool:
    """``kl`` is below ``bar`` beyond float noise."""
    return not no_worse(bar, kl)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """A flat keep mask of the ``k`` units with the highest ``scores`` (ties: the earlier unit)."""
    flat = np.zeros(len(scores), np.float32)
    flat[np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k]] = 1.0
    return flat


class Costs:
    """What :func:`at_most` ranks sets by (the KL, plus the adversarial gap ``gap`` when there is an
    adversary), attacking a set only where a comparison needs its gap.

    A gap is never negative, so a set's KL bounds its cost from below: :meth:`holds` compares costs
    from what is known and attacks the open ones, the lower KL first, only while the bounds leave
    the answer open. The answers are those of attacking every set; where KLs differ by more than
    the gaps, one attack settles a comparison of two sets.

    >>> attacked = []
    >>> costs = Costs(lambda flat: attacked.append(int(flat.sum())) or 0.1)
    >>> one, two = np.ones(1), np.ones(2)
    >>> costs.holds(no_worse, (two, 0.2), (one, 0.5)), attacked  # 0.2 + 0.1 is below 0.5: one attack
    (True, [2])
    >>> costs.holds(no_worse, (one, 0.5), (two, 0.2)), attacked  # one's KL alone is above 0.3
    (False, [2])
    >>> costs.holds(no_worse, (one, 0.25), (two, 0.2)), attacked  # 0.25 could still win: attacked
    (False, [2, 1])

    With ``nothing``, the empty explanation's KL, a set whose KL is no lower explains nothing: its
    cost is its KL, unattacked (on ioi's edges the one- and two-edge rungs learned nothing, and the
    selection attacked such sets only to tell them apart).

    >>> Costs(lambda flat: attacked.append(int(flat.sum())) or 0.1, nothing=0.5).of(two, 0.5), attacked
    (0.5, [2, 1])
    """

    def __init__(
        self,
        gap: Callable[[np.ndarray], float] | None,
        timings: Timings | None = None,
        nothing: float = math.inf,
    ):
        self.gap, self.timings, self.nothing = gap, Timings() if timings is None else timings, nothing
        self.gaps: dict[bytes, float] = {}

    def of(self, flat: np.ndarray, kl: float) -> float:
        """The cost of ``flat`` (its KL ``kl``), attacking it if it was not yet."""
        if self.gap is None or no_worse(self.nothing, kl):
            return kl
        key = (flat > 0.5).tobytes()
        if key not in self.gaps:
            with self.timings.phase("select_attacks"):
                self.gaps[key] = self.gap(flat)
        return kl + self.gaps[key]

    def bounds(self, item: tuple[np.ndarray, float] | float) -> tuple[float, float]:
        """The least and most ``item``'s cost can be (``(flat, kl)``, or a known cost) without
        attacking it: at least its KL."""
        if not isinstance(item, tuple):
            return item, item
        flat, kl = item
        if self.gap is None or no_worse(self.nothing, kl) or (flat > 0.5).tobytes() in self.gaps:
            return self.of(flat, kl), self.of(flat, kl)
        return kl, math.inf

    def holds(self, test: Callable[[float, float], bool], a, b) -> bool:
        """``test(cost of a, cost of b)``, for a ``test`` that can only turn false as ``a``'s cost
        rises or ``b``'s falls (``no_worse``, ``<``); ``a`` and ``b`` as for :meth:`bounds`."""
        while True:
            (low_a, high_a), (low_b, high_b) = self.bounds(a), self.bounds(b)
            if test(high_a, low_b):
                return True
            if not test(low_a, high_b):
                return False
            unknown = [x for x in (a, b) if isinstance(x, tuple) and self.bounds(x)[1] == math.inf]
            self.of(*min(unknown, key=lambda x: x[1]))


# prompts the selection's attacks score: a ranking, not a reported number (the gaps it tells apart
# differ by orders of magnitude)
GAP_PROMPTS = 32
GAP_RESTARTS = 1  # greedy restarts of the selection's attacks (the first tries every unit, to GREEDY_ALL)


def adversarial_gap(
    scrubber: Scrubber, train: Batch, budget: int, seed: int = 0, progress: bool = False
) -> Callable[[np.ndarray], float]:
    """``gap(flat)``: the mean KL gap of the strongest of the grading attacks
    (:data:`~explainer.frontier.grade.ATTACK_METHODS`) at ``budget`` on the first
    :data:`GAP_PROMPTS` training prompts, for :func:`at_most`'s ranking.

    Greedy runs one restart (which tries every unit up to ``GREEDY_ALL`` per step), so an attack
    scores a bounded number of sets whatever the model's size: the ranking needs to tell a set
    an attack breaks from one it does not, not the strongest attack's exact size. ``progress``:
    one line on stderr per attack."""
    from adversary.discrete import attack_all

    prompts = train.take(jnp.arange(min(len(train), GAP_PROMPTS)))
    layout = Layout.of(scrubber.n_units)
    done = [0]

    def gap(flat: np.ndarray) -> float:
        excluded = int((flat < 0.5).sum())
        if excluded == 0 or budget < 1:
            return 0.0
        keep = layout.split(np.asarray(flat, np.float32))
        best, _ = attack_all(
            scrubber,
            prompts,
            keep,
            min(budget, excluded),
            jax.random.key(seed),
            methods=ATTACK_METHODS,
            restarts=GAP_RESTARTS,
        )
        done[0] += 1
        if progress:
            size = int((flat > 0.5).sum())
            say(f"select: attack {done[0]} on a {size}-unit set, gap {best.gap['kl_mean']:.4g}")
        return float(best.gap["kl_mean"])

    return gap


def exact_sets(config: TrainConfig, adversary: InLoopAdversary | None) -> int:
    """How many sets :func:`at_most` may score exactly in ``sweep``: as many as a restart has steps,
    and none with an adversary in the loop. The exact search ranks sets by KL alone, so it would
    undo what the adversary bought: on planted-cancel it put the faithful but fragile 2-unit set
    (adversarial gap 8.75 nats) in place of the robust 4-unit rungs. Restarts train with the
    adversary."""
    return 0 if adversary is not None else config.optimiser.steps


def open_restart(
    scrubber: Scrubber,
    train: Batch,
    config: TrainConfig,
    adversary: InLoopAdversary | None = None,
    checkpoints: Path | None = None,
    patience: int = PATIENCE,
    program: LadderProgram | None = None,
    progress: bool = False,
    timings: Timings | None = None,
) -> Callable[[Sequence[float]], list[Rung]]:
    """:func:`at_most`'s ``restart``: rungs of the given sizes trained again from open gates (at
    most ``optimiser.steps``, as ``explain``'s open restart, and stopped once every rung's explanation,
    and with an adversary its attacks, have stayed the same for ``patience`` steps: on ioi's
    8-point ladder the restart of the 81- and 41-unit rungs settled at step 775 with the same KL as
    at 1500), several as one batch;
    checkpoints in ``open-restart-K`` (``open-restart-K1-K2`` for a batch). ``program``: the
    ladder's (:class:`LadderProgram`), whose compiled step a batch of its shape reuses. ``progress``:
    its steps on stderr (``open restart (K1, K2) ...``); ``timings`` gains ``open_restart_train``,
    the seconds of its steps and their compile."""
    open_config = _open(config)

    def restart(values: Sequence[float]) -> list[Rung]:
        name = "-".join(str(int(v)) for v in values)
        more = checkpoints / f"open-restart-{name}" if checkpoints is not None else None
        # one rung: a continuation ladder of one (its checkpoints, as before); several: one batch
        strategy = "continuation" if len(values) == 1 else "vmap"
        inner = Timings()
        rungs = train_ladder(
            scrubber,
            train,
            open_config,
            "sizes",
            values,
            adversary,
            strategy,
            progress=progress,
            checkpoints=more,
            direction="up",
            first_patience=patience,
            program=program,
            timings=inner,
            label=f"open restart ({', '.join(str(int(v)) for v in values)})",
        )
        if timings is not None:
            timings["open_restart_train"] = timings.get("open_restart_train", 0.0) + sum(inner.values())
        return rungs

    return restart
