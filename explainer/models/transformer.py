"""The transformer in Equinox, with named read sites: GPT-2 and the families beyond it.

Vocabulary (used across the project):

- ``batch``, ``seq``: prompt index and token position; ``d_model``: residual width.
- a *site* is where a component reads the residual stream, before its norm:
  ``blocks.{l}.attn.in``, ``blocks.{l}.mlp.in``, ``unembed.in``.

The families (GPT-2, GPT-NeoX/Pythia, Llama/Mistral, Qwen2, Gemma/Gemma-2) differ in parts, each a
small module: norms (:mod:`~explainer.models.norms`), positions (learned, or
:mod:`~explainer.models.rotary`), attention (grouped heads, soft caps, sliding windows:
:mod:`~explainer.models.attention`), MLPs (plain or gated: :mod:`~explainer.models.mlp`), and the
block's wiring (sequential or parallel, with or without Gemma-2's post-norms).

Interventions are explicit arguments of the forward pass: ``edit(site, h)`` returns what the reader
at ``site`` reads instead of the residual ``h``. The residual stream itself (the skip connection)
is never edited, so an edit at one site changes only that reader's path ("treeified" scrubbing).
Parameters use TransformerLens names and shapes, so the native format maps one to one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from explainer.models.attention import Attention
from explainer.models.config import ModelConfig
from explainer.models.mlp import MLP, GatedMLP
from explainer.models.norms import LayerNorm, Norm, RMSNorm, apply_norm
from explainer.models.padding import pad_counts, real_positions

__all__ = [
    "MLP",
    "Attention",
    "Block",
    "GatedMLP",
    "LayerNorm",
    "RMSNorm",
    "SiteEdits",
    "Transformer",
    "layer_spans",
    "loops_here",
    "same_blocks",
]

Resid = Float[Array, "batch seq d_model"]
Edit = Callable[[str, Resid], Resid]
Reads = Float[Array, "batch _ d_model"]  # every position, or the last alone after the last block's attention


class Block(eqx.Module):
    """One layer: attention and (unless attention-only) an MLP, each behind its input norm.

    ``ln1_post``/``ln2_post`` (Gemma-2) normalise each output before it joins the residual stream;
    ``parallel`` (GPT-NeoX, GPT-J): the MLP reads the block's input, as the attention does.
    """

    ln1: Norm | None
    attn: Attention
    ln2: Norm | None
    mlp: MLP | GatedMLP | None
    ln1_post: Norm | None = None
    ln2_post: Norm | None = None
    parallel: bool = eqx.field(static=True, default=False)


_norm = apply_norm  # the name the rest of the package imports
# Consecutive blocks of one shape from which a forward pass runs them as one loop: its compile does
# not grow with depth, and shallow models compile quickly unrolled.
SCAN_LAYERS = 6
# On the CPU layers stay unrolled: there XLA compiles them quickly, and a loop body ran the steps
# slower (and, in the plain and scrubbed forwards, held a stacked copy of the weights), more than its
# quicker compile saved over a run (benchmarks/results/growth.json, qwen-shape.json).
LOOP_ON_CPU = False
_KINDS = ("attn.in", "mlp.in")


class SiteEdits(eqx.Module):
    """An edit given as data per site, which a loop over layers can carry: ``data(site)`` (a pytree,
    or ``None`` where the site is left alone) and ``apply(data, h)``. Calling it is the plain
    ``edit(site, h)``. Layers of one shape under such an edit run as one loop body
    (``jax.lax.scan``); under any other edit callable, one by one."""

    def data(self, site: str):
        raise NotImplementedError

    def apply(self, data, h: Reads) -> Reads:
        raise NotImplementedError

    def __call__(self, site: str, h: Reads) -> Reads:
        data = self.data(site)
        return h if data is None else self.apply(data, h)


def same_blocks(blocks: Sequence[eqx.Module]) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of consecutive blocks of one shape (tree structure, static
    fields, array shapes and dtypes), which one compiled loop body can run: every block of a plain
    model is one run; Gemma-2's alternating sliding windows make runs of one."""

    runs: list[tuple[int, int]] = []
    for i, block in enumerate(blocks):
        if runs and _shape(block) == _shape(blocks[runs[-1][0]]):
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def loops_here() -> bool:
    """Whether forward passes run layers of one shape as one loop on this backend: off the CPU, or
    with :data:`LOOP_ON_CPU`."""
    return LOOP_ON_CPU or jax.default_backend() != "cpu"


