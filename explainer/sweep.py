"""The frontier: train a ladder of explanations, finish each rung, grade it and save them.

A *ladder* is a list of fixed penalties (``lambdas``, nats per kept unit) or of target sizes
(``sizes``, units kept). :func:`train_ladder` trains every rung with the training step of
:func:`explainer.train.make_step`, either

- ``vmap``: one compiled step over a batch of :class:`~explainer.train.TrainState` whose penalties
  differ, every rung from the initial gates and (for sizes) again from open gates; or
- ``continuation`` (what ``auto`` picks): one rung after the other, each warm-started from its
  neighbour, so a rung carries what the last one learned. Sizes train both ways in lockstep: *up*
  from the smallest (units earn their place) and *down* from the largest, from open gates. Growing
  alone closes most gates of a large model for good at the one-unit rung; shrinking alone loses
  units that matter only together, such as a cancelling pair.

Each rung of sizes keeps the way with the lower KL on the training prompts. On a ladder of sizes
without an adversary a rung stops once its top ``k`` units have not changed for ``patience``
steps; with an adversary no rung stops early, since the adversary may still be finding the attack
that moves the set. On a CPU a batch of states is split into one thread per core where a step is
work enough (:data:`THREAD_ELEMENTS`), because XLA runs each call of these small programs on one
core.

:func:`at_most` then makes each rung of sizes the best explanation found with *at most* its size:
units that buy nothing are dropped, a rung no better than a smaller one is replaced by it, and
rungs over the KL budget are searched again (exactly where the sets are few, else by restarts
from open gates). :func:`grade_masks` measures any list of keep masks the same way (baselines use
it too): held-out faithfulness, normalised faithfulness and loss recovered
(:mod:`explainer.frontier`), the strongest discrete attack's gap at ``budget``, CPR and CMD, and
the same numbers under other ablations. docs/guide.md describes the options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from explainer import resume as resume_files
from explainer.checkpoint import latest_checkpoint, save_checkpoint
from explainer.config import TrainConfig, load_config
from explainer.errors import ExplainerError
from explainer.explanation import swap_into_place
from explainer.faults import History, checked_step
from explainer.frontier import (
    add_normalized,
    empty_mask,
    frontier_areas,
    full_mask,
    measure,
    mib_areas,
    mib_kl_area,
    mib_ladder,
)
from explainer.lock import run_lock
from explainer.masks import Gates
from explainer.parallel import cpu_workers, thread_map
from explainer.polish import KLOracle, best_of_size, best_subset, no_worse, prune, repair, searchable
from explainer.progress import progress_bar
from explainer.scrub import ABLATIONS, Scrubber, check_ablation
from explainer.tasks.base import Batch
from explainer.train import (
    DUAL_BACKOFF,
    LOG_LAMBDA_RANGE,
    OPEN_LOGIT,
    InLoopAdversary,
    TrainState,
    TrainStep,
    init_state,
    make_step,
)

STRATEGIES = ("auto", "vmap", "continuation")
DIRECTIONS = ("both", "up", "down")
DIRECTIONS_BOTH = ("up", "down")
# at_most scores every set of a stuck rung's size when there are at most this many (about what
# an open restart's 1500 steps cost, each step a forward and backward pass on 64 prompts)
EXACT_SETS = 1500
# at_most restarts stuck rungs this many at a time, as one batch: two cost little more than one on
# a 2-core CPU (each in its own thread: a step of two 5.9 ms against 6.1 ms for one on ioi), and
# the second restart lifted ioi's 32-unit rung and paren's 39-unit rung (benchmarks/results/frontier.json)
RESTART_TOGETHER = 2
PATIENCE = 100  # steps a continuation rung's explanation must stay unchanged before the rung stops
SETTLE_EVERY = 25  # steps between reads of that explanation
# a ladder's states step in threads (on a CPU) when one state's step reads at least this many
# residual elements (prompts × positions × d_model × sites): below it the interpreter's share of a
# step outweighs a second core (2-core CPU, two ways: planted-joint, 3,840 elements, 0.91 ms a pair
# of steps in threads against 0.42 ms vmapped; tracr-frac-prevs, 24,960, 1.40 against 1.48 and its
# ladder 5 % slower; induction, 86,016, 2.75 against 3.28 and its ladder 7–18 % faster; ioi 5.9
# against 7.8 ms)
THREAD_ELEMENTS = 2**16
ATTACK_METHODS = ("greedy", "gradient")
FRONTIER_FILE = "frontier.json"
TRIVIAL_LOGIT = 10.0  # gate logit recorded for the untrained rungs (size 0 or every unit)
Mask = dict[str, np.ndarray]


@dataclasses.dataclass
class Rung:
    """One trained rung of a ladder: its target (a size or a penalty), gates, keep mask, history."""

    mode: str
    value: float
    gates: Gates
    keep: Mask
    history: dict[str, list[float]]
    alternative: Rung | None = None  # trained the other way (a ladder of sizes both ways)

    @property
    def name(self) -> str:
        return f"size-{int(self.value)}" if self.mode == "sizes" else f"lambda-{self.value:g}"

    @property
    def size(self) -> int:
        return int(sum(int(v.sum()) for v in self.keep.values()))


# --- training -------------------------------------------------------------------------------------


def _step_config(config: TrainConfig) -> TrainConfig:
    """The step runs with a fixed penalty; the ladder sets each rung's ``log_lambda`` itself."""
    return dataclasses.replace(config, lam=config.init_lambda, target_size=None)


def _ladder_step(step, config: TrainConfig, mode: str):
    """The vmapped step of a batch of rungs. The model, prompts and cache are its ``operands``
    argument, not constants it closes over (see :class:`explainer.train.TrainStep`): baked into the
    program, they made each step of a ladder about 1.6 times slower than a training run's."""
    fn = step.fn if isinstance(step, TrainStep) else (lambda state, _: step(state))

    @eqx.filter_jit
    def ladder_step(states: TrainState, rungs: tuple[jax.Array, jax.Array], operands: Any):
        targets, rise = rungs  # rise: how fast λ rises, as a multiple of dual_lr
        states, metrics = eqx.filter_vmap(lambda state: fn(state, operands))(states)
        if mode == "sizes":  # dual ascent on each rung's λ towards its own size (as target_size does)
            direction = jnp.tanh(metrics["size"] - targets)
            rate = jnp.where(direction > 0, rise * config.dual_lr, DUAL_BACKOFF * config.dual_lr)
            log_lambda = jnp.clip(states.log_lambda + rate * direction, *LOG_LAMBDA_RANGE)
            states = eqx.tree_at(lambda s: s.log_lambda, states, log_lambda)
        return states, metrics

    return ladder_step


