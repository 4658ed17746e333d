"""Ladders: training every rung of a list of penalties or target sizes.

A *ladder* is a list of fixed penalties (``lambdas``, nats per kept unit) or of target sizes
(``sizes``, units kept). :func:`train_ladder` trains every rung with the training step of
:func:`explainer.train.step.make_step`, either

- ``vmap``: one compiled step over a batch of :class:`~explainer.train.step.TrainState` whose penalties
  differ, every rung from the initial gates and (for sizes) again from open gates; or
- ``continuation`` (what ``auto`` picks): one rung after the other, each warm-started from its
  neighbour. Sizes train both ways in lockstep: *up* from the smallest (units earn their place)
  and *down* from the largest, from open gates. Growing alone closes most gates of a large model
  for good at the one-unit rung; shrinking alone loses units that matter only together, such as a
  cancelling pair.

Each rung of sizes keeps the way with the lower KL on the training prompts. A rung after the
first, and the first where the gates start from a ranking, stops once its top ``k`` units (and an
in-loop adversary's attacks on them) have not changed for ``patience`` steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from explainer.errors import ExplainerError
from explainer.faults import checked_step
from explainer.finish.oracle import KLOracle
from explainer.finish.search import no_worse
from explainer.masks import Gates, Layout
from explainer.progress import Timings, progress_bar
from explainer.scrub import Scrubber
from explainer.tasks.base import Batch
from explainer.train.config import TrainConfig
from explainer.train.dual import DUAL_BACKOFF, dual_ascent
from explainer.train.loop import ladder_workers, run_steps
from explainer.train.step import (
    OPEN_LOGIT,
    InLoopAdversary,
    TrainState,
    TrainStep,
    init_state,
    make_step,
    start_gates,
    starts_ranked,
)

STRATEGIES = ("auto", "vmap", "continuation")
DIRECTIONS = ("both", "up", "down")
DIRECTIONS_BOTH = ("up", "down")
PATIENCE = 100  # steps a continuation rung's explanation must stay unchanged before the rung stops
# gate logits closer than this swap order often under the gates' noise (logistic, of scale 1):
# a tie that settling does not wait on
TIE_LOGIT = 1.0
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
        """The rung's run folder: the size it kept, then its target (``size-4-target-6``)."""
        return f"size-{self.size}-" + (
            f"target-{int(self.value)}" if self.mode == "sizes" else f"lambda-{self.value:g}"
        )

    @property
    def size(self) -> int:
        return int(sum(int(v.sum()) for v in self.keep.values()))


# --- training -------------------------------------------------------------------------------------


def _step_config(config: TrainConfig) -> TrainConfig:
    """The step runs with a fixed penalty; the ladder sets each rung's ``log_lambda`` itself."""
    return config.replace(lam=config.optimiser.init_lambda)


def _ladder_step(step, config: TrainConfig, mode: str):
    """The vmapped step of a batch of rungs. The model, prompts and cache are its ``operands``
    argument, not constants it closes over (see :class:`explainer.train.step.TrainStep`): baked into the
    program, they made each step of a ladder about 1.6 times slower than a training run's."""
    fn = step.fn if isinstance(step, TrainStep) else (lambda state, _: step(state))
    dual = dual_ascent(config.optimiser.dual_lr, "target_size")

    @eqx.filter_jit
    def ladder_step(states: TrainState, rungs: tuple[jax.Array, jax.Array], operands: Any):
        targets, rise = rungs  # rise: how fast λ rises, as a multiple of dual_lr
        states, metrics = eqx.filter_vmap(lambda state: fn(state, operands))(states)
        if mode == "sizes":  # dual ascent on each rung's λ towards its own size (as target_size does)
            log_lambda = dual.update(states.log_lambda, metrics["size"], targets, rise)
            states = eqx.tree_at(lambda s: s.log_lambda, states, log_lambda)
        return states, metrics

    return ladder_step


