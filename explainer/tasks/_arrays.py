"""Helpers shared by the seeded task generators: numpy rows in, a :class:`Batch` out.

Every generated task follows one contract, which training relies on: the counterfactual of a prompt
is a prompt of the same length whose answer is the clean prompt's first wrong answer. So a model is
trained on clean and corrupt prompts alike, and the metrics compare the answer with the answer the
counterfactual would have.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from explainer.tasks.base import Batch


def make_batch(clean: np.ndarray, corrupt: np.ndarray, answers: np.ndarray, wrong: np.ndarray) -> Batch:
    """A :class:`Batch` from integer arrays; 1-d ``answers`` / ``wrong`` become one column each.

    >>> b = make_batch(np.zeros((2, 3)), np.ones((2, 3)), np.array([1, 1]), np.array([0, 0]))
    >>> b.clean.shape, b.answers.shape
    ((2, 3), (2, 1))
    """

    def ints(x: np.ndarray, columns: bool) -> jnp.ndarray:
        x = np.asarray(x, dtype=np.int32)
        return jnp.asarray(x[:, None] if columns and x.ndim == 1 else x)

    return Batch(ints(clean, False), ints(corrupt, False), ints(answers, True), ints(wrong, True))