def _alike(parts: list) -> bool:
    """Whether the per-layer data of one kind of site can be stacked over layers: no layer has
    any, or every layer has data of one shape."""
    return all(p is None for p in parts) or (all(p is not None for p in parts) and len(set(map(_shape, parts))) == 1)


def _stacked(parts: list):
    """The per-layer data of one kind of site stacked over layers (``None`` where no layer has any)."""
    return None if parts[0] is None else jax.tree.map(lambda *xs: jnp.stack(xs), *parts)


def _shape(tree) -> tuple:
    leaves, structure = jax.tree.flatten(tree)
    return structure, tuple((x.shape, x.dtype) if hasattr(x, "shape") else x for x in leaves)


def layer_spans(blocks, edit, final: int | None) -> list[tuple[int, int]]:
    """The forward pass's spans of layers: runs of at least :data:`SCAN_LAYERS` blocks of one shape,
    edited alike by a :class:`SiteEdits` (or not at all), loop (off the CPU, or with
    :data:`LOOP_ON_CPU`); every other layer (the last under ``last``, a rewritten MLP's) is a span
    of one."""
    spans: list[tuple[int, int]] = []
    for start, stop in same_blocks(blocks):
        stop_loop = stop if final is None or final >= stop else final  # the last layer runs on its own
        loops = loops_here() and stop_loop - start >= SCAN_LAYERS and not hasattr(blocks[start].mlp, "fitted")
        if loops and edit is not None:
            layers = range(start, stop_loop)
            loops = isinstance(edit, SiteEdits) and all(
                _alike([edit.data(f"blocks.{i}.{k}") for i in layers]) for k in _KINDS
            )
        if loops:
            spans.append((start, stop_loop))
            start = stop_loop
        spans += [(i, i + 1) for i in range(start, stop)]
    return spans


