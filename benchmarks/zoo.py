"""Explanations of every zoo model at the default settings: size, faithfulness, robustness, time.

For each zoo model this trains one explanation with :func:`explainer.explain` (default
:class:`~explainer.TrainConfig`, the learned adversary in the loop unless ``--adversary none``) and
reports, on the model's held-out prompts: size (kept units / all units, and the share), KL mean
and p99, logit difference recovered, accuracy, the adversarial gap at budget 2 (the strongest of
:func:`explainer.api.attack_explanation`'s methods), F1 against the ground truth where the model
has one, and the training wall time (compilation included).

The zoo's target for the trained models (``paren``, ``induction``, ``ioi``) is at most 25% of all
units with logit difference recovered of at least 90%; the table marks each row. For those models
it also trains an explanation of exactly 25% of the units (``target_size``, no adversary) and
reports its logit difference recovered (column "LD @25%"): how far the target is from what a
quarter of the units can carry on that model at all.

``--basis gradient`` counts units in the gradient basis (:mod:`explainer.bases`) instead and
writes ``zoo-gradient.json``; ``--trim`` adds the ``trim`` setting (the file name gains ``-trim``);
``--skip-share`` leaves out the "LD @25%" probe.

Run it with ``python benchmarks/zoo.py`` (several minutes on 2 CPU cores; ``--models`` picks a
subset). It writes the rows with the exact command line to ``benchmarks/results/zoo.json``::

    python benchmarks/zoo.py --models induction ioi --adversary none
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _results import RESULTS_DIR, write_record
from rich.console import Console
from rich.table import Table

import explainer
from explainer.api import attack_explanation
from explainer.metrics import truth_scores
from explainer.models import load_model
from explainer.tasks import resolve_task
from explainer.zoo import load_truth, resolve_model, zoo_names

RESULTS = RESULTS_DIR / "zoo.json"
TRAINED = ("paren", "induction", "ioi")
MAX_SHARE, MIN_RECOVERED = 0.25, 0.90


def at_share(name: str, share: float, seed: int, basis: str) -> float:
    """Logit difference recovered by an explanation of exactly ``share`` of the units."""
    net = load_model(resolve_model(name))
    units = len(net.sites) * net.config.d_model
    e = explainer.explain(
        name, adversary="none", seed=seed, target_size=int(share * units), basis=basis, progress=False
    )
    return e.faithfulness["logit_diff_recovered"]


def measure(
    name: str, adversary: str, seed: int, budget: int, basis: str = "standard", trim: bool = False, share: bool = True
) -> dict:
    folder = resolve_model(name)
    started = time.perf_counter()
    e = explainer.explain(name, adversary=adversary, seed=seed, basis=basis, trim=trim, progress=False)
    seconds = time.perf_counter() - started
    excluded = e.total_units - e.size
    gap = None
    if excluded:
        attack = attack_explanation(e, load_model(folder), resolve_task(None, folder), min(budget, excluded))
        gap = attack["gap"]["kl_mean"]
    truth = load_truth(folder)
    f = e.faithfulness
    return {
        "model": name,
        "basis": basis,
        "trim": trim,
        "adversary": adversary,
        "seed": seed,
        "size": e.size,
        "units": e.total_units,
        "share": e.size / e.total_units,
        "kl_mean": f["kl_mean"],
        "kl_p99": f["kl_p99"],
        "logit_diff_recovered": f["logit_diff_recovered"],
        "accuracy": f["accuracy"],
        "gap": gap,
        "f1": truth_scores(e.kept, truth)["f1"] if truth is not None else None,
        "meets_target": e.size / e.total_units <= MAX_SHARE and f["logit_diff_recovered"] >= MIN_RECOVERED,
        "seconds": seconds,
        "repaired": e.history.get("repaired", [0])[0],
        "open_restart": bool(e.history.get("open_restart", [0])[0]),
        "trimmed": e.history.get("trimmed", [0])[0],
        "ld_at_max_share": at_share(name, MAX_SHARE, seed, basis) if name in TRAINED and share else None,
    }


def show(rows: list[dict], budget: int) -> None:
    table = Table(title=f"zoo explanations at default settings (gap at budget {budget})")
    columns = (
        "model",
        "size",
        "share",
        "KL mean",
        "KL p99",
        "LD recovered",
        "accuracy",
        "gap",
        "F1",
        "target",
        "LD @25%",
        "s",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        target = ("yes" if r["meets_target"] else "no") if r["model"] in TRAINED else "-"
        table.add_row(
            r["model"],
            f"{r['size']}/{r['units']}",
            f"{100 * r['share']:.0f}%",
            f"{r['kl_mean']:.3g}",
            f"{r['kl_p99']:.3g}",
            f"{r['logit_diff_recovered']:.2f}",
            f"{r['accuracy']:.2f}",
            "-" if r["gap"] is None else f"{r['gap']:.3g}",
            "-" if r["f1"] is None else f"{r['f1']:.2f}",
            target,
            "-" if r["ld_at_max_share"] is None else f"{r['ld_at_max_share']:.2f}",
            f"{r['seconds']:.0f}",
        )
    Console(width=150).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=zoo_names())
    parser.add_argument("--adversary", default="learned", choices=["learned", "none"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=2)
    parser.add_argument("--basis", default="standard", help="standard (default), pca, gradient or learned")
    parser.add_argument("--trim", action="store_true", help="train with the trim setting")
    parser.add_argument("--skip-share", action="store_true", help="leave out the LD @25%% probe")
    parser.add_argument("--results", default=None, help="results file (default: results/zoo[-BASIS][-trim].json)")
    args = parser.parse_args(argv)
    share = not args.skip_share
    rows = [measure(name, args.adversary, args.seed, args.budget, args.basis, args.trim, share) for name in args.models]
    show(rows, args.budget)
    stem = "zoo" + ("" if args.basis == "standard" else f"-{args.basis}") + ("-trim" if args.trim else "")
    results = Path(args.results) if args.results else RESULTS.with_name(f"{stem}.json")
    write_record(results, args, rows=rows)
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
