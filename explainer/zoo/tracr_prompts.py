"""Prompts for a compiled tracr program: inputs of one length, balanced answers, counterfactuals.

The answer is the RASP program's own output at the last position (``rasp.evaluate``). A numerical
output becomes a class, above or below a threshold θ (see :mod:`explainer.zoo.tracr_import`).

A program whose answer is the same for every input of one length (``make_length``) gets prompts of
every length up to ``max_seq_len`` instead, left-padded: each counterfactual is an input of another
answer *at least as long* as its clean prompt, and positions correspond counted from the end
(``"positions": "end"``, :mod:`explainer.tasks.prompts`), so the last position is the last.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from explainer.tasks.base import Batch
from explainer.tasks.prompts import parse_prompts
from explainer.zoo.tracr_compile import LOGIT_SCALE, Compiled

N_PROMPTS = 512
POOL = 20_000  # random inputs drawn to find prompts and counterfactuals


def _pool(compiled: Compiled, length: int, rng: np.random.Generator) -> tuple[list[tuple], list]:
    """Distinct random inputs of ``length`` tokens with the program's answer at the last position."""
    from tracr.rasp import rasp

    vocab = list(compiled.vocab)
    if compiled.recipe.distinct and length > len(vocab):
        return [], []
    if compiled.recipe.distinct:
        picks = np.argsort(rng.random((POOL, len(vocab))), axis=1)[:, :length]
    else:
        picks = rng.integers(len(vocab), size=(POOL, length))
    ordered = [tuple(vocab[i] for i in row) for row in np.unique(picks, axis=0)]
    answers = [rasp.evaluate(compiled.program, list(x))[-1] for x in ordered]
    keep = [i for i, a in enumerate(answers) if a is not None]
    return [ordered[i] for i in keep], [answers[i] for i in keep]


def _threshold(values: list[float]) -> dict[str, float] | None:
    """θ between two neighbouring values that best balances ``values``; ``None`` if all are equal."""
    distinct = np.unique(np.asarray(values, dtype=np.float64))
    if len(distinct) < 2:
        return None
    above = np.asarray([np.mean(np.asarray(values) > v) for v in distinct[:-1]])
    i = int(np.argmin(np.abs(above - 0.5)))
    gap = float(distinct[i + 1] - distinct[i])
    return {"threshold": float(distinct[i] + gap / 2), "scale": LOGIT_SCALE / gap}


def _classes(compiled: Compiled, answers: list, readout: dict[str, float] | None) -> np.ndarray:
    if compiled.categorical:
        index = {v: i for i, v in enumerate(compiled.outputs)}
        return np.asarray([index[a] for a in answers])
    assert readout is not None
    return np.where(np.asarray(answers, dtype=np.float64) > readout["threshold"], 0, 1)


def make_prompts(compiled: Compiled, n: int = N_PROMPTS, seed: int = 0) -> tuple[Batch, dict[str, Any]] | None:
    """Prompts for the compiled program and how they were made: inputs of the longest length at
    which the answer at the last position varies (``{"length", "readout"}``), else, when only the
    length changes it (e.g. ``make_length``), inputs of every length with counterfactuals at least
    as long (``{"lengths", "positions": "end", "readout"}``); ``None`` when no input changes it."""
    rng = np.random.default_rng(seed)
    pools = []
    for length in range(compiled.max_seq_len, 0, -1):
        inputs, answers = _pool(compiled, length, rng)
        pools.append((inputs, answers))
        if len(set(answers)) < 2:
            continue
        readout = None if compiled.categorical else _threshold(answers)
        classes = _classes(compiled, answers, readout)
        batch = _sample(compiled, inputs, classes, n, rng)
        return batch, {"length": length, "readout": readout}
    inputs = [x for pool, _ in pools for x in pool]
    answers = [a for _, pool in pools for a in pool]
    if len(set(answers)) < 2:
        return None
    readout = None if compiled.categorical else _threshold(answers)
    batch = _sample_lengths(compiled, inputs, _classes(compiled, answers, readout), n, rng)
    lengths = sorted({len(x) for x in inputs})
    return batch, {"lengths": lengths, "positions": "end", "readout": readout}


def _sample(compiled: Compiled, inputs: list[tuple], classes: np.ndarray, n: int, rng) -> Batch:
    """``n`` prompts, each answer class equally often, each with a counterfactual of another class."""
    ids = compiled.token_ids
    tokens = np.asarray([[ids[compiled.bos]] + [ids[t] for t in x] for x in inputs])
    labels = np.unique(classes)
    by_class = {c: np.flatnonzero(classes == c) for c in labels}
    clean = np.asarray([rng.choice(by_class[c]) for c in rng.choice(labels, size=n)])
    corrupt = np.asarray([rng.choice(np.flatnonzero(classes != classes[i])) for i in clean])
    rows = [
        {
            "clean": tokens[i].tolist(),
            "corrupt": tokens[j].tolist(),
            "answers": [int(classes[i])],
            "wrong_answers": [int(classes[j])],
        }
        for i, j in zip(clean, corrupt, strict=True)
    ]
    return parse_prompts({"prompts": rows}, source=f"tracr {compiled.name} prompts")


def _sample_lengths(compiled: Compiled, inputs: list[tuple], classes: np.ndarray, n: int, rng) -> Batch:
    """``n`` prompts of several lengths: each clean answer class equally often, each with a
    counterfactual of another class and at least the clean input's length (its class drawn evenly
    from those that have one, so that long inputs, the most numerous, do not crowd out the rest).
    A clean input with no input of another class at least as long (in ``make_length``, those of
    ``max_seq_len`` tokens) is only a counterfactual."""
    ids = compiled.token_ids
    tokens = [[ids[compiled.bos]] + [ids[t] for t in x] for x in inputs]
    size = np.asarray([len(x) for x in inputs])
    reach = {k: set(classes[size >= k].tolist()) for k in set(size.tolist())}  # classes of inputs >= k long

    def other_classes(i: int) -> list:
        return sorted(reach[int(size[i])] - {int(classes[i])})

    usable = np.asarray([bool(other_classes(i)) for i in range(len(inputs))])
    by_class = {c: np.flatnonzero(usable & (classes == c)) for c in np.unique(classes[usable])}
    rows = []
    for c in rng.choice(sorted(by_class), size=n):
        i = int(rng.choice(by_class[c]))
        other = rng.choice(other_classes(i))
        j = int(rng.choice(np.flatnonzero((classes == other) & (size >= size[i]))))
        rows.append(
            {
                "clean": tokens[i],
                "corrupt": tokens[j],
                "answers": [int(classes[i])],
                "wrong_answers": [int(classes[j])],
            }
        )
    return parse_prompts({"prompts": rows, "positions": "end"}, source=f"tracr {compiled.name} prompts")
