"""The norms a reader applies to the residual stream before it reads: LayerNorm and RMSNorm.

Names and meanings are TransformerLens's: ``LN`` (centre, scale, affine ``w``/``b``), ``LNPre``
(no affine part, e.g. after folding), ``RMS`` (scale by the root mean square, then ``w``; no
centring, no bias: Llama, Qwen2, Gemma) and ``RMSPre``. Gemma's ``x · (1 + w)`` is stored with the
one folded into ``w``, as TransformerLens stores it.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

Resid = Float[Array, "batch seq d_model"]


class LayerNorm(eqx.Module):
    """TransformerLens LayerNorm; ``w``/``b`` are ``None`` for ``LNPre`` (no affine part).

    >>> ln = LayerNorm(None, None, 1e-5)
    >>> ln(jnp.array([[[1.0, 3.0]]])).round(3).tolist()
    [[[-1.0, 1.0]]]
    """

    w: Float[Array, " d_model"] | None
    b: Float[Array, " d_model"] | None
    eps: float = eqx.field(static=True)

    def __call__(self, x: Resid) -> Resid:
        x = x - x.mean(-1, keepdims=True)
        x = x / jnp.sqrt((x * x).mean(-1, keepdims=True) + self.eps)
        if self.w is not None:
            x = x * self.w + self.b
        return x


class RMSNorm(eqx.Module):
    """TransformerLens RMSNorm: ``x / sqrt(mean(x²) + eps) · w``; ``w`` is ``None`` for ``RMSPre``.

    >>> RMSNorm(None, 0.0)(jnp.array([[[3.0, -3.0]]])).tolist()
    [[[1.0, -1.0]]]
    """

    w: Float[Array, " d_model"] | None
    eps: float = eqx.field(static=True)

    def __call__(self, x: Resid) -> Resid:
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps)
        return x if self.w is None else x * self.w


Norm = LayerNorm | RMSNorm


def apply_norm(ln: Norm | None, x: Resid) -> Resid:
    """``ln(x)``, or ``x`` itself for a model without norms."""
    return x if ln is None else ln(x)


def make_norm(kind: str | None, w: Array | None, b: Array | None, eps: float) -> Norm | None:
    """The norm of a ``normalization_type`` with its parameters (``None`` for none)."""
    if kind is None:
        return None
    if kind in ("LN", "LNPre"):
        return LayerNorm(w, b, eps)
    return RMSNorm(w, eps)
