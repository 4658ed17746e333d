"""``--dtype``: the model's weights and activations in bfloat16 (or float16), everything learned,
measured and reported in float32. The suite's strict dtype promotion turns any implicit mixing of
a float32 mask with bfloat16 activations into an error, so these runs also check that every place
where they meet casts explicitly."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import explainer
from explainer.errors import ExplainerError
from explainer.models import cast_model, load_model
from explainer.scrub import Scrubber
from explainer.tasks import resolve_task
from explainer.train.config import TrainConfig
from explainer.train.config_files import load_config
from explainer.zoo import load_truth, resolve_model


def _nonempty(kept):
    return {s: u for s, u in kept.items() if u}


def _float32(explanation) -> None:
    """Gates, history and every reported number are float32 (or plain floats)."""
    assert {str(np.asarray(v).dtype) for v in explanation.gate_logits.values()} == {"float32"}
    for name, values in explanation.history.items():
        arrays = [np.asarray(v) for v in values]
        assert all(a.dtype.kind != "f" or a.dtype == np.float32 or a.dtype == np.float64 for a in arrays), name
    assert all(isinstance(v, float) for v in explanation.faithfulness.values())


def test_the_setting_is_checked_recorded_and_read_from_toml(tmp_path):
    assert TrainConfig().dtype == "float32" and TrainConfig.of(dtype="bfloat16").dtype == "bfloat16"
    assert TrainConfig.of(dtype="bfloat16").to_json()["dtype"] == "bfloat16"
    with pytest.raises(ExplainerError, match="'dtype' must be one of float32, bfloat16, float16, got 'float8'"):
        TrainConfig.of(dtype="float8")
    path = tmp_path / "s.toml"
    path.write_text('dtype = "bfloat16"\n\n[optimiser]\nsteps = 20\n')
    assert load_config(path).dtype == "bfloat16" and load_config(path).optimiser.steps == 20


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_model_scrubs_exactly_at_the_ends(dtype):
    """With every mask one the scrubbed half-precision model is the full one bit for bit; its
    logits reach the losses as float32."""
    folder = resolve_model("planted-joint")
    net, task = load_model(folder, dtype), resolve_task(None, folder)
    assert {str(x.dtype) for x in jax.tree.leaves(net)} == {dtype}
    scrubber = Scrubber.build(net, task.train_data(), ablation="mean")
    batch = task.heldout_data()
    full, repl = scrubber.reference(batch, jax.random.key(0))
    assert full.dtype == jnp.float32 and {str(v.dtype) for v in repl.values()} == {"float32"}  # float32 means
    ones = {s: jnp.ones(n) for s, n in scrubber.n_units.items()}
    assert bool((scrubber.logits(batch.clean, ones, repl) == full).all())
    assert cast_model(net, "float32").W_E.dtype == jnp.float32


@pytest.mark.parametrize("adversary", ["none", "learned"])
def test_bfloat16_finds_the_planted_truth(adversary, tmp_path):
    name = "planted-distractor"
    run = tmp_path / "run"
    e = explainer.explain(name, dtype="bfloat16", adversary=adversary, progress=False, out=run)
    assert _nonempty(e.kept) == _nonempty(load_truth(resolve_model(name)))
    assert e.faithfulness["kl_mean"] <= 0.01 and e.history["traces"] == [1]
    _float32(e)
    assert json.loads((run / "explanation.json").read_text())["config"]["dtype"] == "bfloat16"
    expl, net, _ = explainer.open_run(run)  # a saved run opens in the dtype it records
    assert net.W_E.dtype == jnp.bfloat16 and expl.config["dtype"] == "bfloat16"
    assert explainer.open_run(run, dtype="float32")[1].W_E.dtype == jnp.float32
    if adversary == "none":  # the same units as float32, seed for seed
        same = explainer.explain(name, adversary=adversary, progress=False)
        assert same.kept == e.kept and same.config["dtype"] == "float32"


def test_bfloat16_edges_and_every_command(tmp_path, cli_here):
    run = tmp_path / "edges"
    trained = cli_here(
        "train", "--model", "planted-joint", "--units", "edges", "--dtype", "bfloat16", "--steps", "60",
        "--adversary", "none", "--out", run, "--json", "--no-progress",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    result = json.loads(trained.stdout.strip().splitlines()[-1])
    assert result["config"]["dtype"] == "bfloat16" and result["config"]["units"] == "edges"
    assert np.isfinite(result["faithfulness"]["kl_mean"])
    evaluated = cli_here("eval", run, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["dtype"] == "bfloat16"
    attacked = cli_here("attack", run, "--budget", "1", "--method", "greedy", "--dtype", "float32", "--json")
    assert attacked.returncode == 0, attacked.stderr
    assert json.loads(attacked.stdout.strip().splitlines()[-1])["dtype"] == "float32"


def test_a_bad_dtype_is_refused_naming_the_choices(cli_here, tmp_path):
    run = tmp_path / "run"
    explainer.explain("planted-joint", steps=5, adversary="none", progress=False, out=run)
    for command in (["train", "--model", "planted-joint", "--out", tmp_path / "new"], ["eval", run], ["attack", run]):
        proc = cli_here(*command, "--dtype", "float8")
        assert proc.returncode == 2, proc.stderr
        assert "'dtype' must be one of float32, bfloat16, float16, got 'float8'" in proc.stderr
    assert not (tmp_path / "new").exists()
