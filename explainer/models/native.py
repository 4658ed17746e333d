"""The native model format: a folder with ``config.json`` and ``model.safetensors``.

This format is a public contract; people write it by hand. ``config.json`` uses TransformerLens
``HookedTransformerConfig`` field names (see :class:`~explainer.models.config.ModelConfig`) and
``model.safetensors`` holds TransformerLens parameter names and shapes::

    embed.W_E                [d_vocab, d_model]
    pos_embed.W_pos          [n_ctx, d_model]          (positional_embedding_type "standard" only)
    blocks.{l}.ln1.w, .b     [d_model]                 (normalization_type "LN"; "RMS": .w only)
    blocks.{l}.ln1_post.w    [d_model]                 (use_normalization_before_and_after; also ln2_post)
    blocks.{l}.attn.W_Q      [n_heads, d_model, d_head] (also W_K, W_V)
    blocks.{l}.attn.b_Q      [n_heads, d_head]          (also b_K, b_V)
    blocks.{l}.attn._W_K     [n_kv_heads, d_model, d_head] (with n_key_value_heads: _W_K, _W_V, _b_K, _b_V
                                                        replace W_K, W_V, b_K, b_V)
    blocks.{l}.attn.W_O      [n_heads, d_head, d_model]
    blocks.{l}.attn.b_O      [d_model]
    blocks.{l}.ln2.w, .b     [d_model]                 (as ln1, and not attn_only)
    blocks.{l}.mlp.W_gate    [d_model, d_mlp]          (gated_mlp only)
    blocks.{l}.mlp.W_in      [d_model, d_mlp]
    blocks.{l}.mlp.b_in      [d_mlp]
    blocks.{l}.mlp.W_out     [d_mlp, d_model]
    blocks.{l}.mlp.b_out     [d_model]
    ln_final.w, .b           [d_model]                 (as ln1)
    unembed.W_U              [d_model, d_vocab_out]
    unembed.b_U              [d_vocab_out]

A Gemma norm's ``(1 + w)`` is stored with the one added (``w`` holds ``1 + w``), as in
TransformerLens, and Gemma's embedding scale ``sqrt(d_model)`` is folded into ``embed.W_E``.

A model folder may also hold ``truth.json`` (``{site: [units]}``, its ground-truth explanation
under resample ablation with its own prompts), ``prompts.json`` (its task, in the prompts format of
:mod:`explainer.tasks.prompts`) and ``card.json`` (name, task, accuracy, description).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from explainer.errors import ExplainerError
from explainer.models.attention import Attention
from explainer.models.config import ModelConfig
from explainer.models.mlp import MLP, GatedMLP
from explainer.models.norms import LayerNorm, Norm, make_norm
from explainer.models.rotary import Rotary
from explainer.models.transformer import Block, Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the native format requires for ``cfg``, with its shape."""
    d, h, e, kv = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_kv_heads
    shapes: dict[str, tuple[int, ...]] = {"embed.W_E": (cfg.d_vocab, d)}
    if cfg.positional_embedding_type == "standard":
        shapes["pos_embed.W_pos"] = (cfg.n_ctx, d)
    grouped = "_" if cfg.n_key_value_heads is not None else ""  # TransformerLens: _W_K, _W_V when grouped

    def norm(name: str) -> dict[str, tuple[int, ...]]:
        if cfg.normalization_type in ("LN", "RMS"):
            out = {name + ".w": (d,)}
            return out | {name + ".b": (d,)} if cfg.normalization_type == "LN" else out
        return {}

    post = cfg.use_normalization_before_and_after
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        shapes |= norm(p + "ln1") | (norm(p + "ln1_post") if post else {})
        shapes |= {p + "attn.W_Q": (h, d, e), p + "attn.b_Q": (h, e)}
        for name in "KV":
            shapes[p + f"attn.{grouped}W_{name}"] = (kv, d, e)
            shapes[p + f"attn.{grouped}b_{name}"] = (kv, e)
        shapes |= {p + "attn.W_O": (h, e, d), p + "attn.b_O": (d,)}
        if not cfg.attn_only:
            assert cfg.d_mlp is not None
            shapes |= norm(p + "ln2") | (norm(p + "ln2_post") if post else {})
            if cfg.gated_mlp:
                shapes[p + "mlp.W_gate"] = (d, cfg.d_mlp)
            shapes |= {
                p + "mlp.W_in": (d, cfg.d_mlp),
                p + "mlp.b_in": (cfg.d_mlp,),
                p + "mlp.W_out": (cfg.d_mlp, d),
                p + "mlp.b_out": (d,),
            }
    shapes |= norm("ln_final")
    shapes |= {"unembed.W_U": (d, cfg.vocab_out), "unembed.b_U": (cfg.vocab_out,)}
    return shapes


