"""Growth: the command line end to end on random GPT-2-shaped models of growing size.

For each size of a ladder (``--sizes``; on the CPU 2L-d128, 4L-d256 and 6L-d384; 12L-d768 is
GPT-2 small's shape, the size for a GPU) it writes a random model folder (native format: GPT-2's
shape, ``n_heads = d_model / 64``, ``d_head`` 64, ``d_mlp = 4 · d_model``, GELU, LayerNorm, learned
positions, vocabulary ``--vocab``, random normal weights) and a random prompts file (``--prompts``
prompts of ``--seq`` random tokens, random counterfactuals, one random answer and one random wrong
answer each) in a temporary folder, then runs the command line as a user would (a subprocess per
command, ``--json``, stderr captured, default settings but ``--steps``):

- ``explainer train`` (residual dimensions) and ``explainer train --units edges``;
- ``explainer sweep --sizes A,B,C,D`` (four rungs at fixed fractions of the dimension units,
  ``--ablations ''``: the frontier under the training ablation only, to keep it affordable;
  ``--sweep-units`` picks dims or edges);
- ``explainer attack`` on the dimension run (default methods and budget).

Per command it records the wall seconds of the subprocess, the peak resident memory of that
subprocess (``ru_maxrss`` from ``os.wait4``), and the seconds per phase the run records store
(``timings`` of ``explanation.json`` and of the sweep's JSON: ``compile``, ``train``, each finishing
pass, ``evaluate``, ``save``; the sweep's ``train`` includes its compiles). ``overhead`` is everything
that is not training steps (the wall time less the ``train`` phase: process start, loading, compile,
finishing passes, evaluation, saving), and ``overhead_ratio = overhead / train``, which issue 25
targets at ≤ 1 for train (dims and edges).

A command still running after ``--timeout`` seconds is stopped: its row says so (``timed_out``,
its wall seconds a lower bound) with the phases it announced finishing on stderr and the one it
was in (``running_at_timeout``); the fits leave it out. The attack needs the dimension run, so it
is skipped where that run was stopped.

Growth exponents are least-squares slopes of log seconds against log units and against log forward
FLOPs over the sizes (``fit_exponent``; the step count is the same at every size, so the exponent
against FLOPs × steps is the same number). Forward FLOPs of one prompt (``forward_flops``)::

    2 · P · S  +  4 · L · S² · d_model

with ``P`` the weights every token multiplies (attention and MLP matrices of every layer plus the
unembedding; the embeddings are looked up, not multiplied), ``S`` the prompt length and ``L`` the
layers; the second term is the attention scores and their weighted sum (causal masking not
discounted).

Compile time: for models of 2, 4, 8 and 12 layers at d_model 128 (``--compile-layers``,
``--compile-width``), dims and edges, the training step as :func:`explainer.train.step.train_gates`
builds it (default settings, learned adversary in the loop) is timed in a fresh process: its first
call less one steady call (tracing + XLA compilation), as ``benchmarks/scale.py`` measures it.

Writes ``benchmarks/results/growth.json`` (``growth-gpu.json`` on a GPU) and
``benchmarks/results/growth.png`` (``growth-gpu.png``), and prints a table::

    nice -n 10 python benchmarks/growth.py --steps 100 --timeout 200

The CPU ladder's vocabulary is smaller than GPT-2's (``--vocab``; at these widths GPT-2's
unembedding would be most of every step). ``--gpu`` is the preset for a GPU: GPT-2 small's shape
(``--sizes 12L-d768``), GPT-2's vocabulary, 320 prompts, an edge sweep. One device call runs at
most ten minutes, so the commands and the compile report go in two calls, each sized by
``--timeout`` (check the device time left first)::

    python benchmarks/growth.py --gpu --steps 200 --timeout 140 --compile-layers ''
    python benchmarks/growth.py --gpu --sizes '' --compile-layers 2,4,8,12 \\
        --out benchmarks/results/growth-gpu-compile.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {"2L-d128": (2, 128), "4L-d256": (4, 256), "6L-d384": (6, 384), "8L-d512": (8, 512), "12L-d768": (12, 768)}
CPU_SIZES = "2L-d128,4L-d256,6L-d384"
GPU_SIZES = "12L-d768"
GPT2_VOCAB = 50257
SWEEP_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4)  # of the dimension units: the sweep's four rungs
TARGET_OVERHEAD_RATIO = 1.0
TARGET_EXPONENT_FLOPS = 1.1
COMMANDS = ("train", "train_edges", "sweep", "attack")


# ---------------------------------------------------------------- models, prompts, arithmetic


def parse_size(name: str) -> tuple[int, int]:
    """``"4L-d256"`` -> ``(4, 256)``.

    >>> parse_size("12L-d768")
    (12, 768)
    """
    if name in SIZES:
        return SIZES[name]
    layers, _, width = name.partition("L-d")
    if not (layers.isdigit() and width.isdigit()):
        raise SystemExit(f"size {name!r} is not of the form <layers>L-d<d_model>, e.g. 4L-d256")
    return int(layers), int(width)


def model_config(layers: int, width: int, vocab: int) -> dict:
    """A GPT-2-shaped config (TransformerLens names): heads of 64 dimensions, MLP four times wider."""
    heads = max(1, width // 64)
    return dict(
        n_layers=layers,
        d_model=width,
        n_heads=heads,
        d_head=width // heads,
        d_mlp=4 * width,
        d_vocab=vocab,
        n_ctx=1024,
        act_fn="gelu_new",
    )


def multiplied_params(cfg: dict) -> int:
    """Weights every token is multiplied by: attention (Q, K, V, O) and MLP matrices, the unembedding.

    >>> multiplied_params(dict(n_layers=1, d_model=4, n_heads=1, d_head=4, d_mlp=16, d_vocab=10))
    232
    """
    d, inner = cfg["d_model"], cfg["n_heads"] * cfg["d_head"]
    per_layer = 4 * d * inner + 2 * d * cfg["d_mlp"]
    return cfg["n_layers"] * per_layer + d * cfg["d_vocab"]


def forward_flops(cfg: dict, seq: int) -> float:
    """FLOPs of one forward pass over one prompt of ``seq`` tokens: ``2·P·S + 4·L·S²·d``.

    >>> forward_flops(dict(n_layers=1, d_model=4, n_heads=1, d_head=4, d_mlp=16, d_vocab=10), 2)
    992.0
    """
    attention = 4 * cfg["n_layers"] * seq * seq * cfg["d_model"]
    return float(2 * multiplied_params(cfg) * seq + attention)


def fit_exponent(x, y) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` (None with fewer than two distinct ``x``).

    >>> round(fit_exponent([1, 2, 4, 8], [3, 12, 48, 192]), 6)
    2.0
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = (x > 0) & (y > 0)
    x, y = np.log(x[ok]), np.log(y[ok])
    if len(np.unique(x)) < 2:
        return None
    return float(np.polyfit(x, y, 1)[0])


def sweep_sizes(total: int) -> list[int]:
    """The sweep's four target sizes: fixed fractions of the dimension units, distinct and ≥ 1.

    >>> sweep_sizes(640)
    [20, 40, 80, 160]
    """
    sizes: list[int] = []
    for f in SWEEP_FRACTIONS:
        s = max(1, round(total * f))
        while s in sizes:
            s += 1
        sizes.append(s)
    return sizes


def write_model(folder: Path, cfg: dict, seed: int = 0) -> Path:
    """A random model folder in the native format."""
    import jax

    from explainer.models import ModelConfig, init_random
    from explainer.models.native import save_model

    return save_model(init_random(ModelConfig(**cfg), jax.random.key(seed)), folder)


def random_prompts(n: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """A prompts file's content (:mod:`explainer.tasks.prompts`): random tokens, answers, counterfactuals."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        answer, wrong = rng.choice(vocab, 2, replace=False)
        prompts.append({
            "clean": rng.integers(0, vocab, seq).tolist(),
            "corrupt": rng.integers(0, vocab, seq).tolist(),
            "answers": [int(answer)],
            "wrong_answers": [int(wrong)],
        })  # fmt: skip
    return {"prompts": prompts}


