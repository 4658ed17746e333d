"""The generic prompts file, accepted everywhere a task is.

Format (the one auto-circuit reads, so the same file can feed a peer tool)::

    {"prompts": [{"clean": [ints], "corrupt": [ints], "answers": [int], "wrong_answers": [int]}]}

- every ``clean`` prompt has the same length, and so does every ``corrupt`` (the same length as
  ``clean``); ``corrupt`` may be left out of every prompt, and then a permutation of the batch is
  the resample source;
- every prompt has the same number of ``answers`` and the same number of ``wrong_answers``
  (at least one each); the metrics compare their mean logits at the last position.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from explainer.errors import ExplainerError
from explainer.models.config import ModelConfig
from explainer.tasks.base import Batch

_KEYS = ("clean", "corrupt", "answers", "wrong_answers")


def _int_list(value: Any, where: str, key: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ExplainerError(f"{where}: {key!r} must be a list of integer token ids, got {value!r:.80}")
    return value


def parse_prompts(data: Any, source: str = "prompts") -> Batch:
    """Validate a prompts object and turn it into a :class:`Batch`.

    >>> b = parse_prompts({"prompts": [{"clean": [1, 2], "corrupt": [3, 2], "answers": [1],
    ...                                 "wrong_answers": [3]}]})
    >>> b.clean.shape, b.answers.shape
    ((1, 2), (1, 1))
    """
    if not isinstance(data, dict) or "prompts" not in data:
        raise ExplainerError(
            f"{source} must be a JSON object with a 'prompts' list: "
            '{"prompts": [{"clean": [...], "corrupt": [...], "answers": [...], "wrong_answers": [...]}]}'
        )
    prompts = data["prompts"]
    if not isinstance(prompts, list) or not prompts:
        raise ExplainerError(f"{source} has no prompts; add at least two to 'prompts'")
    rows: dict[str, list[list[int]]] = {k: [] for k in _KEYS}
    with_corrupt = isinstance(prompts[0], dict) and "corrupt" in prompts[0]
    for i, p in enumerate(prompts):
        where = f"{source}: prompt {i}"
        if not isinstance(p, dict):
            raise ExplainerError(f"{where} must be an object with keys {list(_KEYS)}")
        unknown = sorted(set(p) - set(_KEYS))
        if unknown:
            raise ExplainerError(f"{where} has unknown key(s) {unknown}; valid: {list(_KEYS)}")
        for key in ("clean", "answers", "wrong_answers"):
            if key not in p:
                raise ExplainerError(f"{where} has no {key!r}; every prompt needs clean, answers, wrong_answers")
        if ("corrupt" in p) != with_corrupt:
            raise ExplainerError(f"{where}: give 'corrupt' for every prompt or for none")
        for key in _KEYS:
            if key in p:
                rows[key].append(_int_list(p[key], where, key))
        if not p["clean"]:
            raise ExplainerError(f"{where}: 'clean' is empty")
        if not p["answers"] or not p["wrong_answers"]:
            raise ExplainerError(f"{where}: 'answers' and 'wrong_answers' need at least one token each")
    for key in _KEYS:
        if not rows[key]:
            continue
        lengths = sorted({len(r) for r in rows[key]})
        if len(lengths) > 1:
            first_bad = next(i for i, r in enumerate(rows[key]) if len(r) != len(rows[key][0]))
            raise ExplainerError(
                f"{source}: prompts have unequal '{key}' lengths {lengths} (prompt {first_bad} differs "
                f"from prompt 0); every prompt must have the same length: pad them or split the file"
            )
    if with_corrupt and len(rows["corrupt"][0]) != len(rows["clean"][0]):
        raise ExplainerError(
            f"{source}: 'corrupt' prompts have length {len(rows['corrupt'][0])} but 'clean' ones have "
            f"{len(rows['clean'][0])}; a counterfactual must have the clean prompt's length"
        )

    def arr(key: str):
        return jnp.asarray(np.asarray(rows[key], dtype=np.int32))

    return Batch(arr("clean"), arr("corrupt") if with_corrupt else None, arr("answers"), arr("wrong_answers"))


def check_prompts(batch: Batch, config: ModelConfig, source: str = "prompts") -> None:
    """Raise if the prompts do not fit the model (too long, token or answer out of vocabulary)."""
    seq = batch.clean.shape[1]
    if seq > config.n_ctx:
        raise ExplainerError(
            f"{source}: prompts have {seq} tokens but the model's context is n_ctx={config.n_ctx}; shorten the prompts"
        )
    checks = [
        ("clean", batch.clean, config.d_vocab),
        ("corrupt", batch.corrupt, config.d_vocab),
        ("answers", batch.answers, config.vocab_out),
        ("wrong_answers", batch.wrong_answers, config.vocab_out),
    ]
    for key, tokens, vocab in checks:
        if tokens is None:
            continue
        tokens = np.asarray(tokens)
        bad = np.argwhere((tokens < 0) | (tokens >= vocab))
        if len(bad):
            i, j = bad[0]
            raise ExplainerError(
                f"{source}: prompt {i} has {key} token {int(tokens[i, j])}, out of the model's vocabulary "
                f"(0..{vocab - 1}); the prompts were made for another model or tokenizer"
            )


def split(batch: Batch, heldout_fraction: float, seed: int = 0) -> tuple[Batch, Batch]:
    """A fixed, seeded train / held-out split. With fewer than 10 prompts both halves are all of them."""
    n = len(batch)
    if n < 10:
        return batch, batch
    order = np.random.default_rng(seed).permutation(n)
    n_held = max(1, int(round(n * heldout_fraction)))
    return batch.take(jnp.asarray(order[n_held:])), batch.take(jnp.asarray(order[:n_held]))


class PromptsTask:
    """A task read from a prompts file (or object), split into training and held-out prompts.

    >>> from explainer.models.zoo import resolve_model
    >>> task = PromptsTask.from_file(resolve_model("planted-distractor") / "prompts.json")
    >>> len(task.train_data()) > len(task.heldout_data()) > 0
    True
    """

    def __init__(self, batch: Batch, name: str = "prompts", heldout_fraction: float = 0.2):
        if len(batch) < 2:
            raise ExplainerError(f"task {name!r} has {len(batch)} prompt; give at least two")
        self.name = name
        self.batch = batch
        self._train, self._heldout = split(batch, heldout_fraction)

    @classmethod
    def from_file(cls, path: str | os.PathLike, name: str | None = None) -> PromptsTask:
        from explainer.models.native import read_json

        path = Path(path)
        if not path.is_file():
            raise ExplainerError(f"prompts file {str(path)!r} does not exist")
        if path.stat().st_size == 0:
            raise ExplainerError(f'prompts file {str(path)!r} is empty; it should hold {{"prompts": [...]}}')
        return cls(parse_prompts(read_json(path), source=str(path)), name=name or str(path))

    def check(self, config: ModelConfig) -> None:
        check_prompts(self.batch, config, source=f"task {self.name!r}")

    def train_data(self) -> Batch:
        return self._train

    def heldout_data(self) -> Batch:
        return self._heldout


def prompts_json(batch: Batch) -> dict[str, Any]:
    """The prompts-file object for ``batch`` (the inverse of :func:`parse_prompts`)."""
    out = []
    for i in range(len(batch)):
        p = {"clean": np.asarray(batch.clean[i]).tolist()}
        if batch.corrupt is not None:
            p["corrupt"] = np.asarray(batch.corrupt[i]).tolist()
        p["answers"] = np.asarray(batch.answers[i]).tolist()
        p["wrong_answers"] = np.asarray(batch.wrong_answers[i]).tolist()
        out.append(p)
    return {"prompts": out}
