"""Finishing: after training, an explanation goes through a list of passes.

Every pass has one small protocol: it takes a :class:`Candidate` (the binary keep mask, the gates
it came from, their history, its KL on the training prompts, and what the passes did so far) and
the :class:`Context` of the run, and returns a candidate. :func:`fit` is "train, then run the
passes the settings ask for" (:func:`passes_for`):

- ``repair``: units whose gates closed for good although the budget needs them come back, by exact
  search on the finished mask (:func:`explainer.finish.search.repair`); it also measures the KL the
  next passes read;
- ``open_restart``: when the explanation still misses the budget, training runs once more from open
  gates and the better of the two is kept (every sampled mask of a mostly closed start can break
  the model, leaving the KL no slope to follow);
- ``trim``: units the budget can lose go, one at a time (:func:`explainer.finish.search.trim`), each
  removal checked also on the training prompts the oracle does not score; with a learned basis the
  rotation is refit to a smaller set where trim stops (:func:`explainer.train.step.refit_bases`);
- ``close``: with a rotated in-loop adversary, units come back while the rotated attack still moves
  the explanation by more than the budget (:func:`close_rotated`).

Each pass's cost is bounded by :mod:`explainer.finish.search`'s searches (a number of masks that
does not grow with the number of units). The history gains ``kl_finished``, ``repaired``,
``open_restart``, ``trimmed``, ``refits`` and ``closed``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from explainer.finish.oracle import MAX_ORACLE_PROMPTS, KLOracle, within
from explainer.finish.search import nearest_drop, repair, trim
from explainer.masks import Gates
from explainer.progress import Timings
from explainer.scrub import Scrubber, SiteMeans
from explainer.tasks.base import Batch
from explainer.train.config import TrainConfig
from explainer.train.step import OPEN_LOGIT, Trained, TrainProgram, finish, refit_bases, train_gates, train_program

RECORD = ("repaired", "open_restart", "trimmed", "refits", "closed")  # what passes did, in history order


@dataclasses.dataclass
class Candidate:
    """An explanation between passes: its keep mask, gates, the scrubber whose units they mask (a
    learned basis as trained, or refit), history, its KL on the training prompts (``inf`` until the
    repair pass measures it), and the ``optimal`` ablation's constants learned with the gates
    (``None`` under other ablations)."""

    keep: dict[str, np.ndarray]
    gates: Gates
    scrubber: Scrubber
    history: dict[str, list[float]]
    kl: float = float("inf")
    record: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(RECORD, 0.0))
    constants: SiteMeans | None = None

    def replace(self, **changes: Any) -> Candidate:
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, trained: Trained, config: TrainConfig, **fields: Any) -> Candidate:
        """The candidate that training returned, thresholded (:func:`explainer.train.step.finish`)."""
        gates = trained.gates
        return cls(
            finish(gates, config), gates, trained.scrubber, trained.history, constants=trained.constants, **fields
        )

    def scrubbing(self) -> Scrubber:
        """Its scrubber, replacing excluded units by ``constants`` where given (the ``optimal``
        ablation's, learned with the gates)."""
        scrubber = self.scrubber
        return scrubber if self.constants is None else eqx.tree_at(lambda s: s.means, scrubber, self.constants)


class Context(NamedTuple):
    """What a pass may read: the run's scrubber (its learned bases, if any, as they start),
    training prompts, settings and adversary."""

    scrubber: Scrubber
    data: Batch
    config: TrainConfig
    adversary: Any
    progress: bool
    checkpoints: str | os.PathLike | None
    program: TrainProgram | None = None  # the first training's, which a second one reuses
    timings: Timings | None = None  # the run's: a pass that trains adds its steps' seconds

    def oracle(self, candidate: Candidate, data: Batch | None = None, seed: int | None = None) -> KLOracle:
        """The KL oracle of ``candidate``'s scrubber (:meth:`Candidate.scrubbing`)."""
        seed = self.config.optimiser.seed if seed is None else seed
        return KLOracle(candidate.scrubbing(), self.data if data is None else data, seed)


Pass = Callable[[Candidate, Context], Candidate]


def repaired(candidate: Candidate, ctx: Context) -> Candidate:
    """The candidate with its KL measured, and units added back while it misses the budget."""
    oracle = ctx.oracle(candidate)
    flat, added = oracle.flat(candidate.keep), []
    if ctx.config.finishing.repair:
        flat, added = repair(oracle, flat, ctx.config.penalty.kl_budget)
    record = {**candidate.record, "repaired": float(len(added))}
    return candidate.replace(keep=oracle.split(flat), kl=float(oracle.kl(flat)[0]), record=record)


def open_restart(candidate: Candidate, ctx: Context) -> Candidate:
    """Training from open gates once more when the candidate misses the budget; the better kept
    (within budget and smaller, or closer to the budget)."""
    config, budget = ctx.config, ctx.config.penalty.kl_budget
    if not (candidate.kl > budget and config.finishing.open_restart and config.optimiser.init_logit < OPEN_LOGIT):
        return candidate
    open_config = config.replace(init_logit=OPEN_LOGIT)
    more = None if ctx.checkpoints is None else os.path.join(ctx.checkpoints, "open-restart")
    inner = Timings()
    trained = train_gates(ctx.scrubber, ctx.data, open_config, ctx.adversary, ctx.progress, more, inner, ctx.program)
    if ctx.timings is not None:  # its training steps, apart from its first (which may compile)
        ctx.timings["open_restart_train"] = ctx.timings.get("open_restart_train", 0.0) + inner.get("train", 0.0)
    other = Candidate.of(trained, open_config, record=candidate.record)
    other = repaired(other, ctx)
    size, size2 = (sum(int(v.sum()) for v in c.keep.values()) for c in (candidate, other))
    if (other.kl <= budget and (candidate.kl > budget or size2 < size)) or (
        candidate.kl > budget and other.kl < candidate.kl
    ):
        return other.replace(record={**other.record, "open_restart": 1.0})
    return candidate


def trimmed(candidate: Candidate, ctx: Context) -> Candidate:
    """Units the budget can lose dropped (each removal holding on the prompts the oracle does not
    score, with other replacements); with a learned basis, the rotation refit to a smaller set."""
    config, data = ctx.config, ctx.data
    if candidate.kl > config.penalty.kl_budget:
        return candidate
    held = data.take(jnp.arange(MAX_ORACLE_PROMPTS, len(data))) if len(data) > MAX_ORACLE_PROMPTS else data

    def oracles(c: Candidate) -> tuple[KLOracle, KLOracle]:
        return ctx.oracle(c), ctx.oracle(c, held, (config.optimiser.seed + 1) % 2**63)

    budget, floor, current, refits = config.penalty.kl_budget, config.finishing.trim_ld_floor, candidate, 0
    oracle, check = oracles(current)
    flat, dropped = trim(oracle, oracle.flat(candidate.keep), budget, floor, check)
    while current.scrubber.learned and config.finishing.trim_refit_steps:  # refit a learned basis to a smaller set
        smaller = nearest_drop(oracle, flat, budget, floor)
        if smaller is None:
            break
        refit = current.replace(scrubber=refit_bases(current.scrubber, data, oracle.split(smaller), config))
        refitted = oracles(refit)
        if not all(within(o, smaller, budget, floor) for o in refitted):
            break
        current, (oracle, check), refits = refit, refitted, refits + 1
        dropped.extend(int(u) for u in np.flatnonzero((flat > 0.5) & (smaller < 0.5)))
        flat, more = trim(oracle, smaller, budget, floor, check)
        dropped.extend(more)
    record = {**candidate.record, "trimmed": float(len(dropped)), "refits": float(refits)}
    kl = float(oracle.kl(flat)[0]) if dropped else candidate.kl
    return current.replace(keep=oracle.split(flat), kl=kl, record=record)


def closed(candidate: Candidate, ctx: Context) -> Candidate:
    """Units added back while a rotated attack, left open by training, moves the explanation by
    more than the budget (each addition keeping the KL within it)."""
    config, budget = ctx.config, ctx.config.penalty.kl_budget
    if candidate.kl > budget:
        return candidate
    oracle = ctx.oracle(candidate)
    admissible = lambda k: float(oracle.kl(oracle.flat(k))[0]) <= budget  # noqa: E731
    key = jax.random.fold_in(jax.random.key(config.optimiser.seed), 3)
    keep, added = close_rotated(candidate.scrubbing(), ctx.data, candidate.keep, ctx.adversary, budget, key, admissible)
    keep = {s: np.asarray(v) > 0.5 for s, v in keep.items()}
    kl = float(oracle.kl(oracle.flat(keep))[0]) if added else candidate.kl
    return candidate.replace(keep=keep, kl=kl, record={**candidate.record, "closed": float(len(added))})


def close_rotated(scrubber: Scrubber, data: Batch, keep, adversary, tolerance: float, key, admissible=None):
    """The finished explanation with units added back until the rotated attack at the adversary's
    budget (1 with a penalty) moves it by at most ``tolerance``
    (:func:`adversary.rotated.close_attacks`), and the units added."""
    from adversary.rotated import close_attacks

    budget = adversary.budget if adversary.budget is not None else 1
    closed, added, _ = close_attacks(
        scrubber, data, keep, adversary.basis, budget, tolerance, key, adversary.divergence, admissible
    )
    return closed, added


def passes_for(config: TrainConfig, adversary: Any = None) -> list[tuple[str, Pass]]:
    """The passes ``fit`` runs after training, in order: none outside ``kl_budget`` mode or when no
    finishing setting is on; else repair (which measures the KL), then each pass that is on."""
    passes = config.finishing
    closing = passes.close_attacks and bool(getattr(adversary, "closes", False))  # closing can change something
    wanted = {"open_restart": passes.open_restart, "trim": passes.trim, "close": closing}
    if config.penalty.mode != "kl_budget" or not (passes.repair or any(wanted.values())):
        return []
    chosen = [("open_restart", open_restart), ("trim", trimmed), ("close", closed)]
    return [("repair", repaired)] + [(name, run) for name, run in chosen if wanted[name]]


def fit(
    scrubber: Scrubber,
    data: Batch,
    config: TrainConfig,
    adversary: Any = None,
    progress: bool = True,
    checkpoints: str | os.PathLike | None = None,
    timings: Timings | None = None,
) -> Candidate:
    """Train, threshold, then run the finishing passes (:func:`passes_for`). Returns the finished
    candidate (binary keep mask, gates, the scrubber that defines its units, history with the
    passes' record, learned constants);
    ``timings`` gains each phase's seconds, and ``open_restart_train`` the training steps within
    ``open_restart`` (part of its time)."""
    timings = Timings() if timings is None else timings
    program = train_program(scrubber, data, config, adversary)
    trained = train_gates(scrubber, data, config, adversary, progress, checkpoints, timings, program)
    candidate = Candidate.of(trained, config)
    steps = passes_for(config, adversary)
    context = Context(scrubber, data, config, adversary, progress, checkpoints, program, timings)
    for name, run in steps:
        with timings.phase(name, say=progress):
            candidate = run(candidate, context)
    return candidate.replace(history={**candidate.history, **finished_record(candidate)}) if steps else candidate


def finished_record(candidate: Candidate) -> dict[str, list[float]]:
    """The history's finishing entries: ``kl_finished`` and what each pass did."""
    return {"kl_finished": [candidate.kl], **{k: [float(candidate.record[k])] for k in RECORD}}
