"""Refusals before work starts, warnings after it, and an attack's verdict.

A request that cannot be met (a target size at or above the number of units) is refused before
any training starts, with the fix. A result that can be met but should not be trusted as it stands gets a warning: every
``train``, ``eval`` and ``sweep`` result carries a ``warnings`` list (empty when all is well) and
the CLI prints each on stderr.

>>> check_target_size(3, {"unembed.in": 10})
>>> check_target_size(10, {"unembed.in": 10})
Traceback (most recent call last):
...
explainer.errors.ExplainerError: target size 10 is not below this explanation's 10 units; ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from explainer.errors import ExplainerError

WEAK_LOGIT_DIFF = 0.1  # nats: a full model whose mean logit difference is below this barely does the task
WEAK_ACCURACY_MARGIN = 0.1  # a full model within this of chance accuracy barely does the task
ABOVE_ONE = 0.02  # recovered faithfulness above 1 by more than this is flagged
MOST_UNITS = 0.5  # an explanation keeping more than this share of the units explains little


def check_target_size(target_size: int | None, n_units: Mapping[str, int]) -> None:
    """Refuse a target size the units cannot make smaller than everything."""
    total = sum(n_units.values())
    if target_size is not None and target_size >= total:
        raise ExplainerError(
            f"target size {target_size} is not below this explanation's {total} units; pick a target size "
            f"below {total} (or drop --target-size to find the smallest explanation within the KL budget)"
        )


def full_model_warnings(faithfulness: Mapping[str, Any], n_wrong: int) -> list[str]:
    """Warnings when the full model itself barely does the task (its logit difference or accuracy)."""
    ld, acc = faithfulness.get("logit_diff_full"), faithfulness.get("accuracy_full")
    chance = 1.0 / (1 + max(1, n_wrong))
    if ld is not None and ld < WEAK_LOGIT_DIFF:
        return [
            f"the full model barely does this task (mean logit difference {ld:.3g} nats, accuracy {acc:.3g}): "
            "faithfulness to it, and 'recovered' ratios, mean little; check the task's answers or the model"
        ]
    if acc is not None and acc < chance + WEAK_ACCURACY_MARGIN:
        return [
            f"the full model's accuracy {acc:.3g} is near chance ({chance:.3g}): faithfulness to it means little; "
            "check the task's answers or the model"
        ]
    return []


def faithfulness_warnings(
    faithfulness: Mapping[str, Any], config: Mapping[str, Any], n_wrong: int, heldout: bool = True
) -> list[str]:
    """Warnings about an explanation's measured faithfulness: over its KL budget, a recovered ratio
    above 1, or a full model that barely does the task."""
    weak = full_model_warnings(faithfulness, n_wrong)
    out = list(weak)
    kl, budget = faithfulness.get("kl_mean"), config.get("kl_budget")
    where = "held-out" if heldout else "measured"
    trained_to_budget = config.get("lam") is None and config.get("target_size") is None
    if trained_to_budget and kl is not None and budget and kl > budget:
        out.append(
            f"{where} KL mean {kl:.3g} nats is over the KL budget {budget:g}: the explanation is less faithful on "
            "prompts it was not trained on; give more prompts or --steps, or a smaller --kl-budget for headroom"
        )
    ldr = faithfulness.get("logit_diff_recovered")
    if ldr is not None and ldr > 1 + ABOVE_ONE and not weak:
        out.append(
            f"logit difference recovered {ldr:.3f} is above 1: the scrubbed model is more confident than the full "
            "model, so this ratio overstates faithfulness; read the KL instead"
        )
    return out


def size_warnings(size: int, total: int, units: str, basis: str) -> list[str]:
    """A warning, with what to try, when an explanation keeps most of the units."""
    if total < 8 or size <= MOST_UNITS * total:
        return []
    if units == "dims" and basis == "standard":
        hint = (
            "residual codes of trained models are dense in the standard basis; try --basis learned --trim "
            "(a rotation learned with the mask; training costs about 1.5-2x) or --units edges (writers "
            "into readers; about 2-4x per step)"
        )
    else:
        hint = "the behaviour may need most of the model at this KL budget; try a larger --kl-budget"
    return [f"the explanation keeps {size} of {total} units ({100 * size / total:.0f}%): {hint}"]


def prompt_warnings(n_train: int, batch_size: int) -> list[str]:
    """A warning when the task has fewer training prompts than one batch."""
    if n_train >= batch_size:
        return []
    return [
        f"the task has {n_train} training prompts, fewer than the batch of {batch_size}: every step repeats "
        f"prompts and held-out numbers rest on few examples; give more prompts (or --batch-size {n_train})"
    ]


def train_warnings(explanation: Any, n_train: int, n_wrong: int) -> list[str]:
    """Every warning about a freshly trained explanation."""
    config = explanation.config
    return (
        prompt_warnings(n_train, int(config.get("batch_size", 64)))
        + faithfulness_warnings(explanation.faithfulness, config, n_wrong)
        + size_warnings(
            explanation.size, explanation.total_units, config.get("units", "dims"), str(config.get("basis"))
        )
    )


def sweep_warnings(result: Mapping[str, Any], n_train: int, batch_size: int, n_wrong: int) -> list[str]:
    """Warnings about a graded frontier: rungs above their target size, faithfulness above 1 or a
    CPR outside what MIB's ladder allows (under any ablation), a weak full model, few prompts."""
    records = result["records"]
    out = prompt_warnings(n_train, batch_size)
    if records:
        out += full_model_warnings(records[-1], n_wrong)
    if result.get("mode") == "sizes":
        for r in records:
            if r["size"] > r.get("target", r["size"]):
                out.append(f"the rung for {r['target']} units kept {r['size']}: it missed its size")
    graded = {"": result, **{f" under {k}": v for k, v in result.get("ablations", {}).items()}}
    for where, g in graded.items():
        high = [r for r in g["records"] if r.get("normalized_faithfulness", 0.0) > 1 + ABOVE_ONE]
        if high:
            worst = max(r["normalized_faithfulness"] for r in high)
            out.append(
                f"normalised faithfulness{where} reaches {worst:.3f}, above 1: those explanations beat the full "
                "model's logit difference, which CPR then rewards; read the KL area beside it"
            )
        if not 0.0 <= g.get("cpr", 0.0) <= 1.0:
            out.append(f"CPR{where} is {g['cpr']:.3f}, outside [0, 1], which MIB's ladder allows; read the KL area")
    return out


def attack_verdict(gap: float, threshold: float, budget: int, reincluded: str) -> dict[str, Any]:
    """Robust or fragile at ``budget``: the attack's mean KL gap against ``threshold`` (nats).

    >>> attack_verdict(0.5, 0.01, 2, "unembed.in 3")["verdict"]
    'fragile'
    """
    robust = gap <= threshold
    if robust:
        units = "1 unit" if budget == 1 else f"up to {budget} units"
        text = f"robust at budget {budget}: no re-inclusion of {units} moved KL by more than {threshold:g}"
    else:
        text = f"fragile at budget {budget}: re-including {reincluded} moves KL by {gap:.3g} nats (> {threshold:g})"
    return {"verdict": "robust" if robust else "fragile", "threshold": threshold, "verdict_text": text}
