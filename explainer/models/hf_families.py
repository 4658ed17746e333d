"""Hugging Face checkpoints of the rotary families: GPT-NeoX (Pythia), Llama, Mistral, Qwen2, Gemma, Gemma-2.

:mod:`explainer.models.hf_import` reads the folder and hands the config and tensors here; this module
maps them onto the native (TransformerLens) names, as TransformerLens's own conversions do, keeping
every weight as it is (nothing folded into a neighbour) except where TransformerLens stores a
weight in another form:

- Gemma's norms compute ``x · (1 + w)``: the one is added to ``w``; Gemma's embeddings are scaled
  by ``sqrt(d_model)`` in the forward pass: the scale is folded into ``embed.W_E`` (not into the
  tied unembedding).
- ``q_proj [n_heads · d_head, d]`` becomes ``W_Q [n_heads, d, d_head]``; with fewer key/value heads
  than query heads ``k_proj``/``v_proj`` become ``_W_K``/``_W_V [n_kv_heads, d, d_head]`` (and
  ``n_key_value_heads`` is set), otherwise ``W_K``/``W_V``.
- GPT-NeoX's fused ``query_key_value [n_heads · 3 · d_head, d]`` is split per head into Q, K, V.
- Biases a family lacks are zeros (TransformerLens's convention), ``unembed.b_U`` too.

Config: sizes, ``rms_norm_eps``/``layer_norm_eps``, the activation, ``head_dim``, rotary base and
partial factor (``rope_parameters`` of transformers 5, or the older ``rope_theta``,
``rope_scaling``, ``rotary_pct``, ``rotary_emb_base``), Llama-3 rope scaling (``rope_type``
``llama3``), ``tie_word_embeddings``, GPT-NeoX's ``use_parallel_residual``, Gemma-2's
``query_pre_attn_scalar`` (as ``attn_scale``), soft caps and sliding-window layers
(``layer_types``; Mistral's ``sliding_window`` on every layer; Qwen2's ``use_sliding_window``).
Refused by name: other rope types, Llama's ``mlp_bias`` (TransformerLens's gated MLP has no gate
bias), bidirectional Gemma.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from explainer.errors import ExplainerError
from explainer.models.config import ModelConfig

FAMILIES = ("gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2")
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "gemma", "gemma2")
_ACT_FNS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu"}
_ACT_FNS |= {"gelu_pytorch_tanh": "gelu_pytorch_tanh", "gelu_fast": "gelu_new"}
_TIED_DEFAULT = {"gpt_neox": False, "llama": False, "mistral": False, "qwen2": False, "gemma": True, "gemma2": True}
# buffers some older checkpoints saved: causal masks and rotary tables, recomputed here
_BUFFERS = (".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def _get(hf: dict[str, Any], source: str, *names: str) -> Any:
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    raise ExplainerError(f"{source} lacks {names[0]!r}; a {hf.get('model_type')} config.json needs it")


def _rope(hf: dict[str, Any], source: str) -> tuple[float, float, dict[str, Any] | None]:
    """``(base, partial_rotary_factor, llama3_params or None)``."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or (params and not all(isinstance(k, str) for k in params)):
        raise ExplainerError(f"{source}: rope_parameters must be a JSON object")
    if params and all(isinstance(v, dict) for v in params.values()):  # one per layer type: they must agree
        values = list(params.values())
        if any(v != values[0] for v in values):
            raise ExplainerError(f"{source}: rope_parameters differ between layer types; explainer uses one rotary")
        params = values[0]
    base = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    default_partial = 0.25 if hf.get("model_type") == "gpt_neox" else 1.0
    partial = hf.get("partial_rotary_factor", hf.get("rotary_pct", default_partial))
    partial = params.get("partial_rotary_factor", partial)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(base), float(partial), None
    if kind == "llama3":
        return float(base), float(partial), params
    raise ExplainerError(
        f"{source}: rope_type {kind!r} is not supported; explainer runs plain rotary positions and Llama-3's "
        "scaling (rope_type 'llama3')"
    )


