"""Writing an imported model folder safely: refuse to clobber, write beside, then rename.

The importers (:mod:`explainer.models.hf_import`, :mod:`explainer.models.tl`) share these, so a
failed import never leaves a half-written model folder and never replaces a folder that is not a
model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from explainer.errors import ExplainerError
from explainer.models.native import CONFIG_FILE, save_model, write_json
from explainer.models.transformer import Transformer


def check_out(out: Path, overwrite: bool, what: str = "model folder", marker: str = CONFIG_FILE) -> None:
    """Raise unless ``out`` is free (absent or empty), or is a ``what`` (holds ``marker``) and ``overwrite``."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / marker).is_file():
        raise ExplainerError(f"{str(out)!r} exists and is not a {what}; pick another OUT (it is left untouched)")
    if not overwrite:
        raise ExplainerError(f"{what} {str(out)!r} exists; pass --overwrite to replace it")


def swap_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path``, replacing an old one only once ``tmp`` is whole
    (model folders here, run and sweep folders in :mod:`explainer.explanation` and the sweep)."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def write_folder(out: Path, fill: Any) -> Path:
    """Create a sibling temp folder, let ``fill(tmp)`` write into it, then rename it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; model folders are meant to be shared
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_model_folder(
    model: Transformer, out: Path, card: dict[str, Any], copies: dict[str, Path] | None = None
) -> Path:
    """Write ``model`` in the native format plus ``card.json``, atomically; ``copies`` maps a file
    name in ``out`` to a file copied there (a checkpoint's ``tokenizer.json``)."""

    def fill(tmp: Path) -> None:
        save_model(model, tmp)
        write_json(tmp / "card.json", card)
        for name, source in (copies or {}).items():
            shutil.copyfile(source, tmp / name)

    return write_folder(out, fill)
