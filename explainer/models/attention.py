"""Attention: multi-head, grouped-query and multi-query, with the options of each family.

Query head ``h`` reads key/value head ``h // (n_heads / n_kv_heads)`` (grouped-query attention as
in Llama, Mistral, Qwen2 and Gemma; one key/value head is multi-query). Options, all static:
rotary positions on queries and keys (:mod:`explainer.models.rotary`), a soft cap on the scaled
scores (``cap · tanh(s / cap)``, Gemma-2), and a sliding window (a query sees itself and the
``window - 1`` positions before it). Without them the computation is GPT-2's, op for op.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from explainer.models.rotary import Rotary

Resid = Float[Array, "batch seq d_model"]


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

    def __call__(self, x: Resid, queries: int | None = None) -> Float[Array, "batch queries d_model"]:
        """The attention output at every position, or at the last ``queries`` positions only (keys
        and values still come from every position)."""
        seq = x.shape[1]
        queries = seq if queries is None else queries
        q = jnp.einsum("bpd,hde->bphe", x[:, seq - queries :], self.W_Q) + self.b_Q
        k = jnp.einsum("bpd,hde->bphe", x, self.W_K) + self.b_K
        v = jnp.einsum("bpd,hde->bphe", x, self.W_V) + self.b_V
        z = self.mix(q, k, v)
        return jnp.einsum("bqhe,hem->bqm", z, self.W_O) + self.b_O

    def mix(
        self,
        q: Float[Array, "batch queries heads d_head"],
        k: Float[Array, "batch seq kv d_head"],
        v: Float[Array, "batch seq kv d_head"],
    ) -> Float[Array, "batch queries heads d_head"]:
        """Each query head's mix of values, ``z``, for queries at the last ``q.shape[1]`` positions."""
        seq, queries = k.shape[1], q.shape[1]
        if self.rotary is not None:
            q, k = self.rotary(q, start=seq - queries), self.rotary(k, start=0)
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
        if ok is not None:
            scores = jnp.where(ok, scores, -jnp.inf)
        pattern = jax.nn.softmax(scores, axis=-1)
        if groups == 1:
            return jnp.einsum("bhqk,bkhe->bqhe", pattern, v)
        b, _, kv, e = v.shape
        pg = pattern.reshape(b, kv, groups, queries, seq)
        return jnp.einsum("bkgqs,bske->bqkge", pg, v).reshape(b, queries, kv * groups, e)
