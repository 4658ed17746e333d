"""Import a Hugging Face checkpoint folder as a native model folder.

``model_type`` gpt2 is mapped here; gpt_neox, llama, mistral, qwen2, gemma and gemma2 in
:mod:`explainer.models.hf_families`. What follows is GPT-2's mapping; the reading of the folder is
shared.

``import_hf("./gpt2", "models/gpt2")`` (or ``explainer import hf ./gpt2 models/gpt2``) reads the
folder that ``GPT2LMHeadModel.save_pretrained`` writes (or a hub snapshot of ``gpt2``,
``distilgpt2``, ``gpt2-medium`` ...): ``config.json`` and the weights, from ``model.safetensors``
(sharded ones with ``model.safetensors.index.json`` too) or else ``pytorch_model.bin``. Safetensors
need no torch; ``pytorch_model.bin`` needs the ``explainer[torch]`` extra and is loaded only with
``torch.load(..., weights_only=True)``, which refuses anything but tensors. Other pickles are
refused.

The mapping onto the native (TransformerLens) names keeps every weight as it is, LayerNorm included
(nothing is folded or centred, like TransformerLens's ``from_pretrained_no_processing``), so the
imported model computes the same logits as the torch model, up to float32 rounding:

==============================  ============================================================
Hugging Face (``transformer.``)  native
==============================  ============================================================
``wte.weight [V, d]``           ``embed.W_E``; also ``unembed.W_U = wte.weight.T`` when the
                                embeddings are tied (the default), else ``lm_head.weight.T``
``wpe.weight [n_ctx, d]``       ``pos_embed.W_pos``
``h.{l}.ln_1``, ``ln_2``        ``blocks.{l}.ln1``, ``ln2`` (``weight``/``bias`` -> ``w``/``b``)
``h.{l}.attn.c_attn [d, 3d]``   Conv1D (input-major); split into Q, K, V, each reshaped to
                                ``W_Q [n_heads, d, d_head]`` and ``b_Q [n_heads, d_head]``
``h.{l}.attn.c_proj [d, d]``    ``W_O [n_heads, d_head, d]``, ``b_O``
``h.{l}.mlp.c_fc``, ``c_proj``  ``mlp.W_in [d, d_mlp]``, ``b_in``, ``W_out [d_mlp, d]``, ``b_out``
``ln_f``                        ``ln_final``
(none)                          ``unembed.b_U`` = zeros (GPT-2 has no output bias)
==============================  ============================================================

Config: ``n_layer, n_embd, n_head, n_inner (default 4 n_embd), vocab_size, n_positions,
layer_norm_epsilon, activation_function`` become ``n_layers, d_model, n_heads, d_mlp, d_vocab,
n_ctx, eps, act_fn`` (``gelu_new``, ``gelu_pytorch_tanh`` and ``gelu_fast`` are the same tanh
approximation: ``gelu_new``); ``scale_attn_weights: false`` becomes ``attn_scale 1``. The causal
mask buffers (``attn.bias``, ``attn.masked_bias``) of old checkpoints are dropped. Refused, with a
message: another ``model_type``, ``scale_attn_by_inverse_layer_idx``, cross-attention, and any
tensor the mapping does not know. Weights are converted to float32.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import jax
import numpy as np

from explainer.errors import ExplainerError
from explainer.models.config import ModelConfig
from explainer.models.folders import check_out, write_model_folder
from explainer.models.hf_families import (
    FAMILIES,
    family_config,
    family_shapes,
    family_tensors,
    is_buffer,
    tied_embeddings,
)
from explainer.models.native import from_state_dict, read_json
from explainer.models.transformer import Transformer

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"

# Hugging Face activation_function -> act_fn (the first three are one tanh approximation)
ACT_FNS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new"}
ACT_FNS |= {"gelu": "gelu", "relu": "relu"}
MODEL_TYPES = ("gpt2", *FAMILIES)
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


# --- reading the folder ----------------------------------------------------------------------


def read_hf_checkpoint(src: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """``config.json`` as a dict, the tensors by Hugging Face name, and the weights file read."""
    src = Path(src)
    if not src.is_dir():
        what = "is a file" if src.exists() else "does not exist"
        raise ExplainerError(f"checkpoint folder {str(src)!r} {what}; pass the folder holding config.json")
    if not (src / "config.json").is_file():
        raise ExplainerError(f"{str(src)!r} has no config.json; pass a Hugging Face checkpoint folder")
    config = read_json(src / "config.json")
    if not isinstance(config, dict):
        raise ExplainerError(f"{src / 'config.json'} must hold a JSON object")
    if (src / SAFETENSORS).is_file():
        return config, load_safetensors(src / SAFETENSORS), SAFETENSORS
    if (src / SAFETENSORS_INDEX).is_file():
        return config, _load_sharded(src), SAFETENSORS_INDEX
    if (src / PYTORCH_BIN).is_file():
        return config, load_torch_weights(src / PYTORCH_BIN), PYTORCH_BIN
    present = sorted(p.name for p in src.iterdir() if p.is_file() and p.name != "config.json")
    raise ExplainerError(
        f"{str(src)!r} has no {SAFETENSORS} or {PYTORCH_BIN} (it has {present or 'nothing else'}); explainer "
        f"reads those two only (other pickles can run code when loaded): save the model with "
        f"save_pretrained(), or convert it once with safetensors.torch.save_file(state_dict, '{SAFETENSORS}')"
    )


def _load_sharded(src: Path) -> dict[str, np.ndarray]:
    index = read_json(src / SAFETENSORS_INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ExplainerError(f"{src / SAFETENSORS_INDEX} has no 'weight_map' of tensor names to files")
    tensors: dict[str, np.ndarray] = {}
    for name in sorted(set(weight_map.values())):
        if Path(name).name != name or not (src / name).is_file():
            raise ExplainerError(f"{src / SAFETENSORS_INDEX} names shard {name!r}, which is not in {str(src)!r}")
        tensors |= load_safetensors(src / name)
    return tensors


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy, bfloat16 ones widened to float32 (no torch)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except TypeError:  # a dtype numpy lacks (bfloat16 without ml_dtypes): read the file by hand
        return _load_safetensors_raw(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ExplainerError(f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt") from None
    # with ml_dtypes loaded (jax loads it) numpy reads bfloat16 as its own kind of dtype: widen it
    return {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in tensors.items()}


_RAW_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "U8": "u1", "BOOL": "?"}


def _load_safetensors_raw(path: Path) -> dict[str, np.ndarray]:
    """The safetensors layout: 8-byte header length, a JSON header, then the raw little-endian data."""
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            f.seek(8 + n + start)
            raw = f.read(end - start)
            if info["dtype"] == "BF16":
                array = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
            elif info["dtype"] in _RAW_DTYPES:
                array = np.frombuffer(raw, _RAW_DTYPES[info["dtype"]]).copy()
            else:
                raise ExplainerError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which explainer cannot read")
            out[name] = array.reshape(info["shape"])
    return out


def load_torch_weights(path: Path) -> dict[str, np.ndarray]:
    """A pickled state dict, loaded with ``torch.load(weights_only=True)`` (tensors only), as numpy."""
    import pickle

    try:
        import torch
    except ImportError:
        raise ExplainerError(
            f"{path} is a torch checkpoint; reading it needs torch: pip install 'explainer[torch]' "
            f"(or convert it once to {SAFETENSORS}, which needs no torch)"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExplainerError(
            f"{path} holds more than tensors, and explainer unpickles only with weights_only=True ({first}); "
            "save the state dict (model.state_dict()) or save_pretrained() to model.safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ExplainerError(f"{path} is not a readable torch checkpoint ({err}); it is truncated or corrupt") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        got = type(state).__name__
        raise ExplainerError(f"{path} is not a state dict of tensors (got {got}); save model.state_dict()")
    return {
        str(k): (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).cpu().numpy()
        for k, v in state.items()
    }


# --- the conversion --------------------------------------------------------------------------


def hf_config_to_native(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The native config of a ``config.json`` (refusing what the native model cannot run).

    >>> hf_config_to_native({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4,
    ...                      "vocab_size": 100, "n_positions": 32}).d_head
    16
    """
    model_type = hf.get("model_type")
    if model_type in FAMILIES:
        return family_config(hf, source)
    if model_type != "gpt2":
        raise ExplainerError(
            f"{source}: model_type {model_type!r} is not supported; explainer imports model_type "
            f"{', '.join(MODEL_TYPES)}"
        )
    for key, bad in (("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True)):
        if hf.get(key) == bad:
            raise ExplainerError(f"{source}: {key}={bad} is not supported; the native model has no such attention")
    try:
        d_model, n_heads = int(hf["n_embd"]), int(hf["n_head"])
        fields = dict(
            n_layers=int(hf["n_layer"]),
            d_model=d_model,
            n_heads=n_heads,
            d_vocab=int(hf["vocab_size"]),
            n_ctx=int(hf.get("n_positions", hf.get("n_ctx"))),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ExplainerError(
            f"{source} lacks a usable GPT-2 field ({err}); it needs n_layer, n_embd, n_head, vocab_size, n_positions"
        ) from None
    if n_heads < 1 or d_model % n_heads:
        raise ExplainerError(f"{source}: n_embd={d_model} is not a multiple of n_head={n_heads}")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACT_FNS:
        raise ExplainerError(f"{source}: activation_function {act!r} is not supported; valid: {', '.join(ACT_FNS)}")
    n_inner = hf.get("n_inner")
    return ModelConfig(
        **fields,
        d_head=d_model // n_heads,
        d_mlp=int(n_inner) if n_inner is not None else 4 * d_model,
        act_fn=ACT_FNS[act],
        normalization_type="LN",
        eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
    )


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, m = cfg.d_model, cfg.d_mlp or 0
    shapes = {"wte.weight": (cfg.d_vocab, d), "wpe.weight": (cfg.n_ctx, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for layer in range(cfg.n_layers):
        p = f"h.{layer}."
        for name, shape in {
            "ln_1.weight": (d,),
            "ln_1.bias": (d,),
            "attn.c_attn.weight": (d, 3 * d),
            "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.weight": (d, d),
            "attn.c_proj.bias": (d,),
            "ln_2.weight": (d,),
            "ln_2.bias": (d,),
            "mlp.c_fc.weight": (d, m),
            "mlp.c_fc.bias": (m,),
            "mlp.c_proj.weight": (m, d),
            "mlp.c_proj.bias": (d,),
        }.items():
            shapes[p + name] = shape
    return shapes


def _strip(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Names without the ``transformer.`` prefix, mask buffers dropped."""
    out = {}
    for name, value in tensors.items():
        short = name.removeprefix("transformer.")
        if not _BUFFER.fullmatch(short):
            out[short] = value
    return out


def hf_to_native(hf: dict[str, Any], tensors: dict[str, np.ndarray], source: str = "checkpoint") -> Transformer:
    """The native model of a config and its Hugging Face tensors (validated, float32)."""
    cfg = hf_config_to_native(hf, source=f"{source}/config.json")
    if hf.get("model_type") in FAMILIES:
        return _family_to_native(hf, cfg, tensors, source)
    t = _strip(tensors)
    shapes = _hf_shapes(cfg)
    tied = hf.get("tie_word_embeddings", True)
    if not tied:
        shapes["lm_head.weight"] = (cfg.d_vocab, cfg.d_model)
    t = {k: v for k, v in t.items() if not (tied and k == "lm_head.weight")}
    missing, extra = sorted(set(shapes) - set(t)), sorted(set(t) - set(shapes))
    if missing:
        raise ExplainerError(
            f"{source} is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            f"config.json (n_layer={cfg.n_layers}) needs them: is this a GPT2LMHeadModel checkpoint?"
        )
    if extra:
        raise ExplainerError(
            f"{source} has tensor(s) a GPT-2 language model does not: {extra[:5]}{' ...' if len(extra) > 5 else ''}; "
            "explainer imports GPT2LMHeadModel / GPT2Model checkpoints only"
        )
    _check_shapes(t, shapes, source)
    return from_state_dict(cfg, _native_tensors(cfg, t, tied), source=source)


def _check_shapes(t: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    for name, shape in shapes.items():
        if tuple(t[name].shape) != shape:
            raise ExplainerError(
                f"{source}: tensor {name!r} has shape {list(t[name].shape)} but config.json implies {list(shape)}; "
                "the weights and config.json disagree"
            )


def _family_to_native(hf: dict[str, Any], cfg: ModelConfig, tensors: dict[str, np.ndarray], source: str) -> Transformer:
    kind, tied = hf["model_type"], tied_embeddings(hf)
    t = {k: v for k, v in tensors.items() if not is_buffer(k)}
    if tied:
        t.pop("lm_head.weight", None)
    shapes = family_shapes(hf, cfg, tied)
    missing, extra = sorted(set(shapes) - set(t)), sorted(set(t) - set(shapes))
    if missing:
        raise ExplainerError(
            f"{source} is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; config.json "
            f"(model_type {kind!r}, {cfg.n_layers} layers, tie_word_embeddings={tied}) needs them: is this a "
            "...ForCausalLM checkpoint of that config?"
        )
    if extra:
        raise ExplainerError(
            f"{source} has tensor(s) a {kind} language model does not: {extra[:5]}{' ...' if len(extra) > 5 else ''}; "
            "explainer imports ...ForCausalLM checkpoints of the config's model_type only"
        )
    _check_shapes(t, shapes, source)
    return from_state_dict(cfg, family_tensors(hf, cfg, t, tied), source=source)


def _native_tensors(cfg: ModelConfig, t: dict[str, np.ndarray], tied: bool) -> dict[str, np.ndarray]:
    d, h, e = cfg.d_model, cfg.n_heads, cfg.d_head
    unembed = t["wte.weight"] if tied else t["lm_head.weight"]
    out = {
        "embed.W_E": t["wte.weight"],
        "pos_embed.W_pos": t["wpe.weight"],
        "ln_final.w": t["ln_f.weight"],
        "ln_final.b": t["ln_f.bias"],
        "unembed.W_U": np.ascontiguousarray(unembed.T),
        "unembed.b_U": np.zeros(cfg.d_vocab, np.float32),
    }
    for layer in range(cfg.n_layers):
        p, q = f"h.{layer}.", f"blocks.{layer}."
        qkv_w = t[p + "attn.c_attn.weight"].reshape(d, 3, h, e)
        qkv_b = t[p + "attn.c_attn.bias"].reshape(3, h, e)
        for i, name in enumerate("QKV"):
            out[q + f"attn.W_{name}"] = np.ascontiguousarray(qkv_w[:, i].transpose(1, 0, 2))
            out[q + f"attn.b_{name}"] = qkv_b[i]
        out |= {
            q + "attn.W_O": t[p + "attn.c_proj.weight"].reshape(h, e, d),
            q + "attn.b_O": t[p + "attn.c_proj.bias"],
            q + "ln1.w": t[p + "ln_1.weight"],
            q + "ln1.b": t[p + "ln_1.bias"],
            q + "ln2.w": t[p + "ln_2.weight"],
            q + "ln2.b": t[p + "ln_2.bias"],
            q + "mlp.W_in": t[p + "mlp.c_fc.weight"],
            q + "mlp.b_in": t[p + "mlp.c_fc.bias"],
            q + "mlp.W_out": t[p + "mlp.c_proj.weight"],
            q + "mlp.b_out": t[p + "mlp.c_proj.bias"],
        }
    return out


def import_hf(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Convert the checkpoint folder ``src`` (any ``model_type`` of :data:`MODEL_TYPES`) into the native
    model folder ``out``.

    Writes ``config.json``, ``model.safetensors`` and ``card.json`` (where the model came from)
    atomically, plus the checkpoint's ``tokenizer.json`` when it has one (prompts files may then give
    text: :mod:`explainer.tasks.text`). ``out`` must not exist, or be a model folder and ``overwrite`` set. Returns a
    summary (what ``explainer import hf --json`` prints). Example, with a checkpoint saved by
    ``GPT2LMHeadModel.save_pretrained("./gpt2")``::

        import_hf("./gpt2", "models/gpt2")
        explainer.explain("models/gpt2", "ioi.json")
    """
    src, out = Path(src), Path(out)
    check_out(out, overwrite)
    hf, tensors, weights = read_hf_checkpoint(src)
    model = hf_to_native(hf, tensors, source=str(src))
    cfg = model.config
    card = {
        "name": out.name,
        "kind": "hf",
        "description": (
            f"imported from the Hugging Face checkpoint {src.resolve()} ({weights}): {hf.get('model_type')}, "
            f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, vocabulary {cfg.d_vocab}"
        ),
        "source": {
            "path": str(src.resolve()),
            "weights": weights,
            "model_type": hf.get("model_type"),
            "architectures": hf.get("architectures"),
            "transformers_version": hf.get("transformers_version"),
            "name_or_path": hf.get("_name_or_path"),
        },
    }
    tokenizer = src / "tokenizer.json"
    write_model_folder(model, out, card, {"tokenizer.json": tokenizer} if tokenizer.is_file() else None)
    return {
        "out": str(out),
        "source": str(src),
        "model_type": hf.get("model_type"),
        "weights": weights,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
        "n_ctx": cfg.n_ctx,
        "act_fn": cfg.act_fn,
        "parameters": int(sum(x.size for x in jax.tree_util.tree_leaves(model))),
        "tokenizer": tokenizer.is_file(),
    }
