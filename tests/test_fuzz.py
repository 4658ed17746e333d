"""Fuzzing: corrupted configs, prompts, model folders and run folders thrown at every loader and command.

The property, everywhere: the outcome is success or an ``ExplainerError`` (exit status 2 with an
``error: ...`` line, or a usage error from the argument parser), never another exception; and a
command that fails leaves every run folder it was pointed at exactly as it was. Commands run
in-process (``explainer.cli.main(argv)``) so that hundreds of inputs fit in well under a minute.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import struct
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import explainer
from explainer.cli import main
from explainer.errors import ExplainerError
from explainer.explanation import load
from explainer.models import load_model
from explainer.tasks import resolve_task
from explainer.train.config import flat_names
from explainer.train.config_files import load_config
from explainer.zoo import resolve_model

FAST = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
TRAIN_FAST = ["--steps", "3", "--adversary", "none", "--no-progress", "--checkpoint-every", "2"]


def run_cli(*args) -> tuple[int, str]:
    """Run one command in-process: its exit status and stderr. Any other exception propagates."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    return code, stderr.getvalue()


def digest(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def check_command(*args, watch: tuple[Path, ...] = ()) -> int:
    """The fuzzing property for one command line."""
    before = [digest(w) for w in watch]
    code, err = run_cli(*args)
    assert code in (0, 2), err
    assert "Traceback" not in err, err
    if code == 2:
        assert err.startswith("error: ") or "Usage:" in err or "─ Error ─" in err, err  # ours, or a usage error
        assert [digest(w) for w in watch] == before, "a failed command changed a run folder"
    return code


def fresh(root: Path, name: str) -> Path:
    return root / f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def good_run(root):
    """A small finished run (and the copy of the model it explains)."""
    model = root / "model"
    shutil.copytree(resolve_model("planted-distractor"), model)
    run = root / "run"
    explainer.explain(model, adversary="none", steps=40, progress=False, out=run)
    return run


# --- configs -------------------------------------------------------------------------------------

VALUES = st.one_of(
    st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.booleans(),
    st.lists(st.integers(-2, 5), max_size=2),
    st.sampled_from([2**40, -(2**63), 2**64, 1e308, "resample", "mean", ["unembed.in"], ["blocks.9.mlp.in"]]),
)
KEYS = st.sampled_from([*flat_names(), "stpes", "lambda", "Steps", "train", "optimiser", "penalty", "units"])


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan" if value != value else ("inf" if value > 0 else "-inf") if abs(value) == float("inf") else repr(value)
        )
    if isinstance(value, (int, str)):
        return json.dumps(value)
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


@st.composite
def config_texts(draw) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=60))
    table = draw(st.dictionaries(KEYS, VALUES, max_size=4))
    lines = [f"{k} = {toml_value(v)}" for k, v in table.items()]
    if draw(st.booleans()):
        lines.insert(0, "[train]")
    text = "\n".join(lines)
    if draw(st.booleans()) and text:  # truncate mid-line
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode()


@settings(max_examples=200, **FAST)
@given(text=config_texts())
def test_config_loader(root, text):
    path = fresh(root, "c")
    path.write_bytes(text)
    try:
        load_config(path)
    except ExplainerError as err:
        assert str(err)


@settings(max_examples=40, **FAST)
@given(text=config_texts())
def test_train_with_a_corrupt_config(root, text):
    path, out = fresh(root, "c"), fresh(root, "r")
    path.write_bytes(text)
    try:
        load_config(path)
    except ExplainerError:
        code = check_command("train", "--model", "planted-distractor", "--config", path, "--out", out, *TRAIN_FAST)
        assert code == 2 and not out.exists()
    # valid configs train (seconds each): extreme ones are in test_extreme_but_valid_settings


@pytest.mark.parametrize("setting", ["lr = 1e30", "init_logit = -1e30\nlam = 1e30"])
def test_extreme_but_valid_settings(root, setting):
    path, out = fresh(root, "c"), fresh(root, "r")
    path.write_text(setting)
    code = check_command("train", "--model", "planted-distractor", "--config", path, "--out", out, *TRAIN_FAST)
    assert (code == 0) == (out / "explanation.json").is_file()


# --- prompts -------------------------------------------------------------------------------------

