"""Hugging Face GPT-2 import: logits parity with the torch forward, and the refusals.

Tiny random ``GPT2LMHeadModel``s are built locally (no hub): every parameter, LayerNorm and biases
included, is drawn at a scale that makes each one matter, so a weight mapped to the wrong place
shows up in the logits. Parity tolerance: float32, ``PARITY_ATOL`` (measured max |diff| 1-3e-6).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from explainer.errors import ExplainerError
from explainer.models import load_model
from explainer.models.hf_import import _load_safetensors_raw, import_hf, load_safetensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PARITY_ATOL = 1e-4
TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=32)


def build_gpt2(seed: int = 0, scale: float | None = 0.3, **config):
    """A random GPT2LMHeadModel in eval mode; ``scale`` redraws every parameter at that std."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(bos_token_id=0, eos_token_id=0, **config)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    if scale is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, scale)
    return model


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def max_diff(model, native_folder: Path, tokens: np.ndarray) -> float:
    ours = np.asarray(load_model(native_folder)(jnp.asarray(tokens)))
    ref = torch_logits(model, tokens)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    model = build_gpt2(**TINY)
    return model, save(model, root / "tiny")


@pytest.fixture
def tokens():
    return np.random.default_rng(0).integers(0, TINY["vocab_size"], (3, TINY["n_positions"]))


def test_safetensors_parity(tiny, tokens, tmp_path):
    model, src = tiny
    result = import_hf(src, tmp_path / "native")
    assert (result["weights"], result["n_layers"], result["d_model"]) == ("model.safetensors", 2, 64)
    assert max_diff(model, tmp_path / "native", tokens) < PARITY_ATOL
    card = json.loads((tmp_path / "native" / "card.json").read_text())
    assert card["kind"] == "hf" and card["source"]["model_type"] == "gpt2"
    cfg = load_model(tmp_path / "native").config
    assert (cfg.normalization_type, cfg.act_fn, cfg.d_mlp, cfg.eps) == ("LN", "gelu_new", 256, 1e-5)


def test_pytorch_bin_parity(tiny, tokens, tmp_path):
    """``pytorch_model.bin`` (a torch.save'd state dict, ``transformer.`` names, a tied lm_head)."""
    model, src = tiny
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(src / "config.json", folder / "config.json")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert import_hf(folder, tmp_path / "native")["weights"] == "pytorch_model.bin"
    assert max_diff(model, tmp_path / "native", tokens) < PARITY_ATOL


def test_sharded_safetensors(tiny, tokens, tmp_path):
    model, _ = tiny
    src = tmp_path / "sharded"
    model.save_pretrained(src, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 1
    assert import_hf(src, tmp_path / "native")["weights"] == "model.safetensors.index.json"
    assert max_diff(model, tmp_path / "native", tokens) < PARITY_ATOL


def test_hub_style_names_and_bfloat16(tiny, tmp_path):
    """Old hub checkpoints: no ``transformer.`` prefix, causal-mask buffers; weights in bfloat16."""
    from safetensors.torch import save_file

    model, src = tiny
    state = {k.removeprefix("transformer."): v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    state.pop("lm_head.weight")
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32, dtype=torch.bool))
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    folder = tmp_path / "hub"
    folder.mkdir()
    shutil.copy(src / "config.json", folder / "config.json")
    save_file(state, str(folder / "model.safetensors"))
    import_hf(folder, tmp_path / "native")
    net = load_model(tmp_path / "native")
    expected = model.transformer.h[1].mlp.c_fc.weight.detach().to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(np.asarray(net.blocks[1].mlp.W_in), expected)
    by_hand = _load_safetensors_raw(folder / "model.safetensors")  # the reader used when numpy lacks bfloat16
    for name, value in load_safetensors(folder / "model.safetensors").items():
        np.testing.assert_array_equal(by_hand[name], value)


@pytest.mark.parametrize(
    "variant",
    [
        dict(activation_function="relu", n_inner=48, layer_norm_epsilon=1e-3),
        dict(activation_function="gelu", scale_attn_weights=False, tie_word_embeddings=False),
    ],
    ids=["relu-n_inner-eps", "gelu-unscaled-untied"],
)
def test_config_variants_parity(variant, tmp_path):
    config = dict(TINY, n_layer=1) | variant
    model = build_gpt2(seed=1, **config)
    src = save(model, tmp_path / "src")
    import_hf(src, tmp_path / "native")
    tokens = np.random.default_rng(1).integers(0, TINY["vocab_size"], (2, 9))
    assert max_diff(model, tmp_path / "native", tokens) < PARITY_ATOL


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "config.json").read_text()) | changes
    (dst / "config.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="bert"), "model_type 'bert' is not supported"),
        (dict(model_type="llama"), "lacks 'hidden_size'"),
        (dict(n_embd=32), "has shape"),
        (dict(n_layer=3), "is missing tensor(s) ['h.2."),
        (dict(n_layer=1), "a GPT-2 language model does not"),
        (dict(activation_function="swish"), "activation_function 'swish' is not supported"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True is not supported"),
    ],
)
def test_bad_checkpoints_are_refused(tiny, tmp_path, changes, message):
    src = _edit_config(tiny[1], tmp_path / "src", **changes)
    with pytest.raises(ExplainerError) as err:
        import_hf(src, tmp_path / "native")
    assert message in str(err.value)
    assert not (tmp_path / "native").exists()


