"""Frontier metrics: how faithful explanations are across a ladder of sizes, as single numbers.

For an explanation ``C`` with metric ``m`` (the mean logit difference on held-out prompts), the
*normalised faithfulness* is ``f(C) = (m(C) − m(∅)) / (m(N) − m(∅))``: ``m(N)`` is the full model
(every unit kept), ``m(∅)`` the model with every unit of every masked site ablated. ``f = 1``
recovers the full model, ``f = 0`` does no better than nothing. Both ends depend on the ablation.

The frontier's areas are the MIB benchmark's (Mueller et al. 2025, circuit localisation track;
:func:`mib_areas`): MIB builds one explanation per budget of 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50 and
100 % of the units (``int(p * total)`` units each, :func:`mib_ladder`) and joins their ``f`` by
trapezoids over the *percentages themselves*. A frontier built on another ladder offers, at each
percentage, its explanation for the largest budget within it (the empty one, ``f = 0``, below its
smallest budget; the full model, ``f = 1``, at 100 % when it has none for that budget).

- **CPR** (circuit performance ratio): ``∫ f`` over that ladder; higher is better (at most 0.999).
- **CMD** (circuit–model distance): ``∫ |1 − f|``; lower is better (0 = faithful at every budget).

Beside them, :func:`mib_kl_area` takes the same trapezoids of the held-out KL, the quantity
training minimises (``kl_area``, nats; lower is better). It is not MIB's: a set can recover the
logit difference and still move the rest of the output distribution, and the reverse.

:func:`frontier_areas` is a second reading, not MIB's: trapezoids over the sizes the explanations
actually have (``size / total``). It rewards a method that offers few sizes (the straight line
between two of its points counts as if it had explanations in between), so it is reported beside
MIB's areas (``cpr_sizes``, ``cmd_sizes``) and never instead of them.

Causal scrubbing's **loss recovered** is the same normalisation applied to the task loss
``L = −log p(answers)``: ``(L(∅) − L(C)) / (L(∅) − L(N))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

MIB_PERCENTAGES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def mib_ladder(total: int, percentages: Sequence[float] = MIB_PERCENTAGES) -> list[int]:
    """MIB's sizes for ``total`` units: ``int(p * total)`` per percentage, without repeats.

    >>> mib_ladder(30)
    [0, 1, 3, 6, 15, 30]
    """
    return sorted({int(p * total) for p in percentages})


def normalized_faithfulness(m: float, m_empty: float, m_full: float) -> float:
    """``(m − m(∅)) / (m(N) − m(∅))``; NaN when the full model and the empty one agree.

    >>> normalized_faithfulness(3.0, 1.0, 5.0)
    0.5
    """
    span = m_full - m_empty
    return float((m - m_empty) / span) if span != 0 else float("nan")


def loss_recovered(loss: float, loss_empty: float, loss_full: float) -> float:
    """Causal scrubbing's loss recovered: ``(L(∅) − L) / (L(∅) − L(N))``.

    >>> loss_recovered(1.0, 2.0, 0.0)
    0.5
    """
    span = loss_empty - loss_full
    return float((loss_empty - loss) / span) if span != 0 else float("nan")


def mib_areas(
    budgets: Sequence[float | int], f: Sequence[float | int], total: int, percentages: Sequence[float] = MIB_PERCENTAGES
) -> tuple[float, float]:
    """``(CPR, CMD)`` as MIB computes them: trapezoids of ``f`` and ``|1 − f|`` over ``percentages``.

    ``budgets[i]`` is the number of units explanation ``i`` was built for (its size is at most
    that). At percentage ``p`` the frontier offers the explanation of the largest budget of at most
    ``int(p * total)`` units (the best ``f`` among equal budgets); below the smallest budget, the
    empty explanation (``f = 0``); at 100 %, the full model (``f = 1``) unless a budget is ``total``.

    >>> mib_areas([3], [1.0], 30)  # nothing below 3 units (0.1 %–5 %), faithful from 10 % on
    (0.925, 0.074)
    >>> mib_areas([0, 30], [0.0, 1.0], 30)  # faithful only as the full model
    (0.25, 0.749)
    """
    y = _mib_curve(budgets, f, total, percentages, empty=0.0, full=1.0, best=max)
    if y is None:
        return float("nan"), float("nan")
    return round(_trapezoids(percentages, y), 12), round(_trapezoids(percentages, np.abs(1.0 - y)), 12)


def mib_kl_area(
    budgets: Sequence[float | int],
    kl: Sequence[float],
    total: int,
    empty_kl: float,
    percentages: Sequence[float] = MIB_PERCENTAGES,
) -> float:
    """Trapezoids of the KL (nats) over MIB's percentages, read as :func:`mib_areas` reads ``f``:
    the explanation of the largest budget within each percentage (the lowest KL among equal
    budgets), the empty explanation's ``empty_kl`` below the smallest budget, and the full model
    (KL 0) at 100 % when no budget is ``total``. Lower is better; 0 is faithful at every budget.

    Not one of MIB's areas (those use the logit difference): this one measures the KL that
    training minimises, on the same ladder, so that the two readings can be set side by side.

    >>> mib_kl_area([3], [0.0], 30, empty_kl=2.0)  # the empty set's 2 nats up to 5 %, faithful from 10 %
    0.148
    """
    y = _mib_curve(budgets, kl, total, percentages, empty=float(empty_kl), full=0.0, best=min)
    return float("nan") if y is None else round(_trapezoids(percentages, y), 12)


def _mib_curve(budgets, values, total: int, percentages, empty: float, full: float, best) -> np.ndarray | None:
    """The value the frontier offers at each percentage (see :func:`mib_areas`); ``None`` when no
    value is finite. ``best`` picks among explanations of equal budget (``max`` for ``f``)."""
    if total <= 0:
        raise ValueError(f"total must be a positive number of units, got {total}")
    by_budget: dict[int, float] = {}
    for b, v in zip(budgets, values, strict=True):
        if np.isfinite(v):
            by_budget[int(b)] = best(by_budget.get(int(b), float(v)), float(v))
    if not by_budget:
        return None
    points = sorted(by_budget.items())
    y = []
    for p in percentages:
        k = int(p * total)
        within = [(b, v) for b, v in points if b <= k]
        if k >= total and (not within or within[-1][0] < total):
            y.append(full)
        else:
            y.append(within[-1][1] if within else empty)
    return np.asarray(y, np.float64)


def _trapezoids(x: Sequence[float], y: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def frontier_areas(sizes: Sequence[float | int], f: Sequence[float | int], total: int) -> tuple[float, float]:
    """Areas over the sizes explanations have (not MIB's; see the module docstring): trapezoids of
    ``f`` and ``|1 − f|`` over ``size / total``.

    Points are sorted by size; points of equal size keep the best ``f`` (a method may offer
    several explanations of one size). ``(1, 1)``, the full model, is appended when the largest
    size is below ``total``. Nothing is added at size 0.

    >>> frontier_areas([0, 15, 30], [0.0, 1.0, 1.0], 30)  # a triangle, then a square
    (0.75, 0.25)
    >>> frontier_areas([15], [0.5], 30)  # the full model's point is appended
    (0.375, 0.125)
    """
    if total <= 0:
        raise ValueError(f"total must be a positive number of units, got {total}")
    best: dict[float, float] = {}
    for size, value in zip(sizes, f, strict=True):
        if not np.isfinite(value):
            continue
        x = float(size) / total
        best[x] = max(best.get(x, -np.inf), float(value))
    if not best:
        return float("nan"), float("nan")
    if max(best) < 1.0:
        best[1.0] = 1.0
    x = np.array(sorted(best))
    y = np.array([best[v] for v in x])
    cpr = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))
    gap = np.abs(1.0 - y)
    cmd = float(np.sum(np.diff(x) * (gap[1:] + gap[:-1]) / 2))
    return cpr, cmd


def smallest_size(records: Sequence[dict[str, Any]], max_kl: float = 0.01, key: str = "kl_mean") -> int | None:
    """The smallest ``size`` among ``records`` whose ``key`` is at most ``max_kl`` (``None`` if none).

    >>> smallest_size([{"size": 1, "kl_mean": 0.5}, {"size": 3, "kl_mean": 0.0}, {"size": 2, "kl_mean": 0.01}])
    2
    """
    sizes = [int(r["size"]) for r in records if r.get(key) is not None and r[key] <= max_kl]
    return min(sizes) if sizes else None


def add_normalized(scores: list[dict[str, float]], empty: dict[str, float]) -> list[dict[str, float]]:
    """Each score with ``normalized_faithfulness`` and ``loss_recovered`` against ``empty`` (m(∅)).

    >>> add_normalized([{"logit_diff": 2.0, "logit_diff_full": 4.0, "loss": 1.0, "loss_full": 0.0}],
    ...                {"logit_diff": 0.0, "loss": 2.0})[0]["normalized_faithfulness"]
    0.5
    """
    out = []
    for s in scores:
        f = normalized_faithfulness(s["logit_diff"], empty["logit_diff"], s["logit_diff_full"])
        lr = loss_recovered(s["loss"], empty["loss"], s["loss_full"])
        out.append({**s, "normalized_faithfulness": f, "loss_recovered": lr})
    return out


def empty_mask(n_units: dict[str, int]) -> dict[str, np.ndarray]:
    return {s: np.zeros(n, np.float32) for s, n in n_units.items()}


def full_mask(n_units: dict[str, int]) -> dict[str, np.ndarray]:
    return {s: np.ones(n, np.float32) for s, n in n_units.items()}
