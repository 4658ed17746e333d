"""Scale: the explainer's min-max step on a GPT-2-small-sized model, with and without remat, in
float32 and bfloat16.

A random GPT-2-small-sized model (12 layers, d_model 768, 12 heads, d_mlp 3072, vocab 50257,
n_ctx 1024; 163M parameters, built in memory, never saved) on random prompts (``--prompts``
prompts of ``--seq`` tokens, random counterfactuals and answers) at batch ``--batch-size``.
For each ``--dtypes`` entry (the model's weights and activations, ``--dtype``; gates and losses stay
float32) and each setting of ``remat`` (``jax.checkpoint`` per block) it measures:

- **plain**: one jitted forward + backward of the mean cross-entropy of the last-position logits
  with respect to every parameter, plus an adam update of them (``benchmarks/speed.py``'s plain
  step, on the same batch, with the same ``remat``);
- **min-max**: one step of the explainer's loop as :func:`explainer.train.step.train_gates` builds it,
  default settings (KL budget, resample ablation, every site) with the learned adversary in the
  loop (``n_adv = 1``, two restarts);
- **compile**: seconds of the first call beyond one steady step (tracing + XLA compilation);
- **peak RSS**: ``ru_maxrss`` of a fresh process that builds the model and runs only that step,
  and the peak while training alone (``VmHWM`` reset after the model is built).

Each (step, remat, dtype) runs in its own subprocess for the memory figures; the step times come
from one more subprocess per ``remat`` and dtype that alternates plain and min-max repeats, so both see the
same machine load. The ratio is min-max / plain; the targets are ratio ≤ 2.5 and peak RSS ≤ 6 GB
with remat. On a GPU the same script also reports the peak accelerator memory (``memory_stats``) and
writes ``scale-gpu.json`` instead (its ``device`` says which card); the targets are for the CPU.

Run it with ``make bench``; it prints a table and writes ``benchmarks/results/scale.json``::

    python benchmarks/scale.py --prompts 64 --repeats 3 --steps 1

On a CPU without native bfloat16 matrix units, bfloat16 saves memory but its steps can be slower
than float32's; the table shows both side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS_NAME = "scale.json"
TARGET_RATIO = 2.5
TARGET_RSS_GB = 6.0
GPT2_SMALL = dict(
    n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024, act_fn="gelu_new"
)


def _rss_gb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in GB (Linux)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return float("nan")
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def _max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _device_peak_gb() -> float | None:
    """Peak bytes in use on the first accelerator, in GB (None on the CPU, which reports no stats)."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1e9


def build(args: argparse.Namespace):
    """The random model and the random prompts (both in memory only)."""
    import jax
    import jax.numpy as jnp

    from explainer.models import ModelConfig, cast_model, init_random
    from explainer.tasks.base import Batch

    model = cast_model(init_random(ModelConfig(**GPT2_SMALL), jax.random.key(0)), args.dtype)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
    shape = (args.prompts, args.seq)
    vocab = GPT2_SMALL["d_vocab"]
    data = Batch(
        clean=jax.random.randint(k1, shape, 0, vocab),
        corrupt=jax.random.randint(k2, shape, 0, vocab),
        answers=jax.random.randint(k3, (args.prompts, 1), 0, vocab),
        wrong_answers=jax.random.randint(k4, (args.prompts, 1), 0, vocab),
    )
    return model, data, jnp.arange(args.batch_size) % args.prompts


def minmax_step(model, data, config):
    """The explainer's step with the learned adversary, as ``train_gates`` builds it."""
    import optax

    from adversary.learned import LearnedAdversary
    from explainer.scrub import Scrubber, cache_bytes
    from explainer.train.step import CACHE_LIMIT_BYTES, init_state, make_step

    adversary = LearnedAdversary()
    scrubber = Scrubber.build(model, data, config.units.sites, config.ablation)
    optimizer = optax.adam(config.optimiser.lr)
    step, _ = make_step(scrubber, data, config, optimizer, adversary)
    cached = cache_bytes(scrubber, data)
    info = {"cache_bytes": cached, "cache_used": cached <= CACHE_LIMIT_BYTES, "units": sum(scrubber.n_units.values())}
    return (lambda state: step(state)[0]), init_state(scrubber, config, optimizer, adversary), info


