"""Task ``ioi``: a synthetic indirect-object identification task with a small vocabulary.

A prompt is ``BOS`` and one of four 14-word templates, e.g. ``When {A} and {B} went to the {place} ,
{S} gave a {object} to``: two different names ``A``/``B`` (the indirect object ``IO`` and the subject
``S``, in either order), then ``S`` again. The answer is ``IO``, the name that is not repeated; the
wrong answer is ``S``. The counterfactual replaces the second occurrence of the subject by ``IO``
(so ``IO`` is now the repeated name and the answer becomes ``S``). Names sit at different
positions in different templates. Tokens are words (see ``TOKENS``).

>>> b = prompts(4, seed=0)
>>> b.clean.shape
(4, 15)
>>> " ".join(TOKENS[t] for t in b.clean[0].tolist())
'<bos> Then Anna and Tom were at the school and Tom handed the key to'
"""

from __future__ import annotations

import numpy as np

from explainer.tasks._arrays import make_batch
from explainer.tasks.base import Batch

NAME = "ioi"
NAMES = "Mary John Tom Anna Paul Kate Mark Lucy Jack Emma".split()
PLACES = "store park school market".split()
OBJECTS = "drink book ball key".split()
TEMPLATES = [
    "When {A} and {B} went to the {P} , {S} gave a {O} to",
    "Then {A} and {B} were at the {P} and {S} handed the {O} to",
    "{A} and {B} went to the {P} , then {S} gave a {O} to",
    "After the {P} , {A} and {B} talked and {S} gave a {O} to",
]
_WORDS = sorted({w for t in TEMPLATES for w in t.split() if not w.startswith("{")})
TOKENS = ["<bos>", *NAMES, *PLACES, *OBJECTS, *_WORDS]
D_VOCAB = len(TOKENS)
SEQ = 1 + len(TEMPLATES[0].split())
N_PROMPTS = 500


def _template_ids(template: str, a: int, b: int, s: int, p: int, o: int) -> list[int]:
    slots = {"{A}": a, "{B}": b, "{S}": s, "{P}": p, "{O}": o}
    return [0] + [slots[w] if w in slots else TOKENS.index(w) for w in template.split()]


def prompts(n: int = N_PROMPTS, seed: int = 0) -> Batch:
    """``n`` IOI prompts (ABBA and BABA orders) with subject-swapped counterfactuals, seeded."""
    assert all(len(t.split()) == SEQ - 1 for t in TEMPLATES)
    rng = np.random.default_rng(seed)
    names = 1 + np.argsort(rng.random((n, len(NAMES))), axis=1)[:, :2]  # two different names
    io, s = names[:, 0], names[:, 1]
    io_first = rng.integers(0, 2, n).astype(bool)
    a, b = np.where(io_first, io, s), np.where(io_first, s, io)
    place = 1 + len(NAMES) + rng.integers(0, len(PLACES), n)
    obj = 1 + len(NAMES) + len(PLACES) + rng.integers(0, len(OBJECTS), n)
    template = rng.integers(0, len(TEMPLATES), n)
    clean, corrupt = [], []
    for i in range(n):
        t, fixed = TEMPLATES[template[i]], (int(a[i]), int(b[i]))
        clean.append(_template_ids(t, *fixed, int(s[i]), int(place[i]), int(obj[i])))
        corrupt.append(_template_ids(t, *fixed, int(io[i]), int(place[i]), int(obj[i])))
    return make_batch(np.array(clean), np.array(corrupt), io, s)