BASE_PROMPT = {"clean": [1, 2, 3], "corrupt": [3, 2, 1], "answers": [1], "wrong_answers": [2]}
JUNK = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=3),
    st.lists(st.integers(-5, 2**40), max_size=4),
    st.lists(st.floats(), max_size=2),
)


@st.composite
def prompts_files(draw) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=80))
    prompts = [dict(BASE_PROMPT) for _ in range(draw(st.integers(0, 4)))]
    for p in prompts:
        for key in list(p):
            choice = draw(st.integers(0, 5))
            if choice == 0:
                del p[key]
            elif choice == 1:
                p[key] = draw(JUNK)
        if draw(st.integers(0, 6)) == 0:
            p[draw(st.text(max_size=4))] = 1
    data = {"prompts": prompts} if kind != 3 else draw(JUNK)
    text = json.dumps(data)
    if draw(st.integers(0, 4)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode()


@settings(max_examples=200, **FAST)
@given(data=prompts_files())
def test_prompts_loader(root, good_run, data):
    path = fresh(root, "p").with_suffix(".json")
    path.write_bytes(data)
    try:
        resolve_task(path).check(load_model(root / "model").config)
    except ExplainerError as err:
        assert str(err)


@settings(max_examples=20, **FAST)
@given(data=prompts_files())
def test_eval_with_corrupt_prompts(root, good_run, data):
    path = fresh(root, "p").with_suffix(".json")
    path.write_bytes(data)
    check_command("eval", good_run, "--task", path, watch=(good_run,))


# --- model folders -------------------------------------------------------------------------------


def _tensors_blob(blob: bytes) -> tuple[dict, int]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + n]), 8 + n


@st.composite
def model_corruptions(draw):
    """A function that corrupts a copy of a model folder, and its description."""
    kind = draw(st.sampled_from(["truncate", "flip", "shape", "nan", "drop", "extra", "config", "dtype"]))
    seed = draw(st.integers(0, 2**31))

    def corrupt(folder: Path) -> None:
        from safetensors.numpy import load_file, save_file

        rng = np.random.default_rng(seed)
        weights = folder / "model.safetensors"
        blob = bytearray(weights.read_bytes())
        if kind == "truncate":
            weights.write_bytes(bytes(blob[: rng.integers(0, len(blob))]))
            return
        if kind == "flip":
            _, start = _tensors_blob(bytes(blob))
            for _ in range(rng.integers(1, 4)):
                at = rng.integers(0, start) if rng.random() < 0.5 else rng.integers(0, len(blob))
                blob[at] ^= 1 << rng.integers(0, 8)
            weights.write_bytes(bytes(blob))
            return
        if kind == "config":
            cfg = json.loads((folder / "config.json").read_text())
            key = sorted(cfg)[rng.integers(0, len(cfg))]
            cfg[key] = [None, -1, 0, 10**9, "x", 2.5, [], True][rng.integers(0, 8)]
            (folder / "config.json").write_text(json.dumps(cfg))
            return
        tensors = load_file(str(weights))
        name = sorted(tensors)[rng.integers(0, len(tensors))]
        if kind == "shape":
            tensors[name] = np.zeros((*tensors[name].shape, 2), np.float32)
        elif kind == "nan":
            tensors[name] = tensors[name].copy()
            tensors[name].flat[rng.integers(0, tensors[name].size)] = [np.nan, np.inf, -np.inf][rng.integers(0, 3)]
        elif kind == "drop":
            del tensors[name]
        elif kind == "extra":
            tensors["blocks.7.attn.W_Q"] = np.zeros(3, np.float32)
        elif kind == "dtype":
            tensors[name] = tensors[name].astype([np.int32, np.float16, np.float64, np.uint8][rng.integers(0, 4)])
        save_file(tensors, str(weights))

    return kind, corrupt


@settings(max_examples=150, **FAST)
@given(corruption=model_corruptions())
def test_model_loader(root, corruption):
    kind, corrupt = corruption
    folder = fresh(root, "m")
    shutil.copytree(resolve_model("planted-distractor"), folder)
    corrupt(folder)
    try:
        load_model(folder)
    except ExplainerError as err:
        assert str(err)
    else:
        assert kind in ("flip", "dtype", "config"), kind  # those may leave a valid model


