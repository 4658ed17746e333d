"""Tasks of the planted models: ``first-class`` and ``xor-class``.

Token ids: 0-7 are content tokens, 8 and 9 are the answers ``A`` and ``B``. A content token has a
class (:func:`token_class`: +1 for 0-3, -1 for 4-7) and, inside its group of four, a pair class
(:func:`pair_class`: +1 for 0,1 / 4,5, -1 for 2,3 / 6,7). The planted models of the zoo
(:mod:`explainer.zoo.planted`) are hand-weighted to solve these tasks.

>>> b = first_class_prompts(4, seed=0)
>>> b.clean.shape, sorted(set(b.answers[:, 0].tolist()) | set(b.wrong_answers[:, 0].tolist()))
((4, 4), [8, 9])
"""

from __future__ import annotations

import numpy as np

from explainer.tasks.base import Batch
from explainer.tasks.prompts import parse_prompts

ANSWER_A, ANSWER_B = 8, 9
N_PROMPTS = 512


def token_class(token: np.ndarray | int) -> np.ndarray:
    """Class of a content token: +1 for tokens 0-3, -1 for tokens 4-7."""
    return np.where(np.asarray(token) % 8 < 4, 1.0, -1.0)


def pair_class(token: np.ndarray | int) -> np.ndarray:
    """Class inside a group of four (task ``xor-class``): +1 for ids 0,1 / 4,5; -1 for 2,3 / 6,7."""
    return np.where(np.asarray(token) % 4 < 2, 1.0, -1.0)


def _batch(clean, corrupt, answer_is_a) -> Batch:
    answers = np.where(answer_is_a, ANSWER_A, ANSWER_B)[:, None]
    wrong = np.where(answer_is_a, ANSWER_B, ANSWER_A)[:, None]
    rows = [
        {"clean": c.tolist(), "corrupt": r.tolist(), "answers": a.tolist(), "wrong_answers": b.tolist()}
        for c, r, a, b in zip(clean, corrupt, answers, wrong, strict=True)
    ]
    return parse_prompts({"prompts": rows})


def _flip(rng: np.random.Generator, tokens: np.ndarray) -> np.ndarray:
    """A random token of the other class in the same group of four."""
    group = tokens // 4 * 4
    same = (tokens % 4) // 2  # tokens 0,1 / 2,3 share a class inside a group of four
    return group + (1 - same) * 2 + rng.integers(0, 2, size=tokens.shape)


def first_class_prompts(n: int = N_PROMPTS, seed: int = 0) -> Batch:
    """Task ``first-class``: 4 content tokens; the answer is ``A`` iff the first is in class +1.

    The counterfactual draws new tokens with the first and the last token's classes flipped.
    """
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 8, size=(n, 4))
    corrupt = rng.integers(0, 8, size=(n, 4))
    corrupt[:, 0] = np.where(token_class(clean[:, 0]) > 0, rng.integers(4, 8, n), rng.integers(0, 4, n))
    corrupt[:, 3] = np.where(token_class(clean[:, 3]) > 0, rng.integers(4, 8, n), rng.integers(0, 4, n))
    return _batch(clean, corrupt, token_class(clean[:, 0]) > 0)


def xor_class_prompts(n: int = N_PROMPTS, seed: int = 0) -> Batch:
    """Task ``xor-class``: ``[a, b]`` with a in 0-3, b in 4-7; the answer is ``A`` iff classes agree.

    The counterfactual flips exactly one of the two classes (so the answer flips), drawing new tokens.
    """
    rng = np.random.default_rng(seed)
    clean = np.stack([rng.integers(0, 4, n), rng.integers(4, 8, n)], axis=1)
    corrupt = np.stack([rng.integers(0, 4, n), rng.integers(4, 8, n)], axis=1)
    flip_a = rng.integers(0, 2, n).astype(bool)
    for col, flip in ((0, flip_a), (1, ~flip_a)):
        want = np.where(flip, -pair_class(clean[:, col]), pair_class(clean[:, col]))
        keep = pair_class(corrupt[:, col]) == want
        corrupt[:, col] = np.where(keep, corrupt[:, col], _flip(rng, corrupt[:, col]))
    return _batch(clean, corrupt, pair_class(clean[:, 0]) == pair_class(clean[:, 1]))


TASKS = {"first-class": first_class_prompts, "xor-class": xor_class_prompts}
