import jax
import jax.numpy as jnp
import numpy as np
import pytest

from explainer.errors import ExplainerError
from explainer.models import ModelConfig, init_random, load_model, save_model
from explainer.models.native import expected_shapes, to_state_dict

CONFIGS = [
    dict(n_layers=2, d_model=16, n_heads=2, d_head=4, d_mlp=32, d_vocab=11, n_ctx=8, act_fn="gelu_new"),
    dict(n_layers=1, d_model=8, n_heads=1, d_head=8, d_vocab=5, n_ctx=4, attn_only=True, normalization_type=None),
    dict(
        n_layers=2,
        d_model=8,
        n_heads=2,
        d_head=4,
        d_mlp=8,
        d_vocab=5,
        n_ctx=4,
        act_fn="relu",
        normalization_type="LNPre",
        attention_dir="bidirectional",
        d_vocab_out=3,
    ),
    dict(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=8, d_vocab=5, n_ctx=4, act_fn="gelu"),
]


def reference_forward(cfg: ModelConfig, w: dict, tokens: np.ndarray) -> np.ndarray:
    """A plain numpy GPT-2 forward written from the TransformerLens definitions."""
    from math import erf, sqrt

    def ln(x, prefix):
        if cfg.normalization_type is None:
            return x
        x = x - x.mean(-1, keepdims=True)
        x = x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.eps)
        return x * w[prefix + ".w"] + w[prefix + ".b"] if cfg.normalization_type == "LN" else x

    def act(x):
        if cfg.act_fn == "relu":
            return np.maximum(x, 0)
        if cfg.act_fn == "gelu":
            return 0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2)))
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    seq = tokens.shape[1]
    resid = w["embed.W_E"][tokens] + w["pos_embed.W_pos"][:seq]
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        x = ln(resid, p + "ln1")
        q = np.einsum("bpd,hde->bhpe", x, w[p + "attn.W_Q"]) + w[p + "attn.b_Q"][None, :, None]
        k = np.einsum("bpd,hde->bhpe", x, w[p + "attn.W_K"]) + w[p + "attn.b_K"][None, :, None]
        v = np.einsum("bpd,hde->bhpe", x, w[p + "attn.W_V"]) + w[p + "attn.b_V"][None, :, None]
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(cfg.d_head)
        if cfg.attention_dir == "causal":
            scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
        pattern = np.exp(scores - scores.max(-1, keepdims=True))
        pattern /= pattern.sum(-1, keepdims=True)
        z = pattern @ v
        resid = resid + np.einsum("bhpe,hem->bpm", z, w[p + "attn.W_O"]) + w[p + "attn.b_O"]
        if not cfg.attn_only:
            x = ln(resid, p + "ln2")
            resid = resid + act(x @ w[p + "mlp.W_in"] + w[p + "mlp.b_in"]) @ w[p + "mlp.W_out"] + w[p + "mlp.b_out"]
    return ln(resid, "ln_final") @ w["unembed.W_U"] + w["unembed.b_U"]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_forward_matches_numpy_reference(kwargs, getkey):
    cfg = ModelConfig(**kwargs)
    model = init_random(cfg, getkey(), std=0.5)
    w = {k: v.astype(np.float64) for k, v in to_state_dict(model).items()}
    tokens = np.asarray(jax.random.randint(getkey(), (3, cfg.n_ctx), 0, cfg.d_vocab))
    ours = np.asarray(model(jnp.asarray(tokens)))
    assert ours.shape == (3, cfg.n_ctx, cfg.vocab_out)
    np.testing.assert_allclose(ours, reference_forward(cfg, w, tokens), atol=1e-4, rtol=1e-4)


def test_causal_attention_ignores_the_future(getkey):
    cfg = ModelConfig(**CONFIGS[0])
    model = init_random(cfg, getkey(), std=0.5)
    a = jnp.array([[1, 2, 3, 4]])
    b = jnp.array([[1, 2, 9, 9]])
    np.testing.assert_array_equal(model(a)[:, :2], model(b)[:, :2])


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_save_load_roundtrip(kwargs, tmp_path, getkey):
    cfg = ModelConfig(**kwargs)
    model = init_random(cfg, getkey())
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.config == cfg
    tokens = jnp.zeros((1, 3), jnp.int32)
    np.testing.assert_array_equal(model(tokens), again(tokens))