@settings(max_examples=20, **FAST)
@given(corruption=model_corruptions())
def test_train_and_eval_with_a_corrupt_model(root, good_run, corruption):
    _, corrupt = corruption
    folder, out = fresh(root, "m"), fresh(root, "r")
    shutil.copytree(resolve_model("planted-distractor"), folder)
    corrupt(folder)
    try:
        load_model(folder)
        loads = True
    except ExplainerError:
        loads = False
    if not loads:  # training a model that loads can be slow; its failures are covered above
        assert check_command("train", "--model", folder, "--out", out, *TRAIN_FAST) == 2
        assert not out.exists()
    # the run's own model corrupted under it: eval, attack and show refuse or still work, run untouched
    run = fresh(root, "run")
    shutil.copytree(good_run, run)
    model = root / "model"
    saved = {p.name: p.read_bytes() for p in model.iterdir()}
    try:
        corrupt(model)
        for command in (["eval", run], ["attack", run, "--method", "greedy"], ["show", run]):
            check_command(*command, watch=(run,))
    finally:
        for name, data in saved.items():
            (model / name).write_bytes(data)


# --- run folders ---------------------------------------------------------------------------------


@st.composite
def run_corruptions(draw):
    target = draw(st.sampled_from(["explanation.json", "explanation.safetensors", "history.json"]))
    how = draw(st.sampled_from(["truncate", "flip", "value", "delete"]))
    seed = draw(st.integers(0, 2**31))
    junk = draw(JUNK)
    return target, how, seed, junk


def corrupt_run(run: Path, target: str, how: str, seed: int, junk) -> None:
    rng = np.random.default_rng(seed)
    path = run / target
    blob = bytearray(path.read_bytes())
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(bytes(blob[: rng.integers(0, len(blob))]))
    elif how == "flip" or target.endswith(".safetensors"):
        for _ in range(rng.integers(1, 4)):
            blob[rng.integers(0, len(blob))] ^= 1 << rng.integers(0, 8)
        path.write_bytes(bytes(blob))
    else:
        data = json.loads(blob)

        def poke(node, depth=0):
            if isinstance(node, dict) and node:
                key = sorted(node)[rng.integers(0, len(node))]
                if depth < 2 and rng.random() < 0.5:
                    poke(node[key], depth + 1)
                else:
                    node[key] = junk

        poke(data)
        path.write_text(json.dumps(data))


@settings(max_examples=150, **FAST)
@given(corruption=run_corruptions())
def test_run_loader(root, good_run, corruption):
    run = fresh(root, "run")
    shutil.copytree(good_run, run)
    corrupt_run(run, *corruption)
    try:
        load(run)
    except ExplainerError as err:
        assert str(err)


@settings(max_examples=25, **FAST)
@given(corruption=run_corruptions(), command=st.sampled_from(["eval", "attack", "show"]))
def test_commands_on_a_corrupt_run(root, good_run, corruption, command):
    run = fresh(root, "run")
    shutil.copytree(good_run, run)
    corrupt_run(run, *corruption)
    extra = ["--method", "greedy"] if command == "attack" else []
    check_command(command, run, *extra, watch=(run,))
    # a new training may never replace it unless asked
    code = check_command("train", "--model", "planted-distractor", "--out", run, *TRAIN_FAST, watch=(run,))
    assert code == 2


# --- command lines -------------------------------------------------------------------------------

TOKENS = st.sampled_from(
    [
        "--steps", "-3", "0", "x", "--seed", "-1", "99999999999999999999999", "--lambda", "nan", "-0.5",
        "--target-size", "--kl-budget", "--ablation", "mean", "resampel", "--adversary", "lerned",
        "--task", "nope.json", "first-class", "--model", "planted-jiont", "--config", "--json", "--budget",
        "--method", "greedyy", "--divergence", "--resume", "--out", "--checkpoint-every", "",
    ]
)  # fmt: skip


@settings(max_examples=60, **FAST)
@given(
    command=st.sampled_from(["train", "eval", "attack", "show"]),
    tokens=st.lists(TOKENS, max_size=6),
    real_run=st.booleans(),
)
def test_random_command_lines(root, good_run, command, tokens, real_run):
    args = [*command.split(), *tokens]
    if command == "train":
        args += ["--out", fresh(root, "r"), *TRAIN_FAST]
    if command in ("eval", "attack", "show"):
        args[1:1] = [good_run if real_run else fresh(root, "missing")]
    if command == "attack":
        args[2:2] = ["--method", "greedy"]
    check_command(*args, watch=(good_run,))
