"""Every family ``explainer import hf`` reads: logits parity with transformers, scrubbing, training.

Tiny random checkpoints are built locally from transformers' config classes (no hub), with every
parameter redrawn at a scale that makes it matter, and include the variants the mapping must get
right: grouped-query and multi-query attention, partial rotary, parallel and sequential NeoX
blocks, Llama-3 rope scaling, Qwen2's sliding-window layers, Gemma-2's soft caps and post-norms.
Parity tolerance: float32, ``PARITY_ATOL`` (measured max |diff| 5e-7 to 4e-6 on these checkpoints).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from explainer import edges
from explainer.errors import ExplainerError
from explainer.models import load_model
from explainer.models.hf_import import import_hf
from explainer.models.native import from_state_dict, to_state_dict
from explainer.scrub import Scrubber
from explainer.tasks.prompts import parse_prompts

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PARITY_ATOL = 1e-4
VOCAB = 50
COMMON = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
    max_position_embeddings=64,
)  # fmt: skip
LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=16,
)  # fmt: skip


def _configs():
    t = transformers
    return {
        "gpt2": t.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64),
        "neox-parallel": t.GPTNeoXConfig(**COMMON),  # partial rotary (a quarter), parallel blocks
        "neox-sequential": t.GPTNeoXConfig(**COMMON, use_parallel_residual=False, rotary_pct=0.5),
        "llama-gqa": t.LlamaConfig(**COMMON, num_key_value_heads=2),
        "llama3-mqa-tied": t.LlamaConfig(
            **COMMON, num_key_value_heads=1, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True
        ),
        "mistral-window": t.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=4),
        "qwen2-window": t.Qwen2Config(
            **COMMON, num_key_value_heads=2, use_sliding_window=True, sliding_window=3, max_window_layers=1
        ),
        "gemma-mqa": t.GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=8),
        "gemma2": t.Gemma2Config(
            **COMMON, num_key_value_heads=2, head_dim=8, sliding_window=4, attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0, query_pre_attn_scalar=12,
        ),
    }  # fmt: skip


VARIANTS = tuple(_configs())
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (3, 12))


def build(name: str, seed: int = 0):
    """A random ...ForCausalLM of variant ``name`` in eval mode, every parameter redrawn at std 0.3."""
    cfg = _configs()[name]
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """``{variant: (torch model, native folder)}``, built once per module."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in VARIANTS:
        model = build(name)
        model.save_pretrained(root / name / "hf")
        import_hf(root / name / "hf", root / name / "native")
        out[name] = (model, root / name / "native")
    return out


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers(imported, name):
    model, folder = imported[name]
    ours = np.asarray(load_model(folder)(jnp.asarray(TOKENS)))
    ref = torch_logits(model, TOKENS)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < PARITY_ATOL


def test_each_family_option_matters(imported):
    """Turning an option off moves the logits far beyond the tolerance: the tests above see it."""
    for name, change in [
        ("llama3-mqa-tied", {"use_NTK_by_parts_rope": False}),
        ("qwen2-window", {"use_local_attn": False}),
        ("gemma2", {"attn_scores_soft_cap": -1.0}),
        ("neox-parallel", {"parallel_attn_mlp": False}),
    ]:
        model, folder = imported[name]
        net = load_model(folder)
        other = from_state_dict(dataclasses.replace(net.config, **change), to_state_dict(net))
        assert np.abs(np.asarray(other(jnp.asarray(TOKENS))) - torch_logits(model, TOKENS)).max() > 1e-2, name


def test_native_folder_uses_transformerlens_names(imported):
    cfg = load_model(imported["gemma2"][1]).config
    assert cfg.normalization_type == "RMS" and cfg.positional_embedding_type == "rotary"
    assert cfg.n_key_value_heads == 2 and cfg.gated_mlp and cfg.use_normalization_before_and_after
    assert cfg.attn_types == ("local", "global") and cfg.window_size == 4 and cfg.attn_scale == 12**0.5
    from safetensors.numpy import load_file

    tensors = load_file(str(imported["gemma2"][1] / "model.safetensors"))
    assert tensors["blocks.0.attn._W_K"].shape == (2, 32, 8) and tensors["blocks.0.attn.W_Q"].shape == (4, 32, 8)
    assert {"blocks.1.ln1_post.w", "blocks.1.ln2_post.w", "blocks.1.mlp.W_gate"} <= set(tensors)
    neox = load_model(imported["neox-parallel"][1]).config
    assert neox.parallel_attn_mlp and neox.rotary_dim == 2 and neox.n_key_value_heads is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_and_sharded_checkpoints(tmp_path, dtype):
    """Weights saved in 16 bits (and in shards) import as the same numbers widened to float32."""
    model = build("llama-gqa").to(getattr(torch, dtype))
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    import_hf(tmp_path / "hf", tmp_path / "native")
    reference = build("llama-gqa")  # the rounded weights, run in float32 (with float32 rotary tables)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ours = np.asarray(load_model(tmp_path / "native")(jnp.asarray(TOKENS)))
    assert np.abs(ours - torch_logits(reference, TOKENS)).max() < PARITY_ATOL