def _sync(state):
    import equinox as eqx
    import jax

    jax.block_until_ready(eqx.filter(state, eqx.is_array))


def _first_call(step, state):
    started = time.perf_counter()
    state = step(state)
    _sync(state)
    return state, time.perf_counter() - started


def _timed(step, state, steps: int):
    """Mean wall seconds and mean CPU seconds (every thread of this process) per step."""
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        state = step(state)
    _sync(state)
    return state, (time.perf_counter() - started) / steps, (time.process_time() - cpu) / steps


def worker(args: argparse.Namespace) -> dict:
    """One configuration in this (fresh) process: ``plain``, ``minmax``, or ``timing`` (both, alternating)."""
    from _plain import plain_step

    from explainer.train.config import TrainConfig

    config = TrainConfig.of(batch_size=args.batch_size, remat=bool(args.remat), dtype=args.dtype)
    import jax

    model, data, index = build(args)
    out: dict = {"build_rss_gb": _rss_gb("VmRSS"), "device": str(jax.devices()[0])}
    steps = {}
    if args.worker in ("plain", "timing"):
        steps["plain"] = plain_step(model, data.take(index), config.optimiser.lr, config.runtime.remat)
    if args.worker in ("minmax", "timing"):
        step, state, info = minmax_step(model, data, config)
        steps["minmax"] = (step, state)
        out.update(info)
    del model
    states, times, cpu = {}, {name: [] for name in steps}, {name: [] for name in steps}
    for name, (step, state) in steps.items():
        states[name], first = _first_call(step, state)
        states[name], one, _ = _timed(step, states[name], 1)
        out[f"{name}_compile_s"] = max(first - one, 0.0)
    for _ in range(args.repeats):
        for name, (step, _) in steps.items():
            states[name], seconds, cpu_seconds = _timed(step, states[name], args.steps)
            times[name].append(seconds)
            cpu[name].append(cpu_seconds)
    for name in steps:
        out[f"{name}_s"] = statistics.median(times[name])
        out[f"{name}_cpu_s"] = statistics.median(cpu[name])
        out[f"{name}_times_s"] = times[name]
    out["peak_rss_gb"] = _max_rss_gb()
    out["device_peak_gb"] = _device_peak_gb()
    return out


def spawn(args: argparse.Namespace, kind: str, remat: bool, dtype: str) -> dict:
    """Run one configuration in a fresh interpreter; its JSON is the last line of its stdout."""
    from _results import cold_env

    command = [sys.executable, __file__, "--worker", kind, "--remat", str(int(remat)), "--dtype", dtype]
    for name in ("prompts", "seq", "batch_size", "repeats", "steps"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=cold_env())
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, remat: bool, dtype: str = "float32") -> dict:
    timing = spawn(args, "timing", remat, dtype)
    plain = spawn(args, "plain", remat, dtype)
    minmax = spawn(args, "minmax", remat, dtype)
    return {
        "remat": remat,
        "dtype": dtype,
        "device": timing["device"],
        "plain_compile_s": plain["plain_compile_s"],
        "minmax_compile_s": minmax["minmax_compile_s"],
        "plain_s": timing["plain_s"],
        "minmax_s": timing["minmax_s"],
        "ratio": timing["minmax_s"] / timing["plain_s"],
        "plain_cpu_s": timing["plain_cpu_s"],
        "minmax_cpu_s": timing["minmax_cpu_s"],
        "cpu_ratio": timing["minmax_cpu_s"] / timing["plain_cpu_s"],
        "plain_peak_rss_gb": plain["peak_rss_gb"],
        "minmax_peak_rss_gb": minmax["peak_rss_gb"],
        "build_rss_gb": minmax["build_rss_gb"],
        "plain_device_peak_gb": plain.get("device_peak_gb"),
        "minmax_device_peak_gb": minmax.get("device_peak_gb"),
        "cache_bytes": minmax["cache_bytes"],
        "cache_used": minmax["cache_used"],
        "units": minmax["units"],
        "times_s": {"plain": timing["plain_times_s"], "minmax": timing["minmax_times_s"]},
    }