# ---------------------------------------------------------------- running the command line


def explainer_command() -> list[str]:
    """The ``explainer`` entry point beside this interpreter (the venv's), else ``python -m``."""
    script = Path(sys.executable).with_name("explainer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "explainer.cli"]


def said_phases(log: str) -> tuple[dict[str, float], str | None]:
    """Phases a run announced on stderr (``NAME done [Xs]``) and the one it had started last and not finished.

    A stopped run announces no training phase, but the last progress line of its first training loop
    (``training N/N ... [Ts]``, or the sweep's ladder) gives that loop's seconds with its compile
    (``train_with_compile``).

    >>> said_phases("repair ...\\nrepair done [10.1s]\\nopen_restart ...\\n")
    ({'repair': 10.1}, 'open_restart')
    >>> said_phases("training 50/100 kl 0.1 [30s]\\ntraining 100/100 kl 0.1 [49s]\\nrepair ...\\n")
    ({'train_with_compile': 49.0}, 'repair')
    """
    done: dict[str, float] = {}
    running = None
    for line in log.splitlines():
        match = re.fullmatch(r"(\w+) done \[([\d.]+)s\]", line.strip())
        steps = re.fullmatch(r"(?:training|sweep \(.*?\)) (\d+)/(\d+) .*\[(\d+)s\]", line.strip())
        if steps and steps[1] == steps[2] and "train_with_compile" not in done and not done:
            done["train_with_compile"] = float(steps[3])  # the first training loop, its compile included
        elif match:
            done[match[1]] = done.get(match[1], 0.0) + float(match[2])
            running = None
        elif re.fullmatch(r"\w+ \.\.\.", line.strip()):
            running = line.strip()[:-4]
    return done, running


def run_cli(args: list[str], log: Path, timeout: float | None = None) -> dict:
    """Run ``explainer ARGS`` in a subprocess; its JSON (last stdout line), wall seconds and peak RSS.

    stderr goes to ``log``; ``ru_maxrss`` is read from ``os.wait4`` for this child alone. Past
    ``timeout`` seconds the child is stopped: ``timed_out`` is then true, ``wall_s`` the timeout (a
    lower bound), and ``said``/``running`` the phases it had announced finishing and the one it was in.
    """
    from _results import cold_env

    command = [*explainer_command(), *args]
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True, start_new_session=True, env=cold_env())
        timed_out = False
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if timeout is not None and time.perf_counter() - started > timeout:
                os.killpg(child.pid, signal.SIGTERM)
                timed_out = True
                _, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.2)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        lines = out.read().strip().splitlines()
    said, running = said_phases(log.read_text())
    if child.returncode != 0 and not timed_out:
        raise RuntimeError(f"{shlex.join(command)} failed ({child.returncode}):\n{log.read_text()[-4000:]}")
    result = json.loads(lines[-1]) if lines and not timed_out else {}
    return {
        "result": result,
        "wall_s": timeout if timed_out else seconds,
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
        "timed_out": timed_out,
        "said": said,
        "running": running,
    }


