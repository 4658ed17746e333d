"""How close our explanations are to the smallest faithful one, where exhaustive search can find it.

For each model small enough, this compares sizes at equal faithfulness: mean KL on held-out
prompts at most ``--max-kl`` (0.01 nats by default), and, for the explanation trained with the
adversary, robustness too (adversarial gap at budget ``--budget`` at most ``--max-gap``):

- **ours (no adversary)**: the size of :func:`explainer.explain` in ``kl_budget`` mode with that
  budget and ``adversary="none"``, over the **optimum**: the smallest ``k`` whose exhaustive
  optimum (the least-KL set of ``k`` units on the fitting prompts,
  :func:`explainer.baselines.exhaustive`) has held-out KL at most ``--max-kl``, trying
  ``k = 0, 1, 2, ...`` (:func:`explainer.frontier.smallest_size` over the optima);
- **ours (adversary)**: the default explanation (the learned adversary in the loop) over the
  **robust optimum**: the smallest ``k`` with a set of ``k`` units that is faithful as above and
  whose gap, by exhaustive attack at budget ``--budget`` on held-out prompts, is at most
  ``--max-gap`` (the ``--candidates`` least-KL faithful sets of each size are attacked).

On ``planted-cancel`` the two optima differ: two units already reproduce the output, but
re-including either unit of a cancelling pair then moves it, so the robust optimum is four units.

The ratios must be at most 1.1 (issue 5's acceptance). Exhaustive search runs while a size has at
most ``--max-sets`` sets: the planted models (20-30 units) and ``tracr-frac-prevs`` (65 units,
optimum of 3) qualify; the larger tracr models (80-369 units, optima of 5-7 units, more than 10^9
sets) and the trained models do not.

Run it with ``python benchmarks/optimality.py`` (several minutes on 2 CPU cores). It prints a
table and writes ``benchmarks/results/optimality.json`` with the exact command::

    python benchmarks/optimality.py --models planted-cancel
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import jax
import numpy as np
from _results import RESULTS_DIR, write_record
from rich.console import Console
from rich.table import Table

import explainer
from adversary.discrete import attack
from explainer.baselines import MAX_SETS, _fit_scorer, _unflat
from explainer.frontier import smallest_size
from explainer.models import load_model
from explainer.score import mean_kl, measure
from explainer.scrub import Scrubber
from explainer.tasks import resolve_task
from explainer.zoo import resolve_model

RESULTS = RESULTS_DIR / "optimality.json"
MODELS = ("planted-distractor", "planted-cancel", "planted-joint", "tracr-frac-prevs")
TARGET = 1.1


def _setup(name: str):
    folder = resolve_model(name)
    task = resolve_task(None, folder)
    train = task.train_data()
    return Scrubber.build(load_model(folder), train), train, task.heldout_data()


def _kept(mask: dict) -> dict[str, list[int]]:
    return {s: [int(u) for u in np.flatnonzero(np.asarray(v) > 0.5)] for s, v in mask.items() if np.any(v)}


def gap(scrubber: Scrubber, heldout, mask: dict, budget: int, seed: int) -> float:
    """The exact gap at ``budget`` (exhaustive attack), in mean KL nats."""
    excluded = sum(int((np.asarray(v) < 0.5).sum()) for v in mask.values())
    if excluded == 0:
        return 0.0
    result = attack(scrubber, heldout, mask, min(budget, excluded), "exhaustive", jax.random.key(seed))
    return float(result.gap["kl_mean"])


def _sets(scrubber: Scrubber, k: int) -> np.ndarray:
    n = sum(scrubber.n_units.values())
    rows = np.zeros((math.comb(n, k), n), np.float32)
    for row, units in zip(rows, itertools.combinations(range(n), k), strict=True):
        row[list(units)] = 1.0
    return rows


def optima(name: str, args: argparse.Namespace) -> dict:
    """The smallest faithful set and the smallest faithful and robust set, by exhaustive search."""
    scrubber, train, heldout = _setup(name)
    total = sum(scrubber.n_units.values())
    scorer = _fit_scorer(scrubber, train, jax.random.key(args.seed))
    started = time.perf_counter()
    searched, optimum, robust = [], None, None
    for k in range(total + 1):
        if math.comb(total, k) > args.max_sets:
            break
        rows = _sets(scrubber, k)
        kls = scorer(rows, mean_kl)
        order = [int(i) for i in np.argsort(kls, kind="stable") if kls[i] <= args.max_kl][: args.candidates]
        masks = [_unflat(scrubber, rows[i]) for i in order] or [_unflat(scrubber, rows[int(np.argmin(kls))])]
        heldout_kl = [s["kl_mean"] for s in measure(scrubber, heldout, masks, args.seed)]
        searched.append({"size": k, "kl_mean": heldout_kl[0], "kept": _kept(masks[0])})
        if optimum is None and heldout_kl[0] <= args.max_kl:
            optimum = searched[-1]
        for mask, value in zip(masks, heldout_kl, strict=True):
            if value <= args.max_kl and (g := gap(scrubber, heldout, mask, args.budget, args.seed)) <= args.max_gap:
                robust = {"size": k, "kl_mean": value, "gap": g, "kept": _kept(mask)}
                break
        if robust is not None:
            break
    size = smallest_size(searched, args.max_kl)
    assert optimum is None or optimum["size"] == size
    return {
        "total_units": total,
        "optimal": optimum,
        "robust_optimal": robust,
        "searched": searched,
        "search_seconds": time.perf_counter() - started,
    }


def ours(name: str, adversary: str, args: argparse.Namespace) -> dict:
    scrubber, _, heldout = _setup(name)
    started = time.perf_counter()
    e = explainer.explain(name, adversary=adversary, kl_budget=args.max_kl, seed=args.seed, progress=False)
    seconds = time.perf_counter() - started
    g = gap(scrubber, heldout, e.mask(), args.budget, args.seed)
    return {"size": e.size, "kl_mean": e.faithfulness["kl_mean"], "gap": g, "kept": e.kept, "seconds": seconds}


def _ratio(mine: dict, best: dict | None, max_kl: float, max_gap: float | None) -> float | None:
    faithful = mine["kl_mean"] <= max_kl and (max_gap is None or mine["gap"] <= max_gap)
    if best is None or not faithful:
        return None
    return mine["size"] / best["size"] if best["size"] else (1.0 if mine["size"] == 0 else math.inf)


def row(name: str, args: argparse.Namespace) -> dict:
    out = {"model": name, **optima(name, args)}
    out["ours_no_adversary"] = ours(name, "none", args)
    out["ours"] = ours(name, "learned", args)
    out["ratio"] = _ratio(out["ours_no_adversary"], out["optimal"], args.max_kl, None)
    out["robust_ratio"] = _ratio(out["ours"], out["robust_optimal"], args.max_kl, args.max_gap)
    out["meets_target"] = all(r is not None and r <= TARGET for r in (out["ratio"], out["robust_ratio"]))
    return out


def _cell(size: int | None, ratio: float | None, mine: dict | None = None) -> str:
    if mine is None:
        return "-" if size is None else str(size)
    text = f"{mine['size']} (KL {mine['kl_mean']:.2g}, gap {mine['gap']:.2g})"
    if ratio is None:
        return text + " -"
    return text + f"  ×{ratio:.2f}" + ("" if ratio <= TARGET else " (over)")


def show(rows: list[dict], args: argparse.Namespace) -> None:
    title = f"our size over the optimal size at KL ≤ {args.max_kl} (and gap ≤ {args.max_gap}); target ≤ {TARGET}"
    table = Table(title=title)
    columns = ("model", "units", "optimum", "ours, no adversary", "robust optimum", "ours, adversary", "search s")
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        table.add_row(
            r["model"],
            str(r["total_units"]),
            _cell(r["optimal"]["size"] if r["optimal"] else None, None),
            _cell(None, r["ratio"], r["ours_no_adversary"]),
            _cell(r["robust_optimal"]["size"] if r["robust_optimal"] else None, None),
            _cell(None, r["robust_ratio"], r["ours"]),
            f"{r['search_seconds']:.0f}",
        )
    Console(width=140).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--max-kl", type=float, default=0.01, help="faithfulness both sides must reach")
    parser.add_argument("--max-sets", type=int, default=MAX_SETS, help="exhaustive search up to this many sets")
    parser.add_argument("--max-gap", type=float, default=0.01, help="robustness the adversary's side must reach")
    parser.add_argument("--budget", type=int, default=2, help="adversary budget of the gap")
    parser.add_argument("--candidates", type=int, default=512, help="faithful sets attacked per size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = [row(name, args) for name in args.models]
    show(rows, args)
    write_record(RESULTS, args, target_ratio=TARGET, rows=rows)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
