"""Measuring an explanation that exists: its model and task, its scrubber, faithfulness, attacks.

The functions behind ``explainer eval`` and ``explainer attack`` and behind
:meth:`explainer.Explanation.evaluate` and :meth:`~explainer.Explanation.attack`. They take an
explanation (saved or not) with the model and task it explains; :func:`run_model` and
:func:`run_task` find those for a saved one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from explainer import rewrites
from explainer.errors import ExplainerError
from explainer.illusion import check_illusions
from explainer.masks import as_mask
from explainer.models import load_model, weights_sha256
from explainer.models.transformer import Transformer
from explainer.optimal import for_mask
from explainer.progress import Timings
from explainer.score import evaluate_keep
from explainer.scrub import Scrubber
from explainer.tasks import Task, resolve_task
from explainer.tasks.base import Batch
from explainer.train.config import check_dtype
from explainer.verdicts import attack_verdict, faithfulness_warnings
from explainer.zoo import resolve_model


def run_model(expl: Any, check_weights: bool = True, dtype: str | None = None) -> tuple[Transformer, Path]:
    """The model a saved explanation explains (with its rewrites), and the model's folder; refuses
    when the model is gone or its weights changed since the run was trained. Its weights are in
    ``dtype``, by default the one the run was trained in (float32 for runs that record none)."""
    run = expl.path
    name, path = expl.model.get("name"), expl.model.get("path")
    if not name and not path:
        raise ExplainerError(
            "this explanation was learned on a model given as an object with no folder; evaluate it in the "
            "same session, or save the model as a folder (explainer.models.save_model) and train on that"
        )
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
    dtype = check_dtype(dtype or expl.config.get("dtype", "float32"))
    net = rewrites.from_tensors(load_model(folder, dtype), expl.config.get("rewrites"), expl.rewrites or {}, str(run))
    if expl.config.get("units", "dims") == "edges":
        _check_edge_run(expl, net, run, folder)
        return net, folder
    missing = [s for s in expl.n_units if s not in net.sites]
    d, positional = net.config.d_model, bool(expl.config.get("positional", False))
    widths = [n for s, n in expl.n_units.items() if not rewrites.is_rest(s)]
    if missing or any((n % d if positional else n - d) != 0 for n in widths):
        raise ExplainerError(f"run {str(run)!r} does not match model {str(folder)!r} (sites {missing}); retrain")
    return net, folder


def _check_edge_run(expl: Any, net: Transformer, run, folder) -> None:
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


def run_scrubber(expl: Any, model: Transformer, train: Batch, ablation: str | None = None) -> Scrubber:
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
    learned = getattr(expl, "constants", None) if ablation == expl.config.get("ablation") else None
    if learned and any(np.shape(learned.get(s)) != np.shape(c) for s, c in (scrubber.means or {}).items()):
        learned = None  # constants learned for prompts of another length: start from the means alone
    return for_mask(scrubber, train, expl.mask(), int(expl.config.get("seed", 0)), learned)


def run_task(expl: Any, folder: Path, task: Any = None) -> Task:
    """The task a run was trained on (or ``task`` instead, when given)."""
    if task is not None:
        return resolve_task(task, folder)
    record = expl.task
    if record.get("source") == "inline":
        raise ExplainerError(
            f"run {str(expl.path)!r} was trained on prompts given in Python, which it does not hold; "
            "pass the task again (--task PROMPTS.json, or task= in Python)"
        )
    if record.get("source") == "file":
        return resolve_task(record["path"], folder)
    if record.get("source") == "builtin":
        return resolve_task(record["name"], folder)
    return resolve_task(None, folder)


def evaluate_explanation(expl: Any, model: Transformer, task: Task, ablation: str | None = None) -> dict[str, Any]:
    """Re-measure an explanation on ``task``'s held-out prompts (optionally under another ablation):
    the fields of ``explainer eval --json`` but ``run``."""
    task.check(model.config)
    ablation = ablation or expl.config.get("ablation", "resample")
    scrubber = run_scrubber(expl, model, task.train_data(), ablation)
    scores = evaluate_keep(scrubber, task.heldout_data(), as_mask(expl.mask()), int(expl.config.get("seed", 0)))
    units = expl.config.get("units", "dims")
    n_wrong = int(task.heldout_data().wrong_answers.shape[1])
    same = ablation == expl.config.get("ablation", "resample")  # the KL budget was set for this ablation
    return {
        "warnings": faithfulness_warnings(scores, expl.config if same else {}, n_wrong),
        "size": expl.size,
        "kept": expl.kept,
        "ablation": ablation,
        "task": task.name,
        "faithfulness": scores,
        "basis": expl.config.get("basis", "standard"),
        "units": units,
        "illusion": {}  # an edge is a whole writer's output, not a direction of the reader's input
        if units == "edges"
        else check_illusions(
            model, task.train_data(), expl.kept, expl.bases, bool(expl.config.get("positional", False))
        ),
    }


def attack_explanation(
    expl: Any,
    model: Transformer,
    task: Task,
    budget: int = 1,
    method: str = "all",
    seed: int = 0,
    divergence: str = "kl",
    adversary_basis: str = "own",
    threshold: float | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Grade an explanation (saved or not) with the discrete adversaries, on held-out prompts.

    ``method`` is ``greedy``, ``random``, ``gradient``, ``exhaustive``, ``learned`` or ``all``
    (every method that fits; the strongest is reported, with the per-method list under
    ``methods`` and any method left out, e.g. exhaustive where its sets are too many or too costly
    to score them all, under ``skipped``).
    ``adversary_basis`` ``random`` or ``learned`` makes the adversary re-include directions of its
    own rotation of the excluded subspace (:mod:`adversary.rotation`); the result then also
    holds the re-included ``directions`` (residual vectors per site).

    The result says ``verdict`` ``robust`` or ``fragile``: whether the strongest attack's mean KL gap
    stays within ``threshold`` nats (default: the explanation's KL budget), and names the
    re-included units (``reincluded_names``: ``site:unit``, or ``writer->reader`` for edges).
    ``progress`` announces each phase on stderr (``prepare``, then each method), with a line at
    most every ``adversary.discrete.PROGRESS_EVERY`` seconds while a method runs; ``timings`` holds
    each phase's seconds.
    """
    from adversary.discrete import METHODS, attack, attack_all, check_request
    from adversary.rotated import adversary_bases
    from adversary.rotation import check_adversary_basis, directions

    if method != "all" and method not in METHODS:
        from explainer.errors import did_you_mean

        raise ExplainerError(f"unknown attack method {method!r}; {did_you_mean(method, (*METHODS, 'all'))}")
    check_adversary_basis(adversary_basis)
    task.check(model.config)
    timings = Timings()
    keep = expl.mask()
    check_request(keep, budget, divergence)  # before anything is announced or run
    key = jax.random.key(seed)
    batch = task.heldout_data()
    with timings.phase("prepare", say=progress):  # the scrubber, and the adversary's basis when rotated
        scrubber = run_scrubber(expl, model, task.train_data())
        bases = adversary_bases(scrubber, batch, keep, adversary_basis, budget, key, divergence)
        scrubber = scrubber.with_bases(bases)  # kept units mean the same; excluded ones are rotated
    basis = {"adversary_basis": adversary_basis}
    if method != "all":
        result = attack(scrubber, batch, keep, budget, method, key, divergence, progress, timings).to_json()
        result = {**result, "seed": seed, **basis, "directions": directions(bases, result["reincluded"])}
    else:
        best, every = attack_all(scrubber, batch, keep, budget, key, divergence, progress=progress, timings=timings)
        ran = [r.method for r in every]
        result = {
            **best.to_json(),
            "method": "all",
            "strongest": best.method,
            "methods": [r.to_json() for r in every],
            "skipped": [m for m in METHODS if m not in ran],
            "seed": seed,
            **basis,
            "directions": directions(bases, best.reincluded),
        }
    result["timings"] = timings.rounded()
    names = unit_names(expl, model, result["reincluded"])
    threshold = float(expl.config.get("kl_budget", 0.01)) if threshold is None else float(threshold)
    text = ", ".join(names) or "nothing"
    return {**result, "reincluded_names": names, **attack_verdict(result["gap"]["kl_mean"], threshold, budget, text)}


def unit_names(expl: Any, model: Transformer, units: dict[str, list[int]]) -> list[str]:
    """Readable names of some units of ``expl``: ``writer->reader`` for edges, ``site:unit`` for
    dimensions; sites with no units are left out."""
    if expl.config.get("units", "dims") == "edges":
        from explainer import edges

        named = edges.edge_names(model.config, [s for s in units if units[s]])
        return [named[s][u] for s, us in units.items() for u in us]
    return [f"{s}:{u}" for s, us in units.items() for u in us]
