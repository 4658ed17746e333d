"""Left padding: prompts of different lengths in one batch.

A batch of prompts is one ``[batch, seq]`` array of token ids; a prompt shorter than ``seq`` is
*left-padded* with :data:`PAD` (``-1``, never a token id). So every prompt ends at the last position,
which every metric reads, and a prompt and its counterfactual stay aligned counted from the end (of
equal length, or a longer counterfactual under ``"positions": "end"``, :mod:`explainer.tasks.prompts`).
The forward pass finds the padding in the tokens themselves (:func:`pad_counts`): real queries never
attend to padding, and positions (learned or rotary) count from each prompt's first real token, so a
prompt's logits are the same alone or padded among longer ones. A batch without padding computes
exactly what it did before padding existed.

Where every prompt of a batch is scored (held-out evaluation, grading: :func:`explainer.score.measure`)
prompts of similar length are scored together (:func:`length_groups`): each group is padded only to
its own longest prompt (:func:`trim`), so short prompts do not pay for the longest.

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


MAX_GROUPS = 4  # length groups of one scored batch, at most: each group's shape compiles once
MIN_SAVING = 0.1  # each group beyond the first must save this share of the batch's padded tokens


def length_groups(
    lengths: Sequence[int] | np.ndarray, max_groups: int = MAX_GROUPS, min_saving: float = MIN_SAVING
) -> list[np.ndarray]:
    """Prompts cut into at most ``max_groups`` groups of similar length, as index arrays: the
    partition of the prompts sorted by length that needs the fewest padded tokens (group size ×
    its longest prompt, summed), with a group added only where it saves at least ``min_saving``
    of the tokens of padding everything together (a group is one more compiled shape). One group
    is every prompt in the given order.

    >>> [g.tolist() for g in length_groups([9, 2, 3, 9, 2, 3, 2, 2])]
    [[1, 4, 6, 7, 2, 5], [0, 3]]
    >>> [g.tolist() for g in length_groups([5, 4, 5, 4])]  # a group of 4s would save 10%: not worth it
    [[0, 1, 2, 3]]
    """
    lengths = np.asarray(lengths, np.int64)
    order = np.argsort(lengths, kind="stable")
    longest = lengths[order]  # the longest prompt of a group is its last once sorted
    cuts = [0, *(np.flatnonzero(np.diff(longest)) + 1).tolist(), len(order)]  # one length, one group
    end = len(cuts) - 1

    def tokens(a: int, b: int) -> int:  # the group of sorted prompts cuts[a]:cuts[b], padded
        return (cuts[b] - cuts[a]) * int(longest[cuts[b] - 1])

    best = {(1, b): (tokens(0, b), (0, b)) for b in range(1, end + 1)}  # (groups, end) -> (tokens, bounds)
    for g in range(2, min(max_groups, end) + 1):
        for b in range(g, end + 1):
            best[g, b] = min((best[g - 1, a][0] + tokens(a, b), (*best[g - 1, a][1], b)) for a in range(g - 1, b))
    extra = min_saving * tokens(0, end)  # what a group beyond the first must save
    groups = min(range(1, min(max_groups, end) + 1), key=lambda g: best[g, end][0] + (g - 1) * extra)
    if groups == 1:
        return [np.arange(len(order))]
    bounds = best[groups, end][1]
    return [order[cuts[a] : cuts[b]] for a, b in zip(bounds, bounds[1:], strict=False)]


def leading_padding(tokens: np.ndarray | jax.Array) -> int:
    """How many leading columns of ``tokens`` are padding in every prompt (and can be cut off).

    >>> leading_padding(pad_left([[1, 2], [3]], width=4))
    2
    """
    return int(np.asarray(tokens).shape[-1] - np.asarray(lengths(jnp.asarray(tokens))).max())


def last_columns(tree, width: int, axis: int = 1):
    """Per-position arrays (replacements, constants) cut to their last ``width`` positions, as a
    batch narrowed to ``width`` columns reads them (left padding: positions count from the right).

    >>> last_columns(jnp.arange(6).reshape(1, 6), 4).tolist()
    [[2, 3, 4, 5]]
    """

    def cut(x):
        extra = x.shape[axis] - width
        return x if extra <= 0 else jax.lax.slice_in_dim(x, extra, x.shape[axis], axis=axis)

    return jax.tree.map(cut, tree)
