"""The generic prompts file, accepted everywhere a task is.

Format (the one auto-circuit reads, so the same file can feed a peer tool)::

    {"prompts": [{"clean": [ints], "corrupt": [ints], "answers": [int], "wrong_answers": [int]}],
     "positions": "start"}

- prompts may have different lengths: they are left-padded (:mod:`explainer.models.padding`), so
  each ends at the last position, which the metrics read; ``corrupt`` may be left out of every
  prompt, and then the batch's prompts of the same length are the resample source;
- ``positions`` (optional, at the top) says which positions of a ``clean`` prompt and its
  ``corrupt`` counterfactual correspond, and so where resampling reads:

  - ``"start"`` (the default): position ``i`` of one is position ``i`` of the other, so the two
    must have one length (a mismatch is refused, naming the prompt);
  - ``"end"``: positions correspond counted from the end (the last is the last, the one before it
    the one before it, ...), so a ``corrupt`` may be *longer* than its ``clean`` prompt: its extra
    leading tokens are context of its own run, which no clean position reads. It may not be
    shorter: the clean prompt's first positions would have no counterpart, and every resampled
    value must be one the model computes on a real token of the counterfactual (padding's
    activations are an artefact of the implementation; keeping the clean value there would hide
    those units from the explanation, zeroing them would leave the model's inputs). A shorter one
    is refused, naming the prompt;
  - a prompt may instead map its positions one by one: ``"positions": [j0, j1, ...]`` *in the
    prompt*, one entry per ``clean`` token, entry ``i`` the index (from 0) of the ``corrupt`` token
    whose activations stand for clean position ``i``. The two may then have any lengths, and
    positions any order (a template whose name comes earlier in the counterfactual, say); the file's
    rule holds for the prompts that give no map;
- every prompt has the same number of ``answers`` and the same number of ``wrong_answers``
  (at least one each); the metrics compare their mean logits at the last position;
- with a model folder that holds a ``tokenizer.json``, ``clean`` and ``corrupt`` may be strings
  and ``answers`` / ``wrong_answers`` strings (or lists of them) of one token each
  (:mod:`explainer.tasks.text`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from explainer.errors import ExplainerError, did_you_mean
from explainer.models.config import ModelConfig
from explainer.models.padding import PAD, lengths, pad_left
from explainer.tasks.base import POSITIONS, Batch
from explainer.tasks.text import NO_TOKENIZER, TextEncoder, has_text, tokenizer_of

_KEYS = ("clean", "corrupt", "answers", "wrong_answers")
_OPTIONAL = ("positions",)  # a prompt's own position map
SAME_LENGTH = (
    'with "positions": "start" (the default) position i of one corresponds to position i of the other, so a '
    "counterfactual must have its clean prompt's length; if positions correspond counted from the end (the last "
    'token to the last), say so with "positions": "end" at the top of the file, and a counterfactual may then '
    "be longer than its clean prompt"
)
NOT_SHORTER = (
    'with "positions": "end" positions correspond counted from the end, so a counterfactual may be longer '
    "than its clean prompt but not shorter: the clean prompt's first {missing} position(s) would have nothing to be "
    "resampled from; give a counterfactual at least as long (e.g. with more leading context)"
)


def corrupt_length_error(clean: int, corrupt: int, positions: str) -> str | None:
    """Why a counterfactual of ``corrupt`` tokens cannot stand for a clean prompt of ``clean`` tokens
    under ``positions``, or ``None`` when it can.

    >>> corrupt_length_error(3, 4, "end") is None, corrupt_length_error(3, 4, "start") is None
    (True, False)
    """
    if corrupt == clean or (positions == "end" and corrupt > clean):
        return None
    why = SAME_LENGTH if positions == "start" else NOT_SHORTER.format(missing=clean - corrupt)
    return f"'corrupt' has {corrupt} tokens but 'clean' has {clean}; {why}"


def _positions(data: dict, source: str) -> str:
    positions = data.get("positions", "start")
    if positions not in POSITIONS:
        raise ExplainerError(
            f"{source}: 'positions' is {positions!r}; {did_you_mean(str(positions), POSITIONS)} (\"start\": "
            'position i of a counterfactual stands for position i of its clean prompt; "end": counted from the end)'
        )
    return positions


def _position_map(value: Any, clean: list[int], corrupt: list[int] | None, where: str) -> list[int]:
    """A prompt's own ``positions``: for each clean token, the index of the corrupt token read for it."""
    if corrupt is None:
        raise ExplainerError(
            f"{where}: 'positions' maps each clean position to a 'corrupt' one, but the prompt has no 'corrupt'; "
            "give the counterfactual, or leave 'positions' out"
        )
    if isinstance(value, str):
        raise ExplainerError(
            f"{where}: 'positions' is {value!r}; inside a prompt it is a list of corrupt positions, one per clean "
            'token; "start" or "end" go at the top of the file, for every prompt'
        )
    mapped = _int_list(value, where, "positions")
    if len(mapped) != len(clean):
        raise ExplainerError(
            f"{where}: 'positions' has {len(mapped)} entries but 'clean' has {len(clean)} tokens; give one corrupt "
            "position per clean token"
        )
    beyond = [j for j in mapped if j >= len(corrupt)]
    if beyond:
        raise ExplainerError(
            f"{where}: 'positions' names corrupt position {beyond[0]}, but 'corrupt' has {len(corrupt)} tokens "
            f"(positions 0..{len(corrupt) - 1})"
        )
    return mapped


