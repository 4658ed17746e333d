"""Data parallelism, sharded weights and rematerialisation: the same explanation on 4 devices as on 1,
with and without sharded weights, with and without remat.

The 4-device runs happen in a subprocess started with ``--xla_force_host_platform_device_count=4``,
since JAX fixes its device count when it starts. Both runs of a pair (``devices = 4`` and
``devices = 1``) happen in that one process, so only the device count differs. Sharding changes the
order of the batch-mean reductions, so the gate logits agree to ``LOGIT_ATOL``, not bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from explainer.errors import ExplainerError
from explainer.parallel import data_parallel, distributed_settings, init_distributed, select_devices, weight_spec
from explainer.train.config import TrainConfig
from explainer.train.config_files import from_dict

LOGIT_ATOL = 1e-4
STEPS = 300

FOUR_DEVICES = r"""
import json, sys
import jax
from adversary.learned import make_adversary
from explainer.train.config import TrainConfig
from explainer.train.config_files import from_dict
from explainer.errors import ExplainerError
from explainer.models import load_model
from explainer.zoo import resolve_model
from explainer.scrub import Scrubber
from explainer.tasks import resolve_task
from explainer.train.step import finish, init_state, make_step, train_gates
import optax

steps = int(sys.argv[1])
folder = resolve_model("planted-joint")
model, data = load_model(folder), resolve_task(None, folder).train_data()
out = {"devices": len(jax.devices()), "runs": {}}
for adversary in ("none", "learned"):
    for devices in (4, 1):
        config = TrainConfig.of(steps=steps, devices=devices)
        scrubber = Scrubber.build(model, data, None, config.ablation)
        gates, _, history, _ = train_gates(scrubber, data, config, make_adversary(adversary), progress=False)
        out["runs"][f"{adversary}-{devices}"] = {
            "logits": {s: v.tolist() for s, v in gates.logits.items()},
            "kept": {s: [int(u) for u in v.nonzero()[0]] for s, v in finish(gates, config).items()},
            "traces": history["traces"][0],
            "sharding": str(next(iter(gates.logits.values())).sharding),
        }
config = TrainConfig.of(devices=4)
scrubber = Scrubber.build(model, data)
optimizer = optax.adam(config.optimiser.lr)
step, _ = make_step(scrubber, data, config, optimizer)
state = step.parallel.put_replicated(init_state(scrubber, config, optimizer))
out["hlo_all_reduce"] = "all-reduce" in step.fn.lower(state, step.operands).lowered.compile().as_text()
try:
    make_step(scrubber, data, TrainConfig.of(devices=4, batch_size=30), optimizer)
except ExplainerError as e:
    out["batch_error"] = str(e)
