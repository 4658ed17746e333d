"""Rewrites: an MLP as a fitted f plus a remainder that is one unit (explainer.rewrites)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import explainer
from adversary.discrete import attack
from explainer import rewrites
from explainer.api import evaluate, open_run
from explainer.cli import main
from explainer.errors import ExplainerError
from explainer.models import load_model
from explainer.models.config import ModelConfig
from explainer.models.native import expected_shapes, from_state_dict, init_random, save_model, write_json
from explainer.models.transformer import _norm as rms
from explainer.scrub import Scrubber
from explainer.tasks import resolve_task
from explainer.tasks.planted import first_class_prompts
from explainer.tasks.prompts import prompts_json
from explainer.zoo import resolve_model

LINEAR_TRUTH = {"blocks.0.attn.in": [0], "blocks.0.mlp.in": [1], "blocks.0.mlp.rest": [], "unembed.in": [3]}


@pytest.fixture(scope="module")
def planted_linear(tmp_path_factory):
    """planted-distractor's copy pathway with an MLP in the middle that is exactly affine on the
    task: head 0 copies the class (±1) from dim 0 into dim 1; the MLP's one live neuron reads dim 1
    with bias 2, so its ReLU never clips (pre-activation 1 or 3), and writes the class into dim 3,
    which the unembedding reads. A second neuron reads a distractor and writes where nobody reads."""
    cfg = ModelConfig(
        n_layers=1,
        d_model=10,
        n_heads=1,
        d_head=2,
        d_vocab=10,
        n_ctx=4,
        d_mlp=4,
        act_fn="relu",
        normalization_type=None,
    )
    w = {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(cfg).items()}
    rng = np.random.default_rng(0)
    w["embed.W_E"][:8, 0] = np.where(np.arange(8) < 4, 1.0, -1.0)
    w["embed.W_E"][:8, 5:] = rng.normal(size=(8, 5))
    w["pos_embed.W_pos"][0, 2] = 1.0
    w["blocks.0.attn.b_Q"][0, 0] = 7.0
    w["blocks.0.attn.W_K"][0, 2, 0] = 7.0
    w["blocks.0.attn.W_V"][0, 0, 0] = 1.0
    w["blocks.0.attn.W_O"][0, 0, 1] = 1.0
    w["blocks.0.mlp.W_in"][1, 0], w["blocks.0.mlp.b_in"][0] = 1.0, 2.0  # relu(c + 2) = c + 2
    w["blocks.0.mlp.W_out"][0, 3], w["blocks.0.mlp.b_out"][3] = 1.0, -2.0  # dim 3 = c
    w["blocks.0.mlp.W_in"][5, 1], w["blocks.0.mlp.W_out"][1, 9] = 1.0, 1.0  # distractor neuron
    w["unembed.W_U"][3, 8], w["unembed.W_U"][3, 9] = 4.0, -4.0
    folder = tmp_path_factory.mktemp("models") / "planted-linear"
    save_model(from_state_dict(cfg, w, source="planted-linear"), folder)
    write_json(folder / "prompts.json", prompts_json(first_class_prompts()))
    return folder


def test_a_linear_mlp_is_carried_by_f_and_its_remainder_is_excluded(planted_linear):
    e = explainer.explain(planted_linear, rewrites=["blocks.0.mlp=linear"], progress=False)
    assert e.kept == LINEAR_TRUTH
    assert e.faithfulness["kl_mean"] <= 0.01
    report = e.rewrite_report["blocks.0.mlp"]
    assert 0.9 < report["r2"] < 0.999  # the distractor neuron leaves a remainder, which nothing reads
    assert report["f_alone"]["logit_diff_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert report["remainder_excluded"]["kl_mean"] < 1e-4
    assert "the explanation excluded the remainder" in e.summary()


def test_a_nonlinear_mlp_keeps_its_remainder():
    """planted-joint's MLP computes XNOR: no affine f carries it, so the remainder is kept."""
    e = explainer.explain("planted-joint", rewrites=["blocks.0.mlp=linear"], progress=False)
    assert e.kept["blocks.0.mlp.rest"] == [0]
    assert e.kept["unembed.in"] == [3] and e.faithfulness["kl_mean"] <= 0.01
    report = e.rewrite_report["blocks.0.mlp"]
    assert abs(report["f_alone"]["logit_diff_recovered"]) < 0.1  # f alone carries nothing
    assert report["remainder_excluded"]["logit_diff_recovered"] < -0.5  # resampled: the answer flips
    assert "the explanation kept the remainder" in e.summary()


