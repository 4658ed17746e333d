"""TransformerLens ``HookedTransformer`` files in and out: a config JSON and a state dict.

transformer_lens itself is not a dependency (it pins an older numpy); its formats are plain
files, so explainer reads and writes those:

- **out** (:func:`export_tl`, ``explainer export-model MODEL OUT``): ``OUT/config.json`` holds
  ``HookedTransformerConfig`` keyword arguments and ``OUT/model.safetensors`` the state dict with
  TransformerLens names, including the ``blocks.{l}.attn.mask`` / ``IGNORE`` buffers, so that in a
  TransformerLens environment::

      cfg = HookedTransformerConfig(**json.load(open("OUT/config.json")))
      model = HookedTransformer(cfg)
      model.load_state_dict(safetensors.torch.load_file("OUT/model.safetensors"))

  gives the same model (strict load; no folding or centring is applied or needed).
- **in** (:func:`import_tl`, ``explainer import tl SRC OUT``): ``SRC`` holds a config JSON
  (``config.json`` or ``cfg.json``: ``model.cfg.to_dict()`` dumped with ``default=str``) and one
  state dict: ``model.safetensors`` / ``state_dict.safetensors``, or a ``.pt`` / ``.pth`` file of
  ``model.state_dict()`` (read with ``torch.load(weights_only=True)``, needs ``explainer[torch]``).
  Buffers are dropped; configs that change the forward pass in ways the native model does not
  implement (shortformer positions, ``final_rms``, query/key norms, mixtures of experts, ...) are
  refused by name. Rotary positions, RMSNorm, gated and parallel MLPs, grouped-query attention,
  Gemma-2's post-norms, soft caps and local attention are read as they are. A model whose LayerNorms were folded by
  ``from_pretrained`` has ``normalization_type`` ``"LNPre"``, which the native model runs as is.

The native format already uses TransformerLens's names and shapes, so both directions copy tensors
unchanged: native -> TL -> native gives identical tensors and config.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from explainer.errors import ExplainerError
from explainer.models.config import ModelConfig
from explainer.models.folders import check_out, write_folder, write_model_folder
from explainer.models.hf_import import load_safetensors, load_torch_weights
from explainer.models.native import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    expected_shapes,
    from_state_dict,
    load_model,
    read_json,
    to_state_dict,
    write_json,
)
from explainer.models.transformer import Transformer

CONFIG_NAMES = ("config.json", "cfg.json")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")

# TransformerLens config fields that change the forward pass, with the values the native model runs.
_MUST_BE: dict[str, tuple[Any, ...]] = {
    "final_rms": (False,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "post_embedding_ln": (False,),
    "num_experts": (None,),
    "use_qk_norm": (False,),
}
_ACT_FNS = {"gelu_fast": "gelu_new"}
_BUFFERS = ("attn.mask", "attn.IGNORE", "attn.rotary_sin", "attn.rotary_cos")
_NATIVE_FIELDS = (
    "n_layers d_model n_heads d_head d_vocab n_ctx d_mlp act_fn normalization_type eps attn_only "
    "attention_dir d_vocab_out positional_embedding_type rotary_dim rotary_base rotary_adjacent_pairs "
    "use_NTK_by_parts_rope NTK_by_parts_factor NTK_by_parts_low_freq_factor NTK_by_parts_high_freq_factor "
    "NTK_original_ctx_len gated_mlp n_key_value_heads parallel_attn_mlp use_normalization_before_and_after "
    "attn_scores_soft_cap output_logits_soft_cap use_local_attn window_size attn_types"
).split()


def tl_config(cfg: ModelConfig, model_name: str = "explainer-model") -> dict[str, Any]:
    """``HookedTransformerConfig`` keyword arguments for ``cfg`` (JSON-ready).

    >>> cfg = ModelConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=3, attn_only=True)
    >>> c = tl_config(cfg)
    >>> c["attn_scale"], c["d_vocab_out"], c["normalization_type"]
    (2.0, 5, 'LN')
    """
    families = {k: v for k, v in cfg.to_json().items() if k in _NATIVE_FIELDS[13:]}
    return families | {
        "model_name": model_name,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
        "d_vocab_out": cfg.vocab_out,
        "n_ctx": cfg.n_ctx,
        "act_fn": cfg.act_fn,
        "normalization_type": cfg.normalization_type,
        "eps": cfg.eps,
        "attn_only": cfg.attn_only,
        "attention_dir": cfg.attention_dir,
        "positional_embedding_type": cfg.positional_embedding_type,
        "use_attn_scale": True,
        "attn_scale": cfg.scale,
        "original_architecture": "explainer",
        "init_weights": False,
        "default_prepend_bos": False,
    }


def from_tl_config(data: Any, source: str = "config.json") -> ModelConfig:
    """The native config of a ``HookedTransformerConfig`` dict (its ``to_dict()``), refusing by name
    what the native model cannot run. Defaults are put back (``attn_scale`` ``sqrt(d_head)`` -> null,
    ``d_vocab_out`` equal to ``d_vocab`` -> -1), so a round trip gives the same config.

    >>> c = from_tl_config({"n_layers": 1, "d_model": 8, "n_heads": 2, "d_head": 4, "d_vocab": 5, "n_ctx": 3,
    ...                     "attn_only": True, "attn_scale": 2.0, "d_vocab_out": 5, "dtype": "torch.float32"})
    >>> c.attn_scale is None, c.d_vocab_out
    (True, -1)
    """
    if not isinstance(data, dict):
        raise ExplainerError(f"{source} must hold a JSON object of HookedTransformerConfig fields")
    for key, allowed in _MUST_BE.items():
        if key in data and data[key] not in allowed:
            raise ExplainerError(
                f"{source}: {key}={data[key]!r} is not supported; explainer runs GPT-2-style models with "
                f"{key}={allowed[0]!r}"
            )
    fields = {k: data[k] for k in _NATIVE_FIELDS if k in data}
    for cap in ("attn_scores_soft_cap", "output_logits_soft_cap"):
        if fields.get(cap) is None or fields.get(cap) == -1:
            fields.pop(cap, None)
    if fields.get("positional_embedding_type") == "rotary" and fields.get("rotary_dim") == fields.get("d_head"):
        fields["rotary_dim"] = None
    if not fields.get("use_local_attn"):
        fields.pop("window_size", None), fields.pop("attn_types", None)
    if fields.get("act_fn") in _ACT_FNS:
        fields["act_fn"] = _ACT_FNS[fields["act_fn"]]
    if fields.get("attn_only") and fields.get("act_fn") is None:
        fields.pop("act_fn", None)
    if fields.get("d_vocab_out") == fields.get("d_vocab"):
        fields["d_vocab_out"] = -1
    fields["attn_scale"] = _attn_scale(data, source)
    return ModelConfig.from_json(fields, source=source)


def _attn_scale(data: dict[str, Any], source: str) -> float | None:
    if data.get("use_attn_scale", True) is False:
        return 1.0
    scale = data.get("attn_scale")
    if scale is None or scale == -1 or scale == -1.0:
        return None
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ExplainerError(f"{source}: attn_scale must be a positive number, got {scale!r}")
    d_head = data.get("d_head")
    if isinstance(d_head, int) and math.isclose(scale, math.sqrt(d_head), rel_tol=1e-12):
        return None
    return float(scale)


def tl_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """The model's ``HookedTransformer.state_dict()``: its tensors plus the causal-mask buffers (and,
    with rotary positions, the ``rotary_sin``/``rotary_cos`` tables TransformerLens keeps)."""
    tensors = to_state_dict(model)
    cfg = model.config
    n_ctx = cfg.n_ctx
    tables = _rotary_tables(model)
    for layer in range(cfg.n_layers):
        mask = np.tril(np.ones((n_ctx, n_ctx), dtype=bool))
        window = cfg.window(layer)
        if window is not None:
            mask &= np.triu(np.ones((n_ctx, n_ctx), dtype=bool), 1 - window)
        tensors[f"blocks.{layer}.attn.mask"] = mask
        tensors[f"blocks.{layer}.attn.IGNORE"] = np.array(-np.inf, dtype=np.float32)
        if tables is not None:
            tensors[f"blocks.{layer}.attn.rotary_sin"], tensors[f"blocks.{layer}.attn.rotary_cos"] = tables
    return tensors


def _rotary_tables(model: Transformer) -> tuple[np.ndarray, np.ndarray] | None:
    """TransformerLens's ``[n_ctx, rotary_dim]`` sin and cos: each plane's angle on both of its dimensions."""
    rotary = model.blocks[0].attn.rotary if model.blocks else None
    if rotary is None:
        return None
    cos, sin = rotary.angles(0, model.config.n_ctx)
    if rotary.adjacent_pairs:
        return np.repeat(sin, 2, axis=1), np.repeat(cos, 2, axis=1)
    return np.concatenate([sin, sin], axis=1), np.concatenate([cos, cos], axis=1)


def export_tl(model: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Write the model in the model folder ``model`` as TransformerLens files in ``out`` (a zoo
    model: pass ``explainer.zoo.resolve_model(name)``, as ``explainer export-model`` does).

    >>> import tempfile, jax
    >>> from explainer.models import ModelConfig, init_random, save_model
    >>> cfg = ModelConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=4, attn_only=True,
    ...                   normalization_type=None)
    >>> folder = save_model(init_random(cfg, jax.random.key(0)), tempfile.mkdtemp() + "/model")
    >>> export_tl(folder, tempfile.mkdtemp() + "/tl")["tensors"]  # 12 weights, 2 buffers
    14
    """
    folder = Path(model)
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise ExplainerError(f"OUT {str(out)!r} is the model folder itself; pick another OUT")
    check_out(out, overwrite)
    net = load_model(folder)
    tensors = tl_state_dict(net)
    config = tl_config(net.config, model_name=folder.name)

    def fill(tmp: Path) -> None:
        from safetensors.numpy import save_file

        write_json(tmp / CONFIG_FILE, config)
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        os.chmod(tmp / WEIGHTS_FILE, 0o644)

    write_folder(out, fill)
    return {"out": str(out), "model": str(folder), "format": "tl", "tensors": len(tensors), "config": config}