def test_run_captures_only_requested_sites(planted_models):
    model = planted_models["planted-joint"]
    logits, cache = model.run(jnp.array([[0, 4]]), capture=("blocks.0.mlp.in",))
    assert set(cache) == {"blocks.0.mlp.in"}
    assert cache["blocks.0.mlp.in"].shape == (1, 2, 10)


def test_config_rejects_bad_fields():
    with pytest.raises(ExplainerError, match="d_mlp"):
        ModelConfig(n_layers=1, d_model=4, n_heads=1, d_head=4, d_vocab=3, n_ctx=2)
    with pytest.raises(ExplainerError, match="act_fn.*did you mean 'relu'"):
        ModelConfig(n_layers=1, d_model=4, n_heads=1, d_head=4, d_mlp=4, d_vocab=3, n_ctx=2, act_fn="rleu")
    with pytest.raises(ExplainerError, match="unknown field 'n_layer'"):
        ModelConfig.from_json({"n_layer": 1})
    with pytest.raises(ExplainerError, match="'standard'.*or 'rotary'"):
        ModelConfig.from_json({**CONFIGS[0], "positional_embedding_type": "shortformer"})
    with pytest.raises(ExplainerError, match="gated_mlp"):
        ModelConfig.from_json({**CONFIGS[1], "gated_mlp": True})
    with pytest.raises(ExplainerError, match="n_key_value_heads"):
        ModelConfig.from_json({**CONFIGS[0], "n_key_value_heads": 3})
    with pytest.raises(ExplainerError, match="rotary_dim"):
        ModelConfig.from_json({**CONFIGS[0], "positional_embedding_type": "rotary", "rotary_dim": 3})
    with pytest.raises(ExplainerError, match="attn_types"):
        ModelConfig.from_json({**CONFIGS[0], "use_local_attn": True, "window_size": 2, "attn_types": ["local"]})
    with pytest.raises(ExplainerError, match="final_rms"):
        ModelConfig.from_json({**CONFIGS[0], "final_rms": True})
    # TransformerLens writes fields that do not change the forward pass: accepted.
    assert ModelConfig.from_json({**CONFIGS[0], "model_name": "x", "device": "cpu"}).n_layers == 2


def test_shapes_table_matches_transformerlens_names():
    cfg = ModelConfig(**CONFIGS[0])
    shapes = expected_shapes(cfg)
    assert shapes["blocks.1.attn.W_Q"] == (2, 16, 4)
    assert shapes["blocks.1.attn.W_O"] == (2, 4, 16)
    assert shapes["blocks.0.mlp.W_in"] == (16, 32)
    assert shapes["unembed.W_U"] == (16, 11)
    assert "ln_final.w" in shapes


@pytest.fixture
def model_folder(tmp_path, getkey):
    cfg = ModelConfig(**CONFIGS[0])
    return save_model(init_random(cfg, getkey()), tmp_path / "model")


def _rewrite(folder, change):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_missing_tensor_is_named(model_folder):
    _rewrite(model_folder, lambda t: t.pop("blocks.1.mlp.W_out"))
    with pytest.raises(ExplainerError, match=r"missing tensor.*blocks\.1\.mlp\.W_out"):
        load_model(model_folder)


def test_extra_tensor_is_named(model_folder):
    _rewrite(model_folder, lambda t: t.update({"blocks.7.attn.W_Q": np.zeros(2, np.float32)}))
    with pytest.raises(ExplainerError, match=r"does not use.*blocks\.7\.attn\.W_Q"):
        load_model(model_folder)


def test_wrong_shape_is_named(model_folder):
    _rewrite(model_folder, lambda t: t.update({"embed.W_E": np.zeros((11, 15), np.float32)}))
    with pytest.raises(ExplainerError, match=r"'embed\.W_E' has shape \[11, 15\].*\[11, 16\]"):
        load_model(model_folder)