def unit_counts(cfg: dict) -> tuple[int, int]:
    """(residual-dimension units, edge units) of a model with every default site."""
    from explainer import edges
    from explainer.models import ModelConfig

    config = ModelConfig(**cfg)
    dims = config.d_model * len(config.sites)
    return dims, int(sum(edges.edge_units(config, edges.edge_sites(config)).values()))


def phase_row(name: str, ran: dict, units: int, flops: float) -> dict:
    """One command's row: wall seconds, phases, training-step seconds, everything else and their ratio.

    A command stopped at the timeout keeps the phases it announced finishing, and names the one it was in.
    """
    timings = ran["result"].get("timings") or ran["said"]
    timings = {k: float(v) for k, v in timings.items()}
    train = timings.get("train")
    if train is not None:  # the open restart's training steps are training steps too
        train += timings.get("open_restart_train", 0.0)
    overhead = None if train is None or ran["timed_out"] else ran["wall_s"] - train
    return {
        "command": name,
        "units": units,
        "forward_flops": flops,
        "wall_s": round(ran["wall_s"], 3),
        "timed_out": ran["timed_out"],
        "running_at_timeout": ran["running"] if ran["timed_out"] else None,
        "train_s": train,
        "overhead_s": None if overhead is None else round(overhead, 3),
        "overhead_ratio": None if not train or overhead is None else round(overhead / train, 3),
        "peak_rss_gb": round(ran["peak_rss_gb"], 3),
        "timings": timings,
    }