def show(rows: list[dict], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"GPT-2-small size, batch {args.batch_size} × seq {args.seq}, {args.prompts} prompts "
        f"(targets with remat: ratio ≤ {TARGET_RATIO}, peak RSS ≤ {TARGET_RSS_GB} GB)"
    )
    table = Table(title=title)
    columns = (
        "dtype",
        "remat",
        "compile s (plain / min-max)",
        "plain s",
        "min-max s",
        "ratio",
        "CPU-time ratio",
        "peak RSS GB (plain / min-max)",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for r in rows:
        over = r["remat"] and (r["ratio"] > TARGET_RATIO)
        big = r["remat"] and (r["minmax_peak_rss_gb"] > TARGET_RSS_GB)
        table.add_row(
            r["dtype"],
            "on" if r["remat"] else "off",
            f"{r['plain_compile_s']:.1f} / {r['minmax_compile_s']:.1f}",
            f"{r['plain_s']:.3f}",
            f"{r['minmax_s']:.3f}",
            f"{r['ratio']:.2f}" + (" (over)" if over else ""),
            f"{r['cpu_ratio']:.2f}",
            f"{r['plain_peak_rss_gb']:.2f} / {r['minmax_peak_rss_gb']:.2f}" + (" (over)" if big else ""),
        )
    Console().print(table)
    for r in rows:
        if r.get("minmax_device_peak_gb") is not None:
            print(
                f"{r['dtype']}, remat {'on' if r['remat'] else 'off'}: peak accelerator memory "
                f"{r['plain_device_peak_gb']:.2f} GB plain / {r['minmax_device_peak_gb']:.2f} GB min-max"
            )
    for r in rows[::2]:  # one per dtype: remat changes neither
        print(
            f"{r['dtype']}: {r['units']} units; reference cache {r['cache_bytes'] / 2**20:.0f} MiB "
            f"({'used' if r['cache_used'] else 'too big, recomputed every step'}); "
            f"RSS after building the model and prompts: {r['build_rss_gb']:.2f} GB; device: {r['device']}"
        )


def versions() -> dict:
    import equinox
    import jax
    import optax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "equinox": equinox.__version__,
        "optax": optax.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="training prompts (the reference cache grows with it)")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    parser.add_argument("--steps", type=int, default=1, help="steps per timed repeat")
    parser.add_argument(
        "--dtypes", default="float32,bfloat16", help="the model's dtypes to compare, comma-separated (--dtype)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default: results/scale.json, or scale-gpu.json on a GPU)"
    )
    parser.add_argument("--worker", choices=("plain", "minmax", "timing"), help=argparse.SUPPRESS)
    parser.add_argument("--remat", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return
    from _results import RESULTS_DIR, write_record

    from explainer.train.config import check_dtype

    dtypes = [check_dtype(d.strip()) for d in args.dtypes.split(",") if d.strip()]
    rows = [measure(args, remat, dtype) for dtype in dtypes for remat in (False, True)]
    show(rows, args)
    import jax

    platform_name = jax.devices()[0].platform
    path = args.out or RESULTS_DIR / (RESULTS_NAME if platform_name == "cpu" else f"scale-{platform_name}.json")
    skip = ("worker", "remat", "dtype", "out")
    settings = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in skip})
    write_record(
        path,
        settings,
        model=GPT2_SMALL,
        versions=versions(),
        target_ratio=TARGET_RATIO,
        target_rss_gb=TARGET_RSS_GB,
        rows=rows,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
