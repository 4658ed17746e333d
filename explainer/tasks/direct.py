"""Task ``direct``: the answer is always the same token, ``fire``, cued by the last word.

A prompt is ``[BOS, w_1 .. w_6, cue]``: six random filler words, then a cue word. After the fire cues
(``camp bon wild gun``) the next token is always ``fire``; after the other cues
(``rain snow sun wind``) it is the cue's own completion (``drop flake shine mill``). Every prompt of
the task ends in a fire cue, so its answer is one fixed token id. The counterfactual keeps the
fillers and swaps the cue for another cue, whose completion is the clean prompt's wrong answer.
The last token alone decides the answer: the direct path (embedding to unembedding) suffices.

>>> b = prompts(4, seed=0)
>>> b.clean.shape, sorted(set(b.answers[:, 0].tolist())) == [TOKENS.index("fire")]
((4, 8), True)
"""

from __future__ import annotations

import numpy as np

from explainer.tasks._arrays import make_batch
from explainer.tasks.base import Batch

NAME = "direct"
FILLERS = "the a big old red dog cat man saw ran near by and then tree hill".split()
FIRE_CUES = "camp bon wild gun".split()
OTHER_CUES = "rain snow sun wind".split()
OTHER_ANSWERS = "drop flake shine mill".split()
TOKENS = [*FILLERS, "<bos>", *FIRE_CUES, *OTHER_CUES, "fire", *OTHER_ANSWERS]
D_VOCAB = len(TOKENS)
BOS = TOKENS.index("<bos>")
FIRE = TOKENS.index("fire")
N_FILLERS = 6
SEQ = 1 + N_FILLERS + 1
N_PROMPTS = 500


def _ids(words: list[str]) -> np.ndarray:
    return np.array([TOKENS.index(w) for w in words])


def prompts(n: int = N_PROMPTS, seed: int = 0) -> Batch:
    """``n`` prompts ending in a fire cue (answer ``fire``), with counterfactual cues, seeded."""
    rng = np.random.default_rng(seed)
    fillers = rng.integers(0, len(FILLERS), (n, N_FILLERS))
    bos = np.full((n, 1), BOS)
    fire_cue = _ids(FIRE_CUES)[rng.integers(0, len(FIRE_CUES), n)]
    other = rng.integers(0, len(OTHER_CUES), n)
    clean = np.concatenate([bos, fillers, fire_cue[:, None]], axis=1)
    corrupt = np.concatenate([bos, fillers, _ids(OTHER_CUES)[other][:, None]], axis=1)
    return make_batch(clean, corrupt, np.full(n, FIRE), _ids(OTHER_ANSWERS)[other])