# --- in --------------------------------------------------------------------------------------


def _find(src: Path, config: str | os.PathLike | None, weights: str | os.PathLike | None) -> tuple[Path, Path]:
    if not src.is_dir():
        raise ExplainerError(f"{str(src)!r} is not a folder; pass the folder holding the config and state dict")
    if config is None:
        found = [src / n for n in CONFIG_NAMES if (src / n).is_file()]
        if not found:
            raise ExplainerError(f"{str(src)!r} has no {' or '.join(CONFIG_NAMES)}; save model.cfg.to_dict() there")
        config = found[0]
    if weights is None:
        candidates = sorted(p for p in src.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        if len(candidates) != 1:
            names = [p.name for p in candidates]
            raise ExplainerError(
                f"{str(src)!r} holds {len(candidates)} state-dict files {names}; it needs exactly one "
                f"({', '.join('*' + s for s in WEIGHT_SUFFIXES)}): pass --weights FILE"
            )
        weights = candidates[0]
    return Path(config), Path(weights)


def read_tl(
    src: str | os.PathLike, config: str | os.PathLike | None = None, weights: str | os.PathLike | None = None
) -> Transformer:
    """The native model of TransformerLens files in ``src`` (or the files given)."""
    config_path, weights_path = _find(Path(src), config, weights)
    cfg = from_tl_config(read_json(config_path), source=str(config_path))
    if weights_path.suffix == ".safetensors":
        tensors = load_safetensors(weights_path)
    elif weights_path.suffix in (".pt", ".pth"):
        tensors = load_torch_weights(weights_path)
    else:
        raise ExplainerError(f"{weights_path} is not a state dict explainer reads ({', '.join(WEIGHT_SUFFIXES)})")
    for name in list(tensors):
        if name.endswith(_BUFFERS) and name not in expected_shapes(cfg):
            del tensors[name]
    return from_state_dict(cfg, tensors, source=str(weights_path))


def import_tl(
    src: str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
    config: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Convert TransformerLens files (see the module docstring) into the native model folder ``out``.

    >>> import tempfile, jax
    >>> from explainer.models import ModelConfig, init_random, save_model
    >>> cfg = ModelConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=5, n_ctx=4)
    >>> folder = save_model(init_random(cfg, jax.random.key(0)), tempfile.mkdtemp() + "/model")
    >>> tl = export_tl(folder, tempfile.mkdtemp() + "/tl")["out"]
    >>> import_tl(tl, tempfile.mkdtemp() + "/native")["n_layers"]
    1
    """
    src, out = Path(src), Path(out)
    check_out(out, overwrite)
    model = read_tl(src, config, weights)
    cfg = model.config
    card = {
        "name": out.name,
        "kind": "tl",
        "description": f"imported from TransformerLens files in {src.resolve()}: {cfg.n_layers} layers, "
        f"d_model {cfg.d_model}, {cfg.n_heads} heads",
        "source": {"path": str(src.resolve())},
    }
    write_model_folder(model, out, card)
    summary = {"out": str(out), "source": str(src), "n_layers": cfg.n_layers, "d_model": cfg.d_model}
    return summary | {"config": cfg.to_json()}