def run_size(name: str, args: argparse.Namespace, work: Path) -> dict:
    """Every command at one size; a dict of rows keyed by command."""
    layers, width = parse_size(name)
    cfg = model_config(layers, width, args.vocab)
    units, edge_units = unit_counts(cfg)
    folder, prompts = work / f"model-{name}", work / f"prompts-{name}.json"
    write_model(folder, cfg, args.seed)
    prompts.write_text(json.dumps(random_prompts(args.prompts, args.seq, args.vocab, args.seed)))
    flops = forward_flops(cfg, args.seq) * args.prompts  # one forward over every prompt
    common = ["--model", str(folder), "--task", str(prompts), "--steps", str(args.steps), "--seed", str(args.seed)]
    common += ["--json", "--progress"]
    rows: dict[str, dict] = {}
    timeout = args.timeout or None

    def run(command: str, cli: list[str], n_units: int) -> dict:
        print(
            f"[{name}] {shlex.join(cli[:1] + [a for a in cli[1:] if a not in common])} ...", file=sys.stderr, flush=True
        )
        ran = run_cli(cli, work / f"{command}-{name}.log", timeout)
        rows[command] = phase_row(command, ran, n_units, flops)
        if not ran["timed_out"]:
            found = ran["result"].get("total_units")
            if found is not None and int(found) != n_units:
                raise RuntimeError(f"{command} at {name}: {found} units, expected {n_units}")
            rows[command]["size"] = ran["result"].get("size")
        return ran

    dims_run = work / f"run-{name}"
    skipped: dict[str, str] = {}
    dims = None
    if "train" in args.commands:
        dims = run("train", ["train", *common, "--out", str(dims_run), "--overwrite"], units)
    if "train_edges" in args.commands:
        edges_out = str(work / f"edges-{name}")
        run("train_edges", ["train", *common, "--units", "edges", "--out", edges_out, "--overwrite"], edge_units)
    if "sweep" in args.commands:
        sweep_units = edge_units if args.sweep_units == "edges" else units
        ladder = sweep_sizes(sweep_units)
        sweep_cli = ["sweep", *common, "--units", args.sweep_units, "--sizes", ",".join(map(str, ladder))]
        run("sweep", [*sweep_cli, "--ablations", "", "--out", str(work / f"sweep-{name}"), "--overwrite"], sweep_units)
        rows["sweep"]["ladder"] = ladder
        rows["sweep"]["rung_timings"] = _rung_timings(work / f"sweep-{name}")
    if "attack" in args.commands:
        if dims is None or dims["timed_out"]:
            skipped["attack"] = "no finished dimension run to attack"
        elif dims["result"].get("size") == units:
            skipped["attack"] = "the dimension run keeps every unit: nothing to re-include"
        else:
            run("attack", ["attack", str(dims_run), "--json", "--progress"], units)
    return {
        "size": name,
        "config": cfg,
        "units": units,
        "edge_units": edge_units,
        "forward_flops": flops,
        "rows": rows,
        "skipped": skipped,
    }


def _rung_timings(sweep: Path) -> dict[str, dict]:
    """Each rung's own ``timings`` from its ``explanation.json`` (when the sweep saved them)."""
    found = {}
    for path in sorted((sweep / "runs").glob("*/explanation.json")):
        timings = json.loads(path.read_text()).get("timings")
        if timings:
            found[path.parent.name] = timings
    return found


# ---------------------------------------------------------------- compile time of the training step


def compile_worker(layers: int, width: int, units: str, args: argparse.Namespace) -> dict:
    """In this (fresh) process: the training step's first call less one steady call, in seconds."""
    import equinox as eqx
    import jax

    from adversary.learned import make_adversary
    from explainer.models import ModelConfig, init_random
    from explainer.scrub import Scrubber
    from explainer.tasks.prompts import parse_prompts
    from explainer.train.config import TrainConfig
    from explainer.train.step import _bind, init_state, make_optimizer, make_step

    cfg = model_config(layers, width, args.vocab)
    model = init_random(ModelConfig(**cfg), jax.random.key(args.seed))
    data = parse_prompts(random_prompts(args.prompts, args.seq, args.vocab, args.seed))
    of = getattr(TrainConfig, "of", None)  # settings by their flat names, where TrainConfig is grouped
    config = of(units=units) if of is not None else TrainConfig(units=units)
    adversary = make_adversary("learned")
    scrubber = Scrubber.build(model, data, None, config.ablation, units=units)
    optimizer = make_optimizer(config)
    step, _ = make_step(scrubber, data, config, optimizer, adversary)
    operands, state = _bind(step, init_state(scrubber, config, optimizer, adversary))

    def call(state):
        started = time.perf_counter()
        state = step(state, *operands)[0]
        jax.block_until_ready(eqx.filter(state, eqx.is_array))
        return state, time.perf_counter() - started

    state, first = call(state)
    steady = []
    for _ in range(3):
        state, seconds = call(state)
        steady.append(seconds)
    steady_s = float(np.median(steady))
    return {
        "layers": layers,
        "d_model": width,
        "units_kind": units,
        "units": int(sum(scrubber.n_units.values())),
        "sites": len(scrubber.sites),
        "first_call_s": round(first, 3),
        "steady_step_s": round(steady_s, 4),
        "compile_s": round(max(first - steady_s, 0.0), 3),
    }


