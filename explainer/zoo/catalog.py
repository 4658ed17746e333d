"""The zoo's catalog: the small models shipped inside the package, each a native model folder in
``explainer/zoo/models/<name>/``.

``explainer zoo`` lists them. A zoo folder holds ``config.json``, ``model.safetensors``,
``prompts.json`` (its task), ``card.json`` (name, task, accuracy, description) and, where known,
``truth.json`` (its ground-truth explanation).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from explainer.errors import ExplainerError, did_you_mean
from explainer.models.native import CONFIG_FILE, read_json

ZOO_DIR = Path(__file__).parent / "models"


def zoo_names() -> list[str]:
    """Names of the shipped models, sorted."""
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A zoo name or a folder path, as the folder holding the model.

    >>> resolve_model("planted-joint").name
    'planted-joint'
    """
    text = str(name_or_path)
    path = Path(text)
    if path.is_dir():
        return path
    if (ZOO_DIR / text / CONFIG_FILE).is_file():
        return ZOO_DIR / text
    if os.sep in text or text.startswith("."):
        raise ExplainerError(f"model folder {text!r} does not exist; pass a zoo name or a model folder")
    raise ExplainerError(f"no zoo model or folder named {text!r}; {did_you_mean(text, zoo_names())}")


def load_truth(folder: str | os.PathLike) -> dict[str, list[int]] | None:
    """The folder's ground-truth explanation ``{site: [units]}``, or ``None`` when it has none."""
    path = Path(folder) / "truth.json"
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(u, int) for u in v) for k, v in data.items()
    ):
        raise ExplainerError(f'{path} must map site names to lists of unit indices, e.g. {{"unembed.in": [1]}}')
    return {k: sorted(v) for k, v in data.items()}


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    task: str
    accuracy: float | None
    ground_truth: dict[str, list[int]] | None
    description: str
    path: Path

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        return out


def zoo_entries() -> list[ZooEntry]:
    """Every shipped model with its card."""
    entries = []
    for name in zoo_names():
        folder = ZOO_DIR / name
        card = read_json(folder / "card.json") if (folder / "card.json").is_file() else {}
        assert isinstance(card, dict)
        entries.append(
            ZooEntry(
                name=name,
                task=str(card.get("task", "prompts.json")),
                accuracy=card.get("accuracy"),
                ground_truth=load_truth(folder),
                description=str(card.get("description", "")),
                path=folder,
            )
        )
    return entries
