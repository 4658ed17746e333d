"""Adversarial robustness of explanations trained with and without the learned adversary.

For every planted zoo model (each ships its ground-truth explanation) and every seed, this trains
two explanations with :func:`explainer.explain` and the default :class:`~explainer.TrainConfig`:
one with the learned adversary in the loop (``adversary="learned"``) and one without
(``adversary="none"``). Each is graded on the task's held-out prompts by:

- **size** and held-out **KL** mean and p99 of the scrubbed model against the full model (as
  ``explain`` measured them, resample ablation);
- the **adversarial gap** at each budget: the mean ``KL(S_m ‖ S_{m∨a})`` of the strongest
  re-inclusion ``a`` that :func:`adversary.attack_all` finds (greedy, random, gradient, exhaustive
  when it fits, learned) with a Scrubber built like the run's own; a budget larger than the number
  of excluded units is clamped to that number;
- whether the kept units **equal the ground truth** (sites with no kept units ignored), and the
  **training** wall time of ``explain`` (compilation included).

The table reports per (model, adversary) the mean over seeds (the gap too) and how many seeds
recovered the truth exactly. A robust explanation has a gap near zero at every budget; an
explanation that drops a cancelling pair (``planted-cancel``) looks faithful on average but has a
large gap at budget 1.

Run it with ``python benchmarks/robustness.py`` (about 6 minutes on 2 CPU cores; ``--quick`` is one
seed and budgets 1 and 2). It prints a table and writes the per-run rows with the exact command
line to ``benchmarks/results/robustness.json`` and a bar chart of the gaps to
``benchmarks/results/robustness.png``::

    python benchmarks/robustness.py --seeds 0 1 2 3 --budgets 1 2 4 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np
from _results import RESULTS_DIR, write_record
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

import explainer
from adversary.discrete import attack_all
from explainer.metrics import truth_scores
from explainer.models import load_model
from explainer.scrub import Scrubber
from explainer.tasks import resolve_task
from explainer.zoo import load_truth, resolve_model

RESULTS = RESULTS_DIR / "robustness.json"
PLOT = RESULTS.with_suffix(".png")
MODELS = ("planted-distractor", "planted-cancel", "planted-joint")
ADVERSARIES = ("learned", "none")


def nonempty(kept: dict[str, list[int]]) -> dict[str, list[int]]:
    return {site: sorted(units) for site, units in kept.items() if units}


def measure(name: str, adversary: str, seed: int, budgets: list[int]) -> dict:
    """Train one explanation and grade it: size, held-out KL, gap per budget, truth recovery."""
    started = time.perf_counter()
    e = explainer.explain(name, seed=seed, adversary=adversary, progress=False)
    seconds = time.perf_counter() - started
    folder = resolve_model(name)
    task = resolve_task(None, folder)
    scrubber = Scrubber.build(load_model(folder), task.train_data(), list(e.n_units), e.config["ablation"])
    keep, excluded = e.mask(), e.total_units - e.size
    attacks = []
    for budget in budgets:
        used = min(budget, excluded)
        if used == 0:  # nothing excluded: nothing to re-include
            attacks.append({"budget": budget, "used": 0, "gap": 0.0, "gap_p99": 0.0, "method": None, "reincluded": {}})
            continue
        best, _ = attack_all(scrubber, task.heldout_data(), keep, used, jax.random.key(seed))
        attacks.append(
            {
                "budget": budget,
                "used": used,
                "gap": best.gap["kl_mean"],
                "gap_p99": best.gap["kl_p99"],
                "method": best.method,
                "reincluded": nonempty(best.reincluded),
            }
        )
    truth = load_truth(folder)
    return {
        "model": name,
        "adversary": adversary,
        "seed": seed,
        "size": e.size,
        "kept": nonempty(e.kept),
        "kl_mean": e.faithfulness["kl_mean"],
        "kl_p99": e.faithfulness["kl_p99"],
        "exact_truth": truth is not None and truth_scores(e.kept, truth)["exact"],
        "train_s": seconds,
        "attacks": attacks,
    }


def summarise(rows: list[dict], budgets: list[int]) -> list[dict]:
    """One row per (model, adversary): means over seeds, truth recoveries counted."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        for adversary in dict.fromkeys(r["adversary"] for r in rows):
            group = [r for r in rows if r["model"] == name and r["adversary"] == adversary]
            mean = statistics.fmean
            out.append(
                {
                    "model": name,
                    "adversary": adversary,
                    "seeds": len(group),
                    "sizes": sorted({r["size"] for r in group}),
                    "kl_mean": mean(r["kl_mean"] for r in group),
                    "kl_p99": mean(r["kl_p99"] for r in group),
                    "gap": {b: mean(r["attacks"][i]["gap"] for r in group) for i, b in enumerate(budgets)},
                    "exact_truth": sum(r["exact_truth"] for r in group),
                    "train_s": mean(r["train_s"] for r in group),
                }
            )
    return out


