"""Reliability: checkpoints and resume, determinism, numerical faults, locks, validation of inputs."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import explainer
from explainer import api, runs
from explainer.errors import ExplainerError
from explainer.runs import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from explainer.train.config import TrainConfig
from explainer.train.config_files import from_dict
from explainer.zoo import resolve_model

TINY = {"model": "planted-distractor", "adversary": "none", "progress": False}


def cli(*args, cwd=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "explainer.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, **kw
    )


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def record_without_timings(record: bytes) -> dict:
    """``explanation.json`` without its ``timings``, which describe the process (seconds per phase)."""
    data = json.loads(record)
    data.pop("timings")
    return data


def without_timing(history: bytes) -> dict:
    """A history without what describes the process rather than the training: its seconds, and how
    often it traced the step (0 when a run killed after its last step resumes with none left)."""
    data = json.loads(history)
    data.pop("seconds")
    data.pop("traces", None)
    return data


# --- checkpoints ---------------------------------------------------------------------------------


def _state(key):
    params = {"w": jnp.arange(3.0), "b": jnp.zeros(())}
    return {
        "params": params,
        "opt": optax.adam(0.1).init(params),
        "key": key,
        "step": jnp.asarray(7, jnp.int32),
        "nothing": None,
    }


def test_checkpoint_roundtrip_keeps_two_and_skips_a_corrupt_one(tmp_path, getkey):
    state = _state(getkey())
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, state, step, history={"kl": [0.5] * step}, meta={"lam": 0.1})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 2]
    ckpt = latest_checkpoint(tmp_path, like=state)
    assert ckpt.step == 3 and ckpt.history == {"kl": [0.5] * 3} and ckpt.meta == {"lam": 0.1}
    for a, b in zip(jax.tree.leaves(ckpt.state), jax.tree.leaves(state), strict=True):
        if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())
    newest = tmp_path / "step-00000003.safetensors"
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0xFF  # a flipped byte inside the tensor data
    newest.write_bytes(bytes(data))
    with pytest.raises(ExplainerError, match="corrupt"):
        load_checkpoint(newest, state)
    assert latest_checkpoint(tmp_path, like=state).step == 2
    newest.write_bytes(bytes(data[:100]))  # truncated
    assert latest_checkpoint(tmp_path, like=state).step == 2


def test_checkpoint_of_another_shape_is_refused(tmp_path, getkey):
    save_checkpoint(tmp_path, _state(getkey()), 1)
    other = {**_state(getkey()), "params": {"w": jnp.arange(4.0), "b": jnp.zeros(())}}
    other["opt"] = optax.adam(0.1).init(other["params"])
    with pytest.raises(ExplainerError, match="other settings"):
        load_checkpoint(tmp_path / "step-00000001.safetensors", other)
    with pytest.raises(ExplainerError, match="no usable checkpoint"):
        latest_checkpoint(tmp_path, like=other)
    assert latest_checkpoint(tmp_path / "empty", like=other) is None


def test_a_vmapped_sweep_state_checkpoints_and_is_checked(tmp_path, getkey):
    """What a sweep saves: a batch of states (one per penalty) with batched keys and 2-D curves."""
    from explainer.faults import History, checked_step

    states = jax.vmap(lambda k: _state(k))(jax.random.split(getkey(), 3))

    def step(state, lam):
        new = {**state, "params": jax.tree.map(lambda p: p - lam, state["params"]), "step": state["step"] + 1}
        return new, {"kl": jnp.sum(new["params"]["w"]) * lam, "size": lam}

    ladder, names = checked_step(jax.vmap(step))
    history = History({}, names)
    lams = jnp.asarray([0.1, 0.2, jnp.inf])
    states, metrics = ladder(states, jnp.asarray([0.1, 0.1, 0.3]))
    history.append(metrics)
    history.flush()
    assert len(history.values["kl"][0]) == 3  # one value per rung
    save_checkpoint(tmp_path, states, 1, history.values, meta={"strategy": "vmap"})
    back = latest_checkpoint(tmp_path, like=states)
    assert back.history == history.values and back.meta == {"strategy": "vmap"}
    assert bool((jax.random.key_data(back.state["key"]) == jax.random.key_data(states["key"])).all())
    history.append(ladder(back.state, lams)[1])
    with pytest.raises(ExplainerError, match=r"step 2: the kl term is -inf \(run 2 of the batch\)"):
        history.flush()


# --- kill and resume -----------------------------------------------------------------------------


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    folder = runs.checkpoint_folder(run)
    deadline = time.monotonic() + timeout
    while not list_checkpoints(folder):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "training ended early"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """A run killed with SIGKILL at a random step after a checkpoint, resumed, ends bit-identical."""
    args = ["--model", "planted-distractor", "--steps", "1500", "--checkpoint-every", "100", "--seed", "3"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    command = [sys.executable, "-m", "explainer.cli", "train", *args, "--out", str(killed), "--no-progress"]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        try:
            _wait_for_checkpoint(killed, proc)
            time.sleep(random.Random().uniform(0.0, 1.0))
        finally:
            proc.send_signal(signal.SIGKILL)
    if killed.exists():  # pragma: no cover - a slow machine finished before the kill
        pytest.skip("training finished before it could be killed")
    steps = [s for s, _ in list_checkpoints(runs.checkpoint_folder(killed))]
    assert steps and runs.lock_path(killed).exists()  # the dead process's lock is left behind
    resumed = cli("train", "--resume", killed, "--no-progress", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert not runs.partial_path(killed).exists() and not runs.lock_path(killed).exists()
    assert cli("train", *args, "--out", whole, "--no-progress").returncode == 0
    a, b = files(killed), files(whole)
    assert a["explanation.safetensors"] == b["explanation.safetensors"], f"resumed from step {steps[0]}"
    assert record_without_timings(a["explanation.json"]) == record_without_timings(b["explanation.json"])
    assert without_timing(a["history.json"]) == without_timing(b["history.json"])


def test_same_seed_same_artifacts(tmp_path):
    for name in ("a", "b"):
        explainer.explain(**TINY, steps=60, checkpoint_every=25, seed=4, out=tmp_path / name)
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a["explanation.safetensors"] == b["explanation.safetensors"]
    assert record_without_timings(a["explanation.json"]) == record_without_timings(b["explanation.json"])
    assert without_timing(a["history.json"]) == without_timing(b["history.json"])
    record = json.loads(a["explanation.json"])
    assert record["seed"] == 4 and {"jax", "equinox", "optax", "numpy", "python"} <= set(record["versions"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no .partial, no .lock left


def test_resume_refuses_conflicts_and_finished_runs(tmp_path):
    run = tmp_path / "r"
    explainer.explain(**TINY, steps=30, checkpoint_every=10, out=run)
    with pytest.raises(ExplainerError, match="has finished"):
        api.resume_run(run)
    proc = cli("train", "--resume", tmp_path / "nowhere")
    assert proc.returncode == 2 and "not an unfinished run" in proc.stderr
    # an unfinished run: what a killed process leaves
    record = {
        "model": api._model_record(resolve_model("planted-distractor")),
        "task": None,
        "config": TrainConfig.of(steps=30, checkpoint_every=10).to_json(),
        "adversary": None,
        "adversary_settings": None,
        "overwrite": False,
    }
    other = tmp_path / "other"
    runs.start(other, record, overwrite=False)
    proc = cli("train", "--resume", other, "--steps", "50", "--model", "planted-distractor")
    assert proc.returncode == 2 and "steps 50 (recorded: 30)" in proc.stderr, proc.stderr
    proc = cli("train", "--model", "planted-distractor", "--out", other)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert cli("train", "--resume", other, "--overwrite").returncode == 2
    e = api.resume_run(other, progress=False, steps=30, model="planted-distractor", adversary="none")
    assert e.config["steps"] == 30 and (other / "explanation.json").is_file()
    assert not runs.partial_path(other).exists()


# --- numerical faults ----------------------------------------------------------------------------


def _poisoned(monkeypatch, at: int, what: str):
    """Make training's step go bad from step ``at`` on: a NaN KL or NaN gate gradients."""
    from explainer.train import step as train

    original = train.make_step

    def make_step(*args, **kwargs):
        step, counter = original(*args, **kwargs)

        def bad(state):
            new, metrics = step(state)
            poison = state.step + 1 >= at
            if what == "kl":
                metrics = {**metrics, "kl": jnp.where(poison, jnp.nan, metrics["kl"])}
            else:
                logits = {s: jnp.where(poison, jnp.inf, v) for s, v in new.gates.logits.items()}
                new = eqx.tree_at(lambda s: s.gates.logits, new, logits)
            return new, metrics

        return bad, counter

    monkeypatch.setattr(train, "make_step", make_step)


