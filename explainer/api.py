"""The plain functions behind the CLI: the same code path for notebooks and the command line."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import weakref
from pathlib import Path
from typing import Any

import jax
import numpy as np

from explainer import models, rewrites, runs
from explainer.bases import build_bases, matrices
from explainer.errors import ExplainerError
from explainer.evaluation import (  # noqa: F401  (re-exported: the functions behind eval and attack)
    attack_explanation,
    evaluate_explanation,
    run_model,
    run_scrubber,
    run_task,
)
from explainer.explanation import Explanation, check_writable, load
from explainer.finish.passes import fit
from explainer.masks import as_mask
from explainer.models import weights_sha256
from explainer.models.transformer import Transformer
from explainer.optimal import for_mask
from explainer.parallel import data_parallel
from explainer.progress import Timings
from explainer.score import evaluate_keep
from explainer.scrub import Scrubber
from explainer.tasks import Task, resolve_task
from explainer.train.config import TrainConfig, check_dtype, resolved_start
from explainer.train.config_files import from_dict, load_config
from explainer.train.step import InLoopAdversary
from explainer.verdicts import check_target_size, train_warnings
from explainer.zoo import ZOO_DIR, resolve_model

_FOLDERS: dict[int, tuple[weakref.ref, Path]] = {}  # models loaded by load_model -> their folders


def load_model(model: str | os.PathLike, dtype: str = "float32") -> Transformer:
    """The model of a zoo name or a model folder, as an equinox module, its weights in ``dtype``
    (``float32``, ``bfloat16`` or ``float16``).

    :func:`explain` given this object knows its folder (for the run record and the folder's own
    prompts), as if it had been given the name.

    >>> net = load_model("planted-joint")
    >>> net.config.n_layers
    1
    """
    folder = resolve_model(model)
    net = models.load_model(folder, check_dtype(dtype))
    _FOLDERS[id(net)] = (weakref.ref(net, lambda _, k=id(net): _FOLDERS.pop(k, None)), folder.resolve())
    return net


def _model_and_folder(model: Any, dtype: str = "float32") -> tuple[Transformer, Path | None]:
    """The model (its weights in ``dtype``) and its folder, if known."""
    if isinstance(model, Transformer):
        entry = _FOLDERS.get(id(model))
        return models.cast_model(model, dtype), (entry[1] if entry is not None and entry[0]() is model else None)
    if not isinstance(model, (str, os.PathLike)):
        raise ExplainerError(
            f"model must be a zoo name, a model folder or a model from explainer.load_model, not {type(model).__name__}"
        )
    folder = resolve_model(model)
    return models.load_model(folder, dtype), folder


def _model_record(folder: Path | None, net: Transformer | None = None) -> dict[str, Any]:
    if folder is None:  # a model object with no folder: its weights' digest alone
        assert net is not None
        return {"name": None, "path": None, "sha256": _weights_digest(net)}
    folder = folder.resolve()
    in_zoo = folder.parent == ZOO_DIR.resolve()
    return {"name": folder.name if in_zoo else None, "path": str(folder), "sha256": weights_sha256(folder)}


def _weights_digest(net: Transformer) -> str:
    import hashlib

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(net):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()


def _task_record(task_arg: Any, task: Task) -> dict[str, Any]:
    if task_arg is None:
        return {"name": task.name, "source": "model"}
    if not isinstance(task_arg, (str, os.PathLike)):
        return {"name": task.name, "source": "inline"}
    text = str(task_arg)
    if Path(text).is_file():
        return {"name": task.name, "source": "file", "path": str(Path(text).resolve())}
    return {"name": task.name, "source": "builtin"}


def _task_argument(task: Any) -> Any:
    """What a run's record keeps of its task, for resume: the path, the name, or the prompts given."""
    if task is None or isinstance(task, dict):
        return task
    if isinstance(task, list):
        return {"prompts": task}
    if isinstance(task, (str, os.PathLike)):
        return str(Path(task).resolve()) if Path(task).is_file() else str(task)
    raise ExplainerError("a run saved with out= needs its task as a name, a prompts file or prompts (dicts)")