def test_the_adversary_reincludes_an_excluded_remainder():
    folder = resolve_model("planted-joint")
    task = resolve_task(None, folder)
    net = rewrites.rewrite(load_model(folder), task.train_data(), ["blocks.0.mlp"])
    scrubber = Scrubber.build(net, task.train_data())
    assert scrubber.n_units["blocks.0.mlp.rest"] == 1
    keep = {s: np.zeros(n) for s, n in scrubber.n_units.items()}  # the truth, with the remainder excluded
    keep["blocks.0.attn.in"][0] = keep["blocks.0.mlp.in"][[1, 2]] = keep["unembed.in"][3] = 1
    for method in ("exhaustive", "learned"):
        result = attack(scrubber, task.heldout_data(), keep, 1, method, jax.random.key(0))
        assert result.reincluded["blocks.0.mlp.rest"] == [0], method
        assert result.gap["kl_mean"] > 1.0


def test_the_rewritten_model_is_the_model_until_its_remainder_is_replaced():
    folder = resolve_model("planted-joint")
    task = resolve_task(None, folder)
    net = load_model(folder)
    fitted = rewrites.rewrite(net, task.train_data(), ["mlps=rank-1"])
    tokens = task.heldout_data().clean
    assert bool((fitted(tokens) == net(tokens)).all())  # bit for bit
    f = fitted.blocks[0].mlp
    assert np.linalg.matrix_rank(np.asarray(f.W_f)) == 1
    zeroed = fitted(tokens, edit=lambda s, h: jnp.zeros_like(h) if rewrites.is_rest(s) else h)
    # the remainder zeroed is the MLP replaced by f: the unembedding reads resid + f(y)
    _, cache = net.run(tokens, capture=("blocks.0.mlp.in",))
    resid = cache["blocks.0.mlp.in"]
    by_hand = (resid + f.fitted(resid)) @ net.W_U + net.b_U  # no LayerNorm in planted models
    np.testing.assert_allclose(np.asarray(zeroed), np.asarray(by_hand), atol=1e-4)