def compile_row(layers: int, width: int, units: str, args: argparse.Namespace) -> dict:
    """:func:`compile_worker` in a fresh interpreter (nothing cached from an earlier compile)."""
    from _results import cold_env

    command = [sys.executable, __file__, "--compile-worker", f"{layers},{width},{units}"]
    command += ["--vocab", str(args.vocab), "--prompts", str(args.prompts), "--seq", str(args.seq)]
    command += ["--seed", str(args.seed)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=cold_env())
        _, status, usage = os.wait4(child.pid, 0)
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{err.read()[-4000:]}")
        row = json.loads(out.read().strip().splitlines()[-1])
    row["peak_rss_gb"] = round(usage.ru_maxrss * 1024 / 1e9, 3)
    return row


# ---------------------------------------------------------------- summary, table, plot


def exponents(sizes: list[dict]) -> dict:
    """Per command and in all: growth exponent of wall seconds against units and against forward FLOPs.

    Rows stopped at the timeout are left out (their seconds are only lower bounds), and so is the
    total of a size with such a row.
    """
    out = {}
    for command in COMMANDS:
        rows = [s["rows"][command] for s in sizes if command in s["rows"] and not s["rows"][command]["timed_out"]]
        out[command] = {
            "vs_units": fit_exponent([r["units"] for r in rows], [r["wall_s"] for r in rows]),
            "vs_flops": fit_exponent([r["forward_flops"] for r in rows], [r["wall_s"] for r in rows]),
        }
    whole = [
        s for s in sizes if set(s["rows"]) == set(COMMANDS) and not any(r["timed_out"] for r in s["rows"].values())
    ]
    totals = [sum(r["wall_s"] for r in s["rows"].values()) for s in whole]
    out["total"] = {
        "vs_units": fit_exponent([s["units"] for s in whole], totals),
        "vs_edge_units": fit_exponent([s["edge_units"] for s in whole], totals),
        "vs_flops": fit_exponent([s["forward_flops"] for s in whole], totals),
    }
    return out


def flat_rows(sizes: list[dict]) -> list[dict]:
    """One flat row per (size, command), for the results page."""
    rows = []
    for s in sizes:
        for command, r in s["rows"].items():
            t = r["timings"]
            rows.append({
                "size": s["size"], "command": command, "units": r["units"], "wall_s": r["wall_s"],
                "train_s": r["train_s"], "compile_s": t.get("compile"), "xla_compile_s": t.get("xla_compile"),
                "overhead_s": r["overhead_s"],
                "overhead_ratio": r["overhead_ratio"], "peak_rss_gb": r["peak_rss_gb"],
                "timed_out": r["timed_out"], "running_at_timeout": r["running_at_timeout"],
            })  # fmt: skip
    return rows