@dataclasses.dataclass(frozen=True)
class LadderProgram:
    """The step every stretch of a ladder runs, made once: the training step (model, prompts and
    cache as its ``operands``), vmapped over a batch of states and checked for faults. It compiles
    once per batch shape (per thread's part of a batch: :func:`_run_steps`), so :func:`at_most`'s
    open restarts, given the ladder's program (:func:`open_restart`), reuse the ladder's compiled
    step when they train as many states at once as it did (two: a pair of restarts, a ladder
    trained both ways; on a 2-core CPU one state per thread, as a restart alone). On ioi on a 2-core CPU a
    restart's own step took 0.4 s to build (its cache) and about 1.5 s to compile, in a ladder that
    then took about 35 s. Make it with :func:`ladder_program`."""

    config: TrainConfig  # the step's settings (``_step_config``): any ``init_logit`` may start it
    mode: str
    adversary: InLoopAdversary | None
    optimizer: optax.GradientTransformation
    checked: tuple[Callable, list[str]]
    operands: Any
    counter: dict[str, int]

    def check(self, config: TrainConfig, mode: str, adversary: InLoopAdversary | None) -> None:
        """Refuse to run a ladder whose step would differ from this program's."""
        same = _step_config(config).replace(init_logit=self.config.init_logit) == self.config
        if not same or mode != self.mode or adversary is not self.adversary:
            raise ExplainerError(
                "this ladder program was made for other training settings, ladder mode or adversary; "
                "make one with ladder_program(scrubber, data, config, mode, adversary) for this ladder"
            )


def ladder_program(
    scrubber: Scrubber, data: Batch, config: TrainConfig, mode: str, adversary: InLoopAdversary | None = None
) -> LadderProgram:
    """The :class:`LadderProgram` of ladders of ``mode`` trained with ``config`` on ``data``."""
    config = _step_config(config)
    optimizer = optax.adam(config.lr)
    step, counter = make_step(scrubber, data, config, optimizer, adversary)
    checked = checked_step(_ladder_step(step, config, mode))
    operands = step.operands if isinstance(step, TrainStep) else None
    return LadderProgram(config, mode, adversary, optimizer, checked, operands, counter)


def _log_lambdas(mode: str, values: Sequence[float | int], config: TrainConfig) -> np.ndarray:
    if mode == "sizes":
        return np.full(len(values), math.log(config.init_lambda), np.float32)
    return np.array([math.log(v) if v > 0 else -math.inf for v in values], np.float32)


def _top(logits: np.ndarray, k: float | int) -> np.ndarray:
    """The indices of the ``k`` largest ``logits`` (ties: the earlier unit), as a finished rung of
    sizes keeps them."""
    return np.argsort(-logits, kind="stable")[: int(k)]


def _finish(mode: str, value: float, gates: Gates) -> Mask:
    if mode == "lambdas":
        return {s: np.asarray(v > 0, np.float32) for s, v in gates.logits.items()}
    sites = list(gates.logits)
    flat = np.concatenate([np.asarray(gates.logits[s]) for s in sites])
    chosen = np.zeros(flat.shape, np.float32)
    chosen[_top(flat, value)] = 1.0
    out, start = {}, 0
    for s in sites:
        n = gates.logits[s].shape[0]
        out[s] = chosen[start : start + n]
        start += n
    return out


def _signature(mode: str, values: Sequence[float | int], logits: dict[str, Any]) -> str:
    """A digest of the finished explanation of every state in a batch (``logits``: site -> (B, n)),
    as :func:`_finish` would finish state ``b`` at ``values[b]``: its top ``k`` units, or its units
    with a positive logit."""
    flat = np.concatenate([np.asarray(v) for v in logits.values()], axis=-1)
    digest = hashlib.sha256()
    for row, value in zip(flat, values, strict=True):
        kept = np.sort(_top(row, value)) if mode == "sizes" else np.flatnonzero(row > 0)
        digest.update(kept.astype(np.int64).tobytes() + b"|")
    return digest.hexdigest()


def ladder_workers(scrubber: Scrubber, data: Batch, config: TrainConfig) -> int:
    """The threads a ladder's stretches run on by default: the CPU's cores (:func:`cpu_workers`)
    when one state's step reads at least :data:`THREAD_ELEMENTS` residual elements, else 1."""
    positions = int(np.shape(data.clean)[1])
    elements = config.batch_size * positions * scrubber.model.config.d_model * len(scrubber.n_units)
    return cpu_workers() if elements >= THREAD_ELEMENTS else 1


def _parts(n: int, workers: int) -> int:
    """Equal parts a batch of ``n`` states splits into, one per thread: the most, at most ``workers``
    (equal, so that every part runs the same compiled step).

    >>> _parts(2, 2), _parts(16, 2), _parts(3, 2), _parts(1, 8), _parts(6, 4)
    (2, 2, 1, 1, 3)
    """
    return max(d for d in range(1, max(1, min(n, workers)) + 1) if n % d == 0)


