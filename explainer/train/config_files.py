"""Settings from files and records: TOML files (:func:`load_config`, :func:`to_toml`) and the
dictionaries of saved run records (:func:`from_dict`), each key checked against the settings of
:class:`~explainer.train.config.TrainConfig`.

>>> from_dict({"optimiser": {"steps": 300}}).optimiser.steps
300
>>> print(to_toml({"ablation": "mean", "optimiser": {"steps": 2000}}), end="")
ablation = "mean"
<BLANKLINE>
[optimiser]
steps = 2000
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from explainer.errors import ExplainerError, did_you_mean
from explainer.train.config import FLAT_NAMES, GROUPS, PLACE, TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def from_dict(data: Any, source: str = "config") -> TrainConfig:
    """A config from a dictionary of tables (``{"optimiser": {"steps": 300}, ...}``) or of flat
    settings (saved run records, old TOML files); unknown keys are errors that suggest the closest.

    As before the groups, a flat ``kl_budget`` beside ``lam`` or ``target_size`` is ignored: saved
    records always carry it.
    """
    if not isinstance(data, dict):
        raise ExplainerError(f"{source} must be a table of settings")
    if _layout(data, source) == "tables":
        data = _flatten(data, source)
    elif data.get("lam") is not None or data.get("target_size") is not None:
        data = {k: v for k, v in data.items() if k != "kl_budget"}
    for key in data:
        if key in GROUPS and key != "units":
            raise ExplainerError(f"{source}: {key!r} is a table of settings, e.g. [{key}]")
        if key not in PLACE:
            raise ExplainerError(f"{source}: unknown setting {key!r}; {did_you_mean(key, [*FLAT_NAMES, *GROUPS])}")
    try:
        return TrainConfig.of(**data)
    except (ExplainerError, TypeError) as err:  # TypeError: a type checker's, under the tests
        raise ExplainerError(f"{source}: {err}") from None


def _layout(data: dict[str, Any], source: str) -> str:
    """``tables`` (a group's settings under ``[optimiser]``...) or ``flat`` (every setting at the top)."""
    tables = [k for k, v in data.items() if k in GROUPS and isinstance(v, dict)]
    flat = [k for k in data if k in PLACE and PLACE[k] is not None and k not in tables]
    if tables and flat:
        raise ExplainerError(
            f"{source} mixes tables ({', '.join(tables)}) with flat settings ({', '.join(flat)}); "
            f"put {flat[0]!r} under [{PLACE[flat[0]]}]"
        )
    return "tables" if tables else "flat"


def _flatten(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Tables as flat settings, each key checked against its own table."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if PLACE.get(key, "") is None:  # ablation, adversary_weight, dtype: no table of their own
            flat[key] = value
            continue
        if key not in GROUPS:
            raise ExplainerError(f"{source}: unknown setting {key!r}; {did_you_mean(key, [*GROUPS, 'ablation'])}")
        if not isinstance(value, dict):
            raise ExplainerError(f"{source}: {key!r} is a table of settings, e.g. [{key}]")
        names = [f.name for kind in GROUPS[key] for f in dataclasses.fields(kind)] + (
            ["kind"] if key == "units" else []
        )
        for name, item in value.items():
            if name not in names:
                home = PLACE.get(name)
                fix = f"it belongs under [{home}]" if home else did_you_mean(name, names)
                raise ExplainerError(f"{source}: unknown setting {name!r} in [{key}]; {fix}")
            flat["units" if key == "units" and name == "kind" else name] = item
    return flat


_NOTED: set[str] = set()


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read settings from a TOML file: a table per group (or all of them under ``[train]``).

    Example file::

        ablation = "mean"

        [optimiser]
        steps = 2000

        [penalty]
        kl_budget = 0.005

    A file of the old flat layout (every setting at the top) still loads, with a note on stderr
    (once per file) that shows it as tables.
    """
    path = Path(path)
    if not path.is_file():
        raise ExplainerError(f"config file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ExplainerError(f"{path} is not valid TOML: {err}") from None
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    config = from_dict(data, source=str(path))
    if _layout(data, str(path)) == "flat" and any(PLACE.get(k) for k in data) and str(path) not in _NOTED:
        _NOTED.add(str(path))
        print(f"note: {path} uses the old flat layout of settings (still read); as tables it reads:", file=sys.stderr)
        print(to_toml(_as_tables(data, config)), file=sys.stderr)
    return config


def _as_tables(data: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """The settings a flat file gives, in the tables they belong to."""
    out: dict[str, Any] = {}
    for group, values in config.to_tables().items():
        if not isinstance(values, dict):
            out |= {group: values} if group in data else {}
            continue
        given = {k: v for k, v in values.items() if k in data or (k == "kind" and "units" in data)}
        out |= {group: given} if given else {}
    return out


def to_toml(tables: dict[str, Any]) -> str:
    """Settings as TOML text: plain values first, then a ``[table]`` per group (empty ones left out)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if v != v else ("inf" if v > 0 else "-inf")
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v) if isinstance(v, str) else repr(v)

    lines = [f"{k} = {value(v)}" for k, v in tables.items() if not isinstance(v, dict) and v is not None]
    for name, table in tables.items():
        if isinstance(table, dict) and table:
            lines += ["", f"[{name}]", *(f"{k} = {value(v)}" for k, v in table.items() if v is not None)]
    return "\n".join(lines).strip() + "\n"