def from_state_dict(
    cfg: ModelConfig, tensors: dict[str, np.ndarray], source: str = "weights", dtype: str = "float32"
) -> Transformer:
    """Build a :class:`Transformer` from TransformerLens-named tensors, validating every one;
    its weights in ``dtype`` (``float32``, ``bfloat16`` or ``float16``)."""
    shapes = expected_shapes(cfg)
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing:
        raise ExplainerError(
            f"{source} is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            f"the config (n_layers={cfg.n_layers}, normalization_type={cfg.normalization_type!r}, "
            f"attn_only={cfg.attn_only}, positional_embedding_type={cfg.positional_embedding_type!r}, "
            f"n_key_value_heads={cfg.n_key_value_heads}, gated_mlp={cfg.gated_mlp}) requires them: add them or "
            "fix config.json"
        )
    if extra:
        raise ExplainerError(
            f"{source} has tensor(s) the config does not use: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}; remove them or fix config.json "
            f"(n_layers={cfg.n_layers}, normalization_type={cfg.normalization_type!r}, "
            f"attn_only={cfg.attn_only})"
        )
    arrays: dict[str, jax.Array] = {}
    for name, shape in shapes.items():
        value = np.asarray(tensors[name])
        if value.shape != shape:
            raise ExplainerError(
                f"{source}: tensor {name!r} has shape {list(value.shape)} but config.json implies "
                f"{list(shape)}; the weights and config.json disagree"
            )
        if value.dtype.kind != "f":
            raise ExplainerError(f"{source}: tensor {name!r} has dtype {value.dtype}; expected a float dtype")
        value = value.astype(np.float32)
        if not np.isfinite(value).all():
            raise ExplainerError(f"{source}: tensor {name!r} holds NaN or inf values; the weights are corrupt")
        value = value.astype(jnp.dtype(dtype))
        if dtype != "float32" and not np.isfinite(value.astype(np.float32)).all():
            raise ExplainerError(f"{source}: tensor {name!r} overflows {dtype}; load the model as bfloat16 or float32")
        arrays[name] = jnp.asarray(value)
    return _assemble(cfg, arrays)


def _assemble(cfg: ModelConfig, a: dict[str, jax.Array]) -> Transformer:
    def ln(prefix: str) -> Norm | None:
        return make_norm(cfg.normalization_type, a.get(prefix + ".w"), a.get(prefix + ".b"), cfg.eps)

    rotary = None
    if cfg.positional_embedding_type == "rotary":
        ntk = None
        if cfg.use_NTK_by_parts_rope:
            ntk = (
                float(cfg.NTK_by_parts_factor),
                float(cfg.NTK_by_parts_low_freq_factor),
                float(cfg.NTK_by_parts_high_freq_factor),
                int(cfg.NTK_original_ctx_len),
            )
        rotary = Rotary(cfg.rotary_width, float(cfg.rotary_base), bool(cfg.rotary_adjacent_pairs), ntk)
    grouped = "_" if cfg.n_key_value_heads is not None else ""
    post = cfg.use_normalization_before_and_after
    blocks = []
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        names = ("W_Q", "b_Q", f"{grouped}W_K", f"{grouped}b_K", f"{grouped}W_V", f"{grouped}b_V", "W_O", "b_O")
        attn = Attention(
            *(a[p + f"attn.{n}"] for n in names),
            scale=cfg.scale,
            causal=cfg.attention_dir == "causal",
            rotary=rotary,
            soft_cap=cfg.cap(cfg.attn_scores_soft_cap),
            window=cfg.window(layer),
        )
        mlp: MLP | GatedMLP | None = None
        if cfg.gated_mlp:
            mlp = GatedMLP(*(a[p + f"mlp.{n}"] for n in ("W_gate", "W_in", "b_in", "W_out", "b_out")), cfg.act_fn)
        elif not cfg.attn_only:
            mlp = MLP(*(a[p + f"mlp.{n}"] for n in ("W_in", "b_in", "W_out", "b_out")), act_fn=cfg.act_fn)
        ln2 = None if cfg.attn_only else ln(p + "ln2")
        ln1_post = ln(p + "ln1_post") if post else None
        ln2_post = ln(p + "ln2_post") if post and not cfg.attn_only else None
        blocks.append(Block(ln(p + "ln1"), attn, ln2, mlp, ln1_post, ln2_post, parallel=cfg.parallel_attn_mlp))
    return Transformer(
        config=cfg,
        W_E=a["embed.W_E"],
        W_pos=a.get("pos_embed.W_pos"),
        blocks=tuple(blocks),
        ln_final=ln("ln_final"),
        W_U=a["unembed.W_U"],
        b_U=a["unembed.b_U"],
    )


def to_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """The TransformerLens-named tensors of ``model`` (float32 numpy arrays)."""
    cfg = model.config
    out = {"embed.W_E": model.W_E}
    if model.W_pos is not None:
        out["pos_embed.W_pos"] = model.W_pos

    def put_ln(prefix: str, ln: Norm | None) -> None:
        if ln is not None and ln.w is not None:
            out[prefix + ".w"] = ln.w
            if isinstance(ln, LayerNorm):
                out[prefix + ".b"] = ln.b

    grouped = "_" if cfg.n_key_value_heads is not None else ""
    for layer, block in enumerate(model.blocks):
        p = f"blocks.{layer}."
        put_ln(p + "ln1", block.ln1)
        put_ln(p + "ln1_post", block.ln1_post)
        for n in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O"):
            out[p + f"attn.{grouped if n[-1] in 'KV' else ''}{n}"] = getattr(block.attn, n)
        if block.mlp is not None:
            put_ln(p + "ln2", block.ln2)
            put_ln(p + "ln2_post", block.ln2_post)
            names = ("W_in", "b_in", "W_out", "b_out")
            for n in ("W_gate", *names) if cfg.gated_mlp else names:
                out[p + f"mlp.{n}"] = getattr(block.mlp, n)
    put_ln("ln_final", model.ln_final)
    out |= {"unembed.W_U": model.W_U, "unembed.b_U": model.b_U}
    assert set(out) == set(expected_shapes(cfg))
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def init_random(cfg: ModelConfig, key: jax.Array, std: float = 0.02) -> Transformer:
    """A randomly initialised model (GPT-2-style normal init; LayerNorm weights one, biases zero).

    >>> cfg = ModelConfig(n_layers=1, d_model=4, n_heads=1, d_head=2, d_vocab=3, n_ctx=2, attn_only=True)
    >>> init_random(cfg, jax.random.key(0)).W_E.shape
    (3, 4)
    """
    shapes = expected_shapes(cfg)
    keys = jax.random.split(key, len(shapes))
    tensors = {}
    for k, (name, shape) in zip(keys, sorted(shapes.items()), strict=True):
        if name.endswith(".w"):
            tensors[name] = np.ones(shape, np.float32)
        elif name.split(".")[-1].lstrip("_").startswith("b"):
            tensors[name] = np.zeros(shape, np.float32)
        else:
            tensors[name] = np.asarray(std * jax.random.normal(k, shape), np.float32)
    return from_state_dict(cfg, tensors, source="random init")


def cast_model(model: Transformer, dtype: str = "float32") -> Transformer:
    """``model`` with its weights in ``dtype``; its activations follow them (``--dtype``).

    >>> cfg = ModelConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=4, attn_only=True)
    >>> net = cast_model(init_random(cfg, jax.random.key(0)), "bfloat16")
    >>> str(net.W_E.dtype), str(net(jnp.zeros((1, 2), int)).dtype)
    ('bfloat16', 'bfloat16')
    """
    target = jnp.dtype(dtype)

    def cast(x):
        return x.astype(target) if eqx.is_inexact_array(x) and x.dtype != target else x

    return jax.tree.map(cast, model)


def load_model(folder: str | os.PathLike, dtype: str = "float32") -> Transformer:
    """Load a model folder in the native format, its weights in ``dtype`` (:func:`cast_model`).

    >>> import tempfile, jax
    >>> cfg = ModelConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=4, attn_only=True)
    >>> folder = save_model(init_random(cfg, jax.random.key(0)), tempfile.mkdtemp() + "/model")
    >>> load_model(folder).config.n_layers
    1
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise ExplainerError(f"model folder {str(folder)!r} does not exist; pass a zoo name or a folder")
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if path == weights_path and not path.is_file():
            _refuse_pickles(folder)
        if not path.is_file():
            raise ExplainerError(
                f"model folder {str(folder)!r} has no {path.name}; a model folder needs "
                f"{CONFIG_FILE} and {WEIGHTS_FILE}"
            )
    cfg = ModelConfig.from_json(read_json(cfg_path), source=str(cfg_path))
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ExplainerError(
            f"{weights_path} is not a readable safetensors file ({err}); the file is truncated or "
            "corrupt: write it again"
        ) from None
    return from_state_dict(cfg, tensors, source=str(weights_path), dtype=dtype)


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _refuse_pickles(folder: Path) -> None:
    """Explain why weights in a pickled file are not read (unpickling can run arbitrary code)."""
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED)
    if pickled:
        raise ExplainerError(
            f"model folder {str(folder)!r} has {pickled[0]} but no {WEIGHTS_FILE}: pickled weights are never "
            "loaded (unpickling can run arbitrary code); convert them once, e.g. "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')"
        )


def save_model(model: Transformer, folder: str | os.PathLike) -> Path:
    """Write ``model`` as a native model folder (atomically per file)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CONFIG_FILE, model.config.to_json())
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(to_state_dict(model), str(tmp))
    os.chmod(tmp, 0o644)  # safetensors writes 0600; model folders are meant to be shared
    os.replace(tmp, folder / WEIGHTS_FILE)
    return folder


def weights_sha256(folder: str | os.PathLike) -> str:
    """sha256 of ``model.safetensors``: runs record it, to notice weights that changed since."""
    digest = hashlib.sha256()
    with open(Path(folder) / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | os.PathLike) -> object:
    """Read a JSON file, turning syntax errors into a message with the line and column."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExplainerError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except UnicodeDecodeError:
        raise ExplainerError(f"{path} is not a UTF-8 text file; it should hold JSON") from None
    except RecursionError:
        raise ExplainerError(f"{path} is nested too deeply to be read as JSON") from None
    except OSError as err:
        raise ExplainerError(f"{path} cannot be read ({err.strerror or err})") from None


def write_json(path: str | os.PathLike, data: object) -> None:
    """Write JSON atomically: a temp file in the same folder, then a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
