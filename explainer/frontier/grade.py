"""Grading: any list of keep masks measured as a frontier.

:func:`grade_masks` measures masks the same way whoever made them (a sweep's rungs, a baseline's
rankings): held-out faithfulness, normalised faithfulness and loss recovered, the strongest
discrete attack's gap at a budget, MIB's CPR and CMD, and the same numbers under other ablations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np

from explainer.frontier import (
    add_normalized,
    empty_mask,
    frontier_areas,
    mib_areas,
    mib_kl_area,
)
from explainer.frontier.ladder import (
    Mask,
)
from explainer.progress import progress_bar, say
from explainer.score import measure
from explainer.scrub import Scrubber, check_ablation
from explainer.tasks.base import Batch

ATTACK_METHODS = ("greedy", "gradient")


def _size(mask: Mask) -> int:
    return int(sum(int(np.sum(np.asarray(v) > 0.5)) for v in mask.values()))


def _kept(mask: Mask) -> dict[str, list[int]]:
    return {s: [int(u) for u in np.flatnonzero(np.asarray(v) > 0.5)] for s, v in mask.items()}


def _scores(scrubber: Scrubber, train: Batch, heldout: Batch, masks: list[Mask], seed: int):
    """Held-out scores of ``masks`` (with normalisation) and the constants used (``optimal``)."""
    everything = [empty_mask(scrubber.n_units), *masks]
    constants = None
    if scrubber.ablation == "optimal":
        from explainer.optimal import fit_constants

        constants = fit_constants(scrubber, train, everything, seed=seed)
    scores = measure(scrubber, heldout, everything, seed, constants)
    empty = scores[0]
    return add_normalized(scores[1:], empty), (constants[1:] if constants else None), empty["kl_mean"]


def _gap(scrubber: Scrubber, heldout: Batch, mask: Mask, budget: int, seed: int, methods) -> dict[str, Any]:
    from adversary.discrete import attack_all

    excluded = sum(int((np.asarray(v) < 0.5).sum()) for v in mask.values())
    if excluded == 0 or budget < 1:
        return {"gap": 0.0, "gap_max": 0.0, "attack": None}
    best, _ = attack_all(scrubber, heldout, mask, min(budget, excluded), jax.random.key(seed), methods=methods)
    return {
        "gap": best.gap["kl_mean"],
        "gap_max": best.gap["kl_max"],
        "attack": {"method": best.method, "budget": best.budget, "reincluded": best.reincluded},
    }


def _areas(
    records: list[dict[str, Any]], total: int, budgets: Sequence[int] | None, empty_kl: float
) -> dict[str, float]:
    """MIB's CPR and CMD over the budgets (the sizes when there are none), the same reading of the
    held-out KL (``kl_area``), and the areas over sizes."""
    sizes = [r["size"] for r in records]
    f = [r["normalized_faithfulness"] for r in records]
    cpr, cmd = mib_areas(sizes if budgets is None else budgets, f, total)
    kl_area = mib_kl_area(sizes if budgets is None else budgets, [r["kl_mean"] for r in records], total, empty_kl)
    cpr_sizes, cmd_sizes = frontier_areas(sizes, f, total)
    return {"cpr": cpr, "cmd": cmd, "kl_area": kl_area, "cpr_sizes": cpr_sizes, "cmd_sizes": cmd_sizes}


def ablation_frontiers(
    scrubber: Scrubber,
    train: Batch,
    heldout: Batch,
    masks: list[Mask],
    ablations: Sequence[str],
    seed: int = 0,
    budgets: Sequence[int] | None = None,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """The same masks' faithfulness, normalised faithfulness, CPR and CMD under each ablation
    (``optimal``: constants fitted for each mask). ``progress``: a line per ablation."""
    total = sum(scrubber.n_units.values())
    out = {}
    for ablation in ablations:
        check_ablation(ablation)
        if progress:
            say(f"grade: {len(masks)} masks under the {ablation} ablation")
        other = Scrubber.build(scrubber.model, train, scrubber.sites, ablation, scrubber.bases, units=scrubber.units)
        scores, _, empty_kl = _scores(other, train, heldout, masks, seed)
        keys = ("kl_mean", "kl_p99", "logit_diff_recovered", "accuracy", "normalized_faithfulness", "loss_recovered")
        records = [{"size": _size(m), **{k: s[k] for k in keys}} for m, s in zip(masks, scores, strict=True)]
        out[ablation] = {"records": records, **_areas(records, total, budgets, empty_kl)}
    return out


def grade_masks(
    scrubber: Scrubber,
    train: Batch,
    heldout: Batch,
    masks: Sequence[Mask],
    budget: int = 2,
    seed: int = 0,
    ablations: Sequence[str] = (),
    attack_methods: Sequence[str] = ATTACK_METHODS,
    progress: bool = False,
    budgets: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Frontier records of any keep masks (ours or a baseline's), with CPR and CMD.

    Each record has ``size``, ``kept``, the held-out faithfulness (``kl_mean``, ``kl_p99``,
    ``logit_diff_recovered``, ``accuracy``, ...), ``normalized_faithfulness``, ``loss_recovered``
    and ``gap`` (the mean KL gap of the strongest of ``attack_methods`` at ``budget``; 0 when
    nothing is excluded). ``ablations`` adds ``{"ablations": {name: {"records", "cpr", "cmd"}}}``.
    ``cpr`` and ``cmd`` are MIB's (:func:`explainer.frontier.mib_areas`) over ``budgets``, the
    number of units each mask was built for (default: its size); ``kl_area`` is the same reading
    of the held-out KL (:func:`explainer.frontier.mib_kl_area`, lower is better); ``cpr_sizes`` and
    ``cmd_sizes`` are the areas over the sizes the masks have
    (:func:`explainer.frontier.frontier_areas`).

    >>> import numpy as np
    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> from explainer.tasks import resolve_task
    >>> folder = resolve_model("planted-distractor")
    >>> task = resolve_task(None, folder)
    >>> scrubber = Scrubber.build(load_model(folder), task.train_data())
    >>> truth = {s: np.zeros(10) for s in scrubber.sites}
    >>> truth["blocks.0.attn.in"][0] = truth["unembed.in"][1] = 1
    >>> result = grade_masks(scrubber, task.train_data(), task.heldout_data(), [truth], budget=1)
    >>> round(result["records"][0]["normalized_faithfulness"], 3), result["records"][0]["gap"] < 1e-3
    (1.0, True)
    """
    masks = [{s: np.asarray(m[s], np.float32) for s in scrubber.sites} for m in masks]
    scores, constants, empty_kl = _scores(scrubber, train, heldout, masks, seed)
    records = []
    gaps: dict[Any, dict[str, Any]] = {}  # a mask given again (a rung a smaller one replaced): one attack
    with progress_bar(progress, len(masks), label="attacks") as advance:
        for i, (mask, s) in enumerate(zip(masks, scores, strict=True)):
            graded, key = scrubber, b"".join((mask[site] > 0.5).tobytes() for site in scrubber.sites)
            if constants is not None:  # each mask's own constants: no two attacks are the same
                graded, key = eqx.tree_at(lambda x: x.means, scrubber, constants[i]), i
            if key not in gaps:
                gaps[key] = _gap(graded, heldout, mask, budget, seed, attack_methods)
            records.append({"size": _size(mask), **s, **gaps[key]})
            records[-1]["kept"] = _kept(mask)
            advance(i + 1, f"size {records[-1]['size']}")
    total = sum(scrubber.n_units.values())
    result: dict[str, Any] = {
        "records": records,
        **_areas(records, total, budgets, empty_kl),
        "total_units": total,
        "ablation": scrubber.ablation,
        "budget": budget,
        "attack_methods": list(attack_methods),
    }
    if ablations:
        result["ablations"] = ablation_frontiers(scrubber, train, heldout, masks, ablations, seed, budgets, progress)
    return result
