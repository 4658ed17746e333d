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

import itertools
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from explainer.errors import ExplainerError
from explainer.models.config import ModelConfig
from explainer.models.norms import LayerNorm
from explainer.models.transformer import SCAN_LAYERS, Transformer, _norm, layer_spans, loops_here

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


def _index(config: ModelConfig, sizes: dict[str, int], site: str, rows: int) -> np.ndarray:
    """Where each weight of the readers at ``site`` comes from, ``[rows, writers]``: its entry of
    the masks laid end to end in the order of ``sizes`` (each masked site's units), or ``ONE``
    (= ``sum(sizes)``, an unmasked reader's own writers) or ``ONE + 1`` (zero: writers not
    upstream). A q/k/v site has a row per head (head-major units), any other site one row,
    broadcast to ``rows``."""
    n, one = n_writers(config, site), sum(sizes.values())
    index = np.full((rows, len(writer_names(config))), one + 1)
    if site in sizes:
        offset = sum(sizes[s] for s in itertools.takewhile(lambda s: s != site, sizes))
        heads = sizes[site] // n  # one row per head, or one shared by every row
        index[:, :n] = offset + (np.arange(rows)[:, None] % heads) * n + np.arange(n)
    else:
        index[:, :n] = one
    return index


def _layout(config: ModelConfig, sizes: dict[str, int]) -> tuple[int, list[np.ndarray]]:
    """Rows of the attention readers (``n_heads + 2 · n_kv_heads`` where some head has its own mask,
    else one broadcast to every head) and :func:`_index` of the attention, MLP and unembedding
    readers, stacked over layers: every reader's weights come from one gather of the masks."""
    heads, kv = config.n_heads, config.n_kv_heads
    per_head = any(f"blocks.{i}.attn.{x}.in" in sizes for i in range(config.n_layers) for x in _QKV)
    rows = heads + 2 * kv if per_head else 1
    attn, mlp = [], []
    for layer in range(config.n_layers):
        shared = f"blocks.{layer}.attn.in"
        if shared in sizes or not per_head:
            attn.append(_index(config, sizes, shared, rows))
        else:  # the query, key and value heads' rows in turn
            qkv = zip(_QKV, (heads, kv, kv), strict=True)
            attn.append(np.concatenate([_index(config, sizes, f"blocks.{layer}.attn.{x}.in", r) for x, r in qkv]))
        mlp.append(attn[-1] if config.attn_only else _index(config, sizes, f"blocks.{layer}.mlp.in", 1))
    return rows, [np.stack(attn), np.stack(mlp), _index(config, sizes, "unembed.in", 1)]


