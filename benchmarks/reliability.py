"""Reliability: bad inputs, kill-and-resume trials, and the cost of checkpoints and fault checks.

1. **Bad inputs.** Seeded corruptions of every input kind are run through the commands in-process
   (``explainer.cli.main(argv)``, the same code as the console script): TOML configs (random
   bytes, unknown keys, wrong types, NaN/inf, out-of-range values, truncation), prompts files
   (random bytes, missing keys, ragged or huge token ids, truncated JSON), model folders (truncated
   or bit-flipped safetensors, wrong shapes, dropped/extra tensors, NaN weights, wrong dtypes,
   config fields that disagree with the weights, pickled weights) and run folders (truncated,
   bit-flipped or edited files), plus random command lines. Each outcome is counted as a clear
   error (exit 2 with ``error: ...`` or a usage error), a success (the corruption left a valid
   input), or an uncaught traceback (must be 0). Every run folder a command was pointed at is
   hashed before and after: a failed command that changed one counts (must be 0).
2. **Kill and resume.** ``explainer train`` in a subprocess is killed with SIGKILL at a random
   moment after its first checkpoint, resumed with ``--resume``, and compared byte for byte with an
   uninterrupted run of the same seed (``explanation.safetensors``, ``explanation.json``, and
   ``history.json`` without its ``seconds``).
3. **Overhead.** Seconds per step of the loop without fault checks (the plain jitted step, its
   metrics fetched once at the end) against the loop's fault-checked step (metrics fetched and
   checked every 50 steps), best of five interleaved repeats, and the seconds of one checkpoint
   save (``planted-joint`` with the learned adversary: a step of about a millisecond, the worst case
   for a fixed per-step cost).

Run with ``python benchmarks/reliability.py`` (``--quick``: fewer inputs and one trial). It prints
a table and writes ``benchmarks/results/reliability.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _results import RESULTS_DIR, write_record
from rich.console import Console
from rich.table import Table

from explainer.cli import main as cli_main
from explainer.zoo import resolve_model

RESULTS = RESULTS_DIR / "reliability.json"
MODEL = "planted-distractor"
TRAIN_FAST = ["--steps", "3", "--adversary", "none", "--no-progress", "--checkpoint-every", "2"]


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")) if folder.exists() else []:
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


class Tally:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, int]] = {}
        self.examples: list[str] = []

    def run(self, kind: str, args: list, watch: tuple[Path, ...] = ()) -> None:
        row = self.rows.setdefault(kind, {"tried": 0, "clear_errors": 0, "ok": 0, "tracebacks": 0, "changed": 0})
        row["tried"] += 1
        before = [digest(w) for w in watch]
        stderr = io.StringIO()
        code = 0
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                cli_main([str(a) for a in args])
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            except Exception as err:  # an uncaught exception: what must never happen
                code = -1
                self.examples.append(f"{kind}: {' '.join(map(str, args))}: {type(err).__name__}: {err}")
        text = stderr.getvalue()
        clear = code == 2 and (text.startswith("error: ") or "Usage:" in text or "─ Error ─" in text)
        row["clear_errors"] += clear
        row["ok"] += code == 0
        row["tracebacks"] += not (clear or code == 0)
        if code != 0 and [digest(w) for w in watch] != before:
            row["changed"] += 1
            self.examples.append(f"{kind}: a failed command changed {watch}")


# --- corruptions -----------------------------------------------------------------------------------

JUNK = [None, -1, 0, 2**40, -(2**70), 1.5, float("nan"), "x", [], [1, "a"], {"a": 1}, True]


def toml_text(rng: random.Random, names: list[str]) -> str:
    if rng.random() < 0.2:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40))).decode("latin-1")
    values = ["nan", "inf", "-inf", "-1", "0", "1e308", "99999999999", '"x"', "true", "[1, 2]", '"resampel"', "0.5"]
    keys = [*names, "stpes", "lambda", "Steps"]
    text = "\n".join(f"{rng.choice(keys)} = {rng.choice(values)}" for _ in range(rng.randint(1, 3)))
    return text[: rng.randint(0, len(text))] if rng.random() < 0.2 else text


def prompts_text(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40))).decode("latin-1")
    prompts = []
    for _ in range(rng.randint(0, 4)):
        p = {"clean": [1, 2, 3], "corrupt": [3, 2, 1], "answers": [1], "wrong_answers": [2]}
        for key in list(p):
            roll = rng.random()
            if roll < 0.15:
                del p[key]
            elif roll < 0.35:
                p[key] = rng.choice([*JUNK, [1, 2], [2**40], [-4, 1, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
        prompts.append(p)
    text = json.dumps({"prompts": prompts} if rng.random() < 0.9 else rng.choice(JUNK))
    return text[: rng.randint(0, len(text))] if rng.random() < 0.2 else text


def corrupt_model(folder: Path, rng: random.Random) -> None:
    from safetensors.numpy import load_file, save_file

    weights = folder / "model.safetensors"
    kind = rng.choice(["truncate", "flip", "shape", "nan", "drop", "extra", "config", "dtype", "pickle"])
    blob = bytearray(weights.read_bytes())
    if kind == "truncate":
        weights.write_bytes(bytes(blob[: rng.randrange(len(blob))]))
    elif kind == "flip":
        header = 8 + struct.unpack("<Q", blob[:8])[0]
        for _ in range(rng.randint(1, 3)):
            blob[rng.randrange(header if rng.random() < 0.7 else len(blob))] ^= 1 << rng.randrange(8)
        weights.write_bytes(bytes(blob))
    elif kind == "config":
        cfg = json.loads((folder / "config.json").read_text())
        cfg[rng.choice(sorted(cfg))] = rng.choice([*JUNK, 3, 64])
        (folder / "config.json").write_text(json.dumps(cfg))
    elif kind == "pickle":
        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95" + bytes(20))
    else:
        tensors = load_file(str(weights))
        name = rng.choice(sorted(tensors))
        if kind == "shape":
            tensors[name] = np.zeros((*tensors[name].shape, 2), np.float32)
        elif kind == "nan":
            tensors[name] = tensors[name].copy()
            tensors[name].flat[rng.randrange(tensors[name].size)] = rng.choice([np.nan, np.inf])
        elif kind == "drop":
            del tensors[name]
        elif kind == "extra":
            tensors["blocks.5.mlp.W_in"] = np.zeros(2, np.float32)
        else:
            tensors[name] = tensors[name].astype(rng.choice([np.int32, np.uint8]))
        save_file(tensors, str(weights))


def corrupt_run(run: Path, rng: random.Random) -> None:
    path = run / rng.choice(["explanation.json", "explanation.safetensors", "history.json"])
    blob = bytearray(path.read_bytes())
    how = rng.choice(["truncate", "flip", "edit", "delete"])
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(bytes(blob[: rng.randrange(len(blob))]))
    elif how == "flip" or path.suffix == ".safetensors":
        for _ in range(rng.randint(1, 3)):
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(blob))
    else:
        data = json.loads(blob)
        key = rng.choice(sorted(data))
        if isinstance(data[key], dict) and data[key] and rng.random() < 0.6:
            data[key][rng.choice(sorted(data[key]))] = rng.choice(JUNK)
        else:
            data[key] = rng.choice(JUNK)
        path.write_text(json.dumps(data))


TOKENS = [
    "--steps", "-3", "0", "x", "--seed", "-1", "99999999999999999999999", "--lambda", "nan", "-0.5",
    "--target-size", "--kl-budget", "--ablation", "mean", "resampel", "--adversary", "lerned", "--task",
    "nope.json", "first-class", "--model", "planted-jiont", "--json", "--budget", "--method", "greedyy",
    "--divergence", "--resume", "--checkpoint-every", "",
]  # fmt: skip


def bad_inputs(tally: Tally, work: Path, n: int, seed: int) -> None:
    from explainer.train.config import flat_names

    rng = random.Random(seed)
    model = work / "model"
    shutil.copytree(resolve_model(MODEL), model)
    good = work / "good-run"
    tally.run(
        "setup", ["train", "--model", model, "--out", good, "--steps", "40", "--adversary", "none", "--no-progress"]
    )
    for i in range(n):
        path, out = work / f"c{i}.toml", work / f"r{i}"
        path.write_text(toml_text(rng, flat_names()), encoding="latin-1")
        tally.run("config", ["train", "--model", MODEL, "--config", path, "--out", out, *TRAIN_FAST])
        path = work / f"p{i}.json"
        path.write_text(prompts_text(rng), encoding="latin-1")
        tally.run("prompts", ["eval", good, "--task", path], watch=(good,))
        folder = work / f"m{i}"
        shutil.copytree(resolve_model(MODEL), folder)
        corrupt_model(folder, rng)
        tally.run("model folder", ["train", "--model", folder, "--out", work / f"mr{i}", *TRAIN_FAST])
        run = work / f"run{i}"
        shutil.copytree(good, run)
        corrupt_run(run, rng)
        command = rng.choice([["eval", run], ["show", run], ["attack", run, "--method", "greedy"]])
        tally.run("run folder", command, watch=(run,))
        tally.run("run folder", ["train", "--model", MODEL, "--out", run, *TRAIN_FAST], watch=(run,))
        command = rng.choice(["train", "eval", "attack", "show"])
        args = [command, *(rng.choice(TOKENS) for _ in range(rng.randint(0, 5)))]
        if command == "train":
            args += ["--out", work / f"cl{i}", *TRAIN_FAST]
        else:
            args[1:1] = [good, *(["--method", "greedy"] if command == "attack" else [])]
        tally.run("command line", args, watch=(good,))
    del tally.rows["setup"]


# --- kill and resume -------------------------------------------------------------------------------


def kill_and_resume(work: Path, seed: int, rng: random.Random) -> dict:
    args = ["--model", MODEL, "--steps", "1500", "--checkpoint-every", "100", "--seed", str(seed), "--no-progress"]
    killed, whole = work / f"killed-{seed}", work / f"whole-{seed}"
    base = [sys.executable, "-m", "explainer.cli", "train", *args]
    with subprocess.Popen([*base, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as p:
        folder = killed.with_name(killed.name + ".partial") / "checkpoints"
        while p.poll() is None and not any(folder.glob("step-*.safetensors")):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        p.send_signal(signal.SIGKILL)
    if killed.exists():
        return {"seed": seed, "killed": False}
    at = max(int(f.stem.split("-")[1]) for f in folder.glob("step-*.safetensors"))
    resumed = subprocess.run([*base[:4], "--resume", str(killed), "--no-progress"], capture_output=True, text=True)
    subprocess.run([*base, "--out", str(whole)], capture_output=True, check=True)

    def history(run: Path) -> dict:
        data = json.loads((run / "history.json").read_text())
        data.pop("seconds")
        return data

    same = resumed.returncode == 0 and all(
        (killed / f).read_bytes() == (whole / f).read_bytes() for f in ("explanation.safetensors", "explanation.json")
    )
    return {
        "seed": seed,
        "killed": True,
        "resumed_from_step": at,
        "identical": same and history(killed) == history(whole),
    }


# --- overhead --------------------------------------------------------------------------------------


def overhead(steps: int, work: Path) -> dict:
    import jax
    import optax

    from explainer.faults import History, checked_step
    from explainer.models import load_model
    from explainer.runs import save_checkpoint
    from explainer.scrub import Scrubber
    from explainer.tasks import resolve_task
    from explainer.train.config import TrainConfig
    from explainer.train.step import init_state, make_step

    folder = resolve_model("planted-joint")
    data = resolve_task(None, folder).train_data()
    scrubber = Scrubber.build(load_model(folder), data)
    config = TrainConfig()
    optimizer = optax.adam(config.optimiser.lr)
    from adversary.learned import make_adversary

    adversary = make_adversary("learned")
    plain, _ = make_step(scrubber, data, config, optimizer, adversary)
    checked, names = checked_step(make_step(scrubber, data, config, optimizer, adversary)[0])

    def timed(step, checked: bool) -> float:
        """Seconds per step; without checks, the history is fetched once at the end (the old loop)."""
        state = init_state(scrubber, config, optimizer, adversary)
        state, _ = step(state)
        jax.block_until_ready(state)
        started = time.perf_counter()
        history, records = History({}, names), []
        for i in range(steps):
            state, metrics = step(state)
            if checked:
                history.append(metrics)
                if (i + 1) % 50 == 0:
                    history.flush()
            else:
                records.append(metrics)
        jax.device_get(records)
        history.flush()
        jax.block_until_ready(state)
        return (time.perf_counter() - started) / steps

    runs = [(timed(plain, False), timed(checked, True)) for _ in range(5)]  # interleaved, best of five
    plain_s, checked_s = min(r[0] for r in runs), min(r[1] for r in runs)
    state = init_state(scrubber, config, optimizer, adversary)
    history = {"kl": [0.0] * 1500, "size": [0.0] * 1500}
    started = time.perf_counter()
    for i in range(10):
        save_checkpoint(work / "ckpt", state, i + 1, history)
    save_s = (time.perf_counter() - started) / 10
    return {
        "model": "planted-joint",
        "plain_step_s": plain_s,
        "checked_step_s": checked_s,
        "fault_check_overhead": checked_s / plain_s - 1,
        "checkpoint_save_s": save_s,
        "checkpoint_overhead_per_step_at_default": save_s / config.runtime.checkpoint_every / plain_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=40, help="rounds of bad inputs (six commands per round)")
    parser.add_argument("--trials", type=int, default=3, help="kill-and-resume trials")
    parser.add_argument("--steps", type=int, default=300, help="steps per overhead timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="10 rounds, 1 trial")
    args = parser.parse_args(argv)
    if args.quick:
        args.inputs, args.trials = 10, 1
    console = Console()
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bad_inputs(tally, work, args.inputs, args.seed)
        rng = random.Random(args.seed)
        trials = [kill_and_resume(work, seed, rng) for seed in range(args.trials)]
        cost = overhead(args.steps, work)

    table = Table(title="bad inputs")
    for column in ("input", "tried", "clear errors", "accepted", "uncaught tracebacks", "run folders changed"):
        table.add_column(column, justify="right")
    total = {
        k: sum(r[k] for r in tally.rows.values()) for k in ("tried", "clear_errors", "ok", "tracebacks", "changed")
    }
    for kind, r in [*tally.rows.items(), ("total", total)]:
        table.add_row(kind, *(str(r[k]) for k in ("tried", "clear_errors", "ok", "tracebacks", "changed")))
    console.print(table)
    for line in tally.examples[:10]:
        console.print(f"  [red]{line}[/]", highlight=False)
    killed = [t for t in trials if t["killed"]]
    identical = sum(t["identical"] for t in killed)
    console.print(
        f"kill/resume trials: {len(killed)} killed (resumed from steps {[t['resumed_from_step'] for t in killed]}), "
        f"{identical} identical outcomes"
    )
    console.print(
        f"overhead ({cost['model']}, min-max step): plain {1e3 * cost['plain_step_s']:.2f} ms/step, "
        f"fault-checked {1e3 * cost['checked_step_s']:.2f} ms/step ({100 * cost['fault_check_overhead']:+.1f}%); "
        f"one checkpoint {1e3 * cost['checkpoint_save_s']:.1f} ms "
        f"({100 * cost['checkpoint_overhead_per_step_at_default']:.2f}% of the steps between two at the default)"
    )
    write_record(
        RESULTS,
        args,
        bad_inputs={"per_input": tally.rows, "total": total, "uncaught_examples": tally.examples},
        kill_resume={"trials": trials, "killed": len(killed), "identical": identical},
        overhead=cost,
    )


if __name__ == "__main__":
    main()
