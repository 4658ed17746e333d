"""The step loop: every training run and every stretch of a ladder steps through :func:`run_steps`.

One loop owns what a run does between its compiled steps: the per-step history and its fault
checks (:mod:`explainer.faults`), checkpoints and resuming from the newest good one, the time the
first step took to compile, progress lines, a ladder's settle checks (stop once the explanation
has sat still) and the CPU thread fan-out of a batch of states. Keeping it in one place keeps a
training run and a ladder's rung resuming, failing and reporting alike.

The thread fan-out: XLA on a CPU runs each call of these small programs on one core, so a batch of
states whose step is work enough (:data:`THREAD_ELEMENTS`) is split into one part per core, each
stepped in its own thread; below that the interpreter's share of a step outweighs a second core
and the batch steps as one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from explainer.faults import History
from explainer.parallel import cpu_workers, thread_map
from explainer.progress import Timings
from explainer.runs import latest_checkpoint, save_checkpoint
from explainer.scrub import Scrubber
from explainer.tasks.base import Batch
from explainer.train.config import TrainConfig

# one state's step must read at least this many residual elements (prompts × positions ×
# d_model × sites) for its parts to step in threads
THREAD_ELEMENTS = 2**16
SETTLE_EVERY = 25  # steps between reads of a continuation rung's explanation


GOLDEN = (5**0.5 - 1) / 2  # step n reads length group at (n + 1) * GOLDEN mod 1: spread evenly, fixed by n


@dataclasses.dataclass(frozen=True)
class LengthGroups:
    """A step's operands (model, prompts, cache) once per length group of the training prompts,
    each group's prompts padded only to its own longest (:func:`explainer.score.scoring_groups`).
    Step ``n`` reads group :meth:`at` ``(n)``: a fixed, evenly spread sequence in which each group
    comes up in proportion to its prompts, so every prompt is as likely in a step's batch as without
    groups, and a resumed run reads the groups an uninterrupted one would. Each group's shape
    compiles the step once.

    >>> groups = LengthGroups(("short", "long"), (3, 1))
    >>> "".join(groups.at(n)[0] for n in range(8))
    'sslssssl'
    """

    parts: tuple[Any, ...]
    sizes: tuple[int, ...]

    def at(self, n: int) -> Any:
        share = np.cumsum(self.sizes) / sum(self.sizes)
        return self.parts[min(int(np.searchsorted(share, ((n + 1) * GOLDEN) % 1.0, side="right")), len(self.parts) - 1)]


def operands_at(operands: Any, n: int) -> Any:
    """``operands`` as step ``n`` reads them: each :class:`LengthGroups` in it replaced by its group at ``n``."""
    if isinstance(operands, LengthGroups):
        return operands.at(n)
    if isinstance(operands, tuple):
        return tuple(operands_at(x, n) for x in operands)
    return operands


def ladder_workers(scrubber: Scrubber, data: Batch, config: TrainConfig) -> int:
    """The threads a ladder's stretches run on by default: the CPU's cores (:func:`cpu_workers`)
    when one state's step reads at least :data:`THREAD_ELEMENTS` residual elements, else 1."""
    positions = int(np.shape(data.clean)[1])
    elements = config.optimiser.batch_size * positions * scrubber.model.config.d_model * len(scrubber.n_units)
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

    def _one(self, p: int, n: int, k: int) -> list[dict[str, Any]]:
        state, out = self.parts[p], []
        for i in range(n, n + k):
            state, metrics = self.step(state, self.targets[p], operands_at(self.operands, i))
            out.append(metrics)
        self.parts[p] = state
        return jax.device_get(out)

    def run(self, n: int, k: int, first: bool) -> list[dict[str, np.ndarray]]:
        """Every part's steps ``n .. n + k - 1`` as one batch's metrics per step. On a stretch's
        ``first`` call each part's first step runs here, one after the other, so that a program not
        compiled yet compiles once and not in every thread."""
        parts = range(len(self.parts))
        head = [self._one(p, n, 1) if first else [] for p in parts]
        rest = k - 1 if first else k
        tails = thread_map(lambda p: self._one(p, n + k - rest, rest), parts, len(parts))
        return _merged([h + t for h, t in zip(head, tails, strict=True)])

    def states(self):
        return _join(tuple(self.parts))

    def watched(self):
        return jax.tree.map(lambda *xs: np.concatenate(xs), *jax.device_get([watched(p) for p in self.parts]))


def watched(state) -> tuple[Any, Any]:
    """What a settle check reads of a batch of states: the gate logits (site -> ``(B, n)``) and the
    in-loop adversary's learned state (``None`` without one), on the host."""
    return jax.device_get((state.gates.logits, state.adversary[0] if state.adversary is not None else None))


def _quiet(done: int, text: str) -> None:
    """Progress reports nobody reads."""


