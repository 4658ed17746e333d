"""Edges: units that are the *writers* into each reader, not residual dimensions.

The residual stream is a sum of what earlier components wrote: the token + position embedding
(``embed``), each attention head (``a{l}.h{h}``) and each MLP (``m{l}``), plus their output
biases, which no unit switches. With edge units a reader's input is

    ``x = biases + Σ_w m_w · own_w + (1 − m_w) · repl_w``

over the writers ``w`` upstream of it: ``own_w`` is what ``w`` wrote in this (scrubbed) run and
``repl_w`` what it wrote in the full model on the replacement input. Each mask entry is one edge
``writer -> reader``, the graph of Edge Pruning and auto-circuit.

Readers (sites) and the order of their units:

- ``blocks.{l}.attn.q.in``, ``.k.in``, ``.v.in`` (the default): every head's query, key and value
  input on its own, units ordered head-major (``unit = head · n_writers + writer``);
- ``blocks.{l}.attn.in`` instead: one mask over the writers shared by every head and q/k/v;
- ``blocks.{l}.mlp.in`` and ``unembed.in``: one unit per upstream writer.

Writers are ordered ``embed``, then per layer its heads ``0..H-1`` and its MLP. An edge is named
``"{writer}->{reader}"`` with reader ``a{l}.h{h}.q|k|v``, ``a{l}``, ``m{l}`` or ``logits``. A
2-layer model with 4 heads and MLPs has 110 edges with q/k/v sites:

>>> from explainer.models import ModelConfig
>>> cfg = ModelConfig(n_layers=2, d_model=8, n_heads=4, d_head=2, d_mlp=16, d_vocab=5, n_ctx=4)
>>> sum(edge_units(cfg, edge_sites(cfg)).values())
110
>>> edge_names(cfg, ["blocks.1.mlp.in"])["blocks.1.mlp.in"][:3]
['embed->m1', 'a0.h0->m1', 'a0.h1->m1']

With every mask all ones the edge forward is the full model (to float rounding: the sum is taken
in another order); with every mask zero under resample it reads the full model's writers on the
replacement input, i.e. the full model on that input.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from explainer.errors import ExplainerError
from explainer.models.config import ModelConfig
from explainer.models.norms import LayerNorm
from explainer.models.transformer import Transformer, _norm

Writers = Float[Array, "batch seq writers d_model"]
WRITERS = "writers"  # the replacement's one key: every writer's output on the replacement input
_QKV = ("q", "k", "v")
_SITE = re.compile(r"^blocks\.(\d+)\.(attn\.in|attn\.[qkv]\.in|mlp\.in)$|^unembed\.in$")


def writer_names(config: ModelConfig) -> tuple[str, ...]:
    """Every writer into the residual stream, in forward order."""
    names = ["embed"]
    for layer in range(config.n_layers):
        names += [f"a{layer}.h{h}" for h in range(config.n_heads)]
        if not config.attn_only:
            names.append(f"m{layer}")
    return tuple(names)


def edge_sites(config: ModelConfig, qkv: bool = True) -> tuple[str, ...]:
    """The reader sites of the edge graph: per-head q/k/v inputs (``qkv``) or one per attention."""
    sites: list[str] = []
    for layer in range(config.n_layers):
        attn = [f"blocks.{layer}.attn.{x}.in" for x in _QKV] if qkv else [f"blocks.{layer}.attn.in"]
        sites += attn + ([f"blocks.{layer}.mlp.in"] if not config.attn_only else [])
    return (*sites, "unembed.in")


def _parse(config: ModelConfig, site: str) -> tuple[int, str]:
    """``(layer, kind)`` of an edge site; kind is ``attn``, ``q``/``k``/``v``, ``mlp`` or ``unembed``."""
    match = _SITE.match(site)
    block = match is not None and match.group(1) is not None
    layer = int(match.group(1)) if block else config.n_layers
    if match is None or (block and layer >= config.n_layers) or (match.group(2) == "mlp.in" and config.attn_only):
        valid = ", ".join(edge_sites(config)[:4]) + ", ..., unembed.in"
        raise ExplainerError(
            f"site {site!r} is not a reader of the edge graph of this model (blocks 0-{config.n_layers - 1}"
            f"{', attention only' if config.attn_only else ''}); edge sites look like {valid}, or "
            "blocks.{l}.attn.in for one mask per attention layer"
        )
    if match.group(1) is None:
        return layer, "unembed"
    return layer, {"attn.in": "attn", "mlp.in": "mlp"}.get(match.group(2), match.group(2)[5])  # attn.q.in -> q


def check_edge_sites(config: ModelConfig, sites: Sequence[str]) -> tuple[str, ...]:
    """Validate edge sites (in forward order); an attention layer is masked per q/k/v or as a whole."""
    parsed = {site: _parse(config, site) for site in sites}
    for layer in range(config.n_layers):
        kinds = {k for s, (lay, k) in parsed.items() if lay == layer}
        if "attn" in kinds and kinds & set(_QKV):
            raise ExplainerError(
                f"layer {layer}'s attention is masked both as a whole (blocks.{layer}.attn.in) and per "
                "q/k/v input; give one or the other"
            )
    order = {site: i for i, site in enumerate(edge_sites(config))}
    order.update({f"blocks.{lay}.attn.in": order[f"blocks.{lay}.attn.q.in"] for lay in range(config.n_layers)})
    return tuple(sorted(dict.fromkeys(sites), key=order.__getitem__))


def n_writers(config: ModelConfig, site: str) -> int:
    """How many writers are upstream of ``site`` (a parallel block's MLP reads what its attention reads)."""
    layer, kind = _parse(config, site)
    per_layer = config.n_heads + int(not config.attn_only)
    return 1 + layer * per_layer + (config.n_heads if kind == "mlp" and not config.parallel_attn_mlp else 0)


def _readers(config: ModelConfig, kind: str) -> int:
    """Readers per site: query heads for ``q``, key/value heads for ``k``/``v``, else one."""
    return {"q": config.n_heads, "k": config.n_kv_heads, "v": config.n_kv_heads}.get(kind, 1)


def edge_units(config: ModelConfig, sites: Sequence[str]) -> dict[str, int]:
    """Units per site: its upstream writers, times the heads for a per-head q/k/v site."""
    return {s: n_writers(config, s) * _readers(config, _parse(config, s)[1]) for s in sites}


def edge_names(config: ModelConfig, sites: Sequence[str] | None = None) -> dict[str, list[str]]:
    """The name ``writer->reader`` of every unit of each site, in unit order."""
    writers = writer_names(config)
    out = {}
    for site in edge_sites(config) if sites is None else sites:
        layer, kind = _parse(config, site)
        upstream = writers[: n_writers(config, site)]
        if kind in _QKV:
            grouped = kind != "q" and config.n_kv_heads != config.n_heads  # a key/value head serves a group
            readers = [f"a{layer}.{'kv' if grouped else 'h'}{h}.{kind}" for h in range(_readers(config, kind))]
        else:
            readers = [{"attn": f"a{layer}", "mlp": f"m{layer}", "unembed": "logits"}[kind]]
        out[site] = [f"{w}->{r}" for r in readers for w in upstream]
    return out


def check_model(model: Transformer) -> None:
    """Edge units need blocks whose outputs split into writers (no rewritten MLPs; post-norms RMS)."""
    if any(hasattr(block.mlp, "fitted") for block in model.blocks):
        raise ExplainerError("edge units do not support rewritten MLPs; use --units dims with --rewrite")
    if any(isinstance(b.ln1_post, LayerNorm) or isinstance(b.ln2_post, LayerNorm) for b in model.blocks):
        raise ExplainerError(
            "edge units do not support LayerNorm post-norms (use_normalization_before_and_after with "
            "normalization_type LN): a centred output does not split into heads; use --units dims"
        )


def _mlp_writes(mlp, y):
    """An MLP's output without its output bias (the bias is not an edge)."""
    return mlp(y) - mlp.b_out


def _norm_heads(ln, x: Float[Array, "batch seq heads d_model"]) -> Float[Array, "batch seq heads d_model"]:
    b, p, h, d = x.shape
    return _norm(ln, x.reshape(b, p * h, d)).reshape(x.shape)


def _attention_writes(block, xq, xk, xv, pads):
    """Per-head outputs (without ``b_O``) of attention whose heads read ``x[..., head, :]`` each
    (``xk``, ``xv``: one input per key/value head; ``pads``: each prompt's left padding)."""
    attn = block.attn
    q = jnp.einsum("bphd,hde->bphe", _norm_heads(block.ln1, xq), attn.W_Q) + attn.b_Q
    k = jnp.einsum("bphd,hde->bphe", _norm_heads(block.ln1, xk), attn.W_K) + attn.b_K
    v = jnp.einsum("bphd,hde->bphe", _norm_heads(block.ln1, xv), attn.W_V) + attn.b_V
    return jnp.einsum("bqhe,hem->bqhm", attn.mix(q, k, v, pads), attn.W_O)


def _post_scale(post, total: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq d_model"]:
    """What an RMS post-norm multiplies ``total`` by: ``w / rms(total)``, so that writers scaled by it
    sum to ``post(total)`` (Gemma-2's norms on the attention output)."""
    scale = jax.lax.rsqrt((total * total).mean(-1, keepdims=True) + post.eps)
    return scale if post.w is None else scale * post.w


def _plus(x: jax.Array, bias: jax.Array) -> jax.Array:
    """``x + bias`` for a bias ``[d]`` or per position ``[b, p, d]``, and ``x`` per head or not."""
    return x + (bias[:, :, None, :] if bias.ndim == 3 and x.ndim == 4 else bias)


def run(
    model: Transformer,
    tokens: Int[Array, "batch seq"],
    keep: dict[str, Array] | None = None,
    replacement: dict[str, Writers] | None = None,
    capture: bool = False,
) -> tuple[Float[Array, "batch seq vocab"], Writers | None]:
    """Logits of the model whose readers see kept edges from this run and the rest from
    ``replacement[WRITERS]``; sites absent from ``keep`` read the plain residual. With ``capture``
    also every writer's output, ``[batch, seq, writers, d_model]``.
    """
    keep = keep or {}
    cfg, heads = model.config, model.config.n_heads
    embed, pads = model.embed(tokens)
    writes: list[jax.Array] = [embed]
    bias = jnp.zeros((cfg.d_model,), writes[0].dtype)  # per position ([b, p, d]) once a post-norm scales one

    def reads(site: str, shape: tuple[int, ...] = ()):
        """The input of the reader at ``site``: ``[b, p, d]``, or ``[b, p, H, d]`` for q/k/v."""
        own = jnp.stack(writes, axis=-2)
        m = keep.get(site)
        if m is None:
            x = _plus(own.sum(-2), bias)
            return jnp.broadcast_to(x[:, :, None, :], (*x.shape[:2], shape[0], x.shape[-1])) if shape else x
        m, repl = m.astype(own.dtype), replacement[WRITERS][..., : len(writes), :].astype(own.dtype)  # --dtype
        if shape:
            m = m.reshape(shape)
            return _plus(jnp.einsum("bpwd,hw->bphd", own, m) + jnp.einsum("bpwd,hw->bphd", repl, 1.0 - m), bias)
        return _plus(jnp.einsum("bpwd,w->bpd", own, m) + jnp.einsum("bpwd,w->bpd", repl, 1.0 - m), bias)

    for layer, block in enumerate(model.blocks):
        n, kv = len(writes), cfg.n_kv_heads
        if f"blocks.{layer}.attn.in" in keep:
            shared = reads(f"blocks.{layer}.attn.in")[:, :, None, :]
            xq = jnp.broadcast_to(shared, (*shared.shape[:2], heads, shared.shape[-1]))
            xk = xv = jnp.broadcast_to(shared, (*shared.shape[:2], kv, shared.shape[-1]))
        else:
            readers = zip(_QKV, (heads, kv, kv), strict=True)
            xq, xk, xv = (reads(f"blocks.{layer}.attn.{x}.in", (r, n)) for x, r in readers)
        mlp_in = reads(f"blocks.{layer}.mlp.in") if block.parallel and block.mlp is not None else None
        heads_out = _attention_writes(block, xq, xk, xv, pads)
        if block.ln1_post is None:
            bias = bias + block.attn.b_O
        else:
            scale = _post_scale(block.ln1_post, heads_out.sum(2) + block.attn.b_O)
            heads_out = heads_out * scale[:, :, None, :]
            bias = bias + block.attn.b_O * scale
        writes += [heads_out[:, :, h, :] for h in range(heads)]
        if block.mlp is not None:
            y = _norm(block.ln2, reads(f"blocks.{layer}.mlp.in") if mlp_in is None else mlp_in)
            if block.ln2_post is None:
                writes.append(_mlp_writes(block.mlp, y))
                bias = bias + block.mlp.b_out
            else:  # the post-norm mixes the bias in: the MLP's writer carries it
                writes.append(block.ln2_post(block.mlp(y)))
    logits = model.unembed(reads("unembed.in"))
    return logits, (jnp.stack(writes, axis=-2) if capture else None)