def test_nan_weights_are_refused(model_folder):
    def poison(t):
        t["unembed.b_U"][3] = np.nan

    _rewrite(model_folder, poison)
    with pytest.raises(ExplainerError, match="NaN"):
        load_model(model_folder)


def test_truncated_weights_are_refused(model_folder):
    data = (model_folder / "model.safetensors").read_bytes()
    (model_folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExplainerError, match="truncated or corrupt"):
        load_model(model_folder)


def test_missing_files_are_named(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ExplainerError, match="config.json"):
        load_model(tmp_path / "m")
    with pytest.raises(ExplainerError, match="does not exist"):
        load_model(tmp_path / "nope")


def _scrubbed(layers: int, **kwargs):
    """A random GPT-2-style model of ``layers`` layers, a batch, replacements and random masks."""
    from explainer.scrub import capture

    cfg = ModelConfig(n_layers=layers, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=7, n_ctx=6, **kwargs)
    model = init_random(cfg, jax.random.key(0))
    tokens, other = (jax.random.randint(jax.random.key(i), (3, 5), 0, 7) for i in (1, 2))
    _, repl = capture(model, other, model.sites)
    keys = jax.random.split(jax.random.key(3), len(model.sites))
    keep = {s: jax.random.uniform(k, (cfg.d_model,)) for s, k in zip(model.sites, keys, strict=True)}
    return model, tokens, keep, repl


def test_the_scrubbed_program_does_not_grow_with_depth(equations, monkeypatch):
    """Where the scrubbed forward loops (off the CPU), it and its mask gradient trace to the same
    program at ``SCAN_LAYERS + 1`` layers and at 13: the blocks before the last run as one loop body
    (the last reads its last position alone)."""
    from explainer.models.transformer import SCAN_LAYERS
    from explainer.scrub import scrubbed_logits

    monkeypatch.setattr("explainer.models.transformer.LOOP_ON_CPU", True)  # as off the CPU

    def program(layers):
        model, tokens, keep, repl = _scrubbed(layers)
        loss = lambda keep: scrubbed_logits(model, tokens, keep, repl, last=True).sum()  # noqa: E731
        return equations(jax.make_jaxpr(jax.grad(loss))(keep).jaxpr)

    assert program(SCAN_LAYERS + 1) == program(13)


LLAMA = {"positional_embedding_type": "rotary", "n_key_value_heads": 1, "gated_mlp": True, "act_fn": "silu"}


@pytest.mark.parametrize(
    "kwargs, last",
    [({}, False), ({}, True), ({"parallel_attn_mlp": True, "normalization_type": "RMS"}, True), (LLAMA, True)],
)
def test_a_loop_of_layers_computes_what_layers_one_by_one_do(monkeypatch, kwargs, last):
    """Layers run as one loop give the logits, captures and mask gradients of layers one by one."""
    from explainer.models.transformer import SCAN_LAYERS
    from explainer.scrub import scrubbed_logits

    model, tokens, keep, repl = _scrubbed(SCAN_LAYERS + 1, **kwargs)  # the last layer outside the loop
    monkeypatch.setattr("explainer.models.transformer.LOOP_ON_CPU", True)  # as off the CPU

    def run():
        loss = lambda keep: (scrubbed_logits(model, tokens, keep, repl, last=last) ** 2).mean()  # noqa: E731
        run_model = jax.jit(lambda t: model.run(t, capture=model.sites, last=last))  # traced anew each time
        return jax.jit(jax.value_and_grad(loss))(keep), run_model(tokens)

    looped = run()
    monkeypatch.setattr("explainer.models.transformer.SCAN_LAYERS", 100)
    one_by_one = run()
    np.testing.assert_allclose(looped[0][0], one_by_one[0][0], rtol=1e-5)
    for site in keep:
        np.testing.assert_allclose(looped[0][1][site], one_by_one[0][1][site], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(looped[1][0], one_by_one[1][0], rtol=1e-5, atol=1e-7)  # to float rounding
    assert looped[1][1].keys() == one_by_one[1][1].keys() == set(model.sites)
    for site in model.sites:
        np.testing.assert_allclose(looped[1][1][site], one_by_one[1][1][site], rtol=1e-6, atol=1e-6)