def _prompts(n: int = 8, length: int = 6) -> dict:
    rng = np.random.default_rng(1)
    rows = [
        {"clean": rng.integers(0, VOCAB, length).tolist(), "corrupt": rng.integers(0, VOCAB, length).tolist(),
         "answers": [1], "wrong_answers": [2]}
        for _ in range(n)
    ]  # fmt: skip
    return {"prompts": rows}


@pytest.mark.parametrize("units", ["dims", "edges"])
@pytest.mark.parametrize("name", VARIANTS)
def test_scrubber_ends_are_the_full_model(imported, name, units):
    """All-ones masks give the full model; all-zeros under resample give the model on the corrupt input."""
    model = load_model(imported[name][1])
    batch = parse_prompts(_prompts())
    scrubber = Scrubber.build(model, batch, units=units)
    full, repl = scrubber.reference(batch, jax.random.key(0))
    ones = {s: jnp.ones(n) for s, n in scrubber.n_units.items()}
    zeros = {s: jnp.zeros(n) for s, n in scrubber.n_units.items()}
    # to float rounding: two compiled programs (and, for edges, the writers summed in another order)
    np.testing.assert_allclose(scrubber.logits(batch.clean, ones, repl), full, atol=1e-5, rtol=0)
    on_corrupt = model(batch.corrupt)[:, -1]
    np.testing.assert_allclose(scrubber.logits(batch.clean, zeros, repl), on_corrupt, atol=1e-4, rtol=0)


def test_grouped_edges_name_key_value_heads(imported):
    cfg = load_model(imported["llama-gqa"][1]).config
    units = edges.edge_units(cfg, edges.edge_sites(cfg))
    writers = 1 + 4 + 1  # embed, layer 0's heads and MLP
    assert units["blocks.1.attn.q.in"] == 4 * writers and units["blocks.1.attn.k.in"] == 2 * writers
    names = edges.edge_names(cfg)
    assert names["blocks.1.attn.k.in"][writers] == "embed->a1.kv1.k"
    assert names["blocks.1.attn.q.in"][writers] == "embed->a1.h1.q"
    neox = load_model(imported["neox-parallel"][1]).config  # a parallel MLP reads what its attention reads
    assert edges.n_writers(neox, "blocks.1.mlp.in") == edges.n_writers(neox, "blocks.1.attn.q.in") == 6


@pytest.mark.parametrize("name", VARIANTS)
def test_short_training_runs_on_dims(imported, name):
    import explainer

    found = explainer.explain(
        str(imported[name][1]), _prompts(16), steps=30, progress=False, adversary="none", units="dims"
    )
    assert set(found.kept) <= set(load_model(imported[name][1]).sites)


@pytest.mark.parametrize("name", ["gemma2", "neox-parallel"])
def test_short_training_runs_on_edges(imported, name):
    import explainer

    found = explainer.explain(
        str(imported[name][1]), _prompts(16), steps=30, progress=False, adversary="none", units="edges"
    )
    assert found is not None


def test_unsupported_options_are_refused(tmp_path):
    cfg = transformers.LlamaConfig(**COMMON, rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0))
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    with pytest.raises(ExplainerError, match="rope_type 'yarn' is not supported"):
        import_hf(tmp_path / "hf", tmp_path / "native")
    assert not (tmp_path / "native").exists()


def test_missing_tensor_is_named(imported, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = Path(imported["qwen2-window"][1]).parent / "hf"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ExplainerError, match=r"missing tensor\(s\) \['model.layers.1.self_attn.k_proj.bias'\]"):
        import_hf(tmp_path / "hf", tmp_path / "native")


def test_adjacent_pairs_rotary_is_the_half_rotation_with_dimensions_reordered():
    """GPT-J's planes (2i, 2i+1) turn as Llama's planes (i, i + dim/2) once the dimensions are reordered."""
    from explainer.models.rotary import Rotary

    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
    order = np.concatenate([np.arange(0, 6, 2), np.arange(1, 6, 2), [6, 7]])  # rotary_dim 6, two pass through
    adjacent = Rotary(6, 100.0, adjacent_pairs=True)(x, start=3)
    half = Rotary(6, 100.0)(x[..., order], start=3)
    np.testing.assert_allclose(np.asarray(adjacent)[..., order], np.asarray(half), atol=1e-6)
