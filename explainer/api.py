"""The plain functions behind the CLI: the same code path for notebooks and the command line."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from explainer import resume as resume_files
from explainer import rewrites
from explainer.bases import build_bases, matrices
from explainer.config import TrainConfig, from_dict, load_config
from explainer.errors import ExplainerError
from explainer.explanation import Explanation, check_writable, load
from explainer.illusion import check_illusions
from explainer.lock import run_lock
from explainer.masks import Mask, as_mask
from explainer.metrics import faithfulness
from explainer.models import load_model, resolve_model, weights_sha256
from explainer.models.transformer import Transformer
from explainer.models.zoo import ZOO_DIR
from explainer.optimal import for_mask
from explainer.scrub import Scrubber
from explainer.tasks import Task, resolve_task
from explainer.tasks.base import Batch
from explainer.train import InLoopAdversary, fit


def _model_record(folder: Path) -> dict[str, Any]:
    folder = folder.resolve()
    in_zoo = folder.parent == ZOO_DIR.resolve()
    return {"name": folder.name if in_zoo else None, "path": str(folder), "sha256": weights_sha256(folder)}


def _task_record(task_arg: str | os.PathLike | None, task: Task) -> dict[str, Any]:
    if task_arg is None:
        return {"name": task.name, "source": "model"}
    text = str(task_arg)
    if Path(text).is_file():
        return {"name": task.name, "source": "file", "path": str(Path(text).resolve())}
    return {"name": task.name, "source": "builtin"}


def evaluate_keep(scrubber: Scrubber, batch: Batch, keep: Mask, seed: int = 0, chunk: int = 512) -> dict[str, float]:
    """Faithfulness of a (binary) keep mask on ``batch``, in chunks, as plain floats."""

    @eqx.filter_jit
    def run(scrubber, part: Batch, key):
        full, repl = scrubber.reference(part, key)
        return full, scrubber.logits(part.clean, keep, repl)

    fulls, scrubbed = [], []
    key = jax.random.key(seed)
    for start in range(0, len(batch), chunk):
        part = batch.take(jnp.arange(start, min(start + chunk, len(batch))))
        full, logits = run(scrubber, part, jax.random.fold_in(key, start))
        fulls.append(full)
        scrubbed.append(logits)
    return faithfulness(jnp.concatenate(fulls), jnp.concatenate(scrubbed), batch.answers, batch.wrong_answers)


def explain(
    model: str | os.PathLike = "planted-distractor",
    task: str | os.PathLike | None = None,
    config: TrainConfig | str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    adversary: InLoopAdversary | str | None = "learned",
    progress: bool = True,
    resume: bool = False,
    **settings: Any,
) -> Explanation:
    """Learn an explanation of ``model`` on ``task``; save it to ``out`` when given.

    ``model`` is a zoo name or a model folder; ``task`` a prompts file, a built-in task name, or
    ``None`` for the model folder's own ``prompts.json``. ``settings`` override ``config``
    (a :class:`TrainConfig` or a TOML file), e.g. ``steps=500, lam=0.05``. ``adversary`` is
    ``"learned"`` (the default: an adversary trained in the loop tries to re-include excluded
    units, and the explanation learns to be robust to it), ``"none"``, or an adversary object.

    With ``out``, training holds the lock ``OUT.lock`` and checkpoints into ``OUT.partial/`` every
    ``checkpoint_every`` steps; ``resume=True`` continues such an unfinished run (see
    :func:`resume_run`, which reads its settings back).

    >>> e = explain("planted-joint", seed=1, progress=False)
    >>> e.kept
    {'blocks.0.attn.in': [0], 'blocks.0.mlp.in': [1, 2], 'unembed.in': [3]}
    """
    if not isinstance(config, TrainConfig):
        config = load_config(config) if config is not None else TrainConfig()
    config = config.replace(**settings)
    if out is not None and not resume:
        check_writable(Path(out), overwrite)
        if not overwrite:
            resume_files.refuse_unfinished(out)
    if resume and out is None:
        raise ExplainerError("resume=True needs the run folder to continue (out)")
    if isinstance(adversary, str) or adversary is None:
        from adversary.learned import make_adversary

        adversary = make_adversary(adversary)
    if adversary is not None and config.adversary_weight == 0:
        raise ExplainerError("adversary_weight is 0, so the adversary would learn nothing; use adversary 'none'")
    folder = resolve_model(model)
    net = load_model(folder)
    the_task = resolve_task(task, folder)
    the_task.check(net.config)
    net = rewrites.rewrite(net, the_task.train_data(), config.rewrites)  # MLP = f + rest, rest one unit
    scrubber = Scrubber.build(
        net,
        the_task.train_data(),
        rewrites.with_rest_sites(config.sites, net),
        config.ablation,
        build_bases(config.basis, net, the_task.train_data(), config.sites or net.sites),
        positional=config.positional,
        units=config.units,
    )
    if out is None:
        return _explanation(scrubber, the_task, folder, task, config, adversary, progress)
    record = {
        "model": _model_record(folder),
        "task": str(Path(task).resolve()) if task is not None and Path(task).is_file() else task,
        "config": config.to_json(),
        "adversary": getattr(adversary, "name", None),
        "adversary_settings": dataclasses.asdict(adversary) if dataclasses.is_dataclass(adversary) else None,
        "overwrite": overwrite,
    }
    with run_lock(out):
        if resume:
            _check_same_run(out, record)
            checkpoints = resume_files.checkpoint_folder(out)
        else:
            check_writable(Path(out), overwrite)  # again, now that we hold the lock
            checkpoints = resume_files.start(out, record, overwrite)
        try:
            result = _explanation(scrubber, the_task, folder, task, config, adversary, progress, checkpoints)
        except BaseException:
            resume_files.discard_if_empty(out)
            raise
        result.save(out, overwrite=True if resume else overwrite)
        resume_files.finish(out)
    return result


def _explanation(scrubber, the_task, folder, task, config, adversary, progress, checkpoints=None) -> Explanation:
    started = time.perf_counter()
    kept, gates, history = fit(scrubber, the_task.train_data(), config, adversary, progress, checkpoints)
    history["seconds"] = [time.perf_counter() - started]
    scrubber = scrubber.with_bases(gates.bases)  # a learned basis as trained
    return Explanation(
        kept={site: [int(u) for u in v.nonzero()[0]] for site, v in kept.items()},
        n_units=scrubber.n_units,
        gate_logits={site: jax.device_get(v) for site, v in gates.logits.items()},
        bases=matrices(scrubber.bases) or None,
        model=_model_record(folder),
        task=_task_record(task, the_task),
        config={**config.to_json(), "adversary": getattr(adversary, "name", None)}
        | ({"adversary_basis": adversary.basis} if getattr(adversary, "basis", "own") != "own" else {}),
        faithfulness=evaluate_keep(
            for_mask(scrubber, the_task.train_data(), kept, config.seed),  # optimal: fitted for this mask
            the_task.heldout_data(),
            as_mask(kept),
            config.seed,
        ),
        history=history,
        rewrites=rewrites.tensors(scrubber.model) or None,
        rewrite_report=rewrites.carried(
            scrubber.model, the_task.train_data(), the_task.heldout_data(), config.ablation, config.seed
        )
        or None,
    )


def _check_same_run(out: str | os.PathLike, record: dict[str, Any]) -> None:
    """Refuse to resume ``out`` with anything other than what it was started with."""
    recorded = resume_files.read_record(out)
    if not recorded["overwrite"] and (Path(out) / "explanation.json").is_file():
        resume_files.finish(out)
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
    record = resume_files.read_record(run)
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


def open_run(run: str | os.PathLike, check_weights: bool = True) -> tuple[Explanation, Transformer, Path]:
    """Load a run with the model it explains, refusing if the model's weights changed since."""
    expl = load(run)
    name, path = expl.model.get("name"), expl.model.get("path")
    folder = resolve_model(name) if name else Path(str(path))
    if not folder.is_dir() or not (folder / "model.safetensors").is_file():
        raise ExplainerError(
            f"the model of run {str(run)!r} is gone: {str(folder / 'model.safetensors')!r} does not exist"
        )
    if check_weights and weights_sha256(folder) != expl.model.get("sha256"):
        raise ExplainerError(
            f"the weights in {str(folder)!r} changed since run {str(run)!r} was trained (sha256 differs); "
            "retrain the explanation on the current weights"
        )
    net = rewrites.from_tensors(load_model(folder), expl.config.get("rewrites"), expl.rewrites or {}, str(run))
    if expl.config.get("units", "dims") == "edges":
        _check_edge_run(expl, net, run, folder)
        return expl, net, folder
    missing = [s for s in expl.n_units if s not in net.sites]
    d, positional = net.config.d_model, bool(expl.config.get("positional", False))
    widths = [n for s, n in expl.n_units.items() if not rewrites.is_rest(s)]
    if missing or any((n % d if positional else n - d) != 0 for n in widths):
        raise ExplainerError(f"run {str(run)!r} does not match model {str(folder)!r} (sites {missing}); retrain")
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