def explain(
    model: Any = "planted-distractor",
    task: Any = None,
    config: TrainConfig | str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    adversary: InLoopAdversary | str | None = "learned",
    progress: bool = True,
    resume: bool = False,
    **settings: Any,
) -> Explanation:
    """Learn an explanation of ``model`` on ``task``; save it to ``out`` when given.

    ``model`` is a zoo name, a model folder or a model from :func:`load_model`; ``task`` a
    built-in task name, a prompts file, prompts given in Python (a ``{"prompts": [...]}`` dict or
    a list of prompt dicts), or ``None`` for the model folder's own ``prompts.json``.
    ``settings`` override ``config`` (a :class:`TrainConfig` or a TOML file), e.g. ``steps=500,
    lam=0.05``. ``adversary`` is ``"learned"`` (the default: an adversary trained in the loop tries
    to re-include excluded units, and the explanation learns to be robust to it), ``"none"``, or
    an adversary object.

    With ``out``, training holds the lock ``OUT.lock`` and checkpoints into ``OUT.partial/`` every
    ``checkpoint_every`` steps; ``resume=True`` continues such an unfinished run (see
    :func:`resume_run`, which reads its settings back).

    The explanation returned can be measured again (:meth:`Explanation.evaluate`), attacked
    (:meth:`Explanation.attack`) and drawn, in the same session or after loading it back.

    >>> e = explain("planted-joint", seed=1, progress=False)
    >>> e.kept
    {'blocks.0.attn.in': [0], 'blocks.0.mlp.in': [1, 2], 'unembed.in': [3]}
    """
    if not isinstance(config, TrainConfig):
        config = load_config(config) if config is not None else TrainConfig()
    config = resolved_start(config.replace(**settings), ladder=False)
    if out is not None and not resume:
        check_writable(Path(out), overwrite)
        if not overwrite:
            runs.refuse_unfinished(out)
    if resume and out is None:
        raise ExplainerError("resume=True needs the run folder to continue (out)")
    if isinstance(adversary, str) or adversary is None:
        from adversary.learned import make_adversary

        adversary = make_adversary(adversary)
    if adversary is not None and config.adversary_weight == 0:
        raise ExplainerError("adversary_weight is 0, so the adversary would learn nothing; use adversary 'none'")
    net, folder = _model_and_folder(model, config.dtype)
    if out is not None and folder is None:
        raise ExplainerError(
            "a run saved with out= must name its model's folder: load the model with explainer.load_model(NAME or "
            "FOLDER), or pass the name or folder itself"
        )
    the_task = resolve_task(task, folder)
    the_task.check(net.config)
    units = config.units
    net = rewrites.rewrite(net, the_task.train_data(), getattr(units, "rewrites", None))  # MLP = f + rest (one unit)
    runtime = config.runtime  # --shard-weights: the weights live split from here on (explainer.parallel)
    net = data_parallel(runtime.devices, config.optimiser.batch_size, runtime.shard_weights).shard_model(net)
    scrubber = Scrubber.build(
        net,
        the_task.train_data(),
        rewrites.with_rest_sites(units.sites, net),
        config.ablation,
        build_bases(getattr(units, "basis", "standard"), net, the_task.train_data(), units.sites or net.sites),
        positional=getattr(units, "positional", False),
        units=units.kind,
    )
    check_target_size(getattr(config.penalty, "target_size", None), scrubber.n_units)
    if out is None:
        return _explanation(scrubber, the_task, folder, task, config, adversary, progress)
    record = {
        "model": _model_record(folder),
        "task": _task_argument(task),
        "config": config.to_json(),
        "adversary": getattr(adversary, "name", None),
        "adversary_settings": dataclasses.asdict(adversary) if dataclasses.is_dataclass(adversary) else None,
        "overwrite": overwrite,
    }
    free = lambda path, overwrite: check_writable(Path(path), overwrite)  # noqa: E731
    run = runs.lifecycle(
        out, record, resume=resume, overwrite=overwrite, check_same=_check_same_run, check_free=free, command="train"
    )
    with run as checkpoints:
        result = _explanation(scrubber, the_task, folder, task, config, adversary, progress, checkpoints)
        with result.timings.phase("save"):
            result.save(out, overwrite=True if resume else overwrite)
    return result


