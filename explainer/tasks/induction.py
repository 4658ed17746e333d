"""Task ``induction``: predict the token that followed the previous occurrence of the current token.

A prompt is ``[BOS, x_0 .. x_9, x_j, x_j+1, x_j+2]``: ten distinct random tokens, then a repeat of
three of them starting at a random offset ``j`` (so the answer's position varies and no positional
shortcut works). The answer is ``x_j+3``, the token that followed the last token's earlier
occurrence. The counterfactual replaces that token in the first half by a token that does not occur
in the prompt, so the repeat is the same but its continuation (the answer) differs; the clean
prompt's wrong answer is that replacement. Token ids: ``0-19`` content, ``20`` is BOS.

>>> b = prompts(4, seed=0)
>>> b.clean.shape, int(b.clean[0, 0])
((4, 14), 20)
"""

from __future__ import annotations

import numpy as np

from explainer.tasks._arrays import make_batch
from explainer.tasks.base import Batch

NAME = "induction"
N_CONTENT = 20
BOS = N_CONTENT
D_VOCAB = N_CONTENT + 1
HALF = 10  # distinct tokens before the repeat
REPEAT = 3  # tokens repeated; the last of them is the current token
SEQ = 1 + HALF + REPEAT
N_PROMPTS = 500


def prompts(n: int = N_PROMPTS, seed: int = 0) -> Batch:
    """``n`` induction prompts with counterfactuals, seeded."""
    rng = np.random.default_rng(seed)
    tokens = np.argsort(rng.random((n, N_CONTENT)), axis=1)  # a random permutation per prompt
    first = tokens[:, :HALF]
    unused = tokens[np.arange(n), HALF + rng.integers(0, N_CONTENT - HALF, n)]
    start = rng.integers(0, HALF - REPEAT, n)  # the answer x[start + REPEAT] is inside the first half
    rows = np.arange(n)[:, None]
    repeat = first[rows, start[:, None] + np.arange(REPEAT)]
    answer = first[np.arange(n), start + REPEAT]
    bos = np.full((n, 1), BOS)
    clean = np.concatenate([bos, first, repeat], axis=1)
    corrupt = clean.copy()
    corrupt[np.arange(n), 1 + start + REPEAT] = unused
    return make_batch(clean, corrupt, answer, unused)
