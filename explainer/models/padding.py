"""Left padding: prompts of different lengths in one batch.

A batch of prompts is one ``[batch, seq]`` array of token ids; a prompt shorter than ``seq`` is
*left-padded* with :data:`PAD` (``-1``, never a token id). So every prompt ends at the last position,
which every metric reads, and a prompt and its counterfactual of equal length stay aligned.
The forward pass finds the padding in the tokens themselves (:func:`pad_counts`): real queries never
attend to padding, and positions (learned or rotary) count from each prompt's first real token, so a
prompt's logits are the same alone or padded among longer ones. A batch without padding computes
exactly what it did before padding existed.

>>> pad_left([[5, 6, 7], [8]]).tolist()
[[5, 6, 7], [-1, -1, 8]]
>>> pad_counts(jnp.asarray(pad_left([[5, 6, 7], [8]]))).tolist()
[0, 2]
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PRNGKeyArray

PAD = -1


def pad_left(rows: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
    """``rows`` as one int32 array, each row left-padded with :data:`PAD` to ``width`` (the longest)."""
    width = max(len(r) for r in rows) if width is None else width
    out = np.full((len(rows), width), PAD, dtype=np.int32)
    for i, row in enumerate(rows):
        if len(row):
            out[i, width - len(row) :] = row
    return out


def pad_counts(tokens: Int[Array, "batch seq"]) -> Int[Array, " batch"]:
    """How many padding positions each prompt starts with."""
    return (tokens < 0).sum(-1)


def lengths(tokens: Int[Array, "batch seq"]) -> Int[Array, " batch"]:
    """Each prompt's own length (its real tokens)."""
    return tokens.shape[-1] - pad_counts(tokens)


def real_positions(tokens: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """Each position's index counted from the prompt's first real token (0 on padding)."""
    return jnp.maximum(jnp.arange(tokens.shape[-1])[None, :] - pad_counts(tokens)[:, None], 0)


def same_length_permutation(key: PRNGKeyArray, tokens: Int[Array, "batch seq"]) -> Int[Array, " batch"]:
    """A random permutation of the prompts that sends each prompt to one of its own length, so that
    resampling from the batch reads a real position wherever the prompt has one. Without padding it
    is ``jax.random.permutation(key, batch)``, bit for bit.

    >>> t = jnp.asarray(pad_left([[1], [2, 3], [4], [5, 6]]))
    >>> perm = same_length_permutation(jax.random.key(0), t)
    >>> bool((lengths(t)[perm] == lengths(t)).all())
    True
    """
    n = lengths(tokens)
    shuffled = jax.random.permutation(key, tokens.shape[0])
    by_length = shuffled[jnp.argsort(n[shuffled], stable=True)]  # grouped by length, shuffled within
    return jnp.zeros_like(shuffled).at[jnp.argsort(n, stable=True)].set(by_length)
