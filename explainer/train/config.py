"""Training settings: a frozen :class:`TrainConfig` of a few typed groups, loadable from TOML
(:mod:`explainer.train.config_files`).

The groups follow what a setting changes, so that an illegal combination cannot be written:

- ``optimiser`` (:class:`Optimiser`): how the gates move, seed included. The dual ascent on λ
  (``init_lambda``, ``dual_lr``) is here because the KL budget, the target size and the sweep's
  ladders all run it; a penalty is then one number.
- ``penalty``: exactly one of :class:`KLBudget`, :class:`Lambda`, :class:`TargetSize`, so a
  target size with a fixed λ is refused when it is built.
- ``units``: :class:`Dims` (sites, basis, positional gates, rewrites) or :class:`Edges` (sites
  only), so an edge run with a basis cannot be written.
- ``finishing`` (:class:`Finishing`): the passes after training (:mod:`explainer.finish`).
- ``runtime`` (:class:`Runtime`): checkpoints, devices, sharded weights, rematerialisation; never the result.
- ``ablation``, ``adversary_weight`` and ``dtype`` stay at the top: they shape the objective (or,
  ``dtype``, the precision of the model it is computed on) whatever the penalty and the units are.
  ``dtype`` is not a :class:`Runtime` setting because it changes the numbers, so it may change the
  explanation; ``eval`` and ``attack`` of a saved run use the dtype it records.

Each group checks itself when built. Flat names (``steps``, ``lam``, ``basis``...) remain the
keywords of :func:`explainer.explain`, the keys of saved run records and the CLI's flags:
:meth:`TrainConfig.of` and :meth:`TrainConfig.replace` take them, :meth:`TrainConfig.to_json`
writes them. Each field's ``metadata`` holds its help text (``{default}`` stands for its default)
and its flag where that is not ``--`` plus the name; the CLI and ``docs/settings.md`` read them.

>>> TrainConfig.of(lam=0.1).penalty
Lambda(lam=0.1)
>>> TrainConfig().replace(steps=300).optimiser.steps
300
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from explainer.errors import ExplainerError, did_you_mean
from explainer.scrub import check_ablation, check_units

DTYPES = ("float32", "bfloat16", "float16")  # the model's weights and activations; masks and losses: float32


def setting(default: Any = dataclasses.MISSING, help: str = "", flag: str | None = None, factory: Any = None) -> Any:
    """A settings field whose ``metadata`` carries its help text and, when it differs, its flag."""
    metadata = {"help": help, **({"flag": flag} if flag else {})}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _fail(name: str, must: str, value: Any) -> None:
    raise ExplainerError(f"setting {name!r} must be {must}, got {value!r}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(group: Any, *names: str) -> None:
    for name in names:
        value = getattr(group, name)
        if not _number(value):
            _fail(name, "a finite number", value)
        if value <= 0:
            _fail(name, "a positive number", value)


def _booleans(group: Any) -> None:
    for field in dataclasses.fields(group):
        if field.type == "bool" and not isinstance(getattr(group, field.name), bool):
            _fail(field.name, "true or false", getattr(group, field.name))


def _names(name: str, value: Any, must: str) -> tuple[str, ...] | None:
    """A list of strings as a tuple (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        _fail(name, must, value)
    return tuple(value)


INIT_FROM = ("auto", "logit", "attribution", "integrated_gradients")  # where the gates start


@dataclasses.dataclass(frozen=True)
class Optimiser:
    """How the gates (and a learned basis, and λ) are optimised."""

    steps: int = setting(1500, "Training steps (default {default}).")
    batch_size: int = setting(64, "Prompts per training step (default {default}); a multiple of --devices.")
    lr: float = setting(0.05, "Adam learning rate of the gate logits (default {default}).")
    init_logit: float = setting(
        -1.0,
        "Starting gate logit (default {default}: mostly closed, so every unit has to earn its place; 2.0 starts "
        "open, for circuits of several units in series that no single unit opens alone).",
    )
    init_from: str = setting(
        "auto",
        "Where the gates start (default {default}: integrated_gradients for a sweep's ladder, logit for train): "
        "logit, every gate at --init-logit; attribution or integrated_gradients, each gate between --init-logit "
        "and open by its unit's rank under that ranking (one backward pass, or 16 along the path from the empty "
        "mask, which also sees units whose effect has saturated), so the units that matter start open.",
    )
    basis_lr: float = setting(0.001, "Adam learning rate of a learned basis's rotations (default {default}).")
    init_lambda: float = setting(
        0.1, "Starting λ of the dual ascent (KL budget, target size, ladders; default {default})."
    )
    dual_lr: float = setting(
        0.005, "Step of the dual ascent on log λ (default {default}); it backs off ten times faster than it grows."
    )
    seed: int = setting(0, "Random seed (default {default}).")

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "lr", "basis_lr", "init_lambda", "dual_lr")
        for name in ("steps", "batch_size"):
            if not _integer(getattr(self, name)):
                _fail(name, "an integer", getattr(self, name))
        if not _number(self.init_logit):
            _fail("init_logit", "a finite number", self.init_logit)
        if self.init_from not in INIT_FROM:
            _fail("init_from", f"one of {', '.join(INIT_FROM)}", self.init_from)
        if not _integer(self.seed) or not 0 <= self.seed < 2**63:
            _fail("seed", "an integer in 0..2**63-1", self.seed)


