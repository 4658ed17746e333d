"""Rotary position embeddings: query and key heads turned by an angle that grows with position.

The first ``rotary_dim`` dimensions of a head form ``rotary_dim / 2`` planes; plane ``i`` turns by
``position · θ_i`` with ``θ_i = base^(-2i / rotary_dim)``. The planes pair dimension ``i`` with
``i + rotary_dim / 2`` (the half rotation of Llama, GPT-NeoX, Qwen2, Gemma) or with its neighbour
``2i + 1`` (GPT-J; TransformerLens's ``rotary_adjacent_pairs``). The other dimensions pass
unturned (partial rotary, e.g. Pythia's quarter). Llama-3's scaling ("NTK by parts") divides the
slow frequencies by ``factor`` and blends the middle ones. The angles are constants of the trace
when they depend only on positions the prompt length fixes (``start``); a left-padded batch gives
each prompt's own ``positions`` instead, and its angles are computed in the trace.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

Heads = Float[Array, "batch seq heads d_head"]


def inverse_frequencies(dim: int, base: float, ntk: tuple[float, float, float, int] | None = None) -> np.ndarray:
    """``θ_i`` for each plane, float32; ``ntk = (factor, low_freq_factor, high_freq_factor,
    original_ctx_len)`` applies Llama-3's scaling.

    >>> inverse_frequencies(4, 100.0).tolist()
    [1.0, 0.10000000149011612]
    """
    theta = (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))).astype(np.float32)
    if ntk is None:
        return theta
    factor, low, high, ctx = ntk
    wavelen = 2 * math.pi / theta.astype(np.float64)
    scaled = np.where(wavelen > ctx / low, theta / factor, theta)
    smooth = (ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    middle = ~(wavelen < ctx / high) & ~(wavelen > ctx / low)
    return np.where(middle, blended, scaled).astype(np.float32)


class Rotary(eqx.Module):
    """How a model's heads turn (all static: the angles are computed when traced).

    >>> r = Rotary(dim=2, base=10000.0)
    >>> x = jnp.ones((1, 2, 1, 2))
    >>> [[round(float(a), 3) for a in row] for row in r(x, start=0)[0, :, 0]]  # position 1 turned by 1 radian
    [[1.0, 1.0], [-0.301, 1.382]]
    """

    dim: int = eqx.field(static=True)
    base: float = eqx.field(static=True)
    adjacent_pairs: bool = eqx.field(static=True, default=False)
    ntk: tuple[float, float, float, int] | None = eqx.field(static=True, default=None)

    def angles(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin, ``[n, dim / 2]``, for positions ``start .. start + n - 1``."""
        theta = inverse_frequencies(self.dim, self.base, self.ntk)
        freqs = np.arange(start, start + n, dtype=np.float32)[:, None] * theta[None, :]
        return np.cos(freqs), np.sin(freqs)

    def __call__(self, x: Heads, start: int = 0, positions: Int[Array, "batch seq"] | None = None) -> Heads:
        """``x`` (positions ``start ..``, or each prompt's ``positions``) with each head's planes turned."""
        if positions is None:
            cos, sin = self.angles(start, x.shape[1])
            cos, sin = jnp.asarray(cos)[:, None, :], jnp.asarray(sin)[:, None, :]  # [seq, 1, planes]
        else:
            theta = jnp.asarray(inverse_frequencies(self.dim, self.base, self.ntk))
            freqs = positions.astype(jnp.float32)[..., None, None] * theta  # [batch, seq, 1, planes]
            cos, sin = jnp.cos(freqs), jnp.sin(freqs)
        cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)  # a bfloat16 model's (--dtype)
        turn, rest = x[..., : self.dim], x[..., self.dim :]
        if self.adjacent_pairs:
            a, b = turn[..., 0::2], turn[..., 1::2]
            turned = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(turn.shape)
        else:
            a, b = turn[..., : self.dim // 2], turn[..., self.dim // 2 :]
            turned = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
        return jnp.concatenate([turned, rest], axis=-1) if self.dim < x.shape[-1] else turned