def _explanation(scrubber, the_task, folder, task, config, adversary, progress, checkpoints=None) -> Explanation:
    started = time.perf_counter()
    timings = Timings()
    fitted = fit(scrubber, the_task.train_data(), config, adversary, progress, checkpoints, timings)
    kept, gates, history, constants = fitted.keep, fitted.gates, fitted.history, fitted.constants
    history["seconds"] = [time.perf_counter() - started]
    scrubber = fitted.scrubber  # a learned basis as trained (and refit)
    with timings.phase("evaluate", say=progress):
        faithfulness = evaluate_keep(
            for_mask(scrubber, the_task.train_data(), kept, config.optimiser.seed, constants),  # optimal: fitted
            the_task.heldout_data(),
            as_mask(kept),
            config.optimiser.seed,
        )
        report = rewrites.carried(
            scrubber.model, the_task.train_data(), the_task.heldout_data(), config.ablation, config.optimiser.seed
        )
    explanation = Explanation(
        kept={site: [int(u) for u in v.nonzero()[0]] for site, v in kept.items()},
        n_units=scrubber.n_units,
        gate_logits={site: jax.device_get(v) for site, v in gates.logits.items()},
        bases=matrices(scrubber.bases) or None,
        model=_model_record(folder, scrubber.model),
        task=_task_record(task, the_task),
        config={**config.to_json(), "adversary": getattr(adversary, "name", None)}
        | ({"adversary_basis": adversary.basis} if getattr(adversary, "basis", "own") != "own" else {}),
        faithfulness=faithfulness,
        history=history,
        rewrites=rewrites.tensors(scrubber.model) or None,
        rewrite_report=report or None,
        timings=timings,
        constants=None if constants is None else {s: np.asarray(v) for s, v in constants.items()},
    )
    n_wrong = int(the_task.heldout_data().wrong_answers.shape[1])
    explanation.warnings = train_warnings(explanation, len(the_task.train_data()), n_wrong)
    return explanation.bind(scrubber.model, the_task)


def _check_same_run(out: str | os.PathLike, record: dict[str, Any]) -> None:
    """Refuse to resume ``out`` with anything other than what it was started with."""
    recorded = runs.read_record(out)
    config = from_dict(recorded["config"], source=f"run {str(out)!r}")  # older records too
    recorded["config"] = resolved_start(config, ladder=False).to_json()
    if not recorded["overwrite"] and (Path(out) / "explanation.json").is_file():
        runs.finish(out)
        raise ExplainerError(f"run {str(out)!r} has finished; there is nothing to resume")
    if recorded["model"].get("sha256") != record["model"]["sha256"]:
        raise ExplainerError(
            f"the weights of {record['model']['path']!r} changed since run {str(out)!r} started (sha256 "
            "differs); it cannot be resumed: start again with --overwrite"
        )
    for key in ("model", "task", "config", "adversary", "adversary_settings"):
        if key != "model" and recorded.get(key) != record.get(key):
            raise ExplainerError(
                f"run {str(out)!r} was started with {key} {recorded.get(key)!r}, not {record.get(key)!r}; "
                "resume it with the recorded settings (`explainer train --resume RUN` alone)"
            )


def resume_run(run: str | os.PathLike, progress: bool = True, **given: Any) -> Explanation:
    """Continue the unfinished run ``run`` (killed, or stopped by a fault) from its newest checkpoint.

    The settings come from ``RUN.partial/resume.json``. Anything in ``given`` (``model``,
    ``task``, ``config``, ``adversary`` or a training setting such as ``steps``) must agree with
    them; a conflict is an error naming it. The result is the explanation an uninterrupted run
    would have saved (bit for bit on the same machine).
    """
    record = runs.read_record(run)
    recorded = from_dict({k: v for k, v in record["config"].items()}, source=f"run {str(run)!r}")
    _refuse_conflicts(run, record, recorded, given)
    adversary: Any = record["adversary"] or "none"
    if record.get("adversary_settings") and record["adversary"] == "learned":
        from adversary.learned import make_adversary

        settings = {k: v for k, v in record["adversary_settings"].items() if k != "name"}
        adversary = make_adversary("learned", **settings)
    model = record["model"].get("name") or record["model"]["path"]
    return explain(
        model,
        record["task"],
        recorded,
        out=run,
        overwrite=record["overwrite"],
        adversary=adversary,
        progress=progress,
        resume=True,
    )


