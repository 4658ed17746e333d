"""Attention: multi-head, grouped-query and multi-query, with the options of each family.

Query head ``h`` reads key/value head ``h // (n_heads / n_kv_heads)`` (grouped-query attention as
in Llama, Mistral, Qwen2 and Gemma; one key/value head is multi-query). Options, all static:
rotary positions on queries and keys (:mod:`explainer.models.rotary`), a soft cap on the scaled
scores (``cap · tanh(s / cap)``, Gemma-2), and a sliding window (a query sees itself and the
``window - 1`` positions before it). Without them the computation is GPT-2's, op for op.

Prompts of different lengths share a batch by *left padding* (:mod:`explainer.models.padding`):
``pads[b]`` positions at the start of prompt ``b`` are padding. No real query attends to them, and
rotary positions count from each prompt's first real token, so padding never changes a prompt's
outputs; a padding query attends to itself alone (its output is never read).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from explainer.models.rotary import Rotary

Resid = Float[Array, "batch seq d_model"]
Pads = Int[Array, " batch"]


def allowed(seq: int, queries: int, causal: bool, window: int | None) -> np.ndarray | None:
    """Which keys each of the last ``queries`` positions may see, ``[queries, seq]``; ``None``: all.

    >>> allowed(3, 3, True, 2).astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    q = np.arange(seq - queries, seq)[:, None]
    k = np.arange(seq)[None, :]
    ok = np.ones((queries, seq), dtype=bool)
    if causal:
        ok &= k <= q
    if window is not None:
        ok &= k > q - window
    return None if ok.all() else ok


def visible(pads: Pads, seq: int, queries: int, ok: np.ndarray | None) -> Bool[Array, "batch 1 queries seq"]:
    """``allowed`` per prompt with its left padding hidden: a real query never sees a padding key; a
    padding query sees itself (so that no row of the pattern is empty)."""
    k = np.arange(seq)
    self_key = k[None, :] == np.arange(seq - queries, seq)[:, None]
    see = (k[None, None, :] >= pads[:, None, None]) | self_key[None]
    return (see if ok is None else see & ok[None])[:, None]


class Attention(eqx.Module):
    """One attention layer; ``W_K``, ``b_K``, ``W_V``, ``b_V`` have one row per key/value head."""

    W_Q: Float[Array, "n_heads d_model d_head"]
    b_Q: Float[Array, "n_heads d_head"]
    W_K: Float[Array, "n_kv_heads d_model d_head"]
    b_K: Float[Array, "n_kv_heads d_head"]
    W_V: Float[Array, "n_kv_heads d_model d_head"]
    b_V: Float[Array, "n_kv_heads d_head"]
    W_O: Float[Array, "n_heads d_head d_model"]
    b_O: Float[Array, " d_model"]
    scale: float = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    rotary: Rotary | None = None
    soft_cap: float | None = eqx.field(static=True, default=None)
    window: int | None = eqx.field(static=True, default=None)

    def __call__(
        self, x: Resid, queries: int | None = None, pads: Pads | None = None
    ) -> Float[Array, "batch queries d_model"]:
        """The attention output at every position, or at the last ``queries`` positions only (keys
        and values still come from every position); ``pads``: each prompt's left padding."""
        seq = x.shape[1]
        queries = seq if queries is None else queries
        q = jnp.einsum("bpd,hde->bphe", x[:, seq - queries :], self.W_Q) + self.b_Q
        k = jnp.einsum("bpd,hde->bphe", x, self.W_K) + self.b_K
        v = jnp.einsum("bpd,hde->bphe", x, self.W_V) + self.b_V
        z = self.mix(q, k, v, pads)
        return jnp.einsum("bqhe,hem->bqm", z, self.W_O) + self.b_O

    def mix(
        self,
        q: Float[Array, "batch queries heads d_head"],
        k: Float[Array, "batch seq kv d_head"],
        v: Float[Array, "batch seq kv d_head"],
        pads: Pads | None = None,
    ) -> Float[Array, "batch queries heads d_head"]:
        """Each query head's mix of values, ``z``, for queries at the last ``q.shape[1]`` positions
        (``pads``: each prompt's left padding, hidden from every real query)."""
        seq, queries = k.shape[1], q.shape[1]
        if self.rotary is not None and pads is None:
            q, k = self.rotary(q, start=seq - queries), self.rotary(k, start=0)
        elif self.rotary is not None:  # positions count from each prompt's first real token
            at = jnp.maximum(jnp.arange(seq)[None, :] - pads[:, None], 0)
            q, k = self.rotary(q, positions=at[:, seq - queries :]), self.rotary(k, positions=at)
        groups = q.shape[2] // k.shape[2]
        if groups == 1:
            scores = jnp.einsum("bqhe,bkhe->bhqk", q, k) / self.scale
        else:
            b, _, kv, e = k.shape
            qg = q.reshape(b, queries, kv, groups, e)
            scores = jnp.einsum("bqkge,bske->bkgqs", qg, k).reshape(b, kv * groups, queries, seq) / self.scale
        if self.soft_cap is not None:
            scores = self.soft_cap * jnp.tanh(scores / self.soft_cap)
        ok = allowed(seq, queries, self.causal, self.window)
        if pads is not None:
            scores = jnp.where(visible(pads, seq, queries, ok), scores, -jnp.inf)
        elif ok is not None:
            scores = jnp.where(ok, scores, -jnp.inf)
        pattern = jax.nn.softmax(scores, axis=-1)
        if groups == 1:
            return jnp.einsum("bhqk,bkhe->bqhe", pattern, v)
        b, _, kv, e = v.shape
        pg = pattern.reshape(b, kv, groups, queries, seq)
        return jnp.einsum("bkgqs,bske->bqkge", pg, v).reshape(b, queries, kv * groups, e)
