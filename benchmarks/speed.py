"""Speed of one explainer training step next to one plain training step of the model itself.

For every shipped zoo model this times, side by side in one run:

- **step**: one step of the explainer's training loop without an adversary, built exactly as
  :func:`explainer.train.step.train_gates` builds it (``Scrubber.build(..., "resample")``,
  ``optax.adam``, ``init_state``, ``make_step``, the default :class:`~explainer.TrainConfig`);
  it runs the full model on the clean and resample prompts, the scrubbed forward and backward
  pass, an adam update of the gates and the dual update of λ;
- **min-max step**: the same step with the learned adversary in the loop (``n_adv = 1``, its
  default restarts): the adversary's ascent shares the explainer's forward pass;
- **plain**: one jitted ``eqx.filter_value_and_grad`` of the mean cross-entropy of the model's
  last-position logits against ``batch.answers[:, 0]`` with respect to its parameters, plus an
  adam update of those parameters, on the same number of the same task's prompts.

Both are compiled first; each number is the median over ``--repeats`` repeats of the mean time
of ``--steps`` consecutive steps, synchronised with ``block_until_ready``. The ratio step / plain
is the overhead of explaining a model over training it; the targets are at most 2.5 for the
step and at most 3 for the min-max step.

**Time to frontier** (``--frontier-models``): the wall time of an 8-point ladder of target sizes
as :func:`explainer.sweep` trains it (:func:`~explainer.frontier.ladder.train_ladder` with its
default strategy and patience, then :func:`~explainer.frontier.select.at_most`'s polish, exact searches and
open restarts of stuck rungs, on the ladder's compiled step), next to one single training run
(:func:`explainer.train.step.train_gates`, default settings) and to what ``explainer train`` does
(:func:`explainer.finish.passes.fit`: the training run, then repair and the open restart when it misses
its KL budget), all without an adversary, in the same process. Each kind runs
``--frontier-repeats`` times (default 3), interleaved, each time with JAX's compiled programs
cleared first, so compilation is part of every run as in a new process; the row gives the medians
and every run's seconds. The target is a ratio (ladder / single training run) of at most 3; the
ratio to ``fit`` is printed beside it. ``--strategies`` times the ladder under each strategy
given, one row each (``auto`` is recorded as what it chose). The rows go to
``benchmarks/results/time_to_frontier.json`` (``--models`` with no names skips the step table).
Beside it, from one H100, measured once per kind before the repeats and before ``--patience``:
``time_to_frontier-gpu.json`` (the default, one process per model) and
``time_to_frontier-gpu-vmap.json`` (``--strategies auto continuation``, run when ``auto`` chose
``vmap`` on a GPU: its ``note`` says so; ``vmap`` first)::

    python benchmarks/speed.py --models --frontier-models planted-distractor ioi --strategies vmap continuation

``--ladder-steps``, ``--continuation-steps`` and ``--patience`` time another schedule (``explainer
sweep --steps N --continuation-steps M --patience P``) against the same default training run;
``--frontier-results`` names the file. ``time_to_frontier-short.json`` is the ladder of 750 and
188 steps, measured once per kind before ``--patience``::

    python benchmarks/speed.py --models --frontier-models planted-distractor planted-joint tracr-frac-prevs ioi \
        --ladder-steps 750 --continuation-steps 188 --frontier-results benchmarks/results/time_to_frontier-short.json

Run it with ``make bench`` (that is, ``python benchmarks/speed.py``); it prints a table and writes
the rows with the exact command line to ``benchmarks/results/speed.json``::

    python benchmarks/speed.py --batch-size 64 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _plain import plain_step
from _results import RESULTS_DIR, write_record
from rich.console import Console
from rich.table import Table

from adversary.learned import LearnedAdversary
from explainer.models import load_model
from explainer.scrub import Scrubber
from explainer.tasks import resolve_task
from explainer.tasks.base import Batch
from explainer.train.config import TrainConfig
from explainer.train.step import init_state, make_step
from explainer.zoo import resolve_model, zoo_names

RESULTS = RESULTS_DIR / "speed.json"
FRONTIER_RESULTS = RESULTS_DIR / "time_to_frontier.json"
TARGET_RATIO = 2.5
TARGET_MINMAX = 3.0
TARGET_FRONTIER = 3.0
FRONTIER_MODELS = ("planted-distractor", "ioi")


def time_steps(step, state, steps: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean seconds per step of ``state = step(state)``."""
    state = step(state)  # compile
    jax.block_until_ready(eqx.filter(state, eqx.is_array))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            state = step(state)
        jax.block_until_ready(eqx.filter(state, eqx.is_array))
        times.append((time.perf_counter() - started) / steps)
    return statistics.median(times)


def explainer_step(model, data: Batch, config: TrainConfig, adversary=None):
    """The explainer's step and initial state, as ``train_gates`` makes them."""
    scrubber = Scrubber.build(model, data, None, "resample")
    optimizer = optax.adam(config.optimiser.lr)
    step, _ = make_step(scrubber, data, config, optimizer, adversary)
    return lambda state: step(state)[0], init_state(scrubber, config, optimizer, adversary)


