"""Text prompts: a prompts file may give strings where it gives token ids, when the model folder holds
its checkpoint's ``tokenizer.json`` (``explainer import hf`` copies it).

Strings are tokenized with the ``tokenizers`` library (imported only when a prompts file has text;
``transformers`` is not needed): ``clean`` and ``corrupt`` as the tokenizer encodes a text, with its
special tokens (a Llama tokenizer adds its ``<s>``); each answer and wrong answer must be exactly
one token, encoded without special tokens (mind the leading space: ``" Paris"``, not ``"Paris"``,
for a word that follows a space). An answer that splits is refused, naming its pieces.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from explainer.errors import ExplainerError

TOKENIZER_FILE = "tokenizer.json"
NO_TOKENIZER = (
    "{where} gives text, but {why}; put the checkpoint's tokenizer.json in the model folder "
    "(explainer import hf copies it from a checkpoint folder that has one) or give token ids"
)


def tokenizer_of(folder: str | os.PathLike | None) -> Path | None:
    """The model folder's ``tokenizer.json``, or ``None`` when it has none."""
    if folder is None or not (Path(folder) / TOKENIZER_FILE).is_file():
        return None
    return Path(folder) / TOKENIZER_FILE


class TextEncoder:
    """Turns a prompts file's strings into token ids with a ``tokenizer.json``.

    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> enc = TextEncoder(tok)
    >>> enc.prompt("a b a", "prompt 0", "clean"), enc.answer("b", "prompt 0", "answers")
    ([0, 1, 0], 1)
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TextEncoder:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - a core dependency
            raise ExplainerError("text prompts need the 'tokenizers' package: pip install tokenizers") from e
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # the library raises its own Exception type on a bad file
            raise ExplainerError(f"cannot read the tokenizer {str(path)!r}: {e}") from e

    def prompt(self, text: str, where: str, key: str) -> list[int]:
        """The token ids of a prompt (with the tokenizer's special tokens)."""
        ids = self.tokenizer.encode(text).ids
        if not ids:
            raise ExplainerError(f"{where}: {key!r} {text!r} encodes to no tokens")
        return list(ids)

    def answer(self, text: str, where: str, key: str) -> int:
        """The one token id of an answer; an answer that is not one token is refused."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        if len(enc.ids) != 1:
            raise ExplainerError(
                f"{where}: {key[:-1] if key.endswith('s') else key} {text!r} is not one token: the tokenizer "
                f"splits it into {len(enc.ids)} {enc.tokens} (ids {enc.ids}); give an answer that is one token "
                "(a word after a space usually starts with one, e.g. ' Paris'), or its token id"
            )
        return int(enc.ids[0])


def has_text(prompts: list[Any]) -> bool:
    """Whether any prompt gives a string for any key."""
    return any(
        isinstance(v, str) or (isinstance(v, list) and any(isinstance(x, str) for x in v))
        for p in prompts
        if isinstance(p, dict)
        for v in p.values()
    )