def _windows(hf: dict[str, Any], n_layers: int, source: str) -> dict[str, Any]:
    """The sliding-window fields: ``use_local_attn``, ``window_size``, ``attn_types``."""
    kind, window = hf["model_type"], hf.get("sliding_window")
    types = hf.get("layer_types")
    if types is None:
        if kind == "gemma2":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        elif kind == "mistral" and window is not None:
            types = ["sliding_attention"] * n_layers
        elif kind == "qwen2" and hf.get("use_sliding_window") and window is not None:
            first = int(hf.get("max_window_layers", n_layers))
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        else:
            types = ["full_attention"] * n_layers
    if kind == "qwen2" and not hf.get("use_sliding_window"):
        window = None
    if not isinstance(types, list) or len(types) != n_layers:
        raise ExplainerError(f"{source}: layer_types must list one entry per layer ({n_layers})")
    bad = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
    if bad:
        raise ExplainerError(f"{source}: layer_types {bad} are not supported; valid: sliding_attention, full_attention")
    if window is None or "sliding_attention" not in types:
        return {}
    local = ["local" if t == "sliding_attention" else "global" for t in types]
    return {"use_local_attn": True, "window_size": int(window), "attn_types": local}


def family_config(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The native config of a GPT-NeoX, Llama, Mistral, Qwen2, Gemma or Gemma-2 ``config.json``.

    >>> cfg = family_config({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
    ...     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 50,
    ...     "max_position_embeddings": 64})
    >>> cfg.normalization_type, cfg.n_key_value_heads, cfg.d_head, cfg.gated_mlp
    ('RMS', 2, 8, True)
    """
    kind = hf["model_type"]
    d, n_layers = int(_get(hf, source, "hidden_size")), int(_get(hf, source, "num_hidden_layers"))
    heads = int(_get(hf, source, "num_attention_heads"))
    kv = int(hf.get("num_key_value_heads") or heads)
    d_head = int(hf.get("head_dim") or d // heads)
    if kind == "gpt_neox" and d % heads:
        raise ExplainerError(f"{source}: hidden_size={d} is not a multiple of num_attention_heads={heads}")
    if kind == "llama" and hf.get("mlp_bias"):
        raise ExplainerError(f"{source}: mlp_bias=true is not supported (the gated MLP has no gate bias)")
    if kind in ("gemma", "gemma2") and hf.get("use_bidirectional_attention"):
        raise ExplainerError(f"{source}: use_bidirectional_attention is not supported; explainer runs causal models")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu" if kind == "gpt_neox" else "silu")
    if kind == "gemma" and act == "gelu":  # transformers reads Gemma's legacy "gelu" as the tanh form
        act = "gelu_pytorch_tanh"
    if act not in _ACT_FNS:
        raise ExplainerError(f"{source}: activation {act!r} is not supported; valid: {', '.join(_ACT_FNS)}")
    base, partial, llama3 = _rope(hf, source)
    fields: dict[str, Any] = dict(
        n_layers=n_layers,
        d_model=d,
        n_heads=heads,
        d_head=d_head,
        d_mlp=int(_get(hf, source, "intermediate_size")),
        d_vocab=int(_get(hf, source, "vocab_size")),
        n_ctx=int(_get(hf, source, "max_position_embeddings")),
        act_fn=_ACT_FNS[act],
        normalization_type="LN" if kind == "gpt_neox" else "RMS",
        eps=float(hf.get("layer_norm_eps", 1e-5)) if kind == "gpt_neox" else float(hf.get("rms_norm_eps", 1e-6)),
        positional_embedding_type="rotary",
        rotary_dim=int(d_head * partial),
        rotary_base=base,
        gated_mlp=kind != "gpt_neox",
        n_key_value_heads=kv if kv != heads else None,
        parallel_attn_mlp=kind == "gpt_neox" and bool(hf.get("use_parallel_residual", True)),
    )
    if fields["rotary_dim"] == d_head:
        fields["rotary_dim"] = None
    if llama3 is not None:
        fields |= dict(
            use_NTK_by_parts_rope=True,
            NTK_by_parts_factor=float(llama3["factor"]),
            NTK_by_parts_low_freq_factor=float(llama3["low_freq_factor"]),
            NTK_by_parts_high_freq_factor=float(llama3["high_freq_factor"]),
            NTK_original_ctx_len=int(llama3["original_max_position_embeddings"]),
        )
    if kind == "gemma2":
        fields |= dict(
            use_normalization_before_and_after=True,
            attn_scale=math.sqrt(float(hf.get("query_pre_attn_scalar", 256))),
            attn_scores_soft_cap=float(hf.get("attn_logit_softcapping") or -1.0),
            output_logits_soft_cap=float(hf.get("final_logit_softcapping") or -1.0),
        )
        if math.isclose(fields["attn_scale"], math.sqrt(d_head), rel_tol=1e-12):
            fields["attn_scale"] = None
    if kind != "gpt_neox":
        fields |= _windows(hf, n_layers, source)
    return ModelConfig(**fields)


def family_shapes(hf: dict[str, Any], cfg: ModelConfig, tied: bool) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name the checkpoint must hold, with its shape."""
    kind, d, m, v = hf["model_type"], cfg.d_model, cfg.d_mlp or 0, cfg.d_vocab
    h, kv, e = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    if kind == "gpt_neox":
        shapes = {"gpt_neox.embed_in.weight": (v, d), "gpt_neox.final_layer_norm.weight": (d,)}
        shapes |= {"gpt_neox.final_layer_norm.bias": (d,), "embed_out.weight": (v, d)}
        bias = bool(hf.get("attention_bias", True))
        for layer in range(cfg.n_layers):
            p = f"gpt_neox.layers.{layer}."
            for ln in ("input_layernorm", "post_attention_layernorm"):
                shapes |= {p + f"{ln}.weight": (d,), p + f"{ln}.bias": (d,)}
            shapes |= {p + "attention.query_key_value.weight": (3 * h * e, d), p + "attention.dense.weight": (d, h * e)}
            if bias:
                shapes |= {p + "attention.query_key_value.bias": (3 * h * e,), p + "attention.dense.bias": (d,)}
            shapes |= {p + "mlp.dense_h_to_4h.weight": (m, d), p + "mlp.dense_h_to_4h.bias": (m,)}
            shapes |= {p + "mlp.dense_4h_to_h.weight": (d, m), p + "mlp.dense_4h_to_h.bias": (d,)}
        return shapes
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not tied:
        shapes["lm_head.weight"] = (v, d)
    qkv_bias = kind == "qwen2" or bool(hf.get("attention_bias"))
    norms = ["input_layernorm", "post_attention_layernorm"]
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if kind == "gemma2" else []
    for layer in range(cfg.n_layers):
        p = f"model.layers.{layer}."
        shapes |= {p + f"{ln}.weight": (d,) for ln in norms}
        for name, rows in (("q", h), ("k", kv), ("v", kv)):
            shapes[p + f"self_attn.{name}_proj.weight"] = (rows * e, d)
            if qkv_bias:
                shapes[p + f"self_attn.{name}_proj.bias"] = (rows * e,)
        shapes[p + "self_attn.o_proj.weight"] = (d, h * e)
        if kind != "qwen2" and hf.get("attention_bias"):
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        shapes |= {p + "mlp.gate_proj.weight": (m, d), p + "mlp.up_proj.weight": (m, d)}
        shapes[p + "mlp.down_proj.weight"] = (d, m)
    return shapes


def is_buffer(name: str) -> bool:
    """A non-parameter tensor some checkpoints hold (masks, rotary tables): dropped on import."""
    return name.endswith(_BUFFERS)


def tied_embeddings(hf: dict[str, Any]) -> bool:
    return bool(hf.get("tie_word_embeddings", _TIED_DEFAULT[hf["model_type"]]))


def family_tensors(hf: dict[str, Any], cfg: ModelConfig, t: dict[str, np.ndarray], tied: bool) -> dict[str, np.ndarray]:
    """The native (TransformerLens-named) tensors of a validated checkpoint, float32."""
    t = {k: np.asarray(v, np.float32) for k, v in t.items()}
    if hf["model_type"] == "gpt_neox":
        return _neox(cfg, t)
    return _llama_like(hf, cfg, t, tied)


def _heads_in(w: np.ndarray, n: int, e: int) -> np.ndarray:
    """``[n · e, d]`` (torch Linear weight) -> ``[n, d, e]``."""
    return np.ascontiguousarray(w.reshape(n, e, -1).transpose(0, 2, 1))


def _neox(cfg: ModelConfig, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    d, h, e = cfg.d_model, cfg.n_heads, cfg.d_head
    out = {
        "embed.W_E": t["gpt_neox.embed_in.weight"],
        "ln_final.w": t["gpt_neox.final_layer_norm.weight"],
        "ln_final.b": t["gpt_neox.final_layer_norm.bias"],
        "unembed.W_U": np.ascontiguousarray(t["embed_out.weight"].T),
        "unembed.b_U": np.zeros(cfg.d_vocab, np.float32),
    }
    for layer in range(cfg.n_layers):
        p, q = f"gpt_neox.layers.{layer}.", f"blocks.{layer}."
        w = t[p + "attention.query_key_value.weight"].reshape(h, 3, e, d)
        b = t.get(p + "attention.query_key_value.bias", np.zeros(3 * h * e, np.float32)).reshape(h, 3, e)
        for i, name in enumerate("QKV"):
            out[q + f"attn.W_{name}"] = np.ascontiguousarray(w[:, i].transpose(0, 2, 1))
            out[q + f"attn.b_{name}"] = np.ascontiguousarray(b[:, i])
        out |= {
            q + "attn.W_O": np.ascontiguousarray(t[p + "attention.dense.weight"].T.reshape(h, e, d)),
            q + "attn.b_O": t.get(p + "attention.dense.bias", np.zeros(d, np.float32)),
            q + "ln1.w": t[p + "input_layernorm.weight"],
            q + "ln1.b": t[p + "input_layernorm.bias"],
            q + "ln2.w": t[p + "post_attention_layernorm.weight"],
            q + "ln2.b": t[p + "post_attention_layernorm.bias"],
            q + "mlp.W_in": np.ascontiguousarray(t[p + "mlp.dense_h_to_4h.weight"].T),
            q + "mlp.b_in": t[p + "mlp.dense_h_to_4h.bias"],
            q + "mlp.W_out": np.ascontiguousarray(t[p + "mlp.dense_4h_to_h.weight"].T),
            q + "mlp.b_out": t[p + "mlp.dense_4h_to_h.bias"],
        }
    return out


def _llama_like(hf: dict[str, Any], cfg: ModelConfig, t: dict[str, np.ndarray], tied: bool) -> dict[str, np.ndarray]:
    kind, d, h, kv, e = hf["model_type"], cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    gemma = kind in ("gemma", "gemma2")

    def norm(name: str) -> np.ndarray:  # Gemma's x · (1 + w), stored with the one added
        return t[name] + np.float32(1.0) if gemma else t[name]

    embed = t["model.embed_tokens.weight"]
    out = {
        "embed.W_E": embed * np.float32(math.sqrt(d)) if gemma else embed,
        "ln_final.w": norm("model.norm.weight"),
        "unembed.W_U": np.ascontiguousarray((embed if tied else t["lm_head.weight"]).T),
        "unembed.b_U": np.zeros(cfg.d_vocab, np.float32),
    }
    grouped = "_" if cfg.n_key_value_heads is not None else ""
    for layer in range(cfg.n_layers):
        p, q = f"model.layers.{layer}.self_attn.", f"blocks.{layer}."
        for name, key, rows in (("Q", "q", h), ("K", "k", kv), ("V", "v", kv)):
            prefix = "" if name == "Q" else grouped
            out[q + f"attn.{prefix}W_{name}"] = _heads_in(t[p + f"{key}_proj.weight"], rows, e)
            bias = t.get(p + f"{key}_proj.bias", np.zeros(rows * e, np.float32))
            out[q + f"attn.{prefix}b_{name}"] = bias.reshape(rows, e)
        out[q + "attn.W_O"] = np.ascontiguousarray(t[p + "o_proj.weight"].T.reshape(h, e, d))
        out[q + "attn.b_O"] = t.get(p + "o_proj.bias", np.zeros(d, np.float32))
        p = f"model.layers.{layer}."
        out[q + "ln1.w"] = norm(p + "input_layernorm.weight")
        if kind == "gemma2":
            out[q + "ln1_post.w"] = norm(p + "post_attention_layernorm.weight")
            out[q + "ln2.w"] = norm(p + "pre_feedforward_layernorm.weight")
            out[q + "ln2_post.w"] = norm(p + "post_feedforward_layernorm.weight")
        else:
            out[q + "ln2.w"] = norm(p + "post_attention_layernorm.weight")
        out |= {
            q + "mlp.W_gate": np.ascontiguousarray(t[p + "mlp.gate_proj.weight"].T),
            q + "mlp.W_in": np.ascontiguousarray(t[p + "mlp.up_proj.weight"].T),
            q + "mlp.b_in": np.zeros(cfg.d_mlp or 0, np.float32),
            q + "mlp.W_out": np.ascontiguousarray(t[p + "mlp.down_proj.weight"].T),
            q + "mlp.b_out": np.zeros(d, np.float32),
        }
    return out
