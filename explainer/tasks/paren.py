"""Task ``paren``: is a string of parentheses balanced? (after Redwood's paren balancer)

A prompt is 20 parentheses followed by a ``<cls>`` token; the answer, read at ``<cls>`` (the last
position), is ``<balanced>`` or ``<unbalanced>``. Half the prompts are balanced (uniform over
balanced strings); the unbalanced half mixes four kinds in equal shares: equal counts that dip
below zero (elevation failure), never dipping but ending open (count failure), uniform random
strings, and near misses (a balanced string with one parenthesis flipped, or one ``()`` at depth
zero swapped to ``)(``). The counterfactual has the other label: for a balanced prompt, a near miss
of it; for an unbalanced one, a fresh balanced string. Token ids: ``(`` 0, ``)`` 1, ``<cls>`` 2,
``<balanced>`` 3, ``<unbalanced>`` 4.

>>> b = prompts(4, seed=0)
>>> b.clean.shape, int(b.clean[0, -1])
((4, 21), 2)
"""

from __future__ import annotations

import numpy as np

from explainer.tasks._arrays import make_batch
from explainer.tasks.base import Batch

NAME = "paren"
OPEN, CLOSE, CLS, BALANCED, UNBALANCED = range(5)
TOKENS = ["(", ")", "<cls>", "<balanced>", "<unbalanced>"]
D_VOCAB = len(TOKENS)
LENGTH = 20
SEQ = LENGTH + 1
N_PROMPTS = 500


def is_balanced(parens: np.ndarray) -> bool:
    """Counts match and no prefix closes more than it opens."""
    depth = np.cumsum(np.where(parens == OPEN, 1, -1))
    return bool(depth[-1] == 0 and depth.min() >= 0)


def _completions(length: int) -> np.ndarray:
    """``c[h, r]``: ways to finish from depth ``h`` with ``r`` steps left, never below zero, ending at 0."""
    c = np.zeros((length + 2, length + 1), dtype=np.float64)
    c[0, 0] = 1.0
    for r in range(1, length + 1):
        for h in range(length + 1):
            c[h, r] = c[h + 1, r - 1] + (c[h - 1, r - 1] if h > 0 else 0.0)
    return c


_C = _completions(LENGTH)


def _balanced(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random balanced string."""
    out, h = np.empty(LENGTH, dtype=np.int64), 0
    for i in range(LENGTH):
        left = LENGTH - i - 1
        p_open = _C[h + 1, left] / _C[h, left + 1]
        opens = rng.random() < p_open
        out[i] = OPEN if opens else CLOSE
        h += 1 if opens else -1
    return out


def _near_miss(rng: np.random.Generator, parens: np.ndarray) -> np.ndarray:
    """A balanced string made unbalanced by one flip, or by swapping a ``()`` at depth zero."""
    out = parens.copy()
    depth = np.concatenate([[0], np.cumsum(np.where(parens == OPEN, 1, -1))])
    at_zero = [i for i in range(LENGTH - 1) if depth[i] == 0 and parens[i] == OPEN and parens[i + 1] == CLOSE]
    if at_zero and rng.random() < 0.5:
        i = at_zero[rng.integers(len(at_zero))]
        out[i], out[i + 1] = CLOSE, OPEN
    else:
        i = rng.integers(LENGTH)
        out[i] = 1 - out[i]
    return out


def _unbalanced(rng: np.random.Generator) -> np.ndarray:
    kind = rng.integers(4)
    while True:
        if kind == 0:  # equal counts, dips below zero
            s = rng.permutation(np.repeat([OPEN, CLOSE], LENGTH // 2))
        elif kind == 1:  # never dips, ends open
            s = rng.integers(0, 2, LENGTH)
            depth = np.cumsum(np.where(s == OPEN, 1, -1))
            if depth.min() < 0:
                continue
        elif kind == 2:
            s = rng.integers(0, 2, LENGTH)
        else:
            s = _near_miss(rng, _balanced(rng))
        if not is_balanced(s):
            return s


def prompts(n: int = N_PROMPTS, seed: int = 0) -> Batch:
    """``n`` prompts, half balanced, each with a counterfactual of the other label, seeded."""
    rng = np.random.default_rng(seed)
    clean, corrupt, answers = [], [], []
    for balanced in rng.permutation(np.arange(n) % 2 == 0):
        if balanced:
            s = _balanced(rng)
            clean.append(s)
            corrupt.append(_near_miss(rng, s))
        else:
            clean.append(_unbalanced(rng))
            corrupt.append(_balanced(rng))
        answers.append(BALANCED if balanced else UNBALANCED)
    cls = np.full((n, 1), CLS)
    answers = np.array(answers)
    wrong = np.where(answers == BALANCED, UNBALANCED, BALANCED)
    return make_batch(np.concatenate([clean, cls], 1), np.concatenate([corrupt, cls], 1), answers, wrong)