@pytest.mark.parametrize("what, message", [("kl", "the kl term is nan"), ("grad", "gate logits")])
def test_a_nan_stops_training_naming_step_and_term(monkeypatch, tmp_path, what, message):
    _poisoned(monkeypatch, 37, what)
    run = tmp_path / "r"
    with pytest.raises(ExplainerError, match=message) as err:
        explainer.explain(**TINY, steps=80, checkpoint_every=20, out=run)
    assert "step 37" in str(err.value) and "step-00000020" in str(err.value)
    assert not run.exists() and not runs.lock_path(run).exists()
    assert [s for s, _ in list_checkpoints(runs.checkpoint_folder(run))] == [20]  # the last good one, kept


def test_a_fault_before_any_checkpoint_leaves_nothing(monkeypatch, tmp_path):
    _poisoned(monkeypatch, 1, "kl")
    with pytest.raises(ExplainerError, match="step 1:"):
        explainer.explain(**TINY, steps=30, out=tmp_path / "r")
    assert list(tmp_path.iterdir()) == []


def test_overflowing_weights_stop_training_with_a_clear_error(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "model"
    model.mkdir()
    source = resolve_model("planted-distractor")
    for name in ("config.json", "prompts.json"):
        (model / name).write_bytes((source / name).read_bytes())
    tensors = load_file(str(source / "model.safetensors"))
    tensors["unembed.W_U"] = np.sign(tensors["unembed.W_U"]) * np.float32(3e38)  # finite, but logits overflow
    save_file(tensors, str(model / "model.safetensors"))
    proc = cli("train", "--model", model, "--steps", "20", "--adversary", "none", "--out", tmp_path / "r")
    assert proc.returncode == 2 and "training stopped at step 1" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


# --- concurrency ---------------------------------------------------------------------------------


def test_a_second_writer_is_refused(tmp_path):
    run = tmp_path / "r"
    with runs.run_lock(run):
        proc = cli("train", "--model", "planted-distractor", "--out", run, "--steps", "20")
        assert proc.returncode == 2 and f"being written by process {os.getpid()}" in proc.stderr
        with pytest.raises(ExplainerError, match="being written"):
            explainer.explain(**TINY, steps=20, out=run)
    assert not runs.lock_path(run).exists() and not run.exists()


def test_a_stale_lock_is_taken_over(tmp_path):
    run = tmp_path / "r"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    runs.lock_path(run).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 0}))
    explainer.explain(**TINY, steps=20, out=run)
    assert (run / "explanation.json").is_file() and not runs.lock_path(run).exists()
    runs.lock_path(run).write_text("")  # a crash between creating and writing the lock
    with pytest.raises(ExplainerError, match="being written"):
        runs.acquire(run)
    old = time.time() - 60
    os.utime(runs.lock_path(run), (old, old))
    runs.release(runs.acquire(run))
    other_host = {"pid": pid, "host": "elsewhere", "started": 0}
    runs.lock_path(run).write_text(json.dumps(other_host))  # another machine's pid is never guessed at
    with pytest.raises(ExplainerError, match="elsewhere"):
        runs.acquire(run)