def show(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    table = Table(
        title=f"growth: {record['steps']} steps per run, {record['prompts']} prompts × {record['seq']} tokens"
    )
    for column in ("size", "command", "units", "wall s", "train s", "compile s", "rest s", "rest / train", "peak GB"):
        table.add_column(column, justify="right")
    fmt = lambda v, f="{:.1f}": "–" if v is None else f.format(v)  # noqa: E731
    for r in record["rows"]:
        over = r["overhead_ratio"] is not None and r["overhead_ratio"] > TARGET_OVERHEAD_RATIO
        table.add_row(
            r["size"], r["command"], str(r["units"]),
            (">" + fmt(r["wall_s"]) + f" (stopped in {r['running_at_timeout'] or 'training'})") if r["timed_out"]
            else fmt(r["wall_s"]), fmt(r["train_s"]), fmt(r["compile_s"]),
            fmt(r["overhead_s"]), fmt(r["overhead_ratio"], "{:.2f}") + (" (over)" if over else ""),
            fmt(r["peak_rss_gb"], "{:.2f}"),
        )  # fmt: skip
    console.print(table)
    for command, e in record["exponents"].items():
        bits = ", ".join(f"{k.replace('vs_', 'vs ')} {fmt(v, '{:.2f}')}" for k, v in e.items())
        print(f"growth exponent of {command} wall seconds: {bits}")
    if record.get("compile"):
        table = Table(title=f"training-step compile time, d_model {record['compile_width']}")
        for column in ("layers", "units", "kind", "compile s", "steady step s", "peak GB"):
            table.add_column(column, justify="right")
        for r in record["compile"]:
            table.add_row(
                str(r["layers"]), str(r["units"]), r["units_kind"], f"{r['compile_s']:.1f}",
                f"{r['steady_step_s']:.3f}", f"{r['peak_rss_gb']:.2f}",
            )  # fmt: skip
        console.print(table)
        for kind, e in record["compile_exponents"].items():
            print(f"compile time of the {kind} step grows as layers^{fmt(e, '{:.2f}')}")


PHASE_ORDER = ("compile", "train", "repair", "open_restart", "trim", "close", "select", "grade", "evaluate", "save")
# seconds inside another phase: open_restart's (or select's) training steps, select's polishing and
# attacks, and XLA's compiles within every phase
WITHIN = ("open_restart_train", "polish", "select_attacks", "xla_compile")


def plot(record: dict, path: Path) -> None:
    """Seconds per phase against units (log-log, one panel per command) and compile time against layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    sizes = record["sizes"]
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.5))
    for ax, command in zip(axes, COMMANDS, strict=False):
        rows = [s["rows"][command] for s in sizes if command in s["rows"]]
        if not rows:
            ax.set_title(f"{command} (not run)", fontsize=10)
            ax.set_axis_off()
            continue
        units = [r["units"] for r in rows]
        phases = [p for p in PHASE_ORDER if any(p in r["timings"] for r in rows)]
        phases += sorted({p for r in rows for p in r["timings"]} - set(phases))
        for phase in phases:
            ax.plot(units, [r["timings"].get(phase, np.nan) for r in rows], "o-", label=phase)
        timed = [sum(v for k, v in r["timings"].items() if k not in WITHIN) for r in rows]
        other = [np.nan if r["timed_out"] else r["wall_s"] - t for r, t in zip(rows, timed, strict=True)]
        ax.plot(units, other, "x--", color="grey", label="untimed (start, load, ...)")
        ax.plot(units, [r["wall_s"] for r in rows], "s-", color="black", lw=2, label="wall")
        stopped = [(u, r["wall_s"]) for u, r in zip(units, rows, strict=True) if r["timed_out"]]
        if stopped:
            ax.plot(*zip(*stopped, strict=True), "^", color="red", ms=10, label="stopped at the timeout (≥)")
        for u, r in zip(units, rows, strict=True):
            ax.annotate(next(s["size"] for s in sizes if s["rows"].get(command) is r), (u, r["wall_s"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(bottom=max(ax.get_ylim()[0], 1.0))  # phases under a second (save) fall below the panel
        ax.set_xlabel("units")
        ax.set_ylabel("seconds")
        e = record["exponents"][command]["vs_units"]
        ax.set_title(f"{command} (wall ∝ units^{e:.2f})" if e is not None else command, fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[-1]
    for kind, marker in (("dims", "o-"), ("edges", "s-")):
        rows = [r for r in record.get("compile", []) if r["units_kind"] == kind]
        if rows:
            ax.plot([r["layers"] for r in rows], [r["compile_s"] for r in rows], marker, label=f"{kind} step")
        for other, style in (("compile_before", ":"), ("compile_looped", "--")):
            rows = [r for r in record.get(other, {}).get("rows", []) if r["units_kind"] == kind]
            if rows:
                label = f"{kind} step on {record[other]['commit']}" + (" (looped)" if other == "compile_looped" else "")
                xs, ys = [r["layers"] for r in rows], [r["compile_s"] for r in rows]
                ax.plot(xs, ys, marker[0] + style, alpha=0.4, label=label)
    ax.set_xlabel("layers")
    ax.set_ylabel("compile seconds")
    ax.set_title(f"training-step compile time (d_model {record['compile_width']})", fontsize=10)
    if record.get("compile"):
        ax.legend(fontsize=8)
    fig.suptitle(
        f"growth on {record['device']}: {record['steps']} steps, {record['prompts']} prompts × {record['seq']} tokens,"
        f" vocabulary {record['vocab']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- entry point


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help=f"ladder, e.g. {CPU_SIZES} (default; --gpu: {GPU_SIZES})")
    parser.add_argument("--gpu", action="store_true", help="the GPU preset: GPT-2 vocabulary, 320 prompts, edge sweep")
    parser.add_argument("--steps", type=int, default=200, help="training steps of every run (the sweep's first rung)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts (default 128; --gpu 320)")
    parser.add_argument("--seq", type=int, default=16, help="tokens per prompt")
    parser.add_argument("--vocab", type=int, default=None, help=f"vocabulary (default 4096; --gpu {GPT2_VOCAB})")
    parser.add_argument("--sweep-units", choices=("dims", "edges"), default=None, help="default dims; --gpu edges")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commands", default=",".join(COMMANDS), help="which of " + ",".join(COMMANDS))
    parser.add_argument("--timeout", type=float, default=180, help="stop a command after this many seconds (0: never)")
    parser.add_argument("--compile-layers", default="2,4,8,12", help="depths of the compile-time report ('' none)")
    parser.add_argument("--compile-width", type=int, default=128)
    parser.add_argument("--work", type=Path, default=None, help="folder for models, prompts, runs (default: temp)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default results/growth[-gpu].json)")
    parser.add_argument("--compile-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.commands = [c for c in args.commands.split(",") if c]
    unknown = set(args.commands) - set(COMMANDS)
    if unknown:
        parser.error(f"unknown commands {sorted(unknown)}; valid: {','.join(COMMANDS)}")
    if args.sizes is None:  # '' is no size at all (the compile report alone)
        args.sizes = GPU_SIZES if args.gpu else CPU_SIZES
    args.prompts = args.prompts or (320 if args.gpu else 128)
    args.vocab = args.vocab or (GPT2_VOCAB if args.gpu else 4096)
    args.sweep_units = args.sweep_units or ("edges" if args.gpu else "dims")
    return args


def measure(args: argparse.Namespace, work: Path) -> dict:
    import jax

    sizes = []
    for name in [s for s in args.sizes.split(",") if s]:
        sizes.append(run_size(name, args, work))
    compiles = []
    for layers in [int(x) for x in args.compile_layers.split(",") if x]:
        for kind in ("dims", "edges"):
            print(f"[compile] {layers} layers, {kind} ...", file=sys.stderr, flush=True)
            compiles.append(compile_row(layers, args.compile_width, kind, args))
    compile_exponents = {}
    for kind in ("dims", "edges"):
        rows = [r for r in compiles if r["units_kind"] == kind]
        compile_exponents[kind] = fit_exponent([r["layers"] for r in rows], [r["compile_s"] for r in rows])
    return {
        "device_platform": jax.devices()[0].platform,
        "steps": args.steps,
        "prompts": args.prompts,
        "seq": args.seq,
        "vocab": args.vocab,
        "sweep_units": args.sweep_units,
        "sweep_ablations": "",
        "flops_formula": "forward FLOPs per prompt = 2·P·S + 4·L·S²·d_model; forward_flops = that × prompts",
        "sizes": sizes,
        "rows": flat_rows(sizes),
        "exponents": exponents(sizes),
        "compile_width": args.compile_width,
        "compile": compiles,
        "compile_exponents": compile_exponents,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.compile_worker:
        layers, width, units = args.compile_worker.split(",")
        print(json.dumps(compile_worker(int(layers), int(width), units, args)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from _results import RESULTS_DIR, write_record

    started = time.perf_counter()
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        record = measure(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="growth-") as work:
            record = measure(args, Path(work))
    record["seconds"] = round(time.perf_counter() - started, 1)
    import jax

    record["device"] = str(jax.devices()[0])
    show(record)
    gpu = record["device_platform"] != "cpu"
    path = args.out or RESULTS_DIR / ("growth-gpu.json" if gpu else "growth.json")
    settings = argparse.Namespace(**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    del settings.compile_worker, settings.work, settings.out
    fields = {k: v for k, v in record.items() if k not in ("device",)}
    write_record(
        path,
        settings,
        **fields,
        target_overhead_ratio=TARGET_OVERHEAD_RATIO,
        target_exponent_flops=TARGET_EXPONENT_FLOPS,
    )
    plot(record, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
