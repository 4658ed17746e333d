"""The project's one exception type.

Every mistake a user can make (a bad flag, a malformed model folder, a prompts file with ragged
prompts) is reported as an :class:`ExplainerError` whose message says what is wrong and how to fix
it. The CLI prints the message and exits with status 2; nothing else escapes as a traceback.
"""

from __future__ import annotations


class ExplainerError(Exception):
    """A user-facing error: the message names the mistake and the fix.

    >>> raise ExplainerError("unknown site 'blocks.9.mlp.in'; this model has blocks 0-1")
    Traceback (most recent call last):
    ...
    explainer.errors.ExplainerError: unknown site 'blocks.9.mlp.in'; this model has blocks 0-1
    """


def did_you_mean(name: str, options: list[str] | tuple[str, ...]) -> str:
    """A short hint listing the valid options, closest first.

    >>> did_you_mean("resampel", ["resample", "mean", "zero"])
    "did you mean 'resample'? valid: resample, mean, zero"
    """
    import difflib

    close = difflib.get_close_matches(name, list(options), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}valid: {', '.join(options)}"
