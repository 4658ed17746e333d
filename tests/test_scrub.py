import jax
import jax.numpy as jnp
import numpy as np
import pytest

from explainer.errors import ExplainerError
from explainer.masks import Gates, OrthogonalBasis
from explainer.models import ModelConfig, init_random
from explainer.scrub import Scrubber, scrubbed_logits
from explainer.tasks import resolve_task
from explainer.tasks.base import Batch
from explainer.zoo import resolve_model


@pytest.fixture
def random_setup(getkey):
    cfg = ModelConfig(n_layers=2, d_model=12, n_heads=2, d_head=4, d_mlp=16, d_vocab=9, n_ctx=6)
    model = init_random(cfg, getkey(), std=0.3)
    clean = jax.random.randint(getkey(), (8, 6), 0, 9)
    corrupt = jax.random.randint(getkey(), (8, 6), 0, 9)
    batch = Batch(clean, corrupt, jnp.zeros((8, 1), jnp.int32), jnp.ones((8, 1), jnp.int32))
    return model, batch


def _const(scrubber, value):
    return {s: jnp.full((n,), value, jnp.float32) for s, n in scrubber.n_units.items()}


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_all_ones_is_the_full_model_exactly(random_setup, ablation, getkey):
    model, batch = random_setup
    scrubber = Scrubber.build(model, batch, ablation=ablation)
    _, repl = scrubber.reference(batch, getkey())
    out = scrubbed_logits(model, batch.clean, _const(scrubber, 1.0), repl)
    np.testing.assert_array_equal(out, model(batch.clean))


@pytest.mark.parametrize("attention_dir", ["causal", "bidirectional"])
@pytest.mark.parametrize("positional", [False, True])
def test_the_last_position_forward_matches_the_full_forward(attention_dir, positional, getkey):
    cfg = ModelConfig(
        n_layers=2, d_model=12, n_heads=2, d_head=4, d_mlp=16, d_vocab=9, n_ctx=6, attention_dir=attention_dir
    )
    model = init_random(cfg, getkey(), std=0.3)
    clean, corrupt = jax.random.randint(getkey(), (2, 8, 6), 0, 9)
    batch = Batch(clean, corrupt, jnp.zeros((8, 1), jnp.int32), jnp.ones((8, 1), jnp.int32))
    scrubber = Scrubber.build(model, batch, positional=positional)
    _, repl = scrubber.reference(batch, getkey())
    keep = {s: (jax.random.uniform(getkey(), (n,)) < 0.5).astype(jnp.float32) for s, n in scrubber.n_units.items()}
    full = scrubbed_logits(model, batch.clean, keep, repl, positional=positional)
    last = scrubbed_logits(model, batch.clean, keep, repl, positional=positional, last=True)
    assert last.shape == (8, 1, 9)
    assert float(jnp.abs(full[:, -1] - full[:, 0]).max()) > 0.1  # the positions differ: a real check
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-5)
    np.testing.assert_allclose(scrubber.logits(batch.clean, keep, repl), full[:, -1], atol=1e-5)
    np.testing.assert_allclose(model(batch.clean, last=True)[:, 0], model(batch.clean)[:, -1], atol=1e-5)


def test_all_zeros_resample_is_the_full_model_on_the_resample_input(random_setup, getkey):
    model, batch = random_setup
    scrubber = Scrubber.build(model, batch)
    _, repl = scrubber.reference(batch, getkey())
    out = scrubbed_logits(model, batch.clean, _const(scrubber, 0.0), repl)
    # the replacements come from one compiled program (``reference``), the comparison op by op
    np.testing.assert_allclose(out, model(batch.corrupt), rtol=0, atol=1e-5)


def test_permutation_resample_without_counterfactuals(random_setup, getkey):
    model, batch = random_setup
    no_cf = Batch(batch.clean, None, batch.answers, batch.wrong_answers)
    scrubber = Scrubber.build(model, no_cf)
    key = getkey()
    _, repl = scrubber.reference(no_cf, key)
    out = scrubbed_logits(model, no_cf.clean, _const(scrubber, 0.0), repl)
    perm = jax.random.permutation(key, 8)
    np.testing.assert_allclose(out, model(no_cf.clean[perm]), rtol=0, atol=1e-5)  # compiled against op by op