def run_steps(
    checked: tuple[Callable, list[str]],
    state: Any,
    targets: Any,
    operands: Any,
    steps: int,
    *,
    checkpoints=None,
    every: int | None = 0,
    settle: Callable[[Any], str] | None = None,
    patience: int = 0,
    workers: int = 1,
    label: str | None = None,
    describe: Callable[[dict[str, list[Any]]], str] | None = None,
    advance: Callable[[int, str], None] | None = None,
    done: int = 0,
    place: Callable[[Any], Any] | None = None,
    timings: Timings | None = None,
) -> tuple[Any, dict[str, list[Any]]]:
    """Step ``state`` (one training state, or a batch of them) up to step ``steps``; returns the
    state after the last step and the history (every step's metrics, resumed ones included).
    Step ``n`` reads ``operands_at(operands, n)`` (one group of :class:`LengthGroups`, if any).

    ``checked`` is ``checked_step(step)`` (:func:`explainer.faults.checked_step`, made once so
    that it compiles once) of a ``step(state, targets, operands) -> (state, metrics)``:
    ``targets`` belong to the states of a batch (split with them across threads; ``None`` for one
    state), ``operands`` (model, prompts, cache) are shared. Metrics stay on the device and are
    moved and checked for faults in blocks, at every progress report and before every checkpoint,
    so a step costs no host round trip.

    - ``checkpoints``: a folder; the state is saved there every ``every`` steps and at the end, and
      the run continues from the newest good checkpoint found there (a finished one: no steps).
      ``place`` puts the starting state, fresh or loaded, where the step runs. A fault's error names
      the last good checkpoint.
    - ``advance(done + n, text)``: progress every 50 steps, at each checkpoint and at the end, with
      ``describe(history)`` as text (by default ``label`` and the last step's mean KL); also before
      the first step (text ``compiling the step`` where ``done`` and the run start at 0: the first
      step a bar shows is the one that compiles) and after it. ``label`` is also saved in each
      checkpoint's meta.
    - ``settle`` (:func:`watched`: the batch's gate logits and adversary state, on the host -> a
      digest of its finished explanations and attacks) and ``patience``: the run stops early once
      that digest, read every ``SETTLE_EVERY`` steps, has not changed for ``patience`` steps. The
      digest and the step it last changed at are saved with each checkpoint, so a resumed run
      stops where an uninterrupted one would.
    - ``workers`` above 1: a batch is cut into that many equal parts where it divides
      (:func:`_parts`), each part stepped in its own thread between the points where the run reads
      its states (every ``SETTLE_EVERY`` steps, each checkpoint, the end); metrics, checks,
      checkpoints and the result are the whole batch's, as without threads.
    - ``timings`` gains ``compile`` (the first step this process runs, which compiles the step)
      and ``train`` (the rest).
    """
    step, names = checked
    saved = latest_checkpoint(checkpoints, like=state) if checkpoints is not None else None
    if saved is not None:
        state = saved.state
    if place is not None:
        state = place(state)
    history = History(saved.history if saved else {}, names)
    where = ""
    advance = _quiet if advance is None else advance
    if describe is None:
        describe = lambda values: f"{label or ''} kl {float(np.mean(values['kl'][-1])):.4f}"  # noqa: E731
    watch = settle is not None and patience > 0
    meta = saved.meta if saved is not None else {}
    first = saved.step if saved else 0
    last = first if meta.get("settled") else steps
    n_parts = _parts(int(jax.tree.leaves(state)[0].shape[0]), workers) if workers > 1 and last > first else 1
    threads = None
    if n_parts > 1:
        threads = _Threads(step, _split(state, n_parts), _split(targets, n_parts), operands)
        current, read = threads.states, threads.watched
    else:
        current, read = (lambda: state), (lambda: watched(state))
    signature, since = meta.get("signature"), meta.get("since", first)
    if watch and signature is None:
        signature, since = settle(read()), first
    if first:
        advance(done + first, "")
    elif not done and last:  # a bar's first step: it compiles (and a slow compile is announced)
        advance(0, "compiling the step")
    clock = time.perf_counter()
    n = first
    while n < last:
        # the next step the run reads its states at: a settle read, a checkpoint, the end
        stop = min(last, (n // SETTLE_EVERY + 1) * SETTLE_EVERY, (n // every + 1) * every if every else last)
        timed = timings is not None and n == first
        if n == first:
            stop = n + 1  # the first step alone: it compiles the step, is timed apart and reported
        if threads is not None:
            for metrics in threads.run(n, stop - n, first=n == first):
                history.append(metrics)
        else:
            for i in range(n, stop):
                state, metrics = step(state, targets, operands_at(operands, i))
                history.append(metrics)
        if timed:
            jax.block_until_ready(state if threads is None else threads.parts)
            timings["compile"] = timings.get("compile", 0.0) + time.perf_counter() - clock
            clock = time.perf_counter()
        n = stop
        settled = False
        if watch and n % SETTLE_EVERY == 0 and n < steps:
            now = settle(read())
            if now != signature:
                signature, since = now, n
            settled = n - since >= patience
        due = checkpoints is not None and every and (n % every == 0 or n == steps or settled)
        if n % 50 == 0 or n == steps or due or settled or n == first + 1:
            history.flush(where)
            note = f" settled at step {n}" if settled else ""
            advance(done + (steps if settled else n), describe(history.values) + note)
        if due:
            extra = {"signature": signature, "since": since, "settled": settled} if watch else {}
            tag = {} if label is None else {"label": label}
            path = save_checkpoint(checkpoints, current(), n, history.values, meta={**tag, **extra})
            where = f"The last good checkpoint (step {n}) is {path}. "
        if settled:
            break
    history.flush(where)
    if timings is not None:
        timings["train"] = timings.get("train", 0.0) + time.perf_counter() - clock
    return current(), history.values