def _check_edge_run(expl: Explanation, net: Transformer, run, folder) -> None:
    """An edge run's sites and unit counts must be the model's edge graph."""
    from explainer import edges

    try:
        expected = edges.edge_units(net.config, edges.check_edge_sites(net.config, list(expl.n_units)))
    except ExplainerError as error:
        raise ExplainerError(f"run {str(run)!r} does not match model {str(folder)!r}: {error}; retrain") from None
    if expected != expl.n_units:
        raise ExplainerError(
            f"run {str(run)!r} has {expl.n_units} edges per site but model {str(folder)!r} gives {expected}; retrain"
        )


def run_scrubber(expl: Explanation, model: Transformer, train: Batch, ablation: str | None = None) -> Scrubber:
    """The scrubbed model a run was trained with: its sites, ablation, bases and mask layout."""
    ablation = ablation or expl.config.get("ablation", "resample")
    positional = bool(expl.config.get("positional", False))
    units = expl.config.get("units", "dims")
    scrubber = Scrubber.build(model, train, list(expl.n_units), ablation, expl.basis_modules(), positional, units)
    if scrubber.n_units != expl.n_units:
        raise ExplainerError(
            f"run {str(expl.path)!r} has {expl.n_units} units per site but these prompts give {scrubber.n_units}; "
            "position-specific masks need prompts of the length they were trained on"
        )
    return for_mask(scrubber, train, expl.mask(), int(expl.config.get("seed", 0)))