def test_concurrent_attacks_do_not_collide(tmp_path):
    run = tmp_path / "r"
    explainer.explain(**TINY, steps=60, out=run)
    command = [sys.executable, "-m", "explainer.cli", "attack", str(run), "--method", "greedy"]
    procs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    codes = [(p.wait(240), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    for code, stderr in codes:
        assert code in (0, 2) and "Traceback" not in stderr, stderr
        assert code == 0 or "being written" in stderr
    assert any(code == 0 for code, _ in codes)
    assert json.loads((run / "attack.json").read_text())["method"] == "greedy"
    assert not any(p.name.startswith(".") for p in run.iterdir())


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"lr": float("nan")}, "'lr' must be a finite number"),
        ({"lr": float("inf")}, "'lr' must be a finite number"),
        ({"kl_budget": -1.0}, "'kl_budget' must be a positive number"),
        ({"init_logit": "open"}, "'init_logit' must be a finite number"),
        ({"init_from": "attributions"}, "'init_from' must be one of auto, logit, attribution, integrated_gradients"),
        ({"seed": -1}, "'seed' must be an integer in"),
        ({"seed": 2**70}, "'seed' must be an integer in"),
        ({"steps": 1.5}, "'steps' must be an integer"),
        ({"checkpoint_every": -5}, "'checkpoint_every' must be an integer >= 0"),
        ({"sites": "unembed.in"}, "'sites' must be a list of site names"),
        ({"sites": [1, 2]}, "'sites' must be a list of site names"),
        ({"target_size": True}, "'target_size' must be an integer"),
        ({"adversary_weight": float("inf")}, "'adversary_weight' must be a finite number"),
        ({"stpes": 3}, "did you mean 'steps'"),
    ],
)
def test_out_of_range_settings(settings, message):
    # under the test suite's beartype hook a value of the wrong type fails the type check first
    type_check = f"typechecking parameter '{next(iter(settings))}'"
    with pytest.raises(ExplainerError, match=f"{message}|{type_check}"):
        from_dict(settings)