def test_zero_ablation_of_everything_reads_zeros(random_setup, getkey):
    model, batch = random_setup
    scrubber = Scrubber.build(model, batch, ablation="zero")
    _, repl = scrubber.reference(batch, getkey())
    out = scrubber.logits(batch.clean, _const(scrubber, 0.0), repl)
    # unembed.in reads zeros: logits are LayerNorm(0) @ W_U + b_U, the same for every prompt
    assert jnp.allclose(out, out[:1])


def test_mean_ablation_uses_per_position_means(random_setup, getkey):
    model, batch = random_setup
    scrubber = Scrubber.build(model, batch, ablation="mean", sites=["unembed.in"])
    _, cache = model.run(batch.clean, capture=["unembed.in"])
    np.testing.assert_allclose(scrubber.means["unembed.in"], cache["unembed.in"].mean(0), rtol=1e-5, atol=1e-6)


def test_scrubbing_one_site_leaves_the_residual_stream_alone(planted_models, getkey):
    """Treeified: masking blocks.0.attn.in changes only what attention reads, not the skip path."""
    model = planted_models["planted-distractor"]
    folder = resolve_model("planted-distractor")
    batch = resolve_task(None, folder).heldout_data()
    scrubber = Scrubber.build(model, batch, sites=["blocks.0.attn.in"])
    _, repl = scrubber.reference(batch, getkey())
    keep = {"blocks.0.attn.in": jnp.zeros(10)}
    _, cache = model.run(
        batch.clean, edit=lambda s, h: h if s != "blocks.0.attn.in" else repl[s], capture=["unembed.in"]
    )
    _, clean_cache = model.run(batch.clean, capture=["unembed.in"])
    # the token's own embedding (dims 4-9 carry the distractors of the last token) is untouched
    np.testing.assert_array_equal(cache["unembed.in"][:, -1, 6:], clean_cache["unembed.in"][:, -1, 6:])
    assert scrubber.logits(batch.clean, keep, repl).shape == (len(batch), 10)


def test_orthogonal_basis_keeps_exactly_and_swaps_fully(getkey):
    q, _ = jnp.linalg.qr(jax.random.normal(getkey(), (6, 6)))
    basis = OrthogonalBasis(q)
    h, r = jax.random.normal(getkey(), (2, 3, 6)), jax.random.normal(getkey(), (2, 3, 6))
    np.testing.assert_array_equal(basis.mix(h, r, jnp.ones(6)), h)
    np.testing.assert_allclose(basis.mix(h, r, jnp.zeros(6)), r, atol=1e-5)
    keep = jnp.array([1.0, 0, 1, 0, 0, 1])
    coords = basis.mix(h, r, keep) @ q
    np.testing.assert_allclose(coords, keep * (h @ q) + (1 - keep) * (r @ q), atol=1e-5)


def test_unknown_site_is_named(planted_models):
    model = planted_models["planted-joint"]
    batch = resolve_task(None, resolve_model("planted-joint")).train_data()
    with pytest.raises(ExplainerError, match=r"site 'blocks\.9\.mlp\.in' does not exist; this model has blocks 0-0"):
        Scrubber.build(model, batch, sites=["blocks.9.mlp.in"])
    with pytest.raises(ExplainerError, match="did you mean 'resample'"):
        Scrubber.build(model, batch, ablation="resampel")


def test_hard_concrete_gates(getkey):
    gates = Gates.init({"a": 5, "b": 3}, logit=0.0)
    samples = jnp.stack([gates.sample(getkey())["a"] for _ in range(400)])
    assert float(samples.min()) == 0.0 and float(samples.max()) == 1.0  # exact zeros and ones
    assert 0.0 < float(samples.mean()) < 1.0
    p_nonzero = float((samples > 0).mean())
    np.testing.assert_allclose(p_nonzero, float(gates.keep_probability()["a"][0]), atol=0.08)
    np.testing.assert_allclose(float(gates.expected_size()), 8 * float(gates.keep_probability()["a"][0]), rtol=1e-6)
    assert not gates.binary()["a"].any()
    open_gates = Gates.init({"a": 2}, logit=5.0)
    assert open_gates.binary()["a"].all()
    np.testing.assert_array_equal(open_gates.deterministic()["a"], jnp.ones(2))
