"""What every ``explainer`` command shares: the app, its consoles, and how results are printed.

Every command takes ``--json`` and then prints one JSON object as its last line of stdout
(progress, messages and warnings go to stderr).
"""

from __future__ import annotations

import json
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