@dataclasses.dataclass(frozen=True)
class LadderProgram:
    """The step every stretch of a ladder runs, made once: the training step (model, prompts and
    cache as its ``operands``), vmapped over a batch of states and checked for faults. It compiles
    once per batch shape (per thread's part of a batch: :func:`explainer.train.loop.run_steps`), so :func:`at_most`'s
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
        same = _step_config(config).replace(init_logit=self.config.optimiser.init_logit) == self.config
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
    optimizer = optax.adam(config.optimiser.lr)
    step, counter = make_step(scrubber, data, config, optimizer, adversary)
    checked = checked_step(_ladder_step(step, config, mode))
    operands = step.operands if isinstance(step, TrainStep) else None
    return LadderProgram(config, mode, adversary, optimizer, checked, operands, counter)


def _log_lambdas(mode: str, values: Sequence[float | int], config: TrainConfig) -> np.ndarray:
    """Each rung's starting log λ: its own penalty, or (sizes) ``init_lambda`` for the dual ascent."""
    lams = [config.optimiser.init_lambda] * len(values) if mode == "sizes" else values
    return dual_ascent(config.optimiser.dual_lr, "target_size").init(lams)


def _top(logits: np.ndarray, k: float | int) -> np.ndarray:
    """The indices of the ``k`` largest ``logits`` (ties: the earlier unit), as a finished rung of
    sizes keeps them."""
    return np.argsort(-logits, kind="stable")[: int(k)]


