"""The Explanation artifact and its run folder.

A run folder holds:

- ``explanation.json``: ``schema_version``, ``model`` (``name`` for zoo models, ``path``,
  ``sha256`` of ``model.safetensors``), ``task`` (``name``, ``source``), ``config`` (every training
  setting), ``sites`` (units per site), ``size``, ``size_per_site``, ``kept`` (``{site: [units]}``),
  ``faithfulness`` (``kl_mean``, ``kl_p90``, ``kl_p99``, ``kl_max``, ``logit_diff_recovered``,
  ``accuracy``, ... on held-out prompts), ``seed`` and library ``versions``;
- ``explanation.safetensors``: ``mask.{site}`` (the binary keep mask, float32 0/1) and
  ``gate_logits.{site}`` (the trained hard-concrete log-alphas); trained under the ``optimal``
  ablation, also ``constants.{site}`` (the replacement constants learned with the gates,
  ``[seq, d_model]``; edges: ``constants.writers``, ``[seq, writers, d_model]``);
- ``history.json``: per-step training curves (``loss``, ``kl``, ``size``, ``lambda``, ``gap``);
- with rewrites (:mod:`explainer.rewrites`): ``rewrites.safetensors`` (each fitted ``f``:
  ``blocks.L.mlp.W_f`` and ``.b_f``) and ``rewrites`` in ``explanation.json`` (what ``f`` carries);
- optionally ``attack.json`` and ``masks.png``.

Everything is written into a temporary sibling folder first and renamed into place, so a failed or
interrupted run never leaves a half-written artifact.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from explainer.errors import ExplainerError
from explainer.models.folders import swap_into_place
from explainer.models.native import read_json, write_json
from explainer.progress import Timings

SCHEMA_VERSION = 1
JSON_FILE = "explanation.json"
TENSORS_FILE = "explanation.safetensors"
HISTORY_FILE = "history.json"
REWRITES_FILE = "rewrites.safetensors"


def library_versions() -> dict[str, str]:
    import equinox
    import jax
    import optax

    from explainer import __version__

    return {
        "explainer": __version__,
        "jax": jax.__version__,
        "equinox": equinox.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


@dataclasses.dataclass
class Explanation:
    """A finished explanation: which units each site's reader keeps, and how faithful that is.

    >>> import explainer
    >>> e = explainer.explain("planted-distractor", steps=300, progress=False)
    >>> e.kept
    {'blocks.0.attn.in': [0], 'unembed.in': [1]}
    """

    kept: dict[str, list[int]]
    n_units: dict[str, int]
    gate_logits: dict[str, np.ndarray]
    model: dict[str, Any]
    task: dict[str, Any]
    config: dict[str, Any]
    faithfulness: dict[str, float]
    history: dict[str, list[float]] | None = None
    attack_result: dict[str, Any] | None = None  # the run's attack.json, when it has been attacked
    versions: dict[str, str] = dataclasses.field(default_factory=library_versions)
    path: Path | None = None
    bases: dict[str, np.ndarray] | None = None  # per site, columns = units; absent sites: standard
    rewrites: dict[str, np.ndarray] | None = None  # fitted f of each rewritten MLP (explainer.rewrites)
    rewrite_report: dict[str, Any] | None = None  # how much of the behaviour each f carries
    warnings: list[str] = dataclasses.field(default_factory=list)  # see explainer.verdicts
    timings: Any = dataclasses.field(default_factory=dict)  # seconds per phase (explainer.progress.Timings)
    constants: dict[str, np.ndarray] | None = None  # optimal ablation: the constants learned with the gates
    _bound: Any = dataclasses.field(default=None, repr=False, compare=False)  # (model, task) in this session

    def bind(self, model: Any, task: Any) -> Explanation:
        """This explanation with the model and task it explains held in memory, for :meth:`evaluate`
        and :meth:`attack` (a loaded run finds them from its record instead)."""
        self._bound = (model, task)
        return self

    def _model_and_task(self, task: Any = None) -> tuple[Any, Any]:
        from explainer.evaluation import run_model, run_task
        from explainer.tasks import resolve_task

        if self._bound is not None:
            model, own = self._bound
            return model, own if task is None else resolve_task(task)
        model, folder = run_model(self)
        return model, run_task(self, folder, task)

    def evaluate(self, ablation: str | None = None, task: Any = None) -> dict[str, Any]:
        """Faithfulness on held-out prompts (optionally under another ablation or on another task):
        the fields of ``explainer eval --json``, with its ``warnings``.

        >>> import explainer
        >>> e = explainer.explain("planted-distractor", steps=300, progress=False)
        >>> e.evaluate(ablation="mean")["faithfulness"]["accuracy"]
        1.0
        """
        from explainer.evaluation import evaluate_explanation

        model, the_task = self._model_and_task(task)
        result = evaluate_explanation(self, model, the_task, ablation)
        return {"run": str(self.path) if self.path else None, **result}

    def attack(
        self, budget: int = 1, method: str = "all", seed: int = 0, divergence: str = "kl", adversary_basis: str = "own"
    ) -> dict[str, Any]:
        """Re-include up to ``budget`` excluded units to move the scrubbed model as much as possible
        (:mod:`adversary.discrete`), on held-out prompts: the fields of ``explainer attack --json``,
        with a ``verdict`` (robust or fragile against the KL budget).

        >>> import explainer
        >>> e = explainer.explain("planted-distractor", steps=300, progress=False)
        >>> e.attack(budget=1)["verdict"]
        'robust'
        """
        from explainer.evaluation import attack_explanation

        model, the_task = self._model_and_task()
        result = attack_explanation(self, model, the_task, budget, method, seed, divergence, adversary_basis)
        return {"run": str(self.path) if self.path else None, **result}

    def plot(self, path: str | os.PathLike, truth: dict[str, list[int]] | None = None) -> Path:
        """Write the masks picture (``explainer show``'s ``masks.png``): gates per site and unit, the
        kept units boxed, and the training curves (:func:`explainer.plotting.plot_explanation`).

        >>> import tempfile
        >>> from explainer.export import example_circuit as example
        >>> example().plot(tempfile.mkdtemp() + "/masks.png").name
        'masks.png'
        """
        from explainer.plotting import plot_explanation

        return plot_explanation(self, path, truth)

    def graph(self, path: str | os.PathLike) -> Path:
        """Write the circuit picture (``explainer show --graph``): the kept edges as a layered graph
        for an edge run, or for a dimension run how many units each reader keeps
        (:func:`explainer.plotting.plot_circuit`).

        >>> import tempfile
        >>> from explainer.export import example_circuit as example
        >>> example().graph(tempfile.mkdtemp() + "/circuit.png").name
        'circuit.png'
        """
        from explainer.plotting import plot_circuit

        return plot_circuit(self, path)

    def basis_modules(self) -> dict:
        """The run's bases as :class:`~explainer.masks.OrthogonalBasis` objects, for a Scrubber."""
        import jax.numpy as jnp

        from explainer.masks import OrthogonalBasis

        return {site: OrthogonalBasis(jnp.asarray(m, jnp.float32)) for site, m in (self.bases or {}).items()}

    @property
    def size(self) -> int:
        return sum(len(u) for u in self.kept.values())

    @property
    def size_per_site(self) -> dict[str, int]:
        return {site: len(self.kept.get(site, [])) for site in self.n_units}

    @property
    def total_units(self) -> int:
        return sum(self.n_units.values())

    def mask(self) -> dict[str, np.ndarray]:
        """The binary keep mask per site (float32 0/1)."""
        out = {}
        for site, n in self.n_units.items():
            m = np.zeros(n, np.float32)
            m[self.kept.get(site, [])] = 1.0
            out[site] = m
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "task": self.task,
            "config": self.config,
            "seed": self.config.get("seed"),
            "sites": self.n_units,
            "size": self.size,
            "total_units": self.total_units,
            "size_per_site": self.size_per_site,
            "kept": self.kept,
            "faithfulness": self.faithfulness,
            "warnings": list(self.warnings),
            "timings": _rounded(self.timings),
            "versions": self.versions,
        } | ({"rewrites": self.rewrite_report} if self.rewrite_report else {})

    def result(self) -> dict[str, Any]:
        """The CLI's JSON result: ``run``, ``size``, ``kept``, ``faithfulness`` and more."""
        return {"run": str(self.path) if self.path else None, **self.to_json()}

    def summary(self) -> str:
        """A few lines for people: size, kept units per site, faithfulness."""
        f = self.faithfulness
        lines = [
            f"explanation of {self.model.get('name') or self.model.get('path')} on task {self.task.get('name')}",
            f"size {self.size} of {self.total_units} units ({100 * self.size / max(1, self.total_units):.1f}%)",
        ]
        width = max(len(s) for s in self.n_units)
        for site, n in self.n_units.items():
            units = self.kept.get(site, [])
            lines.append(f"  {site:<{width}}  {len(units):>3}/{n:<4} {units}")
        lines.append(
            f"held-out: KL mean {f['kl_mean']:.4g} p99 {f['kl_p99']:.4g} max {f['kl_max']:.4g} nats, "
            f"logit diff recovered {f['logit_diff_recovered']:.3f}, accuracy {f['accuracy']:.3f} "
            f"(full model {f.get('accuracy_full', float('nan')):.3f})"
        )
        if self.rewrite_report:
            from explainer.rewrites import describe

            lines += describe(self.rewrite_report, self.kept)
        if self.attack_result:
            a = self.attack_result
            lines.append(
                f"attack ({a.get('method')}, budget {a.get('budget')}): gap KL mean "
                f"{a['gap']['kl_mean']:.4g} max {a['gap']['kl_max']:.4g} by re-including {a.get('reincluded')}"
            )
        return "\n".join(lines)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the run folder atomically; refuses to replace anything that is not a run folder."""
        from safetensors.numpy import save_file

        path = Path(path)
        check_writable(path, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            write_json(tmp / JSON_FILE, self.to_json())
            tensors = {}
            for site, m in self.mask().items():
                tensors[f"mask.{site}"] = m
                tensors[f"gate_logits.{site}"] = np.asarray(self.gate_logits[site], np.float32)
            for site, matrix in (self.bases or {}).items():
                tensors[f"basis.{site}"] = np.asarray(matrix, np.float32)
            for site, values in (self.constants or {}).items():
                tensors[f"constants.{site}"] = np.asarray(values, np.float32)
            save_file(tensors, str(tmp / TENSORS_FILE))
            if self.rewrites:
                save_file({k: np.asarray(v, np.float32) for k, v in self.rewrites.items()}, str(tmp / REWRITES_FILE))
            if self.history is not None:
                write_json(tmp / HISTORY_FILE, self.history)
            if self.attack_result is not None:
                write_json(tmp / "attack.json", self.attack_result)
            swap_into_place(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = path
        return path


def check_writable(path: Path, overwrite: bool) -> None:
    """Raise unless ``path`` is free, or is a run folder and ``overwrite`` is set."""
    if not path.exists():
        return
    if not (path / JSON_FILE).is_file():
        raise ExplainerError(
            f"{str(path)!r} exists and is not a run folder; choose another --out (nothing was changed)"
        )
    if not overwrite:
        raise ExplainerError(f"run folder {str(path)!r} already exists; pass --overwrite or choose another --out")


def load(path: str | os.PathLike) -> Explanation:
    """Load a run folder written by :meth:`Explanation.save` (or ``explainer train --out``).

    >>> import explainer, tempfile
    >>> e = explainer.explain("planted-distractor", steps=300, progress=False)
    >>> run = e.save(tempfile.mkdtemp() + "/run")
    >>> explainer.load(run).kept == e.kept
    True
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not (path / JSON_FILE).is_file():
        what = "does not exist" if not path.exists() else f"is not a run folder (no {JSON_FILE})"
        raise ExplainerError(f"{str(path)!r} {what}; pass a folder written by `explainer train --out`")
    data = read_json(path / JSON_FILE)
    if not isinstance(data, dict) or "schema_version" not in data:
        raise ExplainerError(f"{path / JSON_FILE} is not an explanation (no schema_version)")
    version = data["schema_version"]
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise ExplainerError(
            f"{path} has schema version {version!r}; this explainer reads version {SCHEMA_VERSION}: "
            + ("upgrade explainer" if newer else "retrain the explanation with this version")
        )
    try:
        tensors = load_file(str(path / TENSORS_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise ExplainerError(f"{path / TENSORS_FILE} is missing or corrupt ({err}); retrain the run") from None
    try:
        n_units = {s: int(n) for s, n in data["sites"].items()}
        kept = {s: [int(u) for u in units] for s, units in data["kept"].items()}
        logits = {s: tensors[f"gate_logits.{s}"] for s in n_units}
        bases = {k.removeprefix("basis."): v for k, v in tensors.items() if k.startswith("basis.")}
        constants = {k.removeprefix("constants."): v for k, v in tensors.items() if k.startswith("constants.")}
        if any(site not in n_units or m.ndim != 2 or m.shape[0] != m.shape[1] for site, m in bases.items()):
            raise ValueError("a basis tensor names an unknown site or is not square")
        for site, units in kept.items():
            mask = tensors[f"mask.{site}"]
            if sorted(np.flatnonzero(mask > 0.5).tolist()) != sorted(units):
                raise ExplainerError(f"{path}: the mask of {site!r} disagrees with explanation.json; retrain the run")
    except (KeyError, AttributeError, TypeError, ValueError) as err:
        raise ExplainerError(f"{path} is an incomplete run folder ({err!r}); retrain the run") from None
    _check_record(path, data, n_units, kept, logits)
    history = read_json(path / HISTORY_FILE) if (path / HISTORY_FILE).is_file() else None
    rewrites = None
    if data["config"].get("rewrites"):
        try:
            rewrites = load_file(str(path / REWRITES_FILE))
        except (SafetensorError, OSError, ValueError) as err:
            raise ExplainerError(f"{path / REWRITES_FILE} is missing or corrupt ({err}); retrain the run") from None
    attack = read_json(path / "attack.json") if (path / "attack.json").is_file() else None
    if history is not None and not _is_history(history):
        raise ExplainerError(f"{path / HISTORY_FILE} is not a training history ({{name: [numbers]}}); delete it")
    if attack is not None and not isinstance(attack, dict):
        raise ExplainerError(f"{path / 'attack.json'} is not an attack result; delete it or run explainer attack")
    return Explanation(
        kept=kept,
        n_units=n_units,
        gate_logits=logits,
        model=data["model"],
        task=data["task"],
        config=data["config"],
        faithfulness=data["faithfulness"],
        history=history,  # type: ignore[arg-type]
        attack_result=attack,  # type: ignore[arg-type]
        versions=data.get("versions", {}),
        path=path,
        bases=bases or None,
        rewrites=rewrites,
        rewrite_report=data.get("rewrites"),
        warnings=[str(w) for w in data.get("warnings", [])],
        timings=_timings(data.get("timings")),
        constants=constants or None,
    )


def _timings(record: Any) -> Any:
    """The run's seconds per phase, as a :class:`~explainer.progress.Timings` (empty when absent)."""
    ok = isinstance(record, dict) and all(isinstance(v, (int, float)) for v in record.values())
    return Timings.of_record(record if ok else {})


def _rounded(timings: Any) -> dict[str, float]:
    """``timings`` for JSON: a :class:`~explainer.progress.Timings`' own rounding (with ``xla_compile``
    for a run's live timings), any other mapping's as a record's."""
    return (timings if isinstance(timings, Timings) else Timings.of_record(dict(timings))).rounded()


def _is_history(history: Any) -> bool:
    return isinstance(history, dict) and all(
        isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        for v in history.values()
    )


FAITHFULNESS_KEYS = ("kl_mean", "kl_p99", "kl_max", "logit_diff_recovered", "accuracy")


def _check_record(path: Path, data: dict, n_units: dict, kept: dict, logits: dict) -> None:
    """The fields of ``explanation.json`` that commands read, with the types they need."""
    from explainer.train.config import flat_names
    from explainer.train.config_files import from_dict

    problem = None
    model, task, config, faith = (data.get(k) for k in ("model", "task", "config", "faithfulness"))
    if not isinstance(model, dict) or not isinstance(model.get("path", model.get("name")), str):
        problem = "'model' must be an object with the model's 'path' (or zoo 'name') and 'sha256'"
    elif not isinstance(task, dict) or not all(isinstance(task.get(k), str) for k in ("name", "source")):
        problem = "'task' must be an object with 'name' and 'source'"
    elif not isinstance(config, dict):
        problem = "'config' must be an object of training settings"
    elif not isinstance(faith, dict) or not all(isinstance(v, (int, float)) for v in faith.values()):
        problem = "'faithfulness' must be an object of numbers"
    elif missing := [k for k in FAITHFULNESS_KEYS if k not in faith]:
        problem = f"'faithfulness' lacks {missing}"
    elif any(n < 1 for n in n_units.values()) or any(s not in n_units for s in kept):
        problem = "'sites' must give a positive number of units per site, and 'kept' name only those sites"
    elif any(u < 0 or u >= n_units[s] for s, us in kept.items() for u in us):
        problem = "'kept' names a unit outside its site"
    elif any(np.shape(logits[s]) != (n,) for s, n in n_units.items()):
        problem = "the gate logits do not have one value per unit"
    if problem:
        raise ExplainerError(f"{path / JSON_FILE} is damaged: {problem}; retrain the run")
    from_dict({k: v for k, v in config.items() if k in flat_names()}, source=f"{path / JSON_FILE} config")
