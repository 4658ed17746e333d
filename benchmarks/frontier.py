"""Frontiers of every zoo model: ours (with and without the adversary) against every baseline.

For each zoo model this trains our ladder of explanations with :func:`explainer.sweep`
(MIB's ladder of sizes, :func:`explainer.frontier.mib_ladder`; the learned adversary in the loop,
and once more without it) and builds every baseline of :mod:`explainer.baselines` on the same
ladder (``exhaustive`` only on models of at most ``--exhaustive-units`` units; its sizes with too
many sets are left out and listed). Every frontier is graded by the same code
(:func:`explainer.frontier.grade.grade_masks`, held-out prompts, resample ablation) and reported as:

- **CPR** (area under normalised faithfulness, higher is better) and **CMD** (area of
  ``|1 − f|``, lower is better), MIB's areas (:func:`explainer.frontier.mib_areas`: trapezoids
  over MIB's percentages of units, each taking the method's explanation for that budget); beside
  them, the areas over the sizes the explanations have (:func:`explainer.frontier.frontier_areas`),
  which are not MIB's and flatter a method that offers few sizes;
- **KL area**: the same trapezoids of the held-out KL (:func:`explainer.frontier.mib_kl_area`,
  nats, lower is better), the quantity our training minimises, where MIB's areas read the logit
  difference;
- **gap**: the adversarial gap at budget ``--budget`` (greedy and gradient-guided attacks, KL
  nats) of the smallest explanation on the frontier with ``f ≥ 0.9`` (``-`` when there is none),
  and the mean gap over the ladder;
- **time**: wall seconds to build and grade the whole frontier (compilation included).

Then it checks issue 5's acceptance on MIB's areas: on models with a ground truth (planted, tracr)
our CMD is at most each baseline's and our CPR at least each baseline's; on the trained models, at
least as good as the best baseline on both. Losses on the KL area and on the areas over sizes
are listed beside it.
The verdict per model, with the numbers, is printed and saved.

Run it with ``python benchmarks/frontier.py`` (an hour or more on 2 CPU cores; ``--quick``: the
planted models, short training, a few baselines, a few minutes). It writes
``benchmarks/results/frontier.json`` (merging into an existing file model by model, so that
subsets can run separately) and ``benchmarks/results/frontier.png`` (one panel per model)::

    python benchmarks/frontier.py --models planted-cancel ioi --methods attribution acdc
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

from _results import RESULTS_DIR, write_record
from rich.console import Console
from rich.table import Table

from explainer.baselines import METHODS, baseline_frontier
from explainer.frontier import frontier_areas, mib_areas, mib_kl_area, mib_ladder
from explainer.frontier.ladder import STRATEGIES
from explainer.frontier.sweep import sweep
from explainer.models import load_model
from explainer.zoo import load_truth, resolve_model, zoo_names

RESULTS = RESULTS_DIR / "frontier.json"
PICTURE = RESULTS_DIR / "frontier.png"
OURS = ("ours", "ours-no-adversary")
QUICK_MODELS = ("planted-distractor", "planted-cancel", "planted-joint")
QUICK_METHODS = ("random", "attribution", "acdc", "exhaustive")
FAITHFUL = 0.9  # the gap column is taken at the smallest explanation with f at least this
TOLERANCE = 1e-6  # areas equal up to this count as a tie
KEEP = ("size", "target", "kl_mean", "kl_p99", "logit_diff_recovered", "accuracy", "normalized_faithfulness", "gap")


def total_units(name: str) -> int:
    net = load_model(resolve_model(name))
    return len(net.sites) * net.config.d_model


def exhaustive_feasible(name: str, limit: int) -> bool:
    return total_units(name) <= limit


def summarize(label: str, frontier: dict, seconds: float) -> dict:
    """One row of the table: areas, gaps and time, with the frontier's records (trimmed)."""
    records = [{k: r.get(k) for k in KEEP} for r in frontier["records"]]
    faithful = [r for r in records if r["normalized_faithfulness"] >= FAITHFUL and r["size"] > 0]
    smallest = min(faithful, key=lambda r: r["size"]) if faithful else None
    gaps = [r["gap"] for r in records if r["size"] > 0 and r["gap"] is not None]
    row = {
        "method": label,
        "gap": smallest["gap"] if smallest else None,
        "gap_size": smallest["size"] if smallest else None,
        "gap_mean": sum(gaps) / len(gaps) if gaps else None,
        "seconds": seconds,
        "skipped": frontier.get("skipped", []),
        "records": records,
    }
    add_areas(row, frontier["total_units"])
    return row