print(json.dumps(out))
"""


def _on_four_devices(script: str, *args) -> dict:
    """Run ``script`` in a fresh interpreter that sees 4 CPU devices; return the JSON it prints last."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def four_devices():
    return _on_four_devices(FOUR_DEVICES, STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("adversary", ["none", "learned"])
def test_four_devices_give_the_one_device_explanation(four_devices, adversary):
    assert four_devices["devices"] == 4
    one, four = four_devices["runs"][f"{adversary}-1"], four_devices["runs"][f"{adversary}-4"]
    assert four["kept"] == one["kept"]
    assert {s: u for s, u in one["kept"].items() if u} == {
        "blocks.0.attn.in": [0],
        "blocks.0.mlp.in": [1, 2],
        "unembed.in": [3],
    }
    for site in one["logits"]:
        np.testing.assert_allclose(four["logits"][site], one["logits"][site], rtol=0, atol=LOGIT_ATOL)
    assert one["traces"] == four["traces"] == 1
    assert "SingleDeviceSharding" in one["sharding"] and "'batch': 4" in four["sharding"]


SHARDED_WEIGHTS = r"""
import json, sys
import jax
from adversary.learned import make_adversary
import explainer
from explainer.errors import ExplainerError
from explainer.models import load_model
from explainer.scrub import Scrubber
from explainer.tasks import resolve_task
from explainer.train.config import TrainConfig
from explainer.train.step import finish, make_step, make_optimizer, train_gates
from explainer.zoo import resolve_model

steps = int(sys.argv[1])
folder = resolve_model("direct")  # d_model 32, d_mlp 64: 4 divides an axis of every weight matrix
model, data = load_model(folder), resolve_task(None, folder).train_data()
out = {"devices": len(jax.devices()), "runs": {}}
for devices, shard in ((4, True), (1, False)):
    config = TrainConfig.of(steps=steps, devices=devices, shard_weights=shard)
    scrubber = Scrubber.build(model, data, None, config.ablation)
    gates, _, history, _ = train_gates(scrubber, data, config, make_adversary("learned"), progress=False)
    out["runs"][str(devices)] = {
        "logits": {s: v.tolist() for s, v in gates.logits.items()},
        "kept": {s: [int(u) for u in v.nonzero()[0]] for s, v in finish(gates, config).items()},
        "traces": history["traces"][0],
    }
config = TrainConfig.of(devices=4, shard_weights=True)
step, _ = make_step(scrubber, data, config, make_optimizer(config))
placed = step.operands[0].model
weights = {"W_E": placed.W_E, "W_U": placed.W_U, "W_Q": placed.blocks[0].attn.W_Q, "W_in": placed.blocks[0].mlp.W_in}
out["shards"] = {k: [list(a.shape), list(a.sharding.shard_shape(a.shape))] for k, a in weights.items()}
out["bias"] = list(placed.b_U.sharding.shard_shape(placed.b_U.shape))
out["caller_model"] = str(model.W_E.sharding)
# training, finishing and scoring end to end: the explanation planted in the model
done = explainer.explain("planted-joint", steps=300, devices=4, shard_weights=True, progress=False)
out["explain"] = {"kept": done.kept, "kl_mean": done.faithfulness["kl_mean"]}
try:  # planted-joint's axes are 10, 2 and 4: 3 divides none of them
    explainer.explain("planted-joint", steps=5, devices=3, batch_size=48, shard_weights=True, progress=False)
except ExplainerError as e:
    out["divides_nothing"] = str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sharded_weights():
    return _on_four_devices(SHARDED_WEIGHTS, 100)


@pytest.mark.slow
def test_sharded_weights_give_the_one_device_explanation(sharded_weights):
    assert sharded_weights["devices"] == 4
    one, four = sharded_weights["runs"]["1"], sharded_weights["runs"]["4"]
    assert four["kept"] == one["kept"] and any(one["kept"].values())
    for site in one["logits"]:
        np.testing.assert_allclose(four["logits"][site], one["logits"][site], rtol=0, atol=LOGIT_ATOL)
    assert one["traces"] == four["traces"] == 1


@pytest.mark.slow
def test_sharded_weights_are_split_across_the_devices(sharded_weights):
    assert sharded_weights["shards"] == {
        "W_E": [[30, 32], [30, 8]],  # along d_model: 4 does not divide the 30-token vocabulary
        "W_U": [[32, 30], [8, 30]],
        "W_Q": [[2, 32, 16], [2, 8, 16]],
        "W_in": [[32, 64], [32, 16]],  # along d_mlp
    }
    assert sharded_weights["bias"] == [30]  # vectors stay whole
    assert "SingleDeviceSharding" in sharded_weights["caller_model"]  # the caller's model is not moved


@pytest.mark.slow
def test_sharded_weights_finish_and_score(sharded_weights):
    explained = sharded_weights["explain"]
    assert explained["kept"] == {"blocks.0.attn.in": [0], "blocks.0.mlp.in": [1, 2], "unembed.in": [3]}
    assert explained["kl_mean"] < 1e-6  # scored on the model as loaded
    message = sharded_weights["divides_nothing"]
    assert "no weight of the model has an axis that 3 divides" in message and "use --devices 4" in message


@pytest.mark.parametrize(
    "shape, n, spec",
    [
        ((50304, 768), 4, ("batch", None)),
        ((768, 50257), 4, ("batch", None)),  # an unembedding whose vocabulary 4 does not divide: along d_model
        ((768, 3072), 8, (None, "batch")),
        ((12, 768, 64), 4, (None, "batch", None)),
        ((12, 64, 64), 4, (None, "batch", None)),  # equal largest axes: the first
        ((10, 10), 4, ()),
        ((3072,), 4, ()),
    ],
)
def test_weight_spec_splits_the_largest_axis_that_divides(shape, n, spec):
    assert tuple(weight_spec(shape, n)) == spec


def test_sharded_weights_on_one_device_name_the_fix():
    with pytest.raises(ExplainerError, match="--shard-weights .* one cpu device; use --devices N with N > 1"):
        data_parallel(1, batch_size=64, shard_weights=True)
    assert TrainConfig.of(shard_weights=True).to_json()["shard_weights"] is True
    with pytest.raises(ExplainerError, match="shard_weights"):
        from_dict({"shard_weights": "yes"})


@pytest.mark.slow
def test_four_devices_split_the_batch(four_devices):
    assert four_devices["hlo_all_reduce"]  # gradients are summed across devices by XLA
    assert "batch_size 30 does not split evenly across 4 devices; use batch_size 32" in four_devices["batch_error"]


def _scrubber(planted_models, remat: bool):
    from explainer.scrub import Scrubber
    from explainer.tasks import resolve_task
    from explainer.zoo import resolve_model

    task = resolve_task(None, resolve_model("planted-joint"))
    scrubber = Scrubber.build(planted_models["planted-joint"], task.train_data())
    return dataclasses.replace(scrubber, remat=remat), task


def test_remat_gives_the_same_logits_and_gradients(planted_models, getkey):
    outs = []
    for remat in (False, True):
        scrubber, task = _scrubber(planted_models, remat)
        batch = task.heldout_data()
        _, repl = scrubber.reference(batch, jax.random.key(0))
        keep = {s: jax.random.uniform(jax.random.key(i), (n,)) for i, (s, n) in enumerate(scrubber.n_units.items())}

        @jax.jit
        def loss(keep, scrubber=scrubber, batch=batch, repl=repl):
            return jax.nn.logsumexp(scrubber.logits(batch.clean, keep, repl), -1).mean()

        outs.append(jax.value_and_grad(loss)(keep))
    (v0, g0), (v1, g1) = outs
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for site in g0:
        np.testing.assert_allclose(g1[site], g0[site], rtol=1e-5, atol=1e-7)


def test_remat_captures_sites_like_the_plain_forward(planted_models):
    model = planted_models["planted-joint"]
    tokens = jnp.zeros((2, model.config.n_ctx), jnp.int32)
    logits, cache = model.run(tokens, capture=model.sites)
    logits_r, cache_r = jax.jit(lambda t: model.run(t, capture=model.sites, remat=True))(tokens)
    assert sorted(cache_r) == sorted(cache) == sorted(model.sites)
    np.testing.assert_allclose(logits_r, logits, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("adversary", ["none", "learned"])
def test_remat_trains_the_same_explanation(adversary):
    import explainer

    plain = explainer.explain("planted-joint", steps=STEPS, adversary=adversary, progress=False)
    remat = explainer.explain("planted-joint", steps=STEPS, adversary=adversary, remat=True, progress=False)
    assert remat.kept == plain.kept
    for site, logits in plain.gate_logits.items():
        np.testing.assert_allclose(remat.gate_logits[site], logits, rtol=0, atol=LOGIT_ATOL)


def test_one_device_is_the_plain_path():
    dp = data_parallel(None, batch_size=7)  # an odd batch is fine on one device
    assert dp.n_devices == 1 and dp.mesh is None
    tree = {"a": jnp.ones(3)}
    assert dp.shard(tree) is tree and dp.replicate(tree) is tree and dp.put_replicated(tree) is tree


def test_more_devices_than_present_names_the_fix():
    n = len(jax.devices()) + 1
    message = f"--devices {n} asks for more devices.*xla_force_host_platform_device_count={n}"
    with pytest.raises(ExplainerError, match=message):
        select_devices(n)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_devices_setting_is_validated(bad):
    with pytest.raises(ExplainerError, match="devices"):
        from_dict({"devices": bad})


def test_remat_setting_is_validated():
    with pytest.raises(ExplainerError, match="remat"):
        from_dict({"remat": "yes"})
    assert TrainConfig.of(remat=True, devices=2).to_json()["devices"] == 2


def test_distributed_settings_from_the_environment():
    env = {"EXPLAINER_COORDINATOR": "10.0.0.1:1234", "EXPLAINER_NUM_PROCESSES": "4", "EXPLAINER_PROCESS_ID": "3"}
    want = {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert distributed_settings(env) == want
    assert distributed_settings({}) is None
    assert distributed_settings({}, requested=True) == {}  # JAX detects the cluster itself
    calls = []
    assert init_distributed(env, initialize=lambda **kw: calls.append(kw)) is True
    assert init_distributed({}, initialize=lambda **kw: calls.append(kw)) is False
    assert calls == [want]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"EXPLAINER_COORDINATOR": "h:1"}, "EXPLAINER_NUM_PROCESSES must be too"),
        ({"EXPLAINER_COORDINATOR": "h:1", "EXPLAINER_NUM_PROCESSES": "2"}, "EXPLAINER_PROCESS_ID must be too"),
        (
            {"EXPLAINER_COORDINATOR": "h:1", "EXPLAINER_NUM_PROCESSES": "two", "EXPLAINER_PROCESS_ID": "0"},
            "must be an integer",
        ),
        ({"EXPLAINER_COORDINATOR": "h:1", "EXPLAINER_NUM_PROCESSES": "2", "EXPLAINER_PROCESS_ID": "2"}, "0..1"),
    ],
)
def test_distributed_settings_errors_name_the_fix(env, message):
    with pytest.raises(ExplainerError, match=message):
        distributed_settings(env)


def test_cli_shard_weights_on_one_device_exits_2_naming_the_fix(tmp_path, capsys):
    from explainer.cli import main

    with pytest.raises(SystemExit) as done:
        main(["train", "--model", "planted-joint", "--devices", "1", "--shard-weights", "--steps", "5",
              "--out", str(tmp_path / "r")])  # fmt: skip
    assert done.value.code == 2
    assert "use --devices N with N > 1 or drop --shard-weights" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_devices_beyond_the_machine_exit_2_naming_the_fix(tmp_path, capsys):
    from explainer.cli import main

    n = len(jax.devices()) + 1
    with pytest.raises(SystemExit) as done:
        main(["train", "--model", "planted-joint", "--devices", str(n), "--steps", "5", "--out", str(tmp_path / "r")])
    assert done.value.code == 2
    assert f"--devices {n} asks for more devices" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
