"""Training settings: one frozen dataclass whose defaults are the settings, loadable from TOML."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any

from explainer.errors import ExplainerError, did_you_mean
from explainer.scrub import check_ablation, check_units

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How an explanation is trained.

    The size penalty has three modes; the default needs no tuning per model:

    - ``kl_budget`` (default): the smallest explanation whose KL stays within ``kl_budget`` nats;
      the penalty multiplier is learned by dual ascent;
    - ``lam``: a fixed penalty, in nats per kept unit (a unit is kept only if it buys more KL);
    - ``target_size``: an explanation of exactly ``target_size`` units (multiplier learned while
      training, the top units by gate logit kept at the end).

    Gates start mostly closed (``init_logit = -1``: a noise-free gate value of 0.22) so
    that every unit has to earn its place: started open, a pair of units whose contributions cancel
    sits in a local optimum (closing either one alone costs KL), and the smaller explanation that
    drops both is never found. ``λ`` moves slowly (``dual_lr``) and backs off ten times faster than
    it grows, because a ``λ`` that overshoots closes every gate of a serial pathway at once.

    In ``kl_budget`` mode two safeguards follow training (:func:`explainer.finishing.fit`): ``repair``
    adds back, by exact search, units whose gates closed for good although the budget needs them;
    ``open_restart`` trains once more from open gates (logit 3) when the explanation still misses
    the budget, which happens when every sampled mask of a mostly closed start breaks the model
    and the KL has no slope to follow, and keeps the better of the two. ``trim`` (off by default)
    then drops, one at a time by exact search, the units the explanation can lose within its budget
    while its logit difference recovered on the training prompts stays at least ``trim_ld_floor``
    (default 0.9; ``None``: the KL budget alone). On confident models the KL saturates, and a
    budget of 0.01 nats alone let trim cut the logit difference recovered to 0.84 (paren). Each
    removal must also hold on the training prompts the search does not score (those after its
    first 256, or the same prompts with other replacements). With a ``learned`` basis, where trim
    stops, the rotation is refit to the set less the unit nearest to going
    (``trim_refit_steps`` steps of training with the gates fixed, no size penalty, no adversary;
    0: no refit); if that set then holds on both sets of prompts, it is kept and trim goes on.
    With a rotated in-loop adversary (``adversary_basis`` ``random`` or ``learned``),
    ``close_attacks`` finally adds back units while the rotated attack still moves the explanation
    by more than ``kl_budget`` on the training prompts (:func:`adversary.rotated.close_attacks`).

    ``basis`` says what a unit is (:mod:`explainer.bases`): ``standard`` residual dimensions,
    ``pca`` directions, a ``learned`` rotation trained with the mask, or a file of orthogonal
    matrices; ``positional`` gives every (position, unit) pair its own gate (fixed-length tasks).
    ``rewrites`` (e.g. ``["blocks.0.mlp=linear"]``) replace MLPs by a fitted ``f`` plus a remainder
    that is one more unit (:mod:`explainer.rewrites`).

    ``devices`` splits each step's batch across that many devices (unset: all of JAX's devices;
    ``batch_size`` must be a multiple of it; see :mod:`explainer.parallel`), and ``remat``
    recomputes each transformer block's activations in the backward pass instead of storing them
    (``jax.checkpoint``): less memory, somewhat more time, the same explanation.

    >>> TrainConfig(lam=0.1).mode
    'lambda'
    >>> TrainConfig().mode
    'kl_budget'
    """

    steps: int = 1500
    batch_size: int = 64
    lr: float = 0.05
    ablation: str = "resample"
    kl_budget: float = 0.01
    lam: float | None = None
    target_size: int | None = None
    init_lambda: float = 0.1
    dual_lr: float = 0.005
    init_logit: float = -1.0
    sites: tuple[str, ...] | list[str] | None = None
    adversary_weight: float = 1.0
    repair: bool = True
    trim: bool = False
    trim_ld_floor: float | None = 0.9
    trim_refit_steps: int = 300
    open_restart: bool = True
    close_attacks: bool = True
    seed: int = 0
    checkpoint_every: int = 250
    devices: int | None = None
    remat: bool = False
    basis: str = "standard"
    basis_lr: float = 0.001
    positional: bool = False
    units: str = "dims"
    rewrites: tuple[str, ...] | list[str] | None = None

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "lr", "kl_budget", "init_lambda", "dual_lr", "basis_lr")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ExplainerError(f"setting {name!r} must be a positive number, got {value!r}")
        for name in ("steps", "batch_size", "seed"):
            if not isinstance(getattr(self, name), int):
                raise ExplainerError(f"setting {name!r} must be an integer, got {getattr(self, name)!r}")
        if self.lam is not None and self.target_size is not None:
            raise ExplainerError("give either lam (--lambda) or target_size (--target-size), not both")
        if self.lam is not None and (not isinstance(self.lam, (int, float)) or self.lam < 0):
            raise ExplainerError(f"setting 'lam' must be a number >= 0, got {self.lam!r}")
        if self.target_size is not None and (not isinstance(self.target_size, int) or self.target_size < 0):
            raise ExplainerError(f"setting 'target_size' must be an integer >= 0, got {self.target_size!r}")
        for name in ("repair", "open_restart", "trim", "close_attacks", "remat", "positional"):
            if not isinstance(getattr(self, name), bool):
                raise ExplainerError(f"setting {name!r} must be true or false, got {getattr(self, name)!r}")
        floor = self.trim_ld_floor
        if floor is not None and (not isinstance(floor, (int, float)) or isinstance(floor, bool) or math.isnan(floor)):
            raise ExplainerError(f"setting 'trim_ld_floor' must be a number (-inf: no floor), got {floor!r}")
        if not isinstance(self.adversary_weight, (int, float)) or self.adversary_weight < 0:
            raise ExplainerError(f"setting 'adversary_weight' must be >= 0, got {self.adversary_weight!r}")
        _check_ranges(self)
        check_ablation(self.ablation)
        if not isinstance(self.basis, str):
            raise ExplainerError(f"setting 'basis' must be a name or a file path, got {self.basis!r}")
        from explainer.bases import check_basis

        check_basis(self.basis)
        if check_units(self.units) == "edges" and (self.basis != "standard" or self.positional or self.rewrites):
            raise ExplainerError(
                "edge units (--units edges) take no basis, positional masks or rewrites; "
                "use --units dims for those options"
            )
        if self.sites is not None:
            object.__setattr__(self, "sites", tuple(self.sites))
        if self.rewrites is not None:
            from explainer.rewrites import parse

            if isinstance(self.rewrites, str) or not isinstance(self.rewrites, (list, tuple)):
                raise ExplainerError(
                    f"setting 'rewrites' must be a list like ['blocks.0.mlp=linear'], got {self.rewrites!r}"
                )
            for spec in self.rewrites:
                parse(spec)
            object.__setattr__(self, "rewrites", tuple(self.rewrites) or None)

    @property
    def mode(self) -> str:
        if self.lam is not None:
            return "lambda"
        if self.target_size is not None:
            return "target_size"
        return "kl_budget"

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``; ``None`` values are ignored (handy for CLI flags)."""
        return from_dict({**self.to_json(), **{k: v for k, v in changes.items() if v is not None}})

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("sites", "rewrites"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_ranges(config: TrainConfig) -> None:
    """Types and ranges the checks above leave out: finite numbers, integer seeds, site names."""
    for name in ("lr", "kl_budget", "init_lambda", "dual_lr", "init_logit", "adversary_weight", "lam"):
        value = getattr(config, name)
        if value is not None and (not _number(value) or not math.isfinite(value)):
            raise ExplainerError(f"setting {name!r} must be a finite number, got {value!r}")
    if isinstance(config.seed, bool) or not 0 <= config.seed < 2**63:
        raise ExplainerError(f"setting 'seed' must be an integer in 0..2**63-1, got {config.seed!r}")
    refit = config.trim_refit_steps
    if not isinstance(refit, int) or isinstance(refit, bool) or refit < 0:
        raise ExplainerError(f"setting 'trim_refit_steps' must be an integer >= 0 (0: no refit), got {refit!r}")
    every = config.checkpoint_every
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ExplainerError(f"setting 'checkpoint_every' must be an integer >= 0 (0: never), got {every!r}")
    devices = config.devices
    if devices is not None and (not isinstance(devices, int) or isinstance(devices, bool) or devices < 1):
        raise ExplainerError(f"setting 'devices' must be a positive integer (unset: all devices), got {devices!r}")
    if isinstance(config.target_size, bool):
        raise ExplainerError(f"setting 'target_size' must be an integer >= 0, got {config.target_size!r}")
    sites = config.sites
    if sites is not None and (not isinstance(sites, (list, tuple)) or not all(isinstance(s, str) for s in sites)):
        raise ExplainerError(f"setting 'sites' must be a list of site names, got {sites!r}")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def from_dict(data: Any, source: str = "config") -> TrainConfig:
    """A config from a dictionary; unknown keys are errors that list the valid ones."""
    if not isinstance(data, dict):
        raise ExplainerError(f"{source} must be a table of settings")
    names = field_names()
    for key in data:
        if key not in names:
            raise ExplainerError(f"{source}: unknown setting {key!r}; {did_you_mean(key, names)}")
    try:
        return TrainConfig(**data)
    except TypeError as err:  # pragma: no cover - all fields have defaults
        raise ExplainerError(f"{source}: {err}") from None


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read settings from a TOML file (top-level keys, or a ``[train]`` table).

    Example file::

        steps = 2000
        ablation = "mean"
        kl_budget = 0.005
    """
    path = Path(path)
    if not path.is_file():
        raise ExplainerError(f"config file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ExplainerError(f"{path} is not valid TOML: {err}") from None
    if set(data) == {"train"}:
        data = data["train"]
    return from_dict(data, source=str(path))
