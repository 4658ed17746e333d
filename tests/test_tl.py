"""TransformerLens files in and out: native -> TL -> native is exact, and TL configs are checked."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from explainer.errors import ExplainerError
from explainer.models import ModelConfig, init_random, load_model, save_model
from explainer.models.native import to_state_dict
from explainer.models.tl import export_tl, from_tl_config, import_tl, read_tl, tl_config
from explainer.zoo import resolve_model

CONFIGS = {
    "zoo-ioi": None,  # LayerNorm, MLP, relu
    "planted-distractor": None,  # attention only, no LayerNorm
    "lnpre-gelu-scaled": ModelConfig(
        n_layers=2, d_model=12, n_heads=3, d_head=4, d_mlp=20, d_vocab=7, n_ctx=5, act_fn="gelu",
        normalization_type="LNPre", attn_scale=3.0, d_vocab_out=4, attention_dir="bidirectional",
    ),
    "gemma2-like": ModelConfig(
        n_layers=2, d_model=12, n_heads=4, d_head=4, d_mlp=20, d_vocab=7, n_ctx=6, act_fn="gelu_pytorch_tanh",
        normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, n_key_value_heads=2,
        use_normalization_before_and_after=True, attn_scores_soft_cap=5.0, output_logits_soft_cap=3.0,
        use_local_attn=True, window_size=2, attn_types=("local", "global"), attn_scale=3.0,
    ),
    "neox-like": ModelConfig(
        n_layers=2, d_model=12, n_heads=3, d_head=4, d_mlp=20, d_vocab=7, n_ctx=6, act_fn="gelu",
        positional_embedding_type="rotary", rotary_dim=2, parallel_attn_mlp=True, rotary_base=100,
    ),
}  # fmt: skip


@pytest.fixture(params=sorted(CONFIGS))
def model_folder(request, tmp_path):
    cfg = CONFIGS[request.param]
    if cfg is None:
        return resolve_model(request.param.removeprefix("zoo-"))
    return save_model(init_random(cfg, jax.random.key(0), std=0.5), tmp_path / "model")


def test_round_trip_is_exact(model_folder, tmp_path):
    before = load_model(model_folder)
    export_tl(model_folder, tmp_path / "tl")
    tl_cfg = json.loads((tmp_path / "tl" / "config.json").read_text())
    assert tl_cfg["d_vocab_out"] == before.config.vocab_out and tl_cfg["attn_scale"] == before.config.scale
    import_tl(tmp_path / "tl", tmp_path / "back")
    after = load_model(tmp_path / "back")
    assert after.config == before.config
    a, b = to_state_dict(before), to_state_dict(after)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_state_dict_has_the_buffers_hooked_transformer_expects(tmp_path):
    from safetensors.numpy import load_file

    export_tl(resolve_model("ioi"), tmp_path / "tl")
    tensors = load_file(str(tmp_path / "tl" / "model.safetensors"))
    cfg = load_model(resolve_model("ioi")).config
    mask = tensors["blocks.1.attn.mask"]
    assert mask.dtype == bool and mask.shape == (cfg.n_ctx, cfg.n_ctx) and mask[1, 0] and not mask[0, 1]
    assert tensors["blocks.0.attn.IGNORE"].shape == () and tensors["blocks.0.attn.W_Q"].shape == (4, 64, 16)


def test_a_transformer_lens_dump_is_read(tmp_path):
    """``model.cfg.to_dict()`` dumped with default=str, and a torch-saved ``state_dict()``."""
    torch = pytest.importorskip("torch")
    folder = tmp_path / "dump"
    folder.mkdir()
    native = load_model(resolve_model("ioi"))
    dump = tl_config(native.config) | {
        "dtype": "torch.float32", "device": "cpu", "n_params": 123, "tokenizer_name": None, "seed": None,
        "use_attn_result": False, "tie_word_embeddings": False, "rotary_dim": None, "n_key_value_heads": None,
        "NTK_by_parts_factor": 8.0, "attn_scores_soft_cap": -1.0, "output_logits_soft_cap": -1.0,
    }  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(dump))
    state = {k: torch.from_numpy(np.array(v)) for k, v in export_state(native).items()}
    torch.save(state, folder / "state_dict.pt")
    model = read_tl(folder)
    assert model.config == native.config
    tokens = jax.numpy.zeros((1, 5), dtype=int)
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(native(tokens)))


def export_state(model):
    from explainer.models.tl import tl_state_dict

    return tl_state_dict(model)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"positional_embedding_type": "shortformer"}, "positional_embedding_type 'shortformer'"),
        ({"normalization_type": "LNPost"}, "normalization_type"),
        ({"final_rms": True}, "final_rms=True"),
        ({"use_qk_norm": True}, "use_qk_norm=True"),
        ({"n_key_value_heads": 3}, "n_key_value_heads"),
        ({"act_fn": "solu_ln"}, "act_fn"),
        ({"attn_scale": "big"}, "attn_scale must be a positive number"),
    ],
)
def test_unsupported_tl_configs_are_refused(change, message):
    base = tl_config(load_model(resolve_model("ioi")).config)
    with pytest.raises(ExplainerError) as err:
        from_tl_config(base | change, source="cfg.json")
    assert message in str(err.value)


def test_use_attn_scale_false_means_scale_one():
    base = tl_config(load_model(resolve_model("ioi")).config)
    assert from_tl_config(base | {"use_attn_scale": False}).scale == 1.0


def test_tl_folder_problems(tmp_path):
    export_tl(resolve_model("planted-joint"), tmp_path / "tl")
    (tmp_path / "tl" / "extra.pt").write_bytes(b"")
    with pytest.raises(ExplainerError, match="needs exactly one"):
        import_tl(tmp_path / "tl", tmp_path / "out")
    (tmp_path / "tl" / "extra.pt").unlink()
    (tmp_path / "tl" / "config.json").rename(tmp_path / "tl" / "other.json")
    with pytest.raises(ExplainerError, match="has no config.json or cfg.json"):
        import_tl(tmp_path / "tl", tmp_path / "out")
    result = import_tl(tmp_path / "tl", tmp_path / "out", config=tmp_path / "tl" / "other.json")
    assert result["n_layers"] == 1
    with pytest.raises(ExplainerError, match="is the model folder itself"):
        export_tl(tmp_path / "out", tmp_path / "out")


def test_cli_round_trip(tmp_path, cli_here):
    def cli(*args):
        proc = cli_here(*args)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    assert cli("export-model", "planted-cancel", tmp_path / "tl", "--json")["format"] == "tl"
    assert cli("import", "tl", tmp_path / "tl", tmp_path / "back", "--json")["n_layers"] == 1
    assert load_model(tmp_path / "back").config == load_model(resolve_model("planted-cancel")).config