def run(
    model: Transformer,
    tokens: Int[Array, "batch seq"],
    keep: dict[str, Array] | None = None,
    replacement: dict[str, Writers] | None = None,
    capture: bool = False,
    last: bool = False,
) -> tuple[Float[Array, "batch _ vocab"], Writers | None]:
    """Logits of the model whose readers see kept edges from this run and the rest from
    ``replacement[WRITERS]``; sites absent from ``keep`` read the plain residual. With ``capture``
    also every writer's output, ``[batch, seq, writers, d_model]``. ``last`` (not with ``capture``):
    the last position's logits alone, ``[batch, 1, vocab]``: the final block runs on its own, its
    attention with the last position's query alone and its MLP at that position (as
    ``Transformer.run`` does), so the unembedding reads one position, not every one.

    Every writer's output goes into one buffer of all writers, filled layer by layer, and a reader's
    input is one contraction of it with that reader's row of weights (the mask over the writers
    upstream, zeros after; the rows of every reader come from one gather of the masks). A layer's
    query, key and value readers, every head, are one contraction; blocks of one shape run as one
    ``jax.lax.scan`` body over their stacked weights where forward passes loop
    (:func:`~explainer.models.transformer.loops_here`), so the compiled program does not grow with
    depth.
    """
    if last and capture:
        raise ExplainerError("edges.run captures every position's writers; ask for capture or for last, not both")
    keep = keep or {}
    cfg = model.config
    heads, kv, total, d = cfg.n_heads, cfg.n_kv_heads, len(writer_names(cfg)), cfg.d_model
    embed, pads = model.embed(tokens)
    dtype = embed.dtype
    repl = replacement[WRITERS].astype(dtype) if keep else None  # --dtype
    rows, layout = _layout(cfg, {site: int(np.prod(m.shape)) for site, m in keep.items()})
    masks = jnp.concatenate([m.reshape(-1).astype(jnp.float32) for m in keep.values()] + [jnp.ones(1), jnp.zeros(1)])
    attn, mlp, unembed = (masks[index] for index in layout)  # every reader's weights on its run's writers
    # A reader's weights on its upstream writers are m (masked) or 1 (not), and on the replacement's
    # 1 - m or 0: they sum to 1. So its input is sum_w own_w (out_w - repl_w) + sum_w repl_w: one
    # contraction of the writers' differences from the replacement (what ``buf`` holds under a
    # replacement), instead of a contraction of each, and the replacement's sum over the upstream
    # writers, which, like their biases, every downstream reader adds (``bias`` carries both).

    def mix(buf, bias, own, read: int = total):
        """The readers' inputs ``[b, p, rows, d]``: kept writers from this run, the rest from the
        replacement. ``read``: how many writers of ``buf`` are read (a layer not in a loop reads
        only its upstream writers; in a loop the rest weigh zero)."""
        x = jnp.einsum("bpwd,rw->bprd", buf[:, :, :read], own[:, :read].astype(dtype))
        return x + bias[:, :, None, :]

    def write(buf, bias, out, at):
        """``buf`` and ``bias`` with the writers ``out`` (``[b, p, n, d]``) from writer ``at`` on."""
        if repl is not None:
            theirs = jax.lax.dynamic_slice_in_dim(repl[:, -buf.shape[1] :], at, out.shape[2], axis=2)
            out, bias = out - theirs, bias + theirs.sum(2)
        return jax.lax.dynamic_update_slice_in_dim(buf, out.astype(dtype), at, axis=2), bias

    def layer_fn(block, carry, layer, w):
        buf, bias = carry
        own, mlp_own = w
        first = 1 + layer * (heads + int(not cfg.attn_only))  # this layer's first writer
        unrolled = isinstance(layer, int)  # a loop's body reads every writer, a layer on its own its upstream
        x = mix(buf, bias, own, first if unrolled else total)
        if rows > 1:  # some head has its own mask: a row per query, key and value head
            xq, xk, xv = x[:, :, :heads], x[:, :, heads : heads + kv], x[:, :, heads + kv :]
        else:
            xq = jnp.broadcast_to(x, (*x.shape[:2], heads, d))
            xk = xv = jnp.broadcast_to(x, (*x.shape[:2], kv, d))
        mlp_in = None
        if block.parallel and block.mlp is not None:
            mlp_in = mix(buf, bias, mlp_own, first if unrolled else total)[:, :, 0]
        if unrolled and layer == final:  # only the unembedding reads on: the last position's query alone
            xq, buf, bias = xq[:, -1:], buf[:, -1:], bias[:, -1:]
            mlp_in = None if mlp_in is None else mlp_in[:, -1:]
        heads_out = _attention_writes(block, xq, xk, xv, pads)
        if block.ln1_post is None:
            bias = bias + block.attn.b_O
        else:
            scale = _post_scale(block.ln1_post, heads_out.sum(2) + block.attn.b_O)
            heads_out = heads_out * scale[:, :, None, :]
            bias = bias + block.attn.b_O * scale
        buf, bias = write(buf, bias, heads_out, first)
        if block.mlp is not None:
            if mlp_in is None:
                mlp_in = mix(buf, bias, mlp_own, first + heads if unrolled else total)[:, :, 0]
            y = _norm(block.ln2, mlp_in)
            if block.ln2_post is None:
                out = _mlp_writes(block.mlp, y)
                bias = bias + block.mlp.b_out
            else:  # the post-norm mixes the bias in: the MLP's writer carries it
                out = block.ln2_post(block.mlp(y))
            buf, bias = write(buf, bias, out[:, :, None, :], first + heads)
        return buf, bias

    carry = write(jnp.zeros((*embed.shape[:2], total, d), dtype), jnp.zeros_like(embed), embed[:, :, None, :], 0)
    weights = (attn, mlp)  # [layers, rows, writers] each
    final = len(model.blocks) - 1 if last else None  # on its own: its carry narrows to one position
    for start, stop in layer_spans(model.blocks, None, final):
        if stop - start < SCAN_LAYERS or not loops_here():  # unrolled: each layer reads only its upstream
            for layer in range(start, stop):
                carry = layer_fn(model.blocks[layer], carry, layer, tuple(w[layer] for w in weights))
            continue

        def body(carry, xs):
            block, layer, w = xs
            return layer_fn(block, carry, layer, w), None

        blocks = jax.tree.map(lambda *xs: jnp.stack(xs), *model.blocks[start:stop])
        xs = (blocks, jnp.arange(start, stop), tuple(w[start:stop] for w in weights))
        carry, _ = jax.lax.scan(body, carry, xs)
    buf, bias = carry
    if last and not model.blocks:  # no final block narrowed the carry: the embedding's last position
        buf, bias = buf[:, -1:], bias[:, -1:]
    logits = model.unembed(mix(buf, bias, unembed)[:, :, 0])
    if capture and repl is not None:  # the writers' outputs, not their differences from the replacement
        buf = buf + repl
    return logits, (buf if capture else None)