def run_task(expl: Explanation, folder: Path, task: str | os.PathLike | None = None) -> Task:
    """The task a run was trained on (or ``task`` instead, when given)."""
    if task is not None:
        return resolve_task(task, folder)
    record = expl.task
    if record.get("source") == "file":
        return resolve_task(record["path"], folder)
    if record.get("source") == "builtin":
        return resolve_task(record["name"], folder)
    return resolve_task(None, folder)


def evaluate(
    run: str | os.PathLike, task: str | os.PathLike | None = None, ablation: str | None = None
) -> dict[str, Any]:
    """Re-measure a saved explanation on held-out prompts (optionally another task or ablation)."""
    expl, net, folder = open_run(run)
    the_task = run_task(expl, folder, task)
    the_task.check(net.config)
    ablation = ablation or expl.config.get("ablation", "resample")
    scrubber = run_scrubber(expl, net, the_task.train_data(), ablation)
    scores = evaluate_keep(scrubber, the_task.heldout_data(), as_mask(expl.mask()), int(expl.config.get("seed", 0)))
    return {
        "run": str(run),
        "size": expl.size,
        "kept": expl.kept,
        "ablation": ablation,
        "task": the_task.name,
        "faithfulness": scores,
        "basis": expl.config.get("basis", "standard"),
        "units": expl.config.get("units", "dims"),
        "illusion": {}  # an edge is a whole writer's output, not a direction of the reader's input
        if expl.config.get("units", "dims") == "edges"
        else check_illusions(
            net, the_task.train_data(), expl.kept, expl.bases, bool(expl.config.get("positional", False))
        ),
    }


def attack_explanation(
    expl: Explanation,
    model: Transformer,
    task: Task,
    budget: int = 1,
    method: str = "all",
    seed: int = 0,
    divergence: str = "kl",
    adversary_basis: str = "own",
) -> dict[str, Any]:
    """Grade an explanation (saved or not) with the discrete adversaries, on held-out prompts.

    ``method`` is ``greedy``, ``random``, ``gradient``, ``exhaustive``, ``learned`` or ``all``
    (every method that fits; the strongest is reported, with the per-method list under
    ``methods`` and any method left out, e.g. exhaustive with too many sets, under ``skipped``).
    ``adversary_basis`` ``random`` or ``learned`` makes the adversary re-include directions of its
    own rotation of the excluded subspace (:mod:`adversary.rotation`); the result then also
    holds the re-included ``directions`` (residual vectors per site).
    """
    from adversary.discrete import METHODS, attack, attack_all
    from adversary.rotation import adversary_bases, check_adversary_basis, directions

    if method != "all" and method not in METHODS:
        from explainer.errors import did_you_mean

        raise ExplainerError(f"unknown attack method {method!r}; {did_you_mean(method, (*METHODS, 'all'))}")
    check_adversary_basis(adversary_basis)
    task.check(model.config)
    scrubber = run_scrubber(expl, model, task.train_data())
    key = jax.random.key(seed)
    batch, keep = task.heldout_data(), expl.mask()
    bases = adversary_bases(scrubber, batch, keep, adversary_basis, budget, key, divergence)
    scrubber = scrubber.with_bases(bases)  # kept units mean the same; excluded ones are rotated
    basis = {"adversary_basis": adversary_basis}
    if method != "all":
        result = attack(scrubber, batch, keep, budget, method, key, divergence).to_json()
        return {**result, "seed": seed, **basis, "directions": directions(bases, result["reincluded"])}
    best, every = attack_all(scrubber, batch, keep, budget, key, divergence)
    ran = [r.method for r in every]
    return {
        **best.to_json(),
        "method": "all",
        "strongest": best.method,
        "methods": [r.to_json() for r in every],
        "skipped": [m for m in METHODS if m not in ran],
        "seed": seed,
        **basis,
        "directions": directions(bases, best.reincluded),
    }


def attack_run(
    run: str | os.PathLike,
    budget: int = 1,
    method: str = "all",
    seed: int = 0,
    divergence: str = "kl",
    task: str | os.PathLike | None = None,
    save: bool = True,
    adversary_basis: str = "own",
) -> dict[str, Any]:
    """:func:`attack_explanation` on a run folder; writes ``attack.json`` into it (atomically).

    While it runs it holds the run's lock, so it never writes into a run being replaced.
    """
    expl, net, folder = open_run(run)
    with run_lock(run) if save else contextlib.nullcontext():
        result = {
            **attack_explanation(
                expl, net, run_task(expl, folder, task), budget, method, seed, divergence, adversary_basis
            ),
            "run": str(run),
        }
        if save:
            from explainer.models.native import write_json

            write_json(Path(run) / "attack.json", result)
    return result