def ours(name: str, adversary: str, args: argparse.Namespace) -> dict:
    settings = {"steps": args.steps} if args.steps else {}
    started = time.perf_counter()
    f = sweep(
        name,
        adversary=adversary,
        budget=args.budget,
        ablations=(),
        continuation_steps=args.continuation_steps,
        strategy=args.strategy,
        progress=False,
        seed=args.seed,
        **settings,
    )
    row = summarize("ours" if adversary == "learned" else "ours-no-adversary", f, time.perf_counter() - started)
    return {**row, "strategy": f["strategy"]}


def baseline(name: str, method: str, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    f = baseline_frontier(method, name, budget=args.budget, seed=args.seed)
    return summarize(method, f, time.perf_counter() - started)


def compare(me: dict, others: list[dict]) -> dict:
    """One of our frontiers against the best baseline on each area: MIB's (the acceptance) and the
    areas over sizes (reported)."""
    out: dict = {"losses": []}
    for suffix in ("", "_sizes"):
        cpr, cmd = "cpr" + suffix, "cmd" + suffix
        best_cpr = max(others, key=lambda r: r[cpr])
        best_cmd = min(others, key=lambda r: r[cmd])
        if me[cpr] < best_cpr[cpr] - TOLERANCE:
            out["losses"].append(f"{cpr} {me[cpr]:.4f} < {best_cpr['method']} {best_cpr[cpr]:.4f}")
        if me[cmd] > best_cmd[cmd] + TOLERANCE:
            out["losses"].append(f"{cmd} {me[cmd]:.4f} > {best_cmd['method']} {best_cmd[cmd]:.4f}")
        out[cpr], out[cmd] = me[cpr], me[cmd]
        out["best_baseline_" + cpr] = {"method": best_cpr["method"], cpr: best_cpr[cpr]}
        out["best_baseline_" + cmd] = {"method": best_cmd["method"], cmd: best_cmd[cmd]}
    # the KL that training minimises, read on the same ladder: reported, not the acceptance
    best_kl = min(others, key=lambda r: r["kl_area"] if not math.isnan(r["kl_area"]) else math.inf)
    out["kl_area"] = me["kl_area"]
    out["best_baseline_kl_area"] = {"method": best_kl["method"], "kl_area": best_kl["kl_area"]}
    out["kl_area_passed"] = not me["kl_area"] > best_kl["kl_area"] + TOLERANCE
    if not out["kl_area_passed"]:
        out["losses"].append(f"kl_area {me['kl_area']:.4f} > {best_kl['method']} {best_kl['kl_area']:.4f}")
    out["passed"] = not any(loss.split()[0] in ("cpr", "cmd") for loss in out["losses"])  # MIB's areas
    out["passed_sizes"] = not any(loss.split()[0].endswith("_sizes") for loss in out["losses"])
    return out


def verdict(name: str, rows: list[dict]) -> dict:
    """Issue 5's acceptance on one model, for each of our frontiers (with and without adversary).

    Beating each baseline and beating the best baseline are the same check; models with a ground
    truth must pass it, trained models should (the note says where not).
    """
    truth = load_truth(resolve_model(name)) is not None
    others = [r for r in rows if r["method"] not in OURS and not math.isnan(r["cpr"])]
    out: dict = {"model": name, "ground_truth": truth}
    mine = {r["method"]: compare(r, others) for r in rows if r["method"] in OURS and others}
    if not mine:
        return {**out, "passed": None, "note": "ours or the baselines did not run"}
    return {**out, "passed": any(v["passed"] for v in mine.values()), "ours": mine}


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def show(models: dict[str, dict]) -> None:
    table = Table(title="frontiers on MIB's ladder (CPR ↑, CMD ↓: MIB's | KL area ↓ | over sizes; gap at budget 2 ↓)")
    columns = (
        "model",
        "method",
        "CPR",
        "CMD",
        "KL area",
        "CPR sizes",
        "CMD sizes",
        "gap @f≥0.9 (size)",
        "mean gap",
        "seconds",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "method") else "right")
    for name, entry in models.items():
        for i, r in enumerate(entry["rows"]):
            gap = "-" if r["gap"] is None else f"{r['gap']:.3g} ({r['gap_size']})"
            table.add_row(
                name if i == 0 else "",
                r["method"],
                _fmt(r["cpr"]),
                _fmt(r["cmd"]),
                _fmt(r.get("kl_area")),
                _fmt(r.get("cpr_sizes")),
                _fmt(r.get("cmd_sizes")),
                gap,
                "-" if r["gap_mean"] is None else f"{r['gap_mean']:.3g}",
                f"{r['seconds']:.0f}",
                end_section=i == len(entry["rows"]) - 1,
            )
    Console(width=160).print(table)
    checks = Table(title="acceptance: our frontiers against the best baseline on each area")
    for column in ("model", "truth", "ours", "MIB areas", "KL area", "over sizes", "where ours loses"):
        checks.add_column(column)
    for name, entry in models.items():
        v = entry["verdict"]
        if v["passed"] is None:
            checks.add_row(name, str(v["ground_truth"]), "", "-", "-", "-", v["note"])
            continue
        for i, (label, c) in enumerate(v["ours"].items()):
            checks.add_row(
                name if i == 0 else "",
                ("yes" if v["ground_truth"] else "no") if i == 0 else "",
                label,
                "pass" if c["passed"] else "FAIL",
                "pass" if c["kl_area_passed"] else "higher",
                "pass" if c["passed_sizes"] else "lower",
                "; ".join(c["losses"]),
                end_section=i == len(v["ours"]) - 1,
            )
    Console(width=160).print(checks)