@dataclasses.dataclass(frozen=True)
class KLBudget:
    """The smallest explanation whose KL stays within the budget; λ learned by dual ascent."""

    mode: ClassVar[str] = "kl_budget"
    kl_budget: float = setting(0.01, "Smallest explanation with KL <= this (default {default}).")

    def __post_init__(self) -> None:
        _positive(self, "kl_budget")


@dataclasses.dataclass(frozen=True)
class Lambda:
    """A fixed penalty in nats per kept unit: a unit is kept only if it buys more KL."""

    mode: ClassVar[str] = "lambda"
    lam: float = setting(help="Fixed size penalty (nats per kept unit).", flag="--lambda")

    def __post_init__(self) -> None:
        if not _number(self.lam) or self.lam < 0:
            _fail("lam", "a finite number >= 0", self.lam)


@dataclasses.dataclass(frozen=True)
class TargetSize:
    """An explanation of exactly ``target_size`` units (λ learned, the top units kept at the end)."""

    mode: ClassVar[str] = "target_size"
    target_size: int = setting(help="Train an explanation of exactly N units.")

    def __post_init__(self) -> None:
        if not _integer(self.target_size) or self.target_size < 0:
            _fail("target_size", "an integer >= 0", self.target_size)


@dataclasses.dataclass(frozen=True)
class Dims:
    """Units are residual dimensions of each reader's input, in a basis."""

    kind: ClassVar[str] = "dims"
    sites: tuple[str, ...] | list[str] | None = setting(
        None, "Reader sites to explain (default: every site of the model)."
    )
    basis: str = setting(
        "standard", "What a unit is: standard (default), pca, gradient, learned, or a .safetensors/.npz file."
    )
    positional: bool = setting(False, "One gate per (position, unit) (fixed-length prompts).")
    rewrites: tuple[str, ...] | list[str] | None = setting(
        None,
        "Rewrite an MLP as a fitted f plus a remainder that is one unit: blocks.L.mlp=linear, "
        "=rank-R or =mean (mlps=FORM: every MLP). Repeatable.",
        flag="--rewrite",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", _names("sites", self.sites, "a list of site names"))
        if not isinstance(self.basis, str):
            _fail("basis", "a name or a file path", self.basis)
        from explainer.bases import check_basis

        check_basis(self.basis)
        _booleans(self)
        rewrites = _names("rewrites", self.rewrites, "a list like ['blocks.0.mlp=linear']")
        if rewrites:
            from explainer.rewrites import parse

            for spec in rewrites:
                parse(spec)
        object.__setattr__(self, "rewrites", rewrites or None)


@dataclasses.dataclass(frozen=True)
class Edges:
    """Units are edges: one writer (embed, a head, an MLP) into one reader. No basis to choose."""

    kind: ClassVar[str] = "edges"
    sites: tuple[str, ...] | list[str] | None = setting(
        None, "Reader sites to explain (default: every site of the model)."
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", _names("sites", self.sites, "a list of site names"))


@dataclasses.dataclass(frozen=True)
class Finishing:
    """The passes after training, in KL-budget mode (:func:`explainer.finish.passes.fit`)."""

    repair: bool = setting(
        True, "Add back, by exact search, units whose gates closed for good although the budget needs them."
    )
    open_restart: bool = setting(
        True, "Train once more from open gates when the explanation misses its budget; keep the better."
    )
    trim: bool = setting(False, "After training, drop every unit the KL budget can lose (default {default}).")
    trim_ld_floor: float | None = setting(
        0.9, "With --trim, keep the logit difference recovered (training prompts) at least this (default {default})."
    )
    trim_refit_steps: int = setting(
        300,
        "With --trim and --basis learned, steps that refit the rotation to a smaller set (default {default}; 0: none).",
    )
    close_attacks: bool = setting(
        True, "With a rotated in-loop adversary, add back units while its attack moves the explanation past the budget."
    )

    def __post_init__(self) -> None:
        _booleans(self)
        floor = self.trim_ld_floor
        if floor is not None and (isinstance(floor, bool) or not isinstance(floor, (int, float)) or math.isnan(floor)):
            _fail("trim_ld_floor", "a number (-inf: no floor)", floor)
        if not _integer(self.trim_refit_steps) or self.trim_refit_steps < 0:
            _fail("trim_refit_steps", "an integer >= 0 (0: no refit)", self.trim_refit_steps)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where and how the steps run; none of these changes the explanation."""

    checkpoint_every: int = setting(250, "Checkpoint into OUT.partial/ every N steps (default {default}; 0: never).")
    devices: int | None = setting(None, "Split each step's batch across N devices (default: all JAX sees).")
    remat: bool = setting(False, "Recompute each block in the backward pass: less memory (default {default}).")
    shard_weights: bool = setting(
        False, "Also split the model's weights across the --devices (FSDP), for models too big for one device."
    )

    def __post_init__(self) -> None:
        if not _integer(self.checkpoint_every) or self.checkpoint_every < 0:
            _fail("checkpoint_every", "an integer >= 0 (0: never)", self.checkpoint_every)
        if self.devices is not None and (not _integer(self.devices) or self.devices < 1):
            _fail("devices", "a positive integer (unset: all devices)", self.devices)
        _booleans(self)


Penalty = KLBudget | Lambda | TargetSize
Units = Dims | Edges
PENALTIES: tuple[type, ...] = (KLBudget, Lambda, TargetSize)
UNIT_KINDS: tuple[type, ...] = (Dims, Edges)
GROUPS: dict[str, tuple[type, ...]] = {
    "optimiser": (Optimiser,),
    "penalty": PENALTIES,
    "units": UNIT_KINDS,
    "finishing": (Finishing,),
    "runtime": (Runtime,),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How an explanation is trained: settings in groups (see the module's docstring).

    The size penalty needs no tuning per model by default (``KLBudget``). Gates start mostly
    closed so that every unit earns its place: started open, a pair of units whose contributions
    cancel sits in a local optimum and the smaller explanation that drops both is never found. λ
    moves slowly and backs off faster than it grows, because a λ that overshoots closes every gate
    of a serial pathway at once. In KL-budget mode the ``finishing`` passes follow training
    (:func:`explainer.finish.passes.fit`): repair, an open restart, optional trim (with a refit of a
    learned basis) and, with a rotated in-loop adversary, closing its attacks.

    >>> TrainConfig.of(steps=300, target_size=4).penalty.mode
    'target_size'
    >>> TrainConfig().units.kind
    'dims'
    """

    optimiser: Optimiser = setting(help="How the gates are optimised.", factory=Optimiser)
    penalty: Penalty = setting(
        help="The size penalty: exactly one of kl_budget, lam (--lambda) or target_size.", factory=KLBudget
    )
    units: Units = setting(
        help="What a unit is: dims (residual dimensions, default) or edges (writer -> reader).", factory=Dims
    )
    ablation: str = setting(
        "resample", "Replacement of excluded units: resample, mean, zero or optimal (default {default})."
    )
    adversary_weight: float = setting(
        1.0, "Weight of the in-loop adversary's term in the explainer's loss (default {default})."
    )
    finishing: Finishing = setting(help="The passes after training (KL-budget mode).", factory=Finishing)
    runtime: Runtime = setting(help="Checkpoints, devices and memory; never the result.", factory=Runtime)
    dtype: str = setting(
        "float32",
        "The model's weights and activations: float32 (default), bfloat16 or float16 (half the memory; "
        "gates, masks and losses stay float32).",
    )

    def __post_init__(self) -> None:
        for name, kinds in GROUPS.items():
            if not isinstance(getattr(self, name), kinds):
                what = " or ".join(k.__name__ for k in kinds)
                raise ExplainerError(
                    f"setting {name!r} must be a {what}, got {getattr(self, name)!r}; for flat settings "
                    "use TrainConfig.of(steps=..., lam=...)"
                )
        if not isinstance(self.ablation, str):
            _fail("ablation", "a name", self.ablation)
        check_ablation(self.ablation)
        if not _number(self.adversary_weight) or self.adversary_weight < 0:
            _fail("adversary_weight", "a finite number >= 0", self.adversary_weight)
        check_dtype(self.dtype)

    @classmethod
    def of(cls, **settings: Any) -> TrainConfig:
        """A config from flat settings (``steps=300, lam=0.1, basis="pca"``); unknown names are
        errors that suggest the closest, and two penalties or an edge run with a basis are refused.

        >>> TrainConfig.of(stpes=300)
        Traceback (most recent call last):
        ...
        explainer.errors.ExplainerError: unknown setting 'stpes'; did you mean 'steps'? ...
        """
        _check_names(settings)
        parts: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
        top = {}
        for name, value in settings.items():
            group = PLACE[name]
            (parts[group] if group else top)[name] = value
        return cls(
            optimiser=Optimiser(**parts["optimiser"]),
            penalty=_penalty(parts["penalty"]),
            units=_units(parts["units"]),
            finishing=Finishing(**parts["finishing"]),
            runtime=Runtime(**parts["runtime"]),
            **top,
        )

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with flat ``changes``; ``None`` values are ignored (a CLI flag not given). A
        penalty given replaces the penalty, and ``units`` switches the kind of unit.

        >>> TrainConfig.of(lam=0.1).replace(target_size=3).penalty
        TargetSize(target_size=3)
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        _check_names(changes)
        flat = self.settings()
        if PENALTY_NAMES & changes.keys():
            flat = {k: v for k, v in flat.items() if k not in PENALTY_NAMES}
        return TrainConfig.of(**{**flat, **changes})

    def settings(self) -> dict[str, Any]:
        """The flat settings this config holds (its penalty's one number, its kind of units' own)."""
        out: dict[str, Any] = {"ablation": self.ablation, "adversary_weight": self.adversary_weight}
        out["dtype"] = self.dtype
        for group in GROUPS:
            out |= dataclasses.asdict(getattr(self, group))
        out["units"] = self.units.kind
        return out

    def to_json(self) -> dict[str, Any]:
        """Every flat setting, the saved run record's form: the settings another penalty or kind of
        units would use are at their defaults (``lam`` and ``target_size`` ``None``)."""
        out = {**DEFAULTS, **self.settings()}
        for name in ("sites", "rewrites"):
            if out[name] is not None:
                out[name] = list(out[name])
        return {name: out[name] for name in FLAT_NAMES}

    def to_tables(self) -> dict[str, Any]:
        """The TOML form: one table per group, unset (``None``) settings left out."""
        tables: dict[str, Any] = {"ablation": self.ablation, "adversary_weight": self.adversary_weight}
        tables["dtype"] = self.dtype
        for group in GROUPS:
            values = dataclasses.asdict(getattr(self, group))
            if group == "units":
                values = {"kind": self.units.kind, **values}
            tables[group] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if v is not None}
        return tables


def _field_names(kinds: tuple[type, ...]) -> list[str]:
    return [f.name for k in kinds for f in dataclasses.fields(k)]


PENALTY_NAMES = frozenset(_field_names(PENALTIES))
PLACE: dict[str, str | None] = {
    **{name: group for group, kinds in GROUPS.items() for name in _field_names(kinds)},
    "units": "units",
    "ablation": None,
    "adversary_weight": None,
    "dtype": None,
}
FLAT_NAMES = (  # the order of the saved records' keys
    *("steps", "batch_size", "lr", "ablation", "kl_budget", "lam", "target_size", "init_lambda", "dual_lr"),
    *("init_logit", "init_from", "sites", "adversary_weight", "repair", "trim", "trim_ld_floor", "trim_refit_steps"),
    *("open_restart", "close_attacks", "seed", "checkpoint_every", "devices", "remat", "basis", "basis_lr"),
    *("positional", "units", "rewrites", "dtype", "shard_weights"),
)
assert set(FLAT_NAMES) == set(PLACE), "every flat setting has one place"


def resolved_start(config: TrainConfig, ladder: bool) -> TrainConfig:
    """``config`` with ``init_from = "auto"`` made concrete: ``integrated_gradients`` for a sweep's
    ladder (on the peer race's ioi and induction edge ladders it gave a lower CMD than closed gates,
    ``benchmarks/results/peers.json``), ``logit`` for one run. Run records store the concrete value.

    >>> resolved_start(TrainConfig(), ladder=True).optimiser.init_from
    'integrated_gradients'
    >>> resolved_start(TrainConfig.of(init_from="attribution"), ladder=True).optimiser.init_from
    'attribution'
    """
    if config.optimiser.init_from != "auto":
        return config
    return config.replace(init_from="integrated_gradients" if ladder else "logit")


def flat_names() -> list[str]:
    """The flat settings' names, as keywords of :meth:`TrainConfig.of` and keys of saved records."""
    return list(FLAT_NAMES)


def _check_names(settings: dict[str, Any]) -> None:
    for name in settings:
        if name not in PLACE:
            raise ExplainerError(f"unknown setting {name!r}; {did_you_mean(name, FLAT_NAMES)}")


def flag(name: str) -> str:
    """The CLI flag of flat setting ``name`` (``lam``: ``--lambda``)."""
    return setting_field(name).metadata.get("flag") or "--" + name.replace("_", "-")


def check_dtype(dtype: Any) -> str:
    """``dtype`` if it is one of :data:`DTYPES`, else an error naming them.

    >>> check_dtype("float8")
    Traceback (most recent call last):
    ...
    explainer.errors.ExplainerError: setting 'dtype' must be one of float32, bfloat16, float16, got 'float8'
    """
    if dtype not in DTYPES:
        _fail("dtype", "one of " + ", ".join(DTYPES), dtype)
    return dtype


def _penalty(given: dict[str, Any]) -> Penalty:
    given = {k: v for k, v in given.items() if v is not None}
    if len(given) > 1:
        named = " and ".join(f"{k} ({flag(k)})" for k in given)
        raise ExplainerError(
            f"{named} are two size penalties, not both: give one of them (kl_budget: the smallest explanation "
            "within a KL budget; lam: a fixed penalty per unit; target_size: exactly N units)"
        )
    for kind in PENALTIES:
        if given.keys() <= {f.name for f in dataclasses.fields(kind)}:
            return kind(**given)
    raise AssertionError(given)  # pragma: no cover - every penalty name has a kind


def _units(given: dict[str, Any]) -> Units:
    kind = given.pop("units", "dims")
    if not isinstance(kind, str):
        _fail("units", "dims or edges", kind)
    if check_units(kind) == "dims":
        return Dims(**given)
    extra = [k for k, v in given.items() if k != "sites" and v not in (DEFAULTS[k], [], ())]
    if extra:
        raise ExplainerError(
            f"edge units (--units edges) take no basis, positional masks or rewrites (given: {', '.join(extra)}); "
            "use --units dims for those options"
        )
    return Edges(sites=given.get("sites"))


def _defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kinds in (*GROUPS.values(), (TrainConfig,)):
        for kind in kinds:
            for f in dataclasses.fields(kind):
                if f.name not in GROUPS:
                    out[f.name] = None if f.default is dataclasses.MISSING else f.default
    return out | {"units": "dims"}


DEFAULTS = _defaults()


def setting_field(name: str) -> dataclasses.Field:
    """The field that holds flat setting ``name`` (``units``: the group's own field)."""
    group = PLACE[name]
    kinds = (TrainConfig,) if group is None or name == "units" else GROUPS[group]
    return next(f for kind in kinds for f in dataclasses.fields(kind) if f.name == name)


def setting_help(name: str) -> str:
    """The help of flat setting ``name`` with its default filled in (``on``/``off`` for a switch)."""
    default = DEFAULTS[name]
    shown = ("on" if default else "off") if isinstance(default, bool) else default
    return setting_field(name).metadata["help"].format(default=shown)
