"""MLPs: the plain two-layer MLP (GPT-2, NeoX) and the gated one (Llama, Qwen2, Gemma).

The gated MLP computes ``act(x W_gate) ⊙ (x W_in) + b_in``, then ``W_out`` and ``b_out``: the form
and names of TransformerLens's ``GatedMLP`` (Hugging Face's ``gate_proj``, ``up_proj``,
``down_proj``). Activations: ``relu``; ``gelu`` (exact); ``gelu_new`` and ``gelu_pytorch_tanh``
(one tanh approximation); ``silu``.
"""

from __future__ import annotations

import equinox as eqx
import jax
from jaxtyping import Array, Float

Resid = Float[Array, "batch seq d_model"]


def activate(act_fn: str, x: Array) -> Array:
    """The activation ``act_fn`` of ``x``.

    >>> import jax.numpy as jnp
    >>> float(activate("relu", jnp.array(-1.0))), float(activate("silu", jnp.array(0.0)))
    (0.0, 0.0)
    """
    if act_fn == "relu":
        return jax.nn.relu(x)
    if act_fn == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=act_fn in ("gelu_new", "gelu_pytorch_tanh"))


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
        elif self.act_fn == "silu":
            post = jax.nn.silu(pre)
        else:
            post = jax.nn.gelu(pre, approximate=self.act_fn in ("gelu_new", "gelu_pytorch_tanh"))
        return post @ self.W_out + self.b_out


class GatedMLP(eqx.Module):
    W_gate: Float[Array, "d_model d_mlp"]
    W_in: Float[Array, "d_model d_mlp"]
    b_in: Float[Array, " d_mlp"]
    W_out: Float[Array, "d_mlp d_model"]
    b_out: Float[Array, " d_model"]
    act_fn: str = eqx.field(static=True)

    def __call__(self, x: Resid) -> Resid:
        post = activate(self.act_fn, x @ self.W_gate) * (x @ self.W_in) + self.b_in
        return post @ self.W_out + self.b_out