def _clear(logits: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The ``kept`` units whose logit is above every other unit's by more than :data:`TIE_LOGIT`:
    those that the gates' noise does not swap with a unit left out.

    >>> _clear(np.array([3.0, 0.4, 0.0, -2.0]), np.array([0, 1])).tolist()  # 1 and 2 tie
    [0]
    """
    out = np.ones(len(logits), bool)
    out[kept] = False
    if not out.any():
        return np.sort(kept)
    return np.sort(kept[logits[kept] > logits[out].max() + TIE_LOGIT])


def _finish(mode: str, value: float, gates: Gates) -> Mask:
    if mode == "lambdas":
        return {s: np.asarray(v > 0, np.float32) for s, v in gates.logits.items()}
    layout = Layout.of({s: v.shape[0] for s, v in gates.logits.items()})
    return layout.split(layout.top(layout.flat(gates.logits, np.float64), value))


def _signature(mode: str, values: Sequence[float | int], watched: tuple[dict[str, Any], Any], adversary=None) -> str:
    """A digest of the finished explanation of every state in a batch and, with an ``adversary``
    that names its attacks (``named``, ``rows`` and ``best``, as
    :class:`~adversary.learned.LearnedAdversary` outside a learned rotation),
    of each restart's best attack on it. ``watched`` is :func:`explainer.train.loop.watched`'s
    (gate logits: site -> ``(B, n)``; the adversary's state, batched the same way). A state is
    finished as :func:`_finish` would finish it at ``values[b]``: its top ``k`` units, or its units
    with a positive logit. Of the top ``k`` the digest names those clear of the units left out
    (:func:`_clear`): units tied at the boundary swap places under the gates' noise for as long as
    training runs (on ioi's edge ladder the first rung's two ways, up at one edge and down from
    open gates, swapped units at their boundary for as long as they trained), so a rung that has
    settled all but such a tie stops."""
    logits, attack = watched
    layout = Layout.of({s: np.shape(v)[-1] for s, v in logits.items()})
    flat = np.concatenate([np.asarray(logits[s]) for s in layout.sites], axis=-1)
    digest = hashlib.sha256()
    for b, (row, value) in enumerate(zip(flat, values, strict=True)):
        kept = np.sort(_top(row, value)) if mode == "sizes" else np.flatnonzero(row > 0)
        named = _clear(row, kept) if mode == "sizes" else kept
        digest.update(named.astype(np.int64).tobytes() + b"|")
        if adversary is None or attack is None:
            continue
        mask = np.zeros(flat.shape[-1], np.float32)
        mask[kept] = 1.0
        keep = layout.split(jnp.asarray(mask))
        params = jax.tree.map(lambda x, b=b: jnp.asarray(np.asarray(x)[b]), attack)
        for r in range(adversary.rows):
            digest.update(repr(sorted(adversary.best(params, keep, r).items())).encode() + b";")
    return digest.hexdigest()


def _watches(adversary) -> bool:
    """Whether a ladder can tell when ``adversary``'s attacks sit still (it names them: ``named``,
    with ``rows`` and ``best``), and so may stop a rung whose explanation and attacks have both
    settled. A learned rotation does not: its basis moves under units that sit still."""
    if adversary is None:
        return True
    return bool(getattr(adversary, "named", False)) and hasattr(adversary, "best") and hasattr(adversary, "rows")


def _open(config: TrainConfig) -> TrainConfig:
    return config.replace(init_logit=max(config.optimiser.init_logit, OPEN_LOGIT))


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
    timings=None,
    adversary=None,
):
    """Continuation ladders, one per way in ``ways``, trained in lockstep as one batch (one state
    per way, from ``starts``): ``up`` from the smallest value (each rung warm-started from the one
    below), ``down`` from the largest (sizes only: its start has open gates, and on every later rung
    λ rises as fast as it backs off, since a short rung must close units). Both ways have the same
    rungs and steps, so rung ``j`` of every way is one stretch of the batched step (its states in
    ``workers`` threads): a step of two states costs little more than a step of one. Every rung
    after the first stops early once every way's explanation (and, with an ``adversary``, its
    attacks) has stayed the same for ``patience`` steps, the first once it has for
    ``first_patience`` (0: never; see :func:`explainer.train.loop.run_steps`). Returns, per way,
    each rung's gates and history in the order of ``values``."""
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
        settle = lambda watched, ks=ks: _signature(mode, ks, watched, adversary)  # noqa: E731
        state, history = run_steps(
            ladder_step,
            state,
            rung,
            operands,
            n,
            checkpoints=rung_folder,
            every=every,
            settle=settle,
            patience=patience if j > 0 else first_patience,
            workers=workers,
            label=f"rung {j + 1}{suffix}",
            advance=advance,
            done=done,
            timings=timings,
        )
        history = {k: np.asarray(v, np.float64) for k, v in history.items()}
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
    first_patience: int | None = None,
    program: LadderProgram | None = None,
    workers: int | None = None,
    timings: Timings | None = None,
    label: str | None = None,
) -> list[Rung]:
    """Train one explanation per value of ``values`` (target sizes, or penalties for ``lambdas``).

    Returns one :class:`Rung` per value, in the order given. ``continuation_steps`` (default
    ``optimiser.steps // 4``) is the most steps of every rung after the first under ``continuation``:
    such a rung stops once its explanation (every way's) has not changed for ``patience`` steps (0:
    never stops early). With an ``adversary`` the attacks must have stayed the same too (each
    restart's ``best`` re-inclusion, :func:`_signature`): while the explainer's set sits still the
    adversary can still be finding the attack that will move it (on planted-cancel, adversary rungs
    stopped after 100 steps of a still set alone kept the fragile cancelling pair, gap 8.75 nats at
    budget 2, where rungs trained to the end keep the robust four units); with an adversary that
    does not name its attacks (a learned rotation, whose basis moves under still units) no rung
    stops early. Nor does any on a ladder of penalties: under a fixed penalty the gates drift
    steadily, and the units with a positive logit can sit still long before they cross
    (planted-distractor's λ = 100 rung kept 2 units after 100 still steps, none at the end).
    ``first_patience`` is the same rule for the first rung under ``continuation`` and for the whole
    batch under ``vmap`` (every rung settled). By default it is ``patience`` where the gates start
    from a ranking (:func:`~explainer.train.step.starts_ranked`, a sweep's default) and 0 otherwise:
    from uniform initial gates an explanation can sit still for hundreds of steps and then move
    (induction's one-unit rung changed at step 650 after 600 still ones), while from a ranking the
    first rung starts where that ranking puts it (the peer race's induction edge sweeps, with and
    without the adversary, reached the same CMD under either rule); :func:`at_most`'s restarts, from
    open gates, pass it. ``direction`` (``both``, ``up`` or ``down``) is the way a ladder of sizes
    trains (penalties always go up): under ``continuation`` up from the smallest or down from the
    largest, under ``vmap`` every rung from the initial gates (``up``) or from open gates
    (``down``). ``both`` records ``descending`` (1 or 0: the way down or from open gates won) in
    each rung's history and gives each rung the other way's as its ``alternative`` (:func:`at_most`
    polishes both). A rung that a whole run from open gates at its own size trained (every rung of
    ``vmap`` that way, the largest of ``continuation``) records ``opened``: :func:`at_most` does not
    restart it. See the module docstring for the strategies. With a ``checkpoints`` folder, training
    is saved there every ``runtime.checkpoint_every`` steps (``vmap``: in the folder itself;
    ``continuation``: each rung in its own ``rung-J``; both ways, trained in lockstep, in
    ``both/rung-J``, the way down alone in ``down/rung-J``; so a resumed ladder reloads finished
    rungs) and continued from what is there. ``program`` is the step to run (:func:`ladder_program`;
    by default one is made for this ladder). ``workers`` is the most threads a stretch's batch of
    states is split across (:func:`explainer.train.loop.run_steps`; by default
    :func:`ladder_workers`: the CPU's cores where a step is work enough, else 1); each state trains
    as in one vmapped batch, up to float rounding (which can move when a rung settles: tracr-sort's
    rungs took other step counts). ``timings`` gains ``compile`` (each stretch's first step) and
    ``train`` (the other steps), and ``init_gates`` where the gates start from a ranking
    (:func:`~explainer.train.step.start_gates`). ``label``: what its progress lines start with (by
    default ``sweep (N rungs, STRATEGY)``).

    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> from explainer.tasks import resolve_task
    >>> folder = resolve_model("planted-distractor")
    >>> task = resolve_task(None, folder)
    >>> scrubber = Scrubber.build(load_model(folder), task.train_data())
    >>> rungs = train_ladder(scrubber, task.train_data(), TrainConfig.of(steps=300), "sizes", [1, 2])
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
    if first_patience is None:  # from a ranking the first rung settles as the others do
        first_patience = patience if starts_ranked(config) else 0
    check_patience(first_patience)
    workers = ladder_workers(scrubber, data, config) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ExplainerError(f"workers must be a whole number of threads >= 1, got {workers!r}")
    if not _watches(adversary) or mode == "lambdas":  # a still explanation need not be a settled one
        patience = first_patience = 0
    if program is None:
        program = ladder_program(scrubber, data, config, mode, adversary)
    program.check(config, mode, adversary)
    config = _step_config(config)
    optimizer, ladder_step, operands, counter = program.optimizer, program.checked, program.operands, program.counter
    gates = None
    if starts_ranked(config):  # its own phase: the ranking's backward passes are not training steps
        with (timings if timings is not None else Timings()).phase("init_gates", say=progress):
            gates = start_gates(scrubber, data, config)
    start = init_state(scrubber, config, optimizer, adversary, gates=gates)
    log_lambda = _log_lambdas(mode, values, config)
    targets = jnp.asarray(values, jnp.float32)
    folder = Path(checkpoints) if checkpoints is not None else None
    every, steps = config.runtime.checkpoint_every, config.optimiser.steps
    alternatives: list[Rung | None] = [None] * len(values)
    ways = DIRECTIONS_BOTH if mode == "sizes" and direction == "both" else (direction if mode == "sizes" else "up",)
    starts = [start if way == "up" else init_state(scrubber, _open(config), optimizer, adversary) for way in ways]
    if strategy == "vmap":  # every rung of every way from its start, as one batch (way-major)
        n = len(values)
        label = label or f"sweep ({n} rungs, vmap{', both ways' if len(ways) > 1 else ''})"
        with progress_bar(progress, steps, label=label) as advance:
            batch = _stack([s for s in starts for _ in values])
            batch = eqx.tree_at(lambda s: s.log_lambda, batch, jnp.asarray(np.tile(log_lambda, len(ways))))
            rungs = (jnp.tile(targets, len(ways)), jnp.ones(n * len(ways), jnp.float32))
            ks = list(values) * len(ways)
            settle_all = lambda watched: _signature(mode, ks, watched, adversary)  # noqa: E731
            states, history = run_steps(
                ladder_step,
                batch,
                rungs,
                operands,
                steps,
                checkpoints=folder,
                every=every,
                settle=settle_all,
                patience=first_patience,
                workers=workers,
                label="",
                advance=advance,
                timings=timings,
            )
        history = {k: np.asarray(v, np.float64) for k, v in history.items()}
        host = jax.device_get(states.gates)  # sliced on the host: slicing on the device compiles per shape
        by_way = [
            (
                [jax.tree.map(lambda x, b=b: jnp.asarray(x[b]), host) for b in range(w * n, (w + 1) * n)],
                [{k: v[:, b].tolist() for k, v in history.items()} for b in range(w * n, (w + 1) * n)],
            )
            for w in range(len(ways))
        ]
    else:
        more = continuation_steps if continuation_steps is not None else max(1, steps // 4)
        total = steps + more * (len(values) - 1)
        label = label or f"sweep ({len(values)} rungs, continuation{', both ways' if len(ways) > 1 else ''})"
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
                        steps,
                        more,
                        operands,
                        advance,
                        sub,
                        every,
                        patience,
                        first_patience,
                        workers,
                        timings,
                        adversary,
                    ),
                    strict=True,
                )
            )
    gates, histories = list(by_way[0][0]), list(by_way[0][1])
    if len(by_way) > 1:  # each rung: the way whose finished explanation has the lower KL
        oracle = KLOracle(scrubber, data, config.optimiser.seed)
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