def test_missing_files_and_pickles(tiny, tmp_path):
    with pytest.raises(ExplainerError, match="does not exist"):
        import_hf(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExplainerError, match="has no config.json"):
        import_hf(tmp_path / "empty", tmp_path / "out")
    only_pickle = tmp_path / "pickle"
    only_pickle.mkdir()
    shutil.copy(tiny[1] / "config.json", only_pickle / "config.json")
    torch.save({"w": torch.zeros(2)}, only_pickle / "model.pt")
    with pytest.raises(ExplainerError, match=r"has no model.safetensors or pytorch_model.bin \(it has \['model.pt'\]"):
        import_hf(only_pickle, tmp_path / "out")
    # a pickle of arbitrary objects named pytorch_model.bin: weights_only=True refuses it, cleanly
    torch.save({"w": torch.zeros(2), "obj": Path("x")}, only_pickle / "pytorch_model.bin")
    with pytest.raises(ExplainerError, match="holds more than tensors"):
        import_hf(only_pickle, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_import_refuses_to_replace(tiny, tmp_path, cli_here):
    out = tmp_path / "native"
    proc = cli_here("import", "hf", tiny[1], out, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["out"] == str(out) and result["parameters"] > 0
    again = cli_here("import", "hf", tiny[1], out)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    import_hf(tiny[1], out, overwrite=True)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    refused = cli_here("import", "hf", tiny[1], other, "--overwrite")
    assert refused.returncode == 2 and "is not a model folder" in refused.stderr
    assert (other / "keep.txt").read_text() == "mine"
    bad = cli_here("import", "hf", tmp_path / "nowhere", tmp_path / "x")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


# --- a GPT-2-small-sized model ---------------------------------------------------------------


def ioi_like_prompts(vocab: int, n: int = 24, seed: int = 0) -> dict:
    """IOI-shaped prompts over arbitrary token ids: '... A ... B ... B ... ->' answer A, not B;
    the counterfactual repeats a third name instead of B (the ABC ablation)."""
    rng = np.random.default_rng(seed)
    names = rng.choice(np.arange(1000, vocab), size=12, replace=False).tolist()
    filler = rng.integers(0, 1000, size=5).tolist()
    prompts = []
    for _ in range(n):
        a, b, c = rng.choice(names, size=3, replace=False).tolist()
        clean = [filler[0], a, filler[1], b, filler[2], filler[3], b, filler[4]]
        corrupt = [filler[0], a, filler[1], b, filler[2], filler[3], c, filler[4]]
        prompts.append({"clean": clean, "corrupt": corrupt, "answers": [a], "wrong_answers": [b]})
    return {"prompts": prompts}


@pytest.mark.slow
def test_gpt2_small_sized_import_parity(tmp_path, cli_here):
    """A random GPT-2-small-sized checkpoint (12 layers, d 768, 12 heads, 50257 tokens, 1024
    positions), imported through the CLI, gives the same logits as torch."""
    model = build_gpt2(seed=0, scale=None)  # GPT2Config() defaults are GPT-2 small
    assert sum(p.numel() for p in model.parameters()) > 120e6
    native = tmp_path / "models" / "gpt2"
    proc = cli_here("import", "hf", save(model, tmp_path / "gpt2"), native, "--json")
    assert proc.returncode == 0, proc.stderr
    diff = max_diff(model, native, np.random.default_rng(0).integers(0, 50257, (2, 7)))
    assert diff < PARITY_ATOL, diff


def test_training_runs_at_gpt2_small_widths(tmp_path, cli_here):
    """``explainer train`` on an imported checkpoint of GPT-2 small's widths (d 768, 12 heads, 50257
    tokens, 1024 positions) and 2 of its 12 layers: every one of the 5 × 768 residual units is a unit.
    The depth is cut because compiling the 12-layer training step takes minutes of CPU (the scale
    benchmark, ``benchmarks/scale.py``, runs the full depth); 20 steps without the adversary."""
    model = build_gpt2(seed=0, scale=None, n_layer=2)
    native = tmp_path / "models" / "gpt2-2l"
    proc = cli_here("import", "hf", save(model, tmp_path / "gpt2-2l"), native, "--json")
    assert proc.returncode == 0, proc.stderr
    del model
    prompts = tmp_path / "ioi.json"
    prompts.write_text(json.dumps(ioi_like_prompts(50257)))
    settings = tmp_path / "fast.toml"
    settings.write_text("steps = 20\nbatch_size = 8\ncheckpoint_every = 0\n")
    train = cli_here(
        "train", "--model", native, "--task", prompts, "--config", settings, "--lambda", "0.01",
        "--adversary", "none", "--out", tmp_path / "run", "--no-progress", "--json",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    result = json.loads(train.stdout.strip().splitlines()[-1])
    assert result["total_units"] == 5 * 768 and np.isfinite(result["faithfulness"]["kl_mean"])