def test_pickled_weights_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes((resolve_model("planted-distractor") / "config.json").read_bytes())
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    proc = cli("train", "--model", model, "--out", tmp_path / "r")
    assert proc.returncode == 2 and "pickled weights are never loaded" in proc.stderr
    (model / "model.safetensors").write_bytes(pickle.dumps(Payload()))  # a pickle under the safetensors name
    proc = cli("train", "--model", model, "--out", tmp_path / "r")
    assert proc.returncode == 2 and "not a readable safetensors file" in proc.stderr
    assert not marker.exists() and not (tmp_path / "r").exists()


def test_damaged_run_records_are_refused(tmp_path, cli_here):
    run = tmp_path / "r"
    explainer.explain(**TINY, steps=20, out=run)
    record = json.loads((run / "explanation.json").read_text())
    damages = [
        {"model": 3},
        {"task": None},
        {"faithfulness": {"kl_mean": "low"}},
        {"faithfulness": {"kl_mean": 0.1}},
        {"kept": {"unembed.in": [99]}},
        {"config": {**record["config"], "ablation": "resampel"}},
        {"sites": {**record["sites"], "unembed.in": 0}},
    ]
    for damage in damages:
        (run / "explanation.json").write_text(json.dumps({**record, **damage}))
        for command in ("eval", "show", "attack"):
            proc = cli_here(command, run)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, (damage, proc.stderr)
    (run / "explanation.json").write_text(json.dumps(record))
    (run / "history.json").write_text('{"kl": "flat"}')
    proc = cli_here("show", run)
    assert proc.returncode == 2 and "not a training history" in proc.stderr