def test_a_rewritten_run_saves_and_every_command_rebuilds_it(tmp_path):
    run = tmp_path / "run"
    e = explainer.explain("planted-joint", rewrites=["blocks.0.mlp=mean"], steps=400, progress=False, out=run)
    assert (run / rewrites.TENSORS_FILE).is_file()
    loaded = explainer.load(run)
    assert loaded.config["rewrites"] == ["blocks.0.mlp=mean"] and loaded.rewrite_report == e.rewrite_report
    assert {k: v.shape for k, v in loaded.rewrites.items()} == {"blocks.0.mlp.W_f": (10, 10), "blocks.0.mlp.b_f": (10,)}
    _, net, _ = open_run(run)
    assert net.sites == ("blocks.0.attn.in", "blocks.0.mlp.in", "blocks.0.mlp.rest", "unembed.in")
    np.testing.assert_array_equal(np.asarray(net.blocks[0].mlp.W_f), 0.0)  # form mean: W = 0
    again = evaluate(run)
    assert again["faithfulness"]["kl_mean"] == pytest.approx(e.faithfulness["kl_mean"], abs=1e-6)
    for argv in (["attack", str(run), "-k", "1", "--method", "exhaustive"], ["show", str(run)]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code in (0, None)
    (run / rewrites.TENSORS_FILE).unlink()
    with pytest.raises(ExplainerError, match="rewrites.safetensors is missing"):
        explainer.load(run)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("blocks.0.mlpx=linear", "not of the form blocks.L.mlp=FORM"),
        ("blocks.0.attn=linear", "not of the form blocks.L.mlp=FORM"),
        ("blocks.0.mlp=cubic", "unknown rewrite form 'cubic'"),
        ("blocks.0.mlp=rank-0", "unknown rewrite form 'rank-0'"),
        ("blocks.3.mlp=linear", "there is no blocks.3.mlp; this model has blocks 0-0"),
        ("blocks.0.mlp=rank-11", "rank 11 exceeds d_model=10"),
    ],
)
def test_a_bad_rewrite_is_a_clear_error(spec, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "-m", "planted-joint", "--rewrite", spec, "--out", "/nonexistent/never", "--no-progress"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_rewrites_need_an_mlp_and_one_form_per_mlp():
    with pytest.raises(ExplainerError, match="attention-only"):
        rewrites.resolve(["mlps"], load_model(resolve_model("planted-distractor")).config)
    with pytest.raises(ExplainerError, match="rewritten twice"):
        rewrites.resolve(["mlps=linear", "blocks.0.mlp=mean"], load_model(resolve_model("planted-joint")).config)
    with pytest.raises(ExplainerError, match="unknown rewrite form"):  # checked as soon as it is configured
        explainer.TrainConfig.of(rewrites=["blocks.0.mlp=cubic"])


def test_position_specific_masks_give_the_remainder_one_unit_per_position():
    folder = resolve_model("planted-joint")
    task = resolve_task(None, folder)
    net = rewrites.rewrite(load_model(folder), task.train_data(), ["blocks.0.mlp"])
    scrubber = Scrubber.build(net, task.train_data(), positional=True)
    assert scrubber.n_units["blocks.0.mlp.rest"] == 2 and scrubber.n_units["unembed.in"] == 20
    batch = task.heldout_data()
    full, repl = scrubber.reference(batch, jax.random.key(0))
    ones = {s: jnp.ones(n) for s, n in scrubber.n_units.items()}
    assert bool((scrubber.logits(batch.clean, ones, repl) == full).all())


GATED = {  # tiny Llama (SiLU gate, RMSNorm, rotary, grouped-query attention) and Gemma (tanh-GELU gate)
    "llama": dict(act_fn="silu", n_key_value_heads=2),
    "gemma": dict(act_fn="gelu_pytorch_tanh", n_key_value_heads=1),
}
GATED_SPECS = {"llama": ("mlps=rank-2", [0, 1]), "gemma": ("blocks.1.mlp=rank-2", [1])}


def _gated_model(tmp_path, family: str):
    cfg = ModelConfig(
        n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=50, n_ctx=16, normalization_type="RMS",
        positional_embedding_type="rotary", gated_mlp=True, **GATED[family],
    )  # fmt: skip
    folder = tmp_path / family
    save_model(init_random(cfg, jax.random.key(0), std=0.3), folder)
    rng = np.random.default_rng(1)
    rows = [
        {"clean": rng.integers(0, 50, 6).tolist(), "corrupt": rng.integers(0, 50, 6).tolist(),
         "answers": [1], "wrong_answers": [2]}
        for _ in range(32)
    ]  # fmt: skip
    write_json(folder / "prompts.json", {"prompts": rows})
    return folder


@pytest.mark.parametrize("family", list(GATED))
def test_gated_mlps_are_rewritten_as_what_they_compute(tmp_path, family):
    """A gated MLP's f is fitted to its gated output; with the remainder kept the model is bit for bit the model."""
    (folder, run), (spec, layers) = (_gated_model(tmp_path, family), tmp_path / "run"), GATED_SPECS[family]
    with pytest.raises(SystemExit) as exit_:  # a fixed penalty: no finishing passes, a short test
        main(["train", "-m", str(folder), "--rewrite", spec, "--steps", "20", "--lambda", "0.01", "--adversary",
              "none", "--out", str(run), "--no-progress"])  # fmt: skip
    assert exit_.value.code in (0, None)
    expl, net, _ = open_run(run)
    base = load_model(folder)
    rests = [f"blocks.{i}.mlp.rest" for i in layers]
    assert [s for s in net.sites if rewrites.is_rest(s)] == rests and set(expl.n_units) == set(net.sites)
    tokens = resolve_task(None, folder).heldout_data().clean
    assert bool((net(tokens) == base(tokens)).all())  # the remainder unedited: exactly the model
    act = {"llama": jax.nn.silu, "gemma": lambda x: jax.nn.gelu(x, approximate=True)}[family]
    for layer in layers:
        mlp, g, site = net.blocks[layer].mlp, base.blocks[layer].mlp, f"blocks.{layer}.mlp.rest"
        assert isinstance(mlp, rewrites.GatedRewrite) and np.linalg.matrix_rank(np.asarray(mlp.W_f)) == 2
        # f stands in for the whole gated MLP, act(y W_gate) * (y W_in) + b_in, then W_out: refit it by hand
        train = resolve_task(None, folder).train_data()
        io = [base.run(t, capture=(f"blocks.{layer}.mlp.in",))[1] for t in (train.clean, train.corrupt)]
        y = np.concatenate([np.asarray(rms(base.blocks[layer].ln2, c[f"blocks.{layer}.mlp.in"])) for c in io])
        y = y.reshape(-1, 16)
        out = (act(y @ g.W_gate) * (y @ g.W_in) + g.b_in) @ g.W_out + g.b_out
        w, b = rewrites.fit_affine(y, np.asarray(out), "rank-2")
        np.testing.assert_allclose(np.asarray(mlp.W_f), w, atol=1e-4)
        np.testing.assert_allclose(np.asarray(mlp.b_f), b, atol=1e-4)
        zeroed = net(tokens, edit=lambda s, h, site=site: jnp.zeros_like(h) if s == site else h)
        assert float(jnp.abs(zeroed - base(tokens)).max()) > 1e-3  # a rank-2 f leaves a remainder that matters
    assert {r["form"] for r in expl.rewrite_report.values() if "form" in r} == {"rank-2"}
