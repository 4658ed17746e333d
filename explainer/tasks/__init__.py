"""Tasks: the Task protocol, the generic prompts file, and built-in task generators."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from explainer.errors import ExplainerError, did_you_mean
from explainer.tasks.base import Batch, Task
from explainer.tasks.prompts import PromptsTask, parse_prompts, prompts_json
from explainer.tasks.text import tokenizer_of


def builtin_tasks() -> dict[str, Callable[..., Batch]]:
    """The built-in task generators by name: ``generator(n, seed=0) -> Batch``.

    >>> len(builtin_tasks()["induction"](8, seed=1))
    8
    """
    from explainer.tasks import direct, induction, ioi, paren, planted

    return {**planted.TASKS, **{m.NAME: m.prompts for m in (direct, induction, ioi, paren)}}


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


def resolve_task(task: Any, model_folder: str | os.PathLike | None = None) -> Task:
    """A task from a prompts file, a built-in name, prompts given in Python (a ``{"prompts": [...]}``
    dict, or a list of prompt dicts), a :class:`Task` as it is, or (``task=None``) the model folder's
    prompts.

    >>> resolve_task("xor-class").name
    'xor-class'
    >>> p = {"clean": [1, 2], "answers": [1], "wrong_answers": [2]}
    >>> len(resolve_task([p, p, p]).train_data())  # fewer than 10 prompts: every one trains and is held out
    3
    """
    if isinstance(task, (dict, list)):
        data = task if isinstance(task, dict) else {"prompts": task}
        return PromptsTask(parse_prompts(data, source="prompts", tokenizer=tokenizer_of(model_folder)))
    if task is not None and not isinstance(task, (str, os.PathLike)):
        if isinstance(task, Task):
            return task
        raise ExplainerError(
            f"a task is a built-in name, a prompts file, a {{'prompts': [...]}} dict or a list of prompt dicts, "
            f"not {type(task).__name__}"
        )
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