class Transformer(eqx.Module):
    """Embeddings, ``n_layers`` blocks, final norm, unembedding (``W_pos`` is ``None`` with rotary
    positions; logits are soft-capped where the config says so).

    >>> import jax
    >>> from explainer.models import ModelConfig, init_random
    >>> cfg = ModelConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=5, n_ctx=4)
    >>> model = init_random(cfg, jax.random.key(0))
    >>> model(jax.numpy.zeros((2, 3), dtype=int)).shape
    (2, 3, 5)
    """

    config: ModelConfig = eqx.field(static=True)
    W_E: Float[Array, "d_vocab d_model"]
    W_pos: Float[Array, "n_ctx d_model"] | None
    blocks: tuple[Block, ...]
    ln_final: Norm | None
    W_U: Float[Array, "d_model d_vocab_out"]
    b_U: Float[Array, " d_vocab_out"]

    @property
    def sites(self) -> tuple[str, ...]:
        """Every read site in forward order; a rewritten MLP (:mod:`explainer.rewrites`) adds its
        remainder, ``blocks.{l}.mlp.rest``, right after ``blocks.{l}.mlp.in``."""
        rest = {
            f"blocks.{i}.mlp.in": f"blocks.{i}.mlp.rest" for i, b in enumerate(self.blocks) if hasattr(b.mlp, "fitted")
        }
        return tuple(s for site in self.config.sites for s in (site, rest.get(site)) if s is not None)

    def __call__(
        self, tokens: Int[Array, "batch seq"], edit: Edit | None = None, remat: bool = False, last: bool = False
    ) -> Float[Array, "batch _ d_vocab_out"]:
        """Logits for every position (``last``: for the last position only, shape ``[batch, 1,
        vocab]``); ``edit(site, h)`` replaces what the reader at ``site`` reads."""
        logits, _ = self.run(tokens, edit=edit, remat=remat, last=last)
        return logits

    def run(
        self,
        tokens: Int[Array, "batch seq"],
        edit: Edit | None = None,
        capture: Sequence[str] = (),
        remat: bool = False,
        last: bool = False,
    ) -> tuple[Float[Array, "batch _ d_vocab_out"], dict[str, Reads]]:
        """Logits plus the residual ``h`` arriving at each site in ``capture`` (before any edit).

        Only the sites asked for are kept, so memory grows with ``len(capture)``, not the model.
        With ``remat`` each block is a ``jax.checkpoint``: a backward pass recomputes the block's
        activations from its input instead of keeping them (same values, less memory).

        With ``last`` only the last position's logits are computed: the last block's queries, MLP
        and the unembedding run on that position alone (its keys and values still on every one),
        so the sites after the last block's attention (``blocks.{L}.mlp.in``, ``unembed.in``) read,
        and capture, ``[batch, 1, d_model]``. The task reads one position, so every step of
        training and every scored explanation needs no more (on ``ioi``, 2.1 ms a training step of
        64 prompts against 3.4 with every position).
        """
        captured: dict[str, Reads] = {}
        final_layer = len(self.blocks) - 1 if last else None  # from its MLP on, the last position alone

        def layer_fn(block: Block, resid: Resid, read, final: bool) -> tuple[Reads, dict[str, Reads]]:
            seen: dict[str, Reads] = {}  # returned, not stored, so that no tracer leaks out of a checkpoint
            x = read("attn.in", resid, seen)
            attn = block.attn(_norm(block.ln1, x), queries=1 if final else None, pads=pads)
            if block.ln1_post is not None:
                attn = block.ln1_post(attn)
            before = resid[:, -1:] if final else resid  # from here on (final), the last position alone
            resid = before + attn
            if block.mlp is not None:
                x = read("mlp.in", before if block.parallel else resid, seen)
                y = _norm(block.ln2, x)
                out = block.mlp(y)
                if hasattr(block.mlp, "fitted"):  # a rewrite MLP = f + rest: the rest is read as a site
                    rest = out - block.mlp.fitted(y)
                    out = out + (read("mlp.rest", rest, seen) - rest)  # unedited: exactly out
                if block.ln2_post is not None:
                    out = block.ln2_post(out)
                resid = resid + out
            return resid, seen

        def by_site(layer: int):
            """Reads at ``layer``'s sites, by name: ``edit(site, h)``, captured as ``site``."""

            def read(kind: str, resid: Reads, seen: dict[str, Reads]) -> Reads:
                site = f"blocks.{layer}.{kind}"
                if site in capture:
                    seen[site] = resid
                return resid if edit is None else edit(site, resid)

            return read

        resid, pads = self.embed(tokens)
        if last and not self.blocks:
            resid = resid[:, -1:]
        for start, stop in layer_spans(self.blocks, edit, final_layer):
            if stop - start == 1:
                fn = functools.partial(layer_fn, read=by_site(start), final=start == final_layer)
                resid, seen = (jax.checkpoint(fn) if remat else fn)(self.blocks[start], resid)
                captured.update(seen)
                continue
            layers = range(start, stop)
            kinds = {k for k in _KINDS if any(f"blocks.{i}.{k}" in capture for i in layers)}
            data = {} if edit is None else {k: _stacked([edit.data(f"blocks.{i}.{k}") for i in layers]) for k in _KINDS}

            def body(resid, xs, kinds=kinds):
                block, data = xs

                def read(kind: str, resid: Reads, reads: dict[str, Reads]) -> Reads:
                    if kind in kinds:
                        reads[kind] = resid
                    return resid if data.get(kind) is None else edit.apply(data[kind], resid)

                fn = functools.partial(layer_fn, read=read, final=False)
                return (jax.checkpoint(fn) if remat else fn)(block, resid)

            blocks = jax.tree.map(lambda *xs: jnp.stack(xs), *self.blocks[start:stop])
            resid, stacked = jax.lax.scan(body, resid, (blocks, data))
            for name, values in stacked.items():
                captured.update({f"blocks.{i}.{name}": values[j] for j, i in enumerate(layers)})
        captured = {site: value for site, value in captured.items() if site in capture}
        x = resid if edit is None else edit("unembed.in", resid)
        if "unembed.in" in capture:
            captured["unembed.in"] = resid
        return self.unembed(x), captured

    def embed(self, tokens: Int[Array, "batch seq"]) -> tuple[Resid, Int[Array, " batch"]]:
        """The token (plus learned position) embedding and each prompt's left padding
        (:mod:`~explainer.models.padding`): padding embeds as token 0, positions count from each
        prompt's first real token."""
        pads = pad_counts(tokens)
        resid = self.W_E[jnp.maximum(tokens, 0)]
        return (resid if self.W_pos is None else resid + self.W_pos[real_positions(tokens)]), pads

    def unembed(self, x: Reads) -> Float[Array, "batch _ d_vocab_out"]:
        """Logits of what ``unembed.in`` reads: final norm, ``W_U``, ``b_U``, the soft cap if any."""
        logits = _norm(self.ln_final, x) @ self.W_U + self.b_U
        cap = self.config.cap(self.config.output_logits_soft_cap)
        return logits if cap is None else cap * jnp.tanh(logits / cap)