def _columns(maps: list[list[int] | None], clean: list[list[int]], corrupt: list[list[int]], width: int):
    """Per-prompt position maps as one ``[prompts, width]`` array of left-padded columns (the
    identity for prompts that give none), or ``None`` when no prompt gives one."""
    if all(m is None for m in maps):
        return None
    out = np.tile(np.arange(width, dtype=np.int32), (len(maps), 1))
    for b, mapped in enumerate(maps):
        if mapped is not None:
            first_clean, first_corrupt = width - len(clean[b]), width - len(corrupt[b])
            out[b, first_clean:] = first_corrupt + np.asarray(mapped, dtype=np.int32)
    return jnp.asarray(out)


def _int_list(value: Any, where: str, key: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ExplainerError(f"{where}: {key!r} must be a list of integer token ids, got {value!r:.80}")
    if any(t < 0 for t in value):
        raise ExplainerError(f"{where}: {key!r} has a negative token id, {value!r:.80}; ids count from 0")
    return value


def _tokens(value: Any, where: str, key: str, text: TextEncoder | None, why: str) -> list[int]:
    """A prompt's or an answer list's token ids, from ids or (with a tokenizer) text."""
    prompt = key in ("clean", "corrupt")  # a prompt is one string; answers a string or a list of them
    is_text = isinstance(value, str) or (
        not prompt and isinstance(value, list) and any(isinstance(x, str) for x in value)
    )
    if not is_text:
        return _int_list(value, where, key)
    if text is None:
        raise ExplainerError(NO_TOKENIZER.format(where=f"{where}: {key!r}", why=why))
    if prompt:
        return text.prompt(value, where, key)
    items = [value] if isinstance(value, str) else value
    return [t if isinstance(t, int) and not isinstance(t, bool) else text.answer(t, where, key) for t in items]


def _encoder(prompts: list[Any], tokenizer: Any) -> TextEncoder | None:
    """A :class:`TextEncoder` when the prompts have text and a tokenizer (file or object) is given."""
    if tokenizer is None or not has_text(prompts):
        return None
    if isinstance(tokenizer, TextEncoder):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return TextEncoder.from_file(tokenizer)
    return TextEncoder(tokenizer)


def parse_prompts(data: Any, source: str = "prompts", tokenizer: Any = None) -> Batch:
    """Validate a prompts object and turn it into a :class:`Batch` (prompts of different lengths
    left-padded; text tokenized with ``tokenizer``: a ``tokenizer.json`` path or a ``tokenizers``
    ``Tokenizer``).

    >>> b = parse_prompts({"prompts": [{"clean": [1, 2], "corrupt": [3, 2], "answers": [1],
    ...                                 "wrong_answers": [3]}]})
    >>> b.clean.shape, b.answers.shape
    ((1, 2), (1, 1))
    >>> parse_prompts({"prompts": [{"clean": [1, 2], "answers": [1], "wrong_answers": [3]},
    ...                            {"clean": [4], "answers": [1], "wrong_answers": [3]}]}).clean.tolist()
    [[1, 2], [-1, 4]]
    >>> b = parse_prompts({"positions": "end", "prompts": [{"clean": [4], "corrupt": [1, 2], "answers": [1],
    ...                                                     "wrong_answers": [3]}]})
    >>> b.clean.tolist(), b.corrupt.tolist(), b.positions
    ([[-1, 4]], [[1, 2]], 'end')
    >>> parse_prompts({"prompts": [{"clean": [4, 5], "corrupt": [1, 2, 3], "positions": [2, 0], "answers": [1],
    ...                             "wrong_answers": [3]}]}).position_map.tolist()
    [[0, 2, 0]]
    """
    if not isinstance(data, dict) or "prompts" not in data:
        raise ExplainerError(
            f"{source} must be a JSON object with a 'prompts' list: "
            '{"prompts": [{"clean": [...], "corrupt": [...], "answers": [...], "wrong_answers": [...]}]}'
        )
    prompts = data["prompts"]
    if not isinstance(prompts, list) or not prompts:
        raise ExplainerError(f"{source} has no prompts; add at least two to 'prompts'")
    positions = _positions(data, source)
    text = _encoder(prompts, tokenizer)
    why = "there is no tokenizer (the model folder has no tokenizer.json)"
    rows: dict[str, list[list[int]]] = {k: [] for k in _KEYS}
    maps: list[list[int] | None] = []
    with_corrupt = isinstance(prompts[0], dict) and "corrupt" in prompts[0]
    for i, p in enumerate(prompts):
        where = f"{source}: prompt {i}"
        if not isinstance(p, dict):
            raise ExplainerError(f"{where} must be an object with keys {list(_KEYS)}")
        unknown = sorted(set(p) - set(_KEYS) - set(_OPTIONAL))
        if unknown:
            raise ExplainerError(f"{where} has unknown key(s) {unknown}; valid: {list(_KEYS + _OPTIONAL)}")
        for key in ("clean", "answers", "wrong_answers"):
            if key not in p:
                raise ExplainerError(f"{where} has no {key!r}; every prompt needs clean, answers, wrong_answers")
        if ("corrupt" in p) != with_corrupt:
            raise ExplainerError(f"{where}: give 'corrupt' for every prompt or for none")
        for key in _KEYS:
            if key in p:
                rows[key].append(_tokens(p[key], where, key, text, why))
        if not rows["clean"][-1]:
            raise ExplainerError(f"{where}: 'clean' is empty")
        if not rows["answers"][-1] or not rows["wrong_answers"][-1]:
            raise ExplainerError(f"{where}: 'answers' and 'wrong_answers' need at least one token each")
        corrupt = rows["corrupt"][-1] if with_corrupt else None
        maps.append(None if "positions" not in p else _position_map(p["positions"], rows["clean"][-1], corrupt, where))
        lengths_rule = maps[-1] is None and with_corrupt  # a prompt's own map replaces the file's rule
        mismatch = lengths_rule and corrupt_length_error(len(rows["clean"][-1]), len(corrupt), positions)
        if mismatch:
            raise ExplainerError(f"{where}: {mismatch}")
    for key in ("answers", "wrong_answers"):
        lengths = sorted({len(r) for r in rows[key]})
        if len(lengths) > 1:
            first_bad = next(i for i, r in enumerate(rows[key]) if len(r) != len(rows[key][0]))
            raise ExplainerError(
                f"{source}: prompts have unequal '{key}' lengths {lengths} (prompt {first_bad} differs "
                f"from prompt 0); every prompt must give the same number of {key}"
            )

    width = max(len(r) for r in rows["clean"] + rows["corrupt"])  # clean and corrupt share one width

    def arr(key: str, padded: bool = False):
        return jnp.asarray(pad_left(rows[key], width) if padded else np.asarray(rows[key], dtype=np.int32))

    corrupt = arr("corrupt", padded=True) if with_corrupt else None
    mapped = _columns(maps, rows["clean"], rows["corrupt"], width)
    return Batch(arr("clean", padded=True), corrupt, arr("answers"), arr("wrong_answers"), positions, mapped)


def _check_padding(tokens: np.ndarray, key: str, source: str) -> np.ndarray:
    """Raise unless negative ids are left padding (:data:`PAD` before every real token); return
    the tokens with the padding as 0 (for the vocabulary check)."""
    pad = tokens == PAD
    bad = ((tokens < 0) & ~pad).any(1) | (pad[:, 1:] & ~pad[:, :-1]).any(1) | pad.all(1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ExplainerError(
            f"{source}: prompt {i} has {key} {tokens[i].tolist()}: negative ids are padding ({PAD}), only before "
            "a prompt's first token and never all of it"
        )
    return np.where(pad, 0, tokens)


def check_prompts(batch: Batch, config: ModelConfig, source: str = "prompts") -> None:
    """Raise if the prompts do not fit the model (too long, token or answer out of vocabulary)."""
    seq = batch.clean.shape[1]
    if seq > config.n_ctx:
        raise ExplainerError(
            f"{source}: the longest prompt has {seq} tokens but the model's context is n_ctx={config.n_ctx}; "
            "shorten the prompts"
        )
    _check_corrupt_lengths(batch, source)
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
        if key in ("clean", "corrupt"):
            tokens = _check_padding(tokens, key, source)
        bad = np.argwhere((tokens < 0) | (tokens >= vocab))
        if len(bad):
            i, j = bad[0]
            raise ExplainerError(
                f"{source}: prompt {i} has {key} token {int(tokens[i, j])}, out of the model's vocabulary "
                f"(0..{vocab - 1}); the prompts were made for another model or tokenizer"
            )


def _check_corrupt_lengths(batch: Batch, source: str) -> None:
    """Raise unless every counterfactual's length fits its clean prompt's under ``batch.positions``
    (a batch built in code, not read from a file, is held to the same rule), or, for a prompt that maps
    its positions one by one, unless each clean position reads a real token of its counterfactual."""
    if batch.corrupt is None:
        if batch.position_map is not None:
            raise ExplainerError(f"{source}: a position map needs counterfactuals ('corrupt'); the batch has none")
        return
    if batch.corrupt.shape != batch.clean.shape:
        raise ExplainerError(
            f"{source}: 'clean' is {tuple(batch.clean.shape)} but 'corrupt' is {tuple(batch.corrupt.shape)}; "
            "left-pad both to one width (explainer.models.padding.pad_left)"
        )
    clean, corrupt = np.asarray(lengths(batch.clean)), np.asarray(lengths(batch.corrupt))
    mapped = _mapped_rows(batch, source)
    for i in np.flatnonzero((clean != corrupt) & ~mapped):
        mismatch = corrupt_length_error(int(clean[i]), int(corrupt[i]), batch.positions)
        if mismatch:
            raise ExplainerError(f"{source}: prompt {i}: {mismatch}")


def _mapped_rows(batch: Batch, source: str) -> np.ndarray:
    """Which prompts map their positions one by one (``[batch]`` bools); raises unless every real clean
    position of those maps to a real token of the counterfactual."""
    width = batch.clean.shape[1]
    if batch.position_map is None:
        return np.zeros(len(batch), bool)
    columns = np.asarray(batch.position_map)
    if columns.shape != tuple(batch.clean.shape):
        raise ExplainerError(
            f"{source}: 'position_map' is {columns.shape} but 'clean' is {tuple(batch.clean.shape)}; give one corrupt "
            "column per clean column"
        )
    real = np.asarray(batch.clean) != PAD
    inside = (columns >= 0) & (columns < width)
    corrupt = np.asarray(batch.corrupt)
    onto_real = inside & (np.take_along_axis(corrupt, np.clip(columns, 0, width - 1), 1) != PAD)
    bad = (real & ~onto_real).any(1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ExplainerError(
            f"{source}: prompt {i}: its position map sends a clean position to column(s) of 'corrupt' that are "
            "padding or outside the prompt; every clean position must read a real token of its counterfactual"
        )
    return (columns != np.arange(width)).any(1)


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

    >>> import json, tempfile
    >>> from explainer.tasks.planted import first_class_prompts
    >>> path = Path(tempfile.mkdtemp()) / "prompts.json"
    >>> _ = path.write_text(json.dumps(prompts_json(first_class_prompts(50))))
    >>> task = PromptsTask.from_file(path)
    >>> len(task.train_data()), len(task.heldout_data())
    (40, 10)
    """

    def __init__(self, batch: Batch, name: str = "prompts", heldout_fraction: float = 0.2):
        if len(batch) < 2:
            raise ExplainerError(f"task {name!r} has {len(batch)} prompt; give at least two")
        self.name = name
        self.batch = batch
        self._train, self._heldout = split(batch, heldout_fraction)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, name: str | None = None, model_folder: str | os.PathLike | None = None
    ) -> PromptsTask:
        """The prompts in ``path``; text in them is tokenized with ``model_folder``'s ``tokenizer.json``."""
        from explainer.models.native import read_json

        path = Path(path)
        if not path.is_file():
            raise ExplainerError(f"prompts file {str(path)!r} does not exist")
        if path.stat().st_size == 0:
            raise ExplainerError(f'prompts file {str(path)!r} is empty; it should hold {{"prompts": [...]}}')
        batch = parse_prompts(read_json(path), source=str(path), tokenizer=tokenizer_of(model_folder))
        return cls(batch, name=name or str(path))

    def check(self, config: ModelConfig) -> None:
        check_prompts(self.batch, config, source=f"task {self.name!r}")

    def train_data(self) -> Batch:
        return self._train

    def heldout_data(self) -> Batch:
        return self._heldout


def prompts_json(batch: Batch) -> dict[str, Any]:
    """The prompts-file object for ``batch`` (the inverse of :func:`parse_prompts`; padding dropped)."""

    def ids(row) -> list[int]:
        return [t for t in np.asarray(row).tolist() if t != PAD]

    out = []
    width, mapped = batch.clean.shape[1], _mapped_rows(batch, "batch")
    for i in range(len(batch)):
        p = {"clean": ids(batch.clean[i])}
        if batch.corrupt is not None:
            p["corrupt"] = ids(batch.corrupt[i])
        if mapped[i]:
            first_clean, first_corrupt = width - len(p["clean"]), width - len(p["corrupt"])
            p["positions"] = (np.asarray(batch.position_map[i])[first_clean:] - first_corrupt).tolist()
        p["answers"] = np.asarray(batch.answers[i]).tolist()
        p["wrong_answers"] = np.asarray(batch.wrong_answers[i]).tolist()
        out.append(p)
    if batch.positions != "start":  # the default is left out: files of equal-length pairs stay as they were
        return {"prompts": out, "positions": batch.positions}
    return {"prompts": out}