def _refuse_conflicts(run, record: dict[str, Any], recorded: TrainConfig, given: dict[str, Any]) -> None:
    given = {k: v for k, v in given.items() if v is not None}
    if "config" in given:
        file_config = load_config(given.pop("config")).to_json()
        given = {**{k: v for k, v in file_config.items() if v != TrainConfig().to_json()[k]}, **given}
    if "model" in given and resolve_model(given["model"]).resolve() != Path(record["model"]["path"]):
        given["model"] = str(given["model"])
    else:
        given.pop("model", None)
    if "task" in given:
        task = given["task"]
        if (str(Path(task).resolve()) if Path(task).is_file() else task) == record["task"]:
            given.pop("task")
    if given.get("adversary") == (record["adversary"] or "none"):
        given.pop("adversary")
    wanted = recorded.to_json()
    conflicts = [k for k, v in given.items() if k in ("model", "task", "adversary") or wanted.get(k, v) != v]
    unknown = [k for k in given if k not in wanted and k not in ("model", "task", "adversary")]
    if unknown:
        raise ExplainerError(f"unknown setting(s) {unknown} for resume")
    if conflicts:
        was = {
            "model": record["model"].get("name") or record["model"]["path"],
            "task": record["task"],
            "adversary": record["adversary"] or "none",
            **wanted,
        }
        listed = ", ".join(f"{k} {given[k]!r} (recorded: {was[k]!r})" for k in conflicts)
        raise ExplainerError(
            f"--resume continues run {str(run)!r} with the settings it was started with; these differ: "
            f"{listed}. Drop them, or start a new run with --overwrite"
        )


def open_run(
    run: str | os.PathLike, check_weights: bool = True, dtype: str | None = None
) -> tuple[Explanation, Transformer, Path]:
    """Load a run with the model it explains, refusing if the model's weights changed since; the
    model in ``dtype`` (default: the dtype the run was trained in)."""
    expl = load(run)
    net, folder = run_model(expl, check_weights, dtype)
    return expl, net, folder


def check_run_units(run: str | os.PathLike, units: str) -> None:
    """Refuse ``units`` that are not the units run ``run`` was trained in."""
    from explainer.scrub import check_units

    has = load(run).config.get("units", "dims")
    if check_units(units) != has:
        raise ExplainerError(
            f"run {str(run)!r} has {has} units, not {units}; drop --units (a run is attacked in its own units) "
            f"or train a run with --units {units}"
        )


def evaluate(
    run: str | os.PathLike,
    task: str | os.PathLike | None = None,
    ablation: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Re-measure a saved explanation on held-out prompts (optionally another task, ablation or
    ``dtype`` of the model; by default the run's own)."""
    expl, net, folder = open_run(run, dtype=dtype)
    result = evaluate_explanation(expl, net, run_task(expl, folder, task), ablation)
    return {"run": str(run), **result, "dtype": _dtype_of(net)}


def _dtype_of(net: Transformer) -> str:
    return str(net.W_E.dtype)


def attack_run(
    run: str | os.PathLike,
    budget: int = 1,
    method: str = "all",
    seed: int = 0,
    divergence: str = "kl",
    task: str | os.PathLike | None = None,
    save: bool = True,
    adversary_basis: str = "own",
    progress: bool = False,
    dtype: str | None = None,
) -> dict[str, Any]:
    """:func:`attack_explanation` on a run folder; writes ``attack.json`` into it (atomically).
    The model runs in ``dtype`` (default: the dtype the run was trained in).

    While it runs it holds the run's lock, so it never writes into a run being replaced.
    """
    expl, net, folder = open_run(run, dtype=dtype)
    with runs.run_lock(run) if save else contextlib.nullcontext():
        result = {
            **attack_explanation(
                expl,
                net,
                run_task(expl, folder, task),
                budget,
                method,
                seed,
                divergence,
                adversary_basis,
                progress=progress,
            ),
            "run": str(run),
            "dtype": _dtype_of(net),
        }
        if save:
            from explainer.models.native import write_json

            write_json(Path(run) / "attack.json", result)
    return result
