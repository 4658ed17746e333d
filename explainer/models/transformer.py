"""A GPT-2-style transformer in Equinox, with named read sites.

Vocabulary (used across the project):

- ``batch``, ``seq``: prompt index and token position; ``d_model``: residual width.
- a *site* is where a component reads the residual stream, before its LayerNorm:
  ``blocks.{l}.attn.in``, ``blocks.{l}.mlp.in``, ``unembed.in``.

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

from explainer.models.config import ModelConfig

Resid = Float[Array, "batch seq d_model"]
Edit = Callable[[str, Resid], Resid]
Reads = Float[Array, "batch _ d_model"]  # every position, or the last alone after the last block's attention


class LayerNorm(eqx.Module):
    """TransformerLens LayerNorm; ``w``/``b`` are ``None`` for ``LNPre`` (no affine part)."""

    w: Float[Array, " d_model"] | None
    b: Float[Array, " d_model"] | None
    eps: float = eqx.field(static=True)

    def __call__(self, x: Resid) -> Resid:
        x = x - x.mean(-1, keepdims=True)
        x = x / jnp.sqrt((x * x).mean(-1, keepdims=True) + self.eps)
        if self.w is not None:
            x = x * self.w + self.b
        return x


class Attention(eqx.Module):
    W_Q: Float[Array, "n_heads d_model d_head"]
    b_Q: Float[Array, "n_heads d_head"]
    W_K: Float[Array, "n_heads d_model d_head"]
    b_K: Float[Array, "n_heads d_head"]
    W_V: Float[Array, "n_heads d_model d_head"]
    b_V: Float[Array, "n_heads d_head"]
    W_O: Float[Array, "n_heads d_head d_model"]
    b_O: Float[Array, " d_model"]
    scale: float = eqx.field(static=True)
    causal: bool = eqx.field(static=True)

    def __call__(self, x: Resid, queries: int | None = None) -> Float[Array, "batch queries d_model"]:
        """The attention output at every position, or at the last ``queries`` positions only (keys
        and values still come from every position)."""
        seq = x.shape[1]
        queries = seq if queries is None else queries
        q = jnp.einsum("bpd,hde->bphe", x[:, seq - queries :], self.W_Q) + self.b_Q
        k = jnp.einsum("bpd,hde->bphe", x, self.W_K) + self.b_K
        v = jnp.einsum("bpd,hde->bphe", x, self.W_V) + self.b_V
        scores = jnp.einsum("bqhe,bkhe->bhqk", q, k) / self.scale
        if self.causal and queries > 1:  # the last position attends to every position
            allowed = jnp.tril(jnp.ones((seq, seq), dtype=bool))[seq - queries :]
            scores = jnp.where(allowed, scores, -jnp.inf)
        pattern = jax.nn.softmax(scores, axis=-1)
        z = jnp.einsum("bhqk,bkhe->bqhe", pattern, v)
        return jnp.einsum("bqhe,hem->bqm", z, self.W_O) + self.b_O


class MLP(eqx.Module):
    W_in: Float[Array, "d_model d_mlp"]
    b_in: Float[Array, " d_mlp"]
    W_out: Float[Array, "d_mlp d_model"]
    b_out: Float[Array, " d_model"]
    act_fn: str = eqx.field(static=True)

    def __call__(self, x: Resid) -> Resid:
        pre = x @ self.W_in + self.b_in
        if self.act_fn == "relu":
            post = jax.nn.relu(pre)
        else:
            post = jax.nn.gelu(pre, approximate=self.act_fn == "gelu_new")
        return post @ self.W_out + self.b_out


class Block(eqx.Module):
    ln1: LayerNorm | None
    attn: Attention
    ln2: LayerNorm | None
    mlp: MLP | None


def _norm(ln: LayerNorm | None, x: Resid) -> Resid:
    return x if ln is None else ln(x)


class Transformer(eqx.Module):
    """GPT-2-style transformer: embeddings, ``n_layers`` blocks, final LayerNorm, unembedding.

    >>> import jax
    >>> from explainer.models import ModelConfig, init_random
    >>> cfg = ModelConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=5, n_ctx=4)
    >>> model = init_random(cfg, jax.random.key(0))
    >>> model(jax.numpy.zeros((2, 3), dtype=int)).shape
    (2, 3, 5)
    """

    config: ModelConfig = eqx.field(static=True)
    W_E: Float[Array, "d_vocab d_model"]
    W_pos: Float[Array, "n_ctx d_model"]
    blocks: tuple[Block, ...]
    ln_final: LayerNorm | None
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

        def read(site: str, resid: Reads, seen: dict[str, Reads]) -> Reads:
            if site in capture:
                seen[site] = resid
            return resid if edit is None else edit(site, resid)

        def layer_fn(block: Block, resid: Resid, layer: int, final: bool) -> tuple[Reads, dict[str, Reads]]:
            seen: dict[str, Reads] = {}  # returned, not stored, so that no tracer leaks out of a checkpoint
            x = read(f"blocks.{layer}.attn.in", resid, seen)
            if final:  # from here on, the last position alone
                resid = resid[:, -1:] + block.attn(_norm(block.ln1, x), queries=1)
            else:
                resid = resid + block.attn(_norm(block.ln1, x))
            if block.mlp is not None:
                x = read(f"blocks.{layer}.mlp.in", resid, seen)
                y = _norm(block.ln2, x)
                out = block.mlp(y)
                if hasattr(block.mlp, "fitted"):  # a rewrite MLP = f + rest: the rest is read as a site
                    rest = out - block.mlp.fitted(y)
                    out = out + (read(f"blocks.{layer}.mlp.rest", rest, seen) - rest)  # unedited: exactly out
                resid = resid + out
            return resid, seen

        seq = tokens.shape[-1]
        resid = self.W_E[tokens] + self.W_pos[:seq]
        if last and not self.blocks:
            resid = resid[:, -1:]
        for layer, block in enumerate(self.blocks):
            fn = functools.partial(layer_fn, layer=layer, final=last and layer == len(self.blocks) - 1)
            resid, seen = (jax.checkpoint(fn) if remat else fn)(block, resid)
            captured.update(seen)
        x = read("unembed.in", resid, captured)
        logits = _norm(self.ln_final, x) @ self.W_U + self.b_U
        return logits, captured