def measure(name: str, config: TrainConfig, steps: int, repeats: int) -> dict:
    folder = resolve_model(name)
    model, task = load_model(folder), resolve_task(None, folder)
    data = task.train_data()
    batch = data.take(jnp.arange(config.optimiser.batch_size) % len(data))
    step_s = time_steps(*explainer_step(model, data, config), steps, repeats)
    minmax_s = time_steps(*explainer_step(model, data, config, LearnedAdversary()), steps, repeats)
    plain_s = time_steps(*plain_step(model, batch, config.optimiser.lr), steps, repeats)
    return {
        "model": name,
        "batch_size": config.optimiser.batch_size,
        "step_ms": 1e3 * step_s,
        "minmax_ms": 1e3 * minmax_s,
        "plain_ms": 1e3 * plain_s,
        "ratio": step_s / plain_s,
        "minmax_ratio": minmax_s / plain_s,
    }


def ladder_sizes(total: int, points: int = 8) -> list[int]:
    """``points`` distinct sizes spread geometrically from 1 to half the units."""
    sizes = sorted({int(round(v)) for v in np.geomspace(1, max(points, total // 2), points * 2)})
    return [sizes[round(i * (len(sizes) - 1) / (points - 1))] for i in range(points)]


def time_to_frontier(
    name: str,
    config: TrainConfig,
    strategies: tuple[str, ...] = ("auto",),
    ladder_steps: int | None = None,
    continuation_steps: int | None = None,
    patience: int | None = None,
    repeats: int = 1,
) -> list[dict]:
    """Seconds of one training run and of an 8-point ladder (one row per strategy in
    ``strategies``), side by side, and their ratio. ``ladder_steps`` (the first rung's, the open
    restarts' and the exact-search limit: ``explainer sweep --steps``) and ``continuation_steps``
    (``--continuation-steps``) set the ladder's schedule, and ``patience`` (``--patience``) when its
    later rungs and open restarts stop (default: ``explainer sweep``'s); the single run keeps
    ``config``'s. Each of them runs ``repeats`` times, interleaved, every time with JAX's compiled
    programs cleared first (compilation is part of every run, as in a new process); the rows give
    the medians (a ladder's: its median run) and every run's seconds."""
    from explainer.finish.passes import fit
    from explainer.frontier.ladder import PATIENCE, choose_strategy, ladder_program, train_ladder
    from explainer.frontier.select import at_most, exact_sets, open_restart
    from explainer.train.step import train_gates

    folder = resolve_model(name)
    model, task = load_model(folder), resolve_task(None, folder)
    data = task.train_data()
    scrubber = Scrubber.build(model, data, None, "resample")
    sizes = ladder_sizes(sum(scrubber.n_units.values()))
    short = config if ladder_steps is None else config.replace(steps=ladder_steps)
    steps = short.optimiser.steps
    more = continuation_steps if continuation_steps is not None else max(1, steps // 4)  # train_ladder's
    patience = PATIENCE if patience is None else patience

    def cold(run):  # seconds of ``run()`` with every compiled program forgotten, as in a new process
        jax.clear_caches()
        started = time.perf_counter()
        out = run()
        return time.perf_counter() - started, out

    def ladder(strategy):
        timed = {}
        started = time.perf_counter()
        program = ladder_program(scrubber, data, short, "sizes")  # as sweep: the restarts reuse it
        rungs = train_ladder(
            scrubber,
            data,
            short,
            "sizes",
            sizes,
            strategy=strategy,
            continuation_steps=continuation_steps,
            patience=patience,
            program=program,
        )
        timed["trained"] = time.perf_counter() - started
        timed["steps"] = [len(r.history["kl"]) for r in rungs]
        restart = open_restart(scrubber, data, short, patience=patience, program=program)
        seed, budget = short.optimiser.seed, short.penalty.kl_budget
        timed["rungs"] = at_most(scrubber, data, rungs, seed, budget, restart, exact_sets(short, None))
        return timed

    singles, commands, ladders = [], [], {s: [] for s in strategies}
    for _ in range(repeats):  # interleaved, so that a slower spell of the machine slows every kind
        singles.append(cold(lambda: train_gates(scrubber, data, config, progress=False))[0])
        seconds, fitted = cold(lambda: fit(scrubber, data, config, progress=False))
        history = fitted.history
        commands.append(seconds)
        for strategy in strategies:
            ladders[strategy].append(cold(lambda strategy=strategy: ladder(strategy)))
    single, command = statistics.median(singles), statistics.median(commands)
    rows = []
    for strategy in strategies:
        runs = sorted(ladders[strategy], key=lambda run: run[0])
        seconds, timed = runs[(len(runs) - 1) // 2]  # the median run (the lower middle of an even count)
        rungs = timed["rungs"]
        rows.append(
            {
                "model": name,
                "strategy": choose_strategy(strategy, scrubber),
                "sizes": sizes,
                "ladder_steps": short.optimiser.steps,
                "continuation_steps": more,
                "patience": patience,
                "rung_steps": timed["steps"],
                "repeats": repeats,
                "single_s": single,
                "single_runs_s": singles,
                "train_command_s": command,
                "train_command_runs_s": commands,
                "train_command_open_restart": bool(history["open_restart"][0]),
                "ladder_s": seconds,
                "ladder_runs_s": [run[0] for run in ladders[strategy]],
                "ladder_training_s": timed["trained"],
                "ladder_restarts": sum(int("open_restart" in r.history) for r in rungs),
                "ladder_exact_searches": sum(int("exact_search" in r.history) for r in rungs),
                "ratio": seconds / single,
                "ratio_to_train_command": seconds / command,
            }
        )
    return rows


def show_frontier(rows: list[dict]) -> None:
    table = Table(title=f"time to an 8-point frontier vs one training run (target ≤ {TARGET_FRONTIER})")
    columns = (
        "model",
        "strategy",
        "ladder (sizes)",
        "one run s",
        "train cmd s",
        "ladder s (training)",
        "restarts (exact)",
        "ratio",
    )
    for column in columns + ("ratio to train cmd",):
        table.add_column(column, justify="left" if column in ("model", "strategy", "ladder (sizes)") else "right")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" + ("" if r["ratio"] <= TARGET_FRONTIER else " (over)")
        table.add_row(
            r["model"],
            r.get("strategy", "continuation"),
            ",".join(map(str, r["sizes"])),
            f"{r['single_s']:.1f}",
            f"{r['train_command_s']:.1f}" + (" (restarted)" if r["train_command_open_restart"] else ""),
            f"{r['ladder_s']:.1f} ({r['ladder_training_s']:.1f})",
            f"{r['ladder_restarts']} ({r.get('ladder_exact_searches', 0)})",
            ratio,
            f"{r['ratio_to_train_command']:.2f}",
        )
    Console(width=140).print(table)


def show(rows: list[dict]) -> None:
    title = f"explainer step vs plain fwd+bwd (targets: step ≤ {TARGET_RATIO}, min-max ≤ {TARGET_MINMAX})"
    table = Table(title=title)
    for column in ("model", "step ms", "min-max ms", "plain fwd+bwd ms", "step ratio", "min-max ratio"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" + ("" if r["ratio"] <= TARGET_RATIO else " (over)")
        minmax = f"{r['minmax_ratio']:.2f}" + ("" if r["minmax_ratio"] <= TARGET_MINMAX else " (over)")
        table.add_row(r["model"], f"{r['step_ms']:.3f}", f"{r['minmax_ms']:.3f}", f"{r['plain_ms']:.3f}", ratio, minmax)
    Console(width=140).print(table)


def write(rows: list[dict], args: argparse.Namespace, frontier: list[dict] | None = None) -> None:
    if rows:
        write_record(RESULTS, args, target_ratio=TARGET_RATIO, target_minmax_ratio=TARGET_MINMAX, rows=rows)
    if frontier:
        write_record(_frontier_results(args), args, target_ratio=TARGET_FRONTIER, rows=frontier)


def _frontier_results(args: argparse.Namespace) -> Path:
    return Path(args.frontier_results) if args.frontier_results else FRONTIER_RESULTS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=TrainConfig().optimiser.batch_size)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    parser.add_argument("--steps", type=int, default=50, help="steps per timed repeat")
    parser.add_argument("--models", nargs="*", default=None, help="models of the step table (default: all)")
    parser.add_argument("--frontier-models", nargs="*", default=list(FRONTIER_MODELS), help="time-to-frontier models")
    parser.add_argument(
        "--strategies", nargs="+", default=["auto"], help="the ladder's strategies to time (auto, vmap, continuation)"
    )
    parser.add_argument("--ladder-steps", type=int, default=None, help="the ladder's --steps (default: a run's)")
    parser.add_argument("--continuation-steps", type=int, default=None, help="the ladder's later rungs' steps")
    parser.add_argument("--patience", type=int, default=None, help="the ladder's --patience (default: a sweep's)")
    parser.add_argument(
        "--frontier-repeats", type=int, default=3, help="timed runs of each kind per model; medians reported"
    )
    parser.add_argument("--frontier-results", default=None, help="time-to-frontier file (default: results/...)")
    args = parser.parse_args(argv)
    config = TrainConfig().replace(batch_size=args.batch_size)
    names = zoo_names() if args.models is None else args.models
    rows = [measure(name, config, args.steps, args.repeats) for name in names]
    frontier = [
        row
        for name in args.frontier_models
        for row in time_to_frontier(
            name,
            config,
            tuple(args.strategies),
            args.ladder_steps,
            args.continuation_steps,
            args.patience,
            args.frontier_repeats,
        )
    ]
    if rows:
        show(rows)
    if frontier:
        show_frontier(frontier)
    write(rows, args, frontier)
    written = ([RESULTS] if rows else []) + ([_frontier_results(args)] if frontier else [])
    print("wrote " + (" and ".join(str(p) for p in written) or "nothing (no models given)"))


if __name__ == "__main__":
    main()