@eqx.filter_jit
def _split(tree, parts: int):
    """``tree``'s arrays cut into ``parts`` equal batches along their first axis (one program)."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    k = jax.tree.leaves(arrays)[0].shape[0] // parts
    return tuple(eqx.combine(jax.tree.map(lambda x, i=i: x[i * k : (i + 1) * k], arrays), static) for i in range(parts))


@eqx.filter_jit
def _join(parts):
    """The batches of :func:`_split` as one again."""
    arrays = [eqx.partition(p, eqx.is_array)[0] for p in parts]
    static = eqx.partition(parts[0], eqx.is_array)[1]
    return eqx.combine(jax.tree.map(lambda *xs: jnp.concatenate(xs), *arrays), static)


def _merged(per_part: list[list[dict[str, Any]]]) -> list[dict[str, np.ndarray]]:
    """Each step's metrics of every part (host arrays) as one batch's: the states' values in
    order, and a fault flag wherever any part raised it."""
    out = []
    for metrics in zip(*per_part, strict=True):
        step = {k: np.concatenate([np.atleast_1d(m[k]) for m in metrics]) for k in metrics[0] if k != "faults"}
        step["faults"] = np.any(np.stack([np.asarray(m["faults"]) for m in metrics]), axis=0)
        out.append(step)
    return out


class _Threads:
    """``k`` steps of every part of a split batch, each part in its own thread (the step's compiled
    program runs without the interpreter lock, so the parts run on separate cores)."""

    def __init__(self, step, parts, targets, operands):
        self.step, self.parts, self.targets, self.operands = step, list(parts), targets, operands

    def _one(self, p: int, k: int) -> list[dict[str, Any]]:
        state, out = self.parts[p], []
        for _ in range(k):
            state, metrics = self.step(state, self.targets[p], self.operands)
            out.append(metrics)
        self.parts[p] = state
        return jax.device_get(out)

    def run(self, k: int, first: bool) -> list[dict[str, np.ndarray]]:
        """Every part's next ``k`` steps as one batch's metrics per step. On a stretch's ``first``
        call each part's first step runs here, one after the other, so that a program not compiled
        yet compiles once and not in every thread."""
        parts = range(len(self.parts))
        head = [self._one(p, 1) if first else [] for p in parts]
        rest = k - 1 if first else k
        tails = thread_map(lambda p: self._one(p, rest), parts, len(parts))
        return _merged([h + t for h, t in zip(head, tails, strict=True)])

    def states(self):
        return _join(tuple(self.parts))

    def logits(self):
        return jax.tree.map(lambda *xs: np.concatenate(xs), *jax.device_get([p.gates.logits for p in self.parts]))


def _run_steps(
    checked,
    states,
    targets,
    operands,
    steps: int,
    advance,
    done: int,
    label: str,
    checkpoints=None,
    every=0,
    settle: Callable[[Any], str] | None = None,
    patience: int = 0,
    workers: int = 1,
):
    """``steps`` steps of a batch of states; with ``checkpoints``, saved there every ``every`` steps and
    at the end, and continued from the newest good checkpoint found there (a finished one: no steps).
    ``checked`` is ``checked_step(ladder_step)``, made once per ladder so that it compiles once.

    With ``settle`` (gate logits of the batch -> a digest of its finished explanations,
    :func:`_signature`) and ``patience``, the stretch stops early once that digest, read every
    ``SETTLE_EVERY`` steps, has not changed for ``patience`` steps: every state's explanation has
    settled. The digest and the step it last changed at are saved with each checkpoint, so a
    resumed stretch stops where an uninterrupted one would.

    With ``workers`` above 1 the batch is cut into that many equal parts where it divides
    (:func:`_parts`), each part stepped in its own thread between the points where the stretch
    reads its states (every ``SETTLE_EVERY`` steps, each checkpoint, the end); metrics, checks,
    checkpoints and the result are the whole batch's, as without threads."""
    step, names = checked
    saved = latest_checkpoint(checkpoints, like=states) if checkpoints is not None else None
    if saved is not None:
        states = saved.state
    history = History(saved.history if saved else {}, names)
    where = ""
    watch = settle is not None and patience > 0
    meta = saved.meta if saved is not None else {}
    first = saved.step if saved else 0
    last = first if meta.get("settled") else steps
    n_parts = _parts(int(jax.tree.leaves(states.log_lambda)[0].shape[0]), workers) if last > first else 1
    threads = None
    if n_parts > 1:
        threads = _Threads(step, _split(states, n_parts), _split(targets, n_parts), operands)
        current, logits = threads.states, threads.logits
    else:
        current, logits = (lambda: states), (lambda: jax.device_get(states.gates.logits))
    signature, since = meta.get("signature"), meta.get("since", first)
    if watch and signature is None:
        signature, since = settle(logits()), first
    n = first
    while n < last:
        # the next step the stretch reads its states at: a settle read, a checkpoint, the end
        stop = min(last, (n // SETTLE_EVERY + 1) * SETTLE_EVERY, (n // every + 1) * every if every else last)
        if threads is not None:
            for metrics in threads.run(stop - n, first=n == first):
                history.append(metrics)
        else:
            for _ in range(stop - n):
                states, metrics = step(states, targets, operands)
                history.append(metrics)
        n = stop
        settled = False
        if watch and n % SETTLE_EVERY == 0 and n < steps:
            now = settle(logits())
            if now != signature:
                signature, since = now, n
            settled = n - since >= patience
        due = checkpoints is not None and every and (n % every == 0 or n == steps or settled)
        if n % 50 == 0 or n == steps or due or settled:
            history.flush(where)
            note = f" settled at step {n}" if settled else ""
            advance(
                done + (steps if settled else n),
                f"{label} kl {float(np.mean(history.values['kl'][-1])):.4f}{note}",
            )
        if due:
            extra = {"signature": signature, "since": since, "settled": settled} if watch else {}
            path = save_checkpoint(checkpoints, current(), n, history.values, meta={"label": label, **extra})
            where = f"The last good checkpoint (step {n}) is {path}. "
        if settled:
            break
    history.flush(where)
    return current(), {k: np.asarray(v, np.float64) for k, v in history.values.items()}


def _open(config: TrainConfig) -> TrainConfig:
    return config.replace(init_logit=max(config.init_logit, OPEN_LOGIT))


def _stack(states: Sequence[TrainState]) -> TrainState:
    """States of the same shape as one batch, in the order given."""
    static = eqx.partition(states[0], eqx.is_array)[1]
    arrays = [eqx.partition(s, eqx.is_array)[0] for s in states]
    return eqx.combine(jax.tree.map(lambda *xs: jnp.stack(xs), *arrays), static)


def _continue(
    ladder_step,
    starts,
    targets,
    log_lambda,
    values,
    mode,
    ways,
    steps,
    more,
    operands,
    advance,
    folder,
    every,
    patience=0,
    first_patience=0,
    workers=1,
):
    """Continuation ladders, one per way in ``ways``, trained in lockstep as one batch (one state
    per way, from ``starts``): ``up`` from the smallest value (each rung warm-started from the one
    below), ``down`` from the largest (sizes only: its start has open gates, and on every later rung
    λ rises as fast as it backs off, since a short rung must close units). Both ways have the same
    rungs and steps, so rung ``j`` of every way is one stretch of the batched step (its states in
    ``workers`` threads): a step of two states costs little more than a step of one. Every rung after the first stops
    early once every way's explanation has stayed the same for ``patience`` steps, the first once
    it has for ``first_patience`` (0: never; see :func:`_run_steps`). Returns, per way, each rung's
    gates and history in the order of ``values``."""
    ascending = sorted(range(len(values)), key=lambda i: values[i])
    orders = [ascending[::-1] if way == "down" else ascending for way in ways]
    gates = [[None] * len(values) for _ in ways]
    histories = [[None] * len(values) for _ in ways]
    state = eqx.tree_at(lambda s: s.log_lambda, _stack(starts), jnp.asarray(log_lambda[[o[0] for o in orders]]))
    suffix = {("up",): "", ("down",): " (down)"}.get(tuple(ways), " (both ways)")
    done = 0
    for j in range(len(values)):
        chosen = [o[j] for o in orders]
        if j > 0 and mode == "lambdas":
            state = eqx.tree_at(lambda s: s.log_lambda, state, jnp.asarray(log_lambda[chosen]))
        n = steps if j == 0 else more
        rise = [DUAL_BACKOFF if way == "down" and j > 0 else 1.0 for way in ways]
        rung = (targets[jnp.asarray(chosen)], jnp.asarray(rise, jnp.float32))
        rung_folder = folder / f"rung-{j}" if folder is not None else None
        ks = [values[i] for i in chosen]
        settle = lambda logits, ks=ks: _signature(mode, ks, logits)  # noqa: E731
        state, history = _run_steps(
            ladder_step,
            state,
            rung,
            operands,
            n,
            advance,
            done,
            f"rung {j + 1}{suffix}",
            rung_folder,
            every,
            settle,
            patience if j > 0 else first_patience,
            workers,
        )
        done += n
        batch = jax.device_get(state.gates)  # sliced on the host: slicing on the device compiles per shape
        for b, i in enumerate(chosen):
            gates[b][i] = jax.tree.map(lambda x, b=b: jnp.asarray(x[b]), batch)
            histories[b][i] = {k: v[:, b].tolist() for k, v in history.items()}
    return gates, histories


def _opened(strategy: str, ways: Sequence[str], values: Sequence[float]) -> list[bool]:
    """Which rungs a whole run from open gates at their own size trained (a ladder's way down: under
    ``vmap`` every rung, under ``continuation`` the largest), so that :func:`at_most` does not
    restart them: its open restart would repeat that run."""
    if "down" not in ways:
        return [False] * len(values)
    return [strategy == "vmap" or v == max(values) for v in values]


def check_steps(option: str, value: Any, least: int, meaning: str = "") -> None:
    """Refuse ``value`` unless it is a whole number of steps, at least ``least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ExplainerError(f"{option} must be a whole number of steps >= {least}{meaning}, got {value!r}")


def check_patience(patience: Any) -> None:
    """Refuse a ``patience`` that is not a whole number of steps, at least 0 (0: never stop early)."""
    check_steps("--patience", patience, 0, " (0: every rung trains all its steps)")


def choose_strategy(strategy: str, scrubber: Scrubber) -> str:
    """``vmap`` or ``continuation`` (``auto``: continuation, whose frontiers were the better on
    induction and direct, and which meets the time target on a CPU's small models and on a GPU;
    ``vmap`` is faster on a GPU: module docstring)."""
    if strategy not in STRATEGIES:
        raise ExplainerError(f"unknown sweep strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    return "continuation" if strategy == "auto" else strategy


def train_ladder(
    scrubber: Scrubber,
    data: Batch,
    config: TrainConfig,
    mode: str,
    values: Sequence[float | int],
    adversary: InLoopAdversary | None = None,
    strategy: str = "auto",
    continuation_steps: int | None = None,
    progress: bool = False,
    checkpoints: str | os.PathLike | None = None,
    direction: str = "both",
    patience: int = PATIENCE,
    first_patience: int = 0,
    program: LadderProgram | None = None,
    workers: int | None = None,
) -> list[Rung]:
    """Train one explanation per value of ``values`` (target sizes, or penalties for ``lambdas``).

    Returns one :class:`Rung` per value, in the order given. ``continuation_steps`` (default
    ``config.steps // 4``) is the most steps of every rung after the first under ``continuation``:
    such a rung stops once its explanation (every way's) has not changed for ``patience`` steps (0:
    never stops early). With an ``adversary`` no rung stops early: while the explainer's set sits
    still the adversary can still be finding the attack that will move it (on planted-cancel,
    adversary rungs stopped at 100 still steps kept the fragile cancelling pair, gap 8.75 nats at
    budget 2, where rungs trained to the end keep the robust four units), nor on a ladder of
    penalties: under a fixed penalty the gates drift steadily, and the units with a positive logit
    can sit still long before they cross (planted-distractor's λ = 100 rung kept 2 units after 100
    still steps, none at the end). ``first_patience`` is the same rule for the first rung under
    ``continuation`` and for the whole batch under ``vmap`` (every rung settled): 0 by default,
    since from the initial gates an explanation can sit still for hundreds of steps and then move
    (induction's one-unit rung changed at step 650 after 600 still ones); :func:`at_most`'s restarts
    use it. ``direction`` (``both``, ``up`` or ``down``) is the way a ladder of sizes trains
    (penalties always go up): under ``continuation`` up from the smallest or down from the largest,
    under ``vmap`` every rung from the initial gates (``up``) or from open gates (``down``).
    ``both`` records ``descending`` (1 or 0: the way down or from open gates won) in each rung's
    history and gives each rung the other way's as its ``alternative`` (:func:`at_most` polishes
    both). A rung that a whole run from open gates at its own size trained (every rung of ``vmap``
    that way, the largest of ``continuation``) records ``opened``: :func:`at_most` does not restart
    it. See the module docstring for the strategies. With a ``checkpoints`` folder, training is
    saved there every ``config.checkpoint_every`` steps (``vmap``: in the folder itself;
    ``continuation``: each rung in its own ``rung-J``; both ways, trained in lockstep, in
    ``both/rung-J``, the way down alone in ``down/rung-J``; so a resumed ladder reloads finished
    rungs) and continued from what is there. ``program`` is the step to run (:func:`ladder_program`;
    by default one is made for this ladder). ``workers`` is the most threads a stretch's batch of
    states is split across (:func:`_run_steps`; by default :func:`ladder_workers`: the CPU's cores
    where a step is work enough, else 1); each state trains as in one vmapped batch, up to float
    rounding (which can move when a rung settles: tracr-sort's rungs took other step counts).

    >>> from explainer.models import load_model, resolve_model
    >>> from explainer.tasks import resolve_task
    >>> folder = resolve_model("planted-distractor")
    >>> task = resolve_task(None, folder)
    >>> scrubber = Scrubber.build(load_model(folder), task.train_data())
    >>> rungs = train_ladder(scrubber, task.train_data(), TrainConfig(steps=300), "sizes", [1, 2])
    >>> [r.size for r in rungs], rungs[1].keep["unembed.in"].nonzero()[0].tolist()
    ([1, 2], [1])
    """
    if mode not in ("sizes", "lambdas"):
        raise ExplainerError(f"ladder mode must be 'sizes' or 'lambdas', not {mode!r}")
    values = [float(v) for v in values]
    if not values:
        raise ExplainerError("the ladder is empty; give at least one size (--sizes 1,2,4) or penalty (--lambdas)")
    strategy = choose_strategy(strategy, scrubber)
    if direction not in DIRECTIONS:
        raise ExplainerError(f"unknown ladder direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    check_patience(patience)
    check_patience(first_patience)
    workers = ladder_workers(scrubber, data, config) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ExplainerError(f"workers must be a whole number of threads >= 1, got {workers!r}")
    if adversary is not None or mode == "lambdas":  # a still explanation need not be a settled one
        patience = first_patience = 0
    if program is None:
        program = ladder_program(scrubber, data, config, mode, adversary)
    program.check(config, mode, adversary)
    config = _step_config(config)
    optimizer, ladder_step, operands, counter = program.optimizer, program.checked, program.operands, program.counter
    start = init_state(scrubber, config, optimizer, adversary)
    log_lambda = _log_lambdas(mode, values, config)
    targets = jnp.asarray(values, jnp.float32)
    folder = Path(checkpoints) if checkpoints is not None else None
    every = config.checkpoint_every
    alternatives: list[Rung | None] = [None] * len(values)
    ways = DIRECTIONS_BOTH if mode == "sizes" and direction == "both" else (direction if mode == "sizes" else "up",)
    starts = [start if way == "up" else init_state(scrubber, _open(config), optimizer, adversary) for way in ways]
    if strategy == "vmap":  # every rung of every way from its start, as one batch (way-major)
        n = len(values)
        label = f"sweep ({n} rungs, vmap{', both ways' if len(ways) > 1 else ''})"
        with progress_bar(progress, config.steps, label=label) as advance:
            batch = _stack([s for s in starts for _ in values])
            batch = eqx.tree_at(lambda s: s.log_lambda, batch, jnp.asarray(np.tile(log_lambda, len(ways))))
            rungs = (jnp.tile(targets, len(ways)), jnp.ones(n * len(ways), jnp.float32))
            ks = list(values) * len(ways)
            settle_all = lambda logits: _signature(mode, ks, logits)  # noqa: E731
            states, history = _run_steps(
                ladder_step,
                batch,
                rungs,
                operands,
                config.steps,
                advance,
                0,
                "",
                folder,
                every,
                settle_all,
                first_patience,
                workers,
            )
        host = jax.device_get(states.gates)  # sliced on the host: slicing on the device compiles per shape
        by_way = [
            (
                [jax.tree.map(lambda x, b=b: jnp.asarray(x[b]), host) for b in range(w * n, (w + 1) * n)],
                [{k: v[:, b].tolist() for k, v in history.items()} for b in range(w * n, (w + 1) * n)],
            )
            for w in range(len(ways))
        ]
    else:
        more = continuation_steps if continuation_steps is not None else max(1, config.steps // 4)
        total = config.steps + more * (len(values) - 1)
        label = f"sweep ({len(values)} rungs, continuation{', both ways' if len(ways) > 1 else ''})"
        # one way in the folder itself (the way down alone in down/); both ways, in lockstep, in both/
        sub = None if folder is None else folder / {"up": "", "down": "down"}.get("".join(ways), "both")
        with progress_bar(progress, total, label=label) as advance:
            by_way = list(
                zip(
                    *_continue(
                        ladder_step,
                        starts,
                        targets,
                        log_lambda,
                        values,
                        mode,
                        ways,
                        config.steps,
                        more,
                        operands,
                        advance,
                        sub,
                        every,
                        patience,
                        first_patience,
                        workers,
                    ),
                    strict=True,
                )
            )
    gates, histories = list(by_way[0][0]), list(by_way[0][1])
    if len(by_way) > 1:  # each rung: the way whose finished explanation has the lower KL
        oracle = KLOracle(scrubber, data, config.seed)
        kl = [
            oracle.kl(np.stack([oracle.flat(_finish(mode, v, g)) for v, g in zip(values, way[0], strict=True)]))
            for way in by_way
        ]
        for i in range(len(values)):
            down = not no_worse(float(kl[0][i]), float(kl[1][i]))  # lower beyond float noise
            pair = [(by_way[0][0][i], by_way[0][1][i], 0.0), (by_way[1][0][i], by_way[1][1][i], 1.0)]
            (gates[i], histories[i], flag), (g2, h2, flag2) = pair[::-1] if down else pair
            histories[i]["descending"] = [flag]
            h2["descending"] = [flag2]
            alternatives[i] = Rung(mode, values[i], g2, _finish(mode, values[i], g2), h2)
    opened = _opened(strategy, ways, values)
    for i, h in enumerate(histories):
        if opened[i]:
            h["opened"] = [1.0]
    for h in histories + [r.history for r in alternatives if r is not None]:
        h["traces"] = [counter["traces"]]  # the step compiles once, whatever the ladder (tests check)
    return [
        Rung(mode, v, g, _finish(mode, v, g), h, a)
        for v, g, h, a in zip(values, gates, histories, alternatives, strict=True)
    ]


# --- grading --------------------------------------------------------------------------------------


def _size(mask: Mask) -> int:
    return int(sum(int(np.sum(np.asarray(v) > 0.5)) for v in mask.values()))


def _kept(mask: Mask) -> dict[str, list[int]]:
    return {s: [int(u) for u in np.flatnonzero(np.asarray(v) > 0.5)] for s, v in mask.items()}


def _scores(scrubber: Scrubber, train: Batch, heldout: Batch, masks: list[Mask], seed: int):
    """Held-out scores of ``masks`` (with normalisation) and the constants used (``optimal``)."""
    everything = [empty_mask(scrubber.n_units), *masks]
    constants = None
    if scrubber.ablation == "optimal":
        from explainer.optimal import fit_constants

        constants = fit_constants(scrubber, train, everything, seed=seed)
    scores = measure(scrubber, heldout, everything, seed, constants)
    empty = scores[0]
    return add_normalized(scores[1:], empty), (constants[1:] if constants else None), empty["kl_mean"]


def _gap(scrubber: Scrubber, heldout: Batch, mask: Mask, budget: int, seed: int, methods) -> dict[str, Any]:
    from adversary.discrete import attack_all

    excluded = sum(int((np.asarray(v) < 0.5).sum()) for v in mask.values())
    if excluded == 0 or budget < 1:
        return {"gap": 0.0, "gap_max": 0.0, "attack": None}
    best, _ = attack_all(scrubber, heldout, mask, min(budget, excluded), jax.random.key(seed), methods=methods)
    return {
        "gap": best.gap["kl_mean"],
        "gap_max": best.gap["kl_max"],
        "attack": {"method": best.method, "budget": best.budget, "reincluded": best.reincluded},
    }


def _areas(
    records: list[dict[str, Any]], total: int, budgets: Sequence[int] | None, empty_kl: float
) -> dict[str, float]:
    """MIB's CPR and CMD over the budgets (the sizes when there are none), the same reading of the
    held-out KL (``kl_area``), and the areas over sizes."""
    sizes = [r["size"] for r in records]
    f = [r["normalized_faithfulness"] for r in records]
    cpr, cmd = mib_areas(sizes if budgets is None else budgets, f, total)
    kl_area = mib_kl_area(sizes if budgets is None else budgets, [r["kl_mean"] for r in records], total, empty_kl)
    cpr_sizes, cmd_sizes = frontier_areas(sizes, f, total)
    return {"cpr": cpr, "cmd": cmd, "kl_area": kl_area, "cpr_sizes": cpr_sizes, "cmd_sizes": cmd_sizes}


def ablation_frontiers(
    scrubber: Scrubber,
    train: Batch,
    heldout: Batch,
    masks: list[Mask],
    ablations: Sequence[str],
    seed: int = 0,
    budgets: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """The same masks' faithfulness, normalised faithfulness, CPR and CMD under each ablation."""
    total = sum(scrubber.n_units.values())
    out = {}
    for ablation in ablations:
        check_ablation(ablation)
        other = Scrubber.build(scrubber.model, train, scrubber.sites, ablation, scrubber.bases, units=scrubber.units)
        scores, _, empty_kl = _scores(other, train, heldout, masks, seed)
        keys = ("kl_mean", "kl_p99", "logit_diff_recovered", "accuracy", "normalized_faithfulness", "loss_recovered")
        records = [{"size": _size(m), **{k: s[k] for k in keys}} for m, s in zip(masks, scores, strict=True)]
        out[ablation] = {"records": records, **_areas(records, total, budgets, empty_kl)}
    return out


def grade_masks(
    scrubber: Scrubber,
    train: Batch,
    heldout: Batch,
    masks: Sequence[Mask],
    budget: int = 2,
    seed: int = 0,
    ablations: Sequence[str] = (),
    attack_methods: Sequence[str] = ATTACK_METHODS,
    progress: bool = False,
    budgets: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Frontier records of any keep masks (ours or a baseline's), with CPR and CMD.

    Each record has ``size``, ``kept``, the held-out faithfulness (``kl_mean``, ``kl_p99``,
    ``logit_diff_recovered``, ``accuracy``, ...), ``normalized_faithfulness``, ``loss_recovered``
    and ``gap`` (the mean KL gap of the strongest of ``attack_methods`` at ``budget``; 0 when
    nothing is excluded). ``ablations`` adds ``{"ablations": {name: {"records", "cpr", "cmd"}}}``.
    ``cpr`` and ``cmd`` are MIB's (:func:`explainer.frontier.mib_areas`) over ``budgets``, the
    number of units each mask was built for (default: its size); ``kl_area`` is the same reading
    of the held-out KL (:func:`explainer.frontier.mib_kl_area`, lower is better); ``cpr_sizes`` and
    ``cmd_sizes`` are the areas over the sizes the masks have
    (:func:`explainer.frontier.frontier_areas`).

    >>> import numpy as np
    >>> from explainer.models import load_model, resolve_model
    >>> from explainer.tasks import resolve_task
    >>> folder = resolve_model("planted-distractor")
    >>> task = resolve_task(None, folder)
    >>> scrubber = Scrubber.build(load_model(folder), task.train_data())
    >>> truth = {s: np.zeros(10) for s in scrubber.sites}
    >>> truth["blocks.0.attn.in"][0] = truth["unembed.in"][1] = 1
    >>> result = grade_masks(scrubber, task.train_data(), task.heldout_data(), [truth], budget=1)
    >>> round(result["records"][0]["normalized_faithfulness"], 3), result["records"][0]["gap"] < 1e-3
    (1.0, True)
    """
    masks = [{s: np.asarray(m[s], np.float32) for s in scrubber.sites} for m in masks]
    scores, constants, empty_kl = _scores(scrubber, train, heldout, masks, seed)
    records = []
    with progress_bar(progress, len(masks), label="attacks") as advance:
        for i, (mask, s) in enumerate(zip(masks, scores, strict=True)):
            graded = scrubber
            if constants is not None:
                graded = eqx.tree_at(lambda x: x.means, scrubber, constants[i])
            records.append({"size": _size(mask), **s, **_gap(graded, heldout, mask, budget, seed, attack_methods)})
            records[-1]["kept"] = _kept(mask)
            advance(i + 1, f"size {records[-1]['size']}")
    total = sum(scrubber.n_units.values())
    result: dict[str, Any] = {
        "records": records,
        **_areas(records, total, budgets, empty_kl),
        "total_units": total,
        "ablation": scrubber.ablation,
        "budget": budget,
        "attack_methods": list(attack_methods),
    }
    if ablations:
        result["ablations"] = ablation_frontiers(scrubber, train, heldout, masks, ablations, seed, budgets)
    return result


# --- the sweep ------------------------------------------------------------------------------------


def polish(oracle, flat: np.ndarray, size: int, kl_budget: float) -> np.ndarray:
    """:func:`prune`, then :func:`explainer.polish.repair` up to ``size`` units, then prune again.

    Continuation can leave a rung stuck below its size with gates closed for good (their units get
    no gradient back); the exact search of ``explain``'s repair step adds them back.
    """
    flat = prune(oracle, flat)
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
) -> list[Rung]:
    """Each rung of a ladder of sizes as the best explanation found with *at most* its size.

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
    explanation's 10.0. Then a rung whose KL is no lower than that
    of a smaller rung buys nothing with its extra units, so it is replaced by that rung (keeping
    its own target and history). The full model's rung stays as it is. Baselines' searches are
    read the same way (``acdc``'s set for size ``k`` is its largest with at most ``k`` units).
    This is MIB's "at most ``k`` % of the units": without it, a rung no better than a smaller one
    puts a dominated point on the frontier, and the straight line to it from below lowers the
    area.
    """
    oracle = KLOracle(scrubber, train, seed)
    total = sum(scrubber.n_units.values())
    order = sorted(range(len(rungs)), key=lambda i: (rungs[i].value, i))
    found: dict[int, tuple[Rung, np.ndarray, float]] = {}
    empty_kl = float(oracle.kl(np.zeros((1, oracle.n_units), np.float32))[0])
    for i in order:
        rung, flat = rungs[i], oracle.flat(rungs[i].keep)
        if rung.value < total:
            flat = polish(oracle, flat, int(rung.value), kl_budget)
        kl = float(oracle.kl(flat[None])[0])
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
            flat2 = polish(oracle, other_flat, int(rung.value), kl_budget)
            kl2 = float(oracle.kl(flat2[None])[0])
            if not no_worse(kl, kl2):  # lower beyond float noise
                rung, flat, kl = other, flat2, kl2
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
            flat2, key = polish(oracle, oracle.flat(again.keep), int(rung.value), kl_budget), "open_restart"
        kl2 = float(oracle.kl(flat2[None])[0])
        history = {key: [float(kl2 < kl)]}
        if kl2 < kl:
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
    out: dict[int, Rung] = {}
    best, best_kl = None, math.inf
    for i in order:
        rung, flat, kl = found[i]
        keep = {s: np.asarray(v, np.float32) for s, v in oracle.split(flat).items()}
        if rung.value >= total or best is None or not no_worse(best_kl, kl):
            best, best_kl = i, kl
            out[i] = Rung(rung.mode, rung.value, rung.gates, keep, rung.history)
        else:
            out[i] = Rung(rung.mode, rung.value, out[best].gates, out[best].keep, rung.history)
    return [out[i] for i in range(len(rungs))]


def exact_sets(config: TrainConfig, adversary: InLoopAdversary | None) -> int:
    """How many sets :func:`at_most` may score exactly in ``sweep``: as many as a restart has steps,
    and none with an adversary in the loop. The exact search ranks sets by KL alone, so it would
    undo what the adversary bought: on planted-cancel it put the faithful but fragile 2-unit set
    (adversarial gap 8.75 nats) in place of the robust 4-unit rungs. Restarts train with the
    adversary."""
    return 0 if adversary is not None else config.steps


def open_restart(
    scrubber: Scrubber,
    train: Batch,
    config: TrainConfig,
    adversary: InLoopAdversary | None = None,
    checkpoints: Path | None = None,
    patience: int = PATIENCE,
    program: LadderProgram | None = None,
) -> Callable[[Sequence[float]], list[Rung]]:
    """:func:`at_most`'s ``restart``: rungs of the given sizes trained again from open gates (at
    most ``config.steps``, as ``explain``'s open restart, and stopped once every rung's explanation
    has stayed the same for ``patience`` steps: on ioi's 8-point ladder the restart of the 81- and
    41-unit rungs settled at step 775 with the same KL as at 1500), several as one batch;
    checkpoints in ``open-restart-K`` (``open-restart-K1-K2`` for a batch). ``program``: the
    ladder's (:class:`LadderProgram`), whose compiled step a batch of its shape reuses."""
    open_config = _open(config)

    def restart(values: Sequence[float]) -> list[Rung]:
        name = "-".join(str(int(v)) for v in values)
        more = checkpoints / f"open-restart-{name}" if checkpoints is not None else None
        # one rung: a continuation ladder of one (its checkpoints, as before); several: one batch
        strategy = "continuation" if len(values) == 1 else "vmap"
        return train_ladder(
            scrubber,
            train,
            open_config,
            "sizes",
            values,
            adversary,
            strategy,
            checkpoints=more,
            direction="up",
            first_patience=patience,
            program=program,
        )

    return restart


def parse_ladder(text: str | Sequence[float | int] | None, kind: str) -> list[float] | None:
    """``"1,2,4"`` (or a list) as numbers; sizes must be integers >= 0, penalties >= 0."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    values = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ExplainerError(f"--{kind} takes comma-separated numbers, e.g. 1,2,4; got {item!r}") from None
        if not math.isfinite(value) or value < 0 or (kind == "sizes" and value != int(value)):
            what = "integers >= 0" if kind == "sizes" else "numbers >= 0"
            raise ExplainerError(f"--{kind} must be {what}; got {item!r}")
        values.append(value)
    if not values:
        raise ExplainerError(f"--{kind} is empty; give comma-separated values, e.g. 1,2,4")
    return sorted(set(values))


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not (out / FRONTIER_FILE).is_file():
        if out.is_dir() and not any(out.iterdir()):
            return
        raise ExplainerError(f"{str(out)!r} exists and is not a sweep folder; choose another --out (nothing changed)")
    if not overwrite:
        raise ExplainerError(f"sweep folder {str(out)!r} already exists; pass --overwrite or choose another --out")


def _trivial_rung(mode: str, value: float, n_units: dict[str, int], keep_all: bool) -> Rung:
    logit = TRIVIAL_LOGIT if keep_all else -TRIVIAL_LOGIT
    gates = Gates({s: jnp.full((n,), logit, jnp.float32) for s, n in n_units.items()})
    keep = full_mask(n_units) if keep_all else empty_mask(n_units)
    return Rung(mode, value, gates, keep, {})


def sweep(
    model: str | os.PathLike = "planted-distractor",
    task: str | os.PathLike | None = None,
    lambdas: str | Sequence[float | int] | None = None,
    sizes: str | Sequence[float | int] | None = None,
    config: TrainConfig | str | os.PathLike | None = None,
    adversary: InLoopAdversary | str | None = "learned",
    budget: int = 2,
    ablations: Sequence[str] | None = ABLATIONS,
    strategy: str = "auto",
    continuation_steps: int | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    direction: str = "both",
    patience: int = PATIENCE,
    **settings: Any,
) -> dict[str, Any]:
    """Train a ladder of explanations of ``model`` on ``task`` and grade them: the frontier.

    Give ``sizes`` (target sizes) or ``lambdas`` (fixed penalties), as ``"1,2,4"`` or a list;
    neither means MIB's ladder of sizes (:func:`explainer.frontier.mib_ladder`). ``settings``
    override ``config`` as in :func:`explainer.explain`; ``adversary`` too. Returns
    ``{"records": [{"run", "size", "kl_mean", "kl_p99", "logit_diff_recovered", "accuracy",
    "gap", ...}], "cpr", "cmd", "ablations": {...}, ...}`` (see :func:`grade_masks`). With
    ``out``, every explanation is saved as a run folder ``OUT/runs/size-K`` (or ``lambda-X``)
    and the result as ``OUT/frontier.json`` with ``OUT/frontier.png``, all written atomically.
    Meanwhile the sweep holds the lock ``OUT.lock`` and checkpoints into ``OUT.partial/`` every
    ``checkpoint_every`` steps; ``resume=True`` continues such an unfinished sweep (see
    :func:`resume_sweep`, which reads its settings back). ``direction`` is the way a continuation
    ladder of sizes trains (:func:`train_ladder`: ``both``, ``up`` or ``down``). A rung after the
    first (at most ``continuation_steps`` steps) and an open restart (at most ``steps``) stop once
    their explanation has stayed the same for ``patience`` steps (0: they never stop early), on a
    ladder of sizes without an adversary (:func:`train_ladder` says why only there).

    >>> f = sweep("planted-distractor", sizes=[1, 2], adversary="none", ablations=(), steps=300, progress=False)
    >>> [(r["size"], round(r["normalized_faithfulness"], 2)) for r in f["records"]]
    [(0, 0.0), (2, 1.0)]
    """
    from explainer.api import _model_record
    from explainer.models import load_model, resolve_model
    from explainer.tasks import resolve_task

    started = time.perf_counter()
    if lambdas is not None and sizes is not None:
        raise ExplainerError("give either --lambdas or --sizes, not both")
    if not isinstance(config, TrainConfig):
        config = load_config(config) if config is not None else TrainConfig()
    config = config.replace(**settings)
    if config.rewrites:
        raise ExplainerError(
            "sweep does not apply rewrites; train one size at a time with "
            "`explainer train --rewrite ... --target-size K` instead"
        )
    for name, standard in (("basis", "standard"), ("positional", False)):
        if getattr(config, name) != standard:
            raise ExplainerError(
                f"sweep trains in the standard basis over dimensions, not with {name} = "
                f"{getattr(config, name)!r}; drop it, or train one size at a time with "
                f"`explainer train --{name}{'' if name == 'positional' else ' ' + str(getattr(config, name))} "
                "--target-size K`"
            )
    if direction not in DIRECTIONS:
        raise ExplainerError(f"unknown ladder direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    check_patience(patience)
    if continuation_steps is not None:
        check_steps("--continuation-steps", continuation_steps, 1)
    if isinstance(adversary, str) or adversary is None:
        from adversary.learned import make_adversary

        adversary = make_adversary(adversary)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ExplainerError(f"--budget must be an integer >= 0, got {budget!r}")
    ablations = tuple(ablations or ())
    for a in ablations:
        check_ablation(a)
    out_path = Path(out) if out is not None else None
    if resume and out_path is None:
        raise ExplainerError("resume=True needs the sweep folder to continue (out)")
    if out_path is not None and not resume:
        _check_out(out_path, overwrite)
        if not overwrite:
            _refuse_unfinished(out_path)
    folder = resolve_model(model)
    net = load_model(folder)
    the_task = resolve_task(task, folder)
    the_task.check(net.config)
    train = the_task.train_data()
    scrubber = Scrubber.build(net, train, config.sites, config.ablation, units=config.units)
    total = sum(scrubber.n_units.values())
    mode = "lambdas" if lambdas is not None else "sizes"
    values = parse_ladder(lambdas, "lambdas") if lambdas is not None else parse_ladder(sizes, "sizes")
    if values is None:
        values = [float(k) for k in mib_ladder(total)]
    trivial = [v for v in values if mode == "sizes" and (v == 0 or v >= total)]
    trained_values = [v for v in values if v not in trivial]
    strategy = choose_strategy(strategy, scrubber)
    if out_path is None:
        return _sweep(locals(), None)
    record = {
        "kind": "sweep",
        "model": _model_record(folder),
        "task": str(Path(task).resolve()) if task is not None and Path(task).is_file() else task,
        "config": config.to_json(),
        "adversary": getattr(adversary, "name", None),
        "adversary_settings": dataclasses.asdict(adversary) if dataclasses.is_dataclass(adversary) else None,
        "overwrite": overwrite,
        "mode": mode,
        "ladder": values,
        "budget": budget,
        "ablations": list(ablations),
        "strategy": strategy,
        "continuation_steps": continuation_steps,
        "direction": direction,
        "patience": patience,
    }
    with run_lock(out_path):
        if resume:
            _check_same_sweep(out_path, record)
            checkpoints = resume_files.checkpoint_folder(out_path)
        else:
            _check_out(out_path, overwrite)  # again, now that we hold the lock
            checkpoints = resume_files.start(out_path, record, overwrite)
        try:
            result = _sweep(locals(), checkpoints)
        except BaseException:
            if not any(checkpoints.rglob("step-*.safetensors")):
                resume_files.finish(out_path)
            raise
        resume_files.finish(out_path)
    return result


def _sweep(ns: dict[str, Any], checkpoints: Path | None) -> dict[str, Any]:
    """Train, grade and save the ladder that :func:`sweep` set up (``ns``: its local variables)."""
    from explainer.api import _model_record, _task_record

    scrubber, train, config, mode, values, adversary = (
        ns[k] for k in ("scrubber", "train", "config", "mode", "values", "adversary")
    )
    strategy, trained_values, trivial, total, out_path = (
        ns[k] for k in ("strategy", "trained_values", "trivial", "total", "out_path")
    )
    t0 = time.perf_counter()
    rungs = {}
    # one step for the ladder and its open restarts (a pair of restarts reuses its compiled program)
    program = ladder_program(scrubber, train, config, mode, adversary) if trained_values else None
    if trained_values:
        for r in train_ladder(
            scrubber,
            train,
            config,
            mode,
            trained_values,
            adversary,
            strategy,
            ns["continuation_steps"],
            ns["progress"],
            checkpoints,
            ns["direction"],
            ns["patience"],
            program=program,
        ):
            rungs[r.value] = r
    train_seconds = time.perf_counter() - t0
    for v in trivial:
        rungs[v] = _trivial_rung(mode, v, scrubber.n_units, keep_all=v >= total)
    ordered = [rungs[v] for v in values]
    if mode == "sizes":
        restart = open_restart(scrubber, train, config, adversary, checkpoints, ns["patience"], program)
        exact = exact_sets(config, adversary)
        ordered = at_most(scrubber, train, ordered, config.seed, config.kl_budget, restart, exact)
    graded = grade_masks(
        scrubber,
        train,
        ns["the_task"].heldout_data(),
        [r.keep for r in ordered],
        ns["budget"],
        config.seed,
        ns["ablations"],
        progress=ns["progress"],
        budgets=[int(r.value) for r in ordered] if mode == "sizes" else None,
    )
    result: dict[str, Any] = {
        "records": graded["records"],
        "cpr": graded["cpr"],
        "cmd": graded["cmd"],
        "model": _model_record(ns["folder"]),
        "task": _task_record(ns["task"], ns["the_task"]),
        "mode": mode,
        "ladder": values,
        "strategy": strategy,
        "adversary": getattr(adversary, "name", None),
        **{k: v for k, v in graded.items() if k not in ("records", "cpr", "cmd")},
        "train_seconds": train_seconds,
    }
    for rung, record in zip(ordered, result["records"], strict=True):
        record["target"] = int(rung.value) if mode == "sizes" else rung.value
        record["run"] = str(out_path / "runs" / rung.name) if out_path is not None else None
    result["seconds"] = time.perf_counter() - ns["started"]
    if out_path is not None:
        _save(out_path, ns["overwrite"], result, ordered, scrubber, config, adversary, strategy)
    return result


def _refuse_unfinished(out: Path) -> None:
    if resume_files.partial_path(out).exists():
        raise ExplainerError(
            f"sweep folder {str(out)!r} has an unfinished sweep in {resume_files.partial_path(out)}; continue "
            f"it with `explainer sweep --resume {out}`, or pass --overwrite to start again"
        )


def _read_record(out: Path) -> dict[str, Any]:
    if not (resume_files.partial_path(out) / resume_files.RECORD_FILE).is_file() and (out / FRONTIER_FILE).is_file():
        raise ExplainerError(f"sweep {str(out)!r} has finished; there is nothing to resume")
    record = resume_files.read_record(out)
    if record.get("kind") != "sweep":
        raise ExplainerError(f"{str(out)!r} is an unfinished `explainer train` run; resume it with `explainer train`")
    return record


def _check_same_sweep(out: Path, record: dict[str, Any]) -> None:
    """Refuse to resume ``out`` with anything other than what it was started with."""
    recorded = _read_record(out)
    if recorded["model"].get("sha256") != record["model"]["sha256"]:
        raise ExplainerError(
            f"the weights of {record['model']['path']!r} changed since sweep {str(out)!r} started (sha256 "
            "differs); it cannot be resumed: start again with --overwrite"
        )
    # sweeps started before the setting went both ways, and before rungs stopped once settled
    recorded = {"direction": "both", "patience": 0, **recorded}
    for key, value in record.items():
        if key not in ("model", "overwrite") and recorded.get(key) != value:
            raise ExplainerError(
                f"sweep {str(out)!r} was started with {key} {recorded.get(key)!r}, not {value!r}; "
                "resume it with the recorded settings (`explainer sweep --resume OUT` alone)"
            )


def resume_sweep(out: str | os.PathLike, progress: bool = True, **given: Any) -> dict[str, Any]:
    """Continue the unfinished sweep ``out`` (killed, or stopped by a fault) from its checkpoints.

    The settings come from ``OUT.partial/resume.json``; anything in ``given`` (``model``, ``task``,
    ``sizes``, ``budget``, a training setting such as ``steps``, ...) must agree with them. The
    result is what an uninterrupted sweep would have saved (bit for bit on the same machine).
    """
    from explainer.api import _refuse_conflicts
    from explainer.config import from_dict

    out = Path(out)
    record = _read_record(out)
    recorded = from_dict(dict(record["config"]), source=f"sweep {str(out)!r}")
    given = {k: v for k, v in given.items() if v is not None}
    ladder = {"lambdas": given.pop("lambdas", None), "sizes": given.pop("sizes", None)}
    sweep_settings = {
        "mode": next((k for k, v in ladder.items() if v is not None), record["mode"]),
        "ladder": parse_ladder(ladder[record["mode"]], record["mode"]) or record["ladder"],
        "budget": given.pop("budget", record["budget"]),
        "ablations": list(given.pop("ablations", record["ablations"])),
        "strategy": given.pop("strategy", record["strategy"]),
        "direction": given.pop("direction", record.get("direction", "both")),
        "patience": given.pop("patience", record.get("patience", 0)),
        "continuation_steps": given.pop("continuation_steps", record["continuation_steps"]),
    }
    record = {"direction": "both", "patience": 0, **record}
    differ = [f"{k} {v!r} (recorded: {record[k]!r})" for k, v in sweep_settings.items() if v != record[k]]
    if differ:
        raise ExplainerError(
            f"--resume continues sweep {str(out)!r} with the settings it was started with; these differ: "
            f"{', '.join(differ)}. Drop them, or start a new sweep with --overwrite"
        )
    _refuse_conflicts(out, record, recorded, given)
    adversary: Any = record["adversary"] or "none"
    if record.get("adversary_settings") and record["adversary"] == "learned":
        from adversary.learned import make_adversary

        settings = {k: v for k, v in record["adversary_settings"].items() if k != "name"}
        adversary = make_adversary("learned", **settings)
    return sweep(
        record["model"].get("name") or record["model"]["path"],
        record["task"],
        **{record["mode"]: record["ladder"]},
        config=recorded,
        adversary=adversary,
        budget=record["budget"],
        ablations=record["ablations"],
        strategy=record["strategy"],
        continuation_steps=record["continuation_steps"],
        out=out,
        overwrite=record["overwrite"],
        progress=progress,
        resume=True,
        direction=record["direction"],
        patience=record["patience"],
    )


def _explanation(rung: Rung, record: dict[str, Any], result: dict[str, Any], scrubber, config, adversary, strategy):
    from explainer.explanation import Explanation

    if rung.mode == "sizes":
        run_config = dataclasses.replace(config, target_size=int(rung.value), lam=None)
    else:
        run_config = dataclasses.replace(config, lam=rung.value, target_size=None)
    faithfulness = {k: record[k] for k in record if k.startswith(("kl_", "logit_diff", "accuracy", "loss"))}
    faithfulness["normalized_faithfulness"] = record["normalized_faithfulness"]
    return Explanation(
        kept=record["kept"],
        n_units=scrubber.n_units,
        gate_logits={s: np.asarray(v) for s, v in rung.gates.logits.items()},
        model=result["model"],
        task=result["task"],
        config={**run_config.to_json(), "adversary": getattr(adversary, "name", None), "sweep": strategy},
        faithfulness=faithfulness,
        history=rung.history or None,
        attack=None,
    )


def _save(out: Path, overwrite: bool, result, rungs: list[Rung], scrubber, config, adversary, strategy) -> None:
    from explainer.models.native import write_json
    from explainer.plotting import plot_frontier

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for rung, record in zip(rungs, result["records"], strict=True):
            _explanation(rung, record, result, scrubber, config, adversary, strategy).save(tmp / "runs" / rung.name)
        plot_frontier({"ours": result}, tmp / "frontier.png", title=_title(result))
        result["png"] = str(out / "frontier.png")
        from_cli = Path(sys.argv[0]).name in ("explainer", "cli.py")
        result["command"] = " ".join(["explainer", *sys.argv[1:]]) if from_cli else None
        write_json(tmp / FRONTIER_FILE, result)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _title(result: dict[str, Any]) -> str:
    name = result["model"].get("name") or Path(result["model"]["path"]).name
    areas = f"CPR {result['cpr']:.3f}, CMD {result['cmd']:.3f}, KL area {result['kl_area']:.3g} nats"
    return f"{name} on {result['task']['name']}: {areas}"
