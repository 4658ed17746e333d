"""What every ``explainer`` command shares: the app, its consoles, and how results are printed.

Every command takes ``--json`` and then prints one JSON object as its last line of stdout
(progress, messages and warnings go to stderr).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from explainer.errors import ExplainerError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Learn small, faithful, adversarially robust explanations of transformer behaviours.",
)
zoo_app = typer.Typer(help="Models shipped with explainer.", invoke_without_command=True)
app.add_typer(zoo_app, name="zoo")
import_app = typer.Typer(help="Bring your own model: convert a checkpoint into a model folder.", no_args_is_help=True)
app.add_typer(import_app, name="import")
out = Console()
err = Console(stderr=True)


def _emit(result: dict[str, Any], as_json: bool, text: str | None = None) -> None:
    if as_json:
        print(json.dumps(result, default=str))
    elif text is not None:
        out.print(text, highlight=False, markup=False, soft_wrap=True)


def _fail(message: str) -> None:
    raise ExplainerError(message)


def _warn(result: dict[str, Any]) -> None:
    """Print each of a result's ``warnings`` on stderr."""
    for warning in result.get("warnings", []):
        err.print(f"warning: {warning}", highlight=False, markup=False)


def _join_cluster(requested: bool) -> None:
    """``--distributed`` or ``EXPLAINER_COORDINATOR``: join a multi-host cluster before JAX starts."""
    from explainer.parallel import init_distributed

    if init_distributed(requested=requested):
        err.print("joined the JAX cluster (jax.distributed)", highlight=False)


def setting_option(name: str, help: str | None = None) -> Any:
    """The typer option of flat setting ``name``: its flag and help (``help`` may say it in the
    command's terms, ``{default}`` filled in) from the settings' metadata. Not given, it is
    ``None``: the library's default (or the ``--config`` file's value) applies."""
    from explainer.train.config import DEFAULTS, flag, setting_field, setting_help

    text = setting_help(name) if help is None else help.format(default=DEFAULTS[name])
    switch = setting_field(name).type == "bool" or isinstance(DEFAULTS[name], bool)
    option = f"{flag(name)}/--no-{flag(name)[2:]}" if switch else flag(name)
    return typer.Option(None, option, help=text)


def given_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The flat settings among a command's options (its ``locals()``) that were given."""
    from explainer.train.config import flat_names

    names = flat_names()
    return {k: v for k, v in options.items() if k in names and v is not None and v != []}


def config_from_options(config: Path | None, settings: dict[str, Any]):
    """The :class:`~explainer.train.config.TrainConfig` of ``--config FILE`` (or the defaults) with the
    flat ``settings`` given as flags on top."""
    from explainer.train.config import TrainConfig
    from explainer.train.config_files import load_config

    return (load_config(config) if config is not None else TrainConfig()).replace(**settings)


COMPILE_CACHE_ENV = "EXPLAINER_COMPILE_CACHE"
COMPILE_CACHE_BYTES = 4 << 30  # beyond this the least recently used programs are dropped
COMPILE_CACHE_SECONDS = 0.2  # programs that compiled faster are not kept (scoring's take about this)
OFF = ("", "0", "off", "no", "false")


def compile_cache_folder(environ: Mapping[str, str] = os.environ) -> str | None:
    """Where the commands keep compiled programs: ``$EXPLAINER_COMPILE_CACHE``, else
    ``$XDG_CACHE_HOME/explainer/xla`` (``~/.cache/explainer/xla``); ``None`` when that variable
    says ``off`` (or ``0``, ``no``, ``false``, empty) or when JAX's own ``JAX_COMPILATION_CACHE_DIR``
    is set (JAX then uses that folder).

    >>> compile_cache_folder({"EXPLAINER_COMPILE_CACHE": "off"}) is None
    True
    >>> compile_cache_folder({"XDG_CACHE_HOME": "/c"})
    '/c/explainer/xla'
    """
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    where = environ.get(COMPILE_CACHE_ENV)
    if where is not None:
        return None if where.strip().lower() in OFF else where
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "explainer", "xla")


def use_compile_cache(environ: Mapping[str, str] = os.environ) -> str | None:
    """Keep the programs XLA compiles (those that took at least :data:`COMPILE_CACHE_SECONDS`, unless
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise) on disk, so that a later
    command with the same model, prompts and settings loads them instead of compiling again (the
    training step, scoring, evaluation: seconds on a CPU, minutes for large models on a GPU).
    Returns the folder, or ``None`` when off (:func:`compile_cache_folder`) or not writable."""
    where = compile_cache_folder(environ)
    if where is None:
        return None
    try:
        os.makedirs(where, exist_ok=True)
    except OSError:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_BYTES)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILE_CACHE_SECONDS)
    return where