def show(summary: list[dict], budgets: list[int]) -> None:
    table = Table(title="adversarial gap (mean KL of the strongest discrete attack, held-out, mean over seeds)")
    columns = ["model", "adversary", "size", "KL mean", "KL p99", *(f"gap k={b}" for b in budgets), "truth", "train s"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "adversary") else "right")
    for s in summary:
        table.add_row(
            s["model"],
            s["adversary"],
            "/".join(map(str, s["sizes"])),
            f"{s['kl_mean']:.2e}",
            f"{s['kl_p99']:.2e}",
            *(f"{s['gap'][b]:.2e}" for b in budgets),
            f"{s['exact_truth']}/{s['seeds']}",
            f"{s['train_s']:.1f}",
        )
    Console(width=max(Console().width, 120)).print(table)  # the table needs ~115 columns, also in a log


def plot(summary: list[dict], budgets: list[int]) -> None:
    """Grouped bars per model: the gap at each budget, with vs without the learned adversary."""
    models = list(dict.fromkeys(s["model"] for s in summary))
    fig = Figure(figsize=(2.2 * len(models) + 1.5, 3.2), layout="constrained")
    axes = fig.subplots(1, len(models), sharey=True, squeeze=False)[0]
    width = 0.8 / len(ADVERSARIES)
    top = 30 * max([1e-2, *(g for s in summary for g in s["gap"].values())])  # headroom for the legend
    for ax, name in zip(axes, models, strict=True):
        for j, adversary in enumerate(ADVERSARIES):
            s = next((s for s in summary if s["model"] == name and s["adversary"] == adversary), None)
            if s is not None:
                x = np.arange(len(budgets)) + (j - (len(ADVERSARIES) - 1) / 2) * width
                ax.bar(x, [s["gap"][b] for b in budgets], width, label=f"adversary={adversary}", color=f"C{j}")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(np.arange(len(budgets)), [f"k={b}" for b in budgets])
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(0, top)
    axes[0].set_ylabel("adversarial gap (KL, nats)")
    axes[-1].legend(fontsize=7)
    tmp = PLOT.with_name(PLOT.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, PLOT)


def write(rows: list[dict], summary: list[dict], args: argparse.Namespace, seconds: float) -> None:
    write_record(RESULTS, args, seconds=seconds, summary=summary, rows=rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="zoo models with a ground truth")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training (and attack) seeds")
    parser.add_argument("--budgets", nargs="+", type=int, default=[1, 2, 4], help="attack budgets (units)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the first seed only, budgets 1 and 2")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.budgets = args.seeds[:1], [1, 2]
    started = time.perf_counter()
    rows = [
        measure(name, adversary, seed, args.budgets)
        for name in args.models
        for adversary in ADVERSARIES
        for seed in args.seeds
    ]
    summary = summarise(rows, args.budgets)
    seconds = time.perf_counter() - started
    show(summary, args.budgets)
    plot(summary, args.budgets)
    write(rows, summary, args, seconds)
    print(f"wrote {RESULTS} and {PLOT} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
