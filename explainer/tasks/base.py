"""The Task protocol: what a behaviour to explain provides.

A task hands out prompts as a :class:`Batch`: ``clean`` tokens, ``corrupt`` tokens (its
counterfactual inputs, or ``None`` when the task has none and a permutation of the batch stands in),
and the ``answers`` / ``wrong_answers`` whose logits the metrics compare at the last position.
Prompts of different lengths are left-padded with ``-1`` (:mod:`explainer.models.padding`), so the
last position is every prompt's own last token. ``positions`` says which positions of a prompt and
its counterfactual correspond: ``"start"`` (the default: position ``i`` of one is position ``i`` of
the other, so the two have one length) or ``"end"`` (counted from the end: the last is the last, and
a counterfactual may be longer than its clean prompt, never shorter). Left padding aligns the ends,
so both are the same arrays: ``clean`` and ``corrupt`` share one width and each prompt's activation
at a padded position is its own at that place counted from its end. Any other correspondence is a
``position_map``: for each column of ``clean``, the column of ``corrupt`` whose activations stand for
it (prompts of any two lengths, positions in any order); :meth:`Batch.at_clean_positions` reads the
counterfactual's activations through it.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PyTree

from explainer.models.config import ModelConfig
from explainer.models.padding import leading_padding

POSITIONS = ("start", "end")  # which positions of a prompt and its counterfactual correspond


class Batch(eqx.Module):
    """Prompts as arrays (left-padded with ``-1``). Metrics read the logits at the last position.
    ``positions``: which positions of ``clean`` and ``corrupt`` correspond (see the module docstring);
    ``position_map`` (optional, ``[batch, seq]``): for each column of ``clean``, the column of
    ``corrupt`` read in its place, where prompts map positions one by one."""

    clean: Int[Array, "batch seq"]
    corrupt: Int[Array, "batch seq"] | None
    answers: Int[Array, "batch n_answers"]
    wrong_answers: Int[Array, "batch n_wrong"]
    positions: str = eqx.field(static=True, default="start")
    position_map: Int[Array, "batch seq"] | None = None

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    def take(self, index: Int[Array, " n"]) -> Batch:
        """The prompts at ``index`` (works under ``jit``)."""
        return jax.tree.map(lambda x: jnp.take(x, index, axis=0), self)

    def narrowed(self) -> Batch:
        """The batch without the leading columns that are padding in every prompt and counterfactual
        (one longer than its clean prompt, under ``"positions": "end"``, keeps its own first tokens).

        >>> b = Batch(jnp.asarray([[-1, -1, 1, 2], [-1, -1, -1, 3]]), None, jnp.zeros((2, 1), jnp.int32),
        ...           jnp.ones((2, 1), jnp.int32))
        >>> b.narrowed().clean.tolist()
        [[1, 2], [-1, 3]]
        """
        cut = leading_padding(self.clean)
        if self.corrupt is not None:
            cut = min(cut, leading_padding(self.corrupt))
        if not cut:
            return self
        corrupt = None if self.corrupt is None else self.corrupt[:, cut:]
        mapped = None if self.position_map is None else self.position_map[:, cut:] - cut  # columns counted anew
        return dataclasses.replace(self, clean=self.clean[:, cut:], corrupt=corrupt, position_map=mapped)

    def at_clean_positions(self, values: PyTree[Array]) -> PyTree[Array]:
        """Per-position values computed on ``corrupt`` (``[batch, seq, ...]`` leaves), read at the
        columns that stand for each column of ``clean``: through ``position_map`` where there is one,
        else as they are (the columns correspond already).

        >>> b = Batch(jnp.asarray([[1, 2, 3]]), jnp.asarray([[4, 5, 6]]), jnp.zeros((1, 1), jnp.int32),
        ...           jnp.ones((1, 1), jnp.int32), position_map=jnp.asarray([[0, 0, 2]]))
        >>> b.at_clean_positions(jnp.asarray([[[10.0], [20.0], [30.0]]]))[0, :, 0].tolist()
        [10.0, 10.0, 30.0]
        """
        if self.position_map is None:
            return values

        def read(x):
            index = self.position_map.reshape(self.position_map.shape + (1,) * (x.ndim - 2))
            return jnp.take_along_axis(x, index, axis=1)

        return jax.tree.map(read, values)


@runtime_checkable
class Task(Protocol):
    """A behaviour: named prompts split into training and held-out sets."""

    name: str

    def check(self, config: ModelConfig) -> None:
        """Raise :class:`~explainer.errors.ExplainerError` if the prompts do not fit the model."""
        ...

    def train_data(self) -> Batch:
        """Prompts the explanation is trained on."""
        ...

    def heldout_data(self) -> Batch:
        """Prompts the finished explanation is evaluated on."""
        ...