def plot(models: dict[str, dict], path) -> None:
    """One panel per model: normalised faithfulness against size, one line per method."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    names = list(models)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    styles = {"ours": ("black", "o", 2.2), "ours-no-adversary": ("tab:gray", "s", 1.6)}
    colors = dict(
        zip(METHODS, ("tab:olive", "tab:purple", "tab:blue", "tab:cyan", "tab:orange", "tab:green"), strict=True)
    )
    for ax, name in zip(axes.flat, names, strict=False):
        total = models[name]["total_units"]
        for r in models[name]["rows"]:
            color, marker, width = styles.get(r["method"], (colors.get(r["method"], "tab:red"), ".", 1.0))
            points = sorted((max(p["size"], 0.5), p["normalized_faithfulness"]) for p in r["records"])
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                color=color,
                marker=marker,
                lw=width,
                ms=4,
                label=f"{r['method']} ({_fmt(r['cpr'], 2)}/{_fmt(r['cmd'], 2)})",
            )
        ax.axhline(1.0, color="tab:green", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_ylim(-0.6, 1.4)
        mark = " (ground truth)" if models[name]["verdict"]["ground_truth"] else ""
        ax.set_title(f"{name}: {total} units{mark}", fontsize=9)
        ax.set_xlabel("units kept (log)", fontsize=8)
        ax.set_ylabel("normalised faithfulness", fontsize=8)
        ax.legend(fontsize=6, loc="lower right", title="method (CPR/CMD)", title_fontsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.suptitle("size against faithfulness on MIB's ladder: ours (black) against the baselines", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def add_areas(row: dict, total: int) -> None:
    """MIB's areas (``cpr``, ``cmd``), the same reading of the held-out KL (``kl_area``, with the
    empty explanation's KL from the record of budget 0; NaN without one) and the areas over sizes
    (``cpr_sizes``, ``cmd_sizes``) of a row, from its records: rows saved by earlier versions get
    the same numbers a fresh run would."""
    records = row["records"]
    f = [p["normalized_faithfulness"] for p in records]
    targets = [p["target"] for p in records]
    row["cpr"], row["cmd"] = mib_areas(targets, f, total)
    empty = [p["kl_mean"] for p in records if p["target"] == 0]
    kl = [p["kl_mean"] for p in records]
    row["kl_area"] = mib_kl_area(targets, kl, total, empty[0]) if empty else math.nan
    row["cpr_sizes"], row["cmd_sizes"] = frontier_areas([p["size"] for p in records], f, total)
    for old in ("cpr_ladder", "cmd_ladder"):  # areas over budgets as fractions of units, before MIB's
        row.pop(old, None)


def run_model(name: str, args: argparse.Namespace, earlier: dict) -> dict:
    rows = []
    reused = {r["method"]: r for r in earlier.get("rows", [])} if args.reuse_baselines else {}
    for r in reused.values():
        add_areas(r, total_units(name))
    for adversary in ("learned", "none"):
        method = OURS[0] if adversary == "learned" else OURS[1]
        if adversary in args.adversaries:
            rows.append(ours(name, adversary, args))
        elif method in reused:  # a frontier of ours not asked for this time: kept as it was
            rows.append(reused[method])
        else:
            continue
        print(f"{name}: {rows[-1]['method']} CPR {rows[-1]['cpr']:.3f} CMD {rows[-1]['cmd']:.3f}", flush=True)
    for method in args.methods:
        if method == "exhaustive" and not exhaustive_feasible(name, args.exhaustive_units):
            continue
        rows.append(reused[method] if method in reused else baseline(name, method, args))
        print(f"{name}: {method} CPR {rows[-1]['cpr']:.3f} CMD {rows[-1]['cmd']:.3f}", flush=True)
    total = total_units(name)
    return {
        "total_units": total,
        "ladder": mib_ladder(total),
        "command": shlex.join(sys.orig_argv),
        "rows": rows,
        "verdict": verdict(name, rows),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None, help="zoo models (default: all)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="baselines")
    parser.add_argument("--adversaries", nargs="+", default=["learned", "none"], choices=["learned", "none"])
    parser.add_argument("--steps", type=int, default=None, help="training steps of the first rung (default: 1500)")
    parser.add_argument("--continuation-steps", type=int, default=None, help="steps of every later rung")
    parser.add_argument("--strategy", default="auto", choices=STRATEGIES, help="our ladder's")
    parser.add_argument("--budget", type=int, default=2, help="adversary budget of the gap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exhaustive-units", type=int, default=40, help="exhaustive search up to this many units")
    parser.add_argument("--quick", action="store_true", help="planted models, 300 steps, four baselines")
    parser.add_argument("--fresh", action="store_true", help="replace the results file instead of merging")
    parser.add_argument(
        "--reuse-baselines",
        action="store_true",
        help="keep baseline rows already in the file, and our rows for --adversaries not given",
    )
    parser.add_argument("--report", action="store_true", help="only re-check, print and plot the saved results")
    parser.add_argument("--results", default=None, help="results file (default: results/frontier.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models = args.models or list(QUICK_MODELS)
        args.steps = args.steps or 300
        args.methods = [m for m in args.methods if m in QUICK_METHODS]
    names = args.models or zoo_names()
    for name in names:
        resolve_model(name)  # fail early on a typo
    results = RESULTS.with_name("frontier-quick.json") if args.quick else RESULTS
    if args.results:
        results = Path(args.results)
    earlier = {} if args.fresh or not results.is_file() else json.loads(results.read_text()).get("models", {})
    models = dict(earlier)
    if args.report:
        for name, entry in models.items():
            for row in entry["rows"]:
                add_areas(row, entry["total_units"])
            entry["verdict"] = verdict(name, entry["rows"])
        names = [n for n in names if n in models] if args.models else list(models)
    for name in [] if args.report else names:
        models[name] = run_model(name, args, earlier.get(name, {}))
        write_record(results, args, models=models)  # after every model, so a cut-off run keeps its results
    show({n: models[n] for n in names})
    picture = results.with_suffix(".png")
    plot(models, picture)
    if args.report:  # keep the command and settings of the run that trained them
        record = json.loads(results.read_text())
        record.update(models=models, png=picture.name)
        results.write_text(json.dumps(record, indent=2) + "\n")
    else:
        write_record(results, args, models=models, png=picture.name)
    print(f"wrote {results} and {picture}")


if __name__ == "__main__":
    main()
