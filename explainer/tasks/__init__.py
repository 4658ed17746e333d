"""Tasks: the Task protocol, the generic prompts file, and built-in task generators."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from explainer.errors import ExplainerError, did_you_mean
from explainer.tasks.base import Batch, Task
from explainer.tasks.prompts import PromptsTask, parse_prompts, prompts_json


def builtin_tasks() -> dict[str, Callable[..., Batch]]:
    """The built-in task generators by name: ``generator(n, seed=0) -> Batch``.

    >>> len(builtin_tasks()["induction"](8, seed=1))
    8
    """
    from explainer.models.planted import TASKS
    from explainer.tasks import direct, induction, ioi, paren

    return {**TASKS, **{m.NAME: m.prompts for m in (direct, induction, ioi, paren)}}


def task_names() -> list[str]:
    """Names of the built-in task generators."""
    return sorted(builtin_tasks())


def _own_task_name(folder: Path) -> str:
    """The task name on the folder's ``card.json``, else ``prompts.json``."""
    import json

    try:
        name = json.loads((folder / "card.json").read_text()).get("task")
    except (OSError, ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) else "prompts.json"


def resolve_task(task: str | os.PathLike | None, model_folder: str | os.PathLike | None = None) -> Task:
    """A task from a prompts file, a built-in name, or (``task=None``) the model folder's prompts.

    >>> from explainer.models import resolve_model
    >>> resolve_task("xor-class").name
    'xor-class'
    """
    if task is None:
        if model_folder is not None and (Path(model_folder) / "prompts.json").is_file():
            own = Path(model_folder) / "prompts.json"
            return PromptsTask.from_file(own, name=_own_task_name(Path(model_folder)), model_folder=model_folder)
        raise ExplainerError(
            "no task given and the model folder has no prompts.json; pass --task PROMPTS.json or "
            f"a built-in task ({', '.join(task_names())})"
        )
    text = str(task)
    if Path(text).is_file() or text.endswith(".json"):
        return PromptsTask.from_file(text, model_folder=model_folder)
    tasks = builtin_tasks()
    if text in tasks:
        return PromptsTask(tasks[text](), name=text)
    raise ExplainerError(
        f"unknown task {text!r}: not a prompts file nor a built-in task; {did_you_mean(text, task_names())}"
    )


__all__ = [
    "Batch",
    "PromptsTask",
    "Task",
    "builtin_tasks",
    "parse_prompts",
    "prompts_json",
    "resolve_task",
    "task_names",
]
