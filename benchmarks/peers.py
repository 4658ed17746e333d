"""The peer race: auto-circuit's edge methods against ours, on the same edge graph, prompts and ablation.

For each model (``--models``, default ``induction ioi``) this

1. exports the zoo model as TransformerLens files (:func:`explainer.models.tl.export_tl`) and its
   task's training and held-out prompts (the split every explainer command uses) into a work
   folder;
2. runs ``benchmarks/peers_run.py`` in the peers' own environment (``.venv-peers``, built by ``make
   bench-peers``: auto-circuit pins an older numpy, so it never shares our environment) as a
   subprocess. It scores every edge of auto-circuit's graph (q/k/v inputs apart: 29 edges for
   ``induction``, 110 for ``ioi``) with edge attribution patching, integrated gradients, ACDC and
   subnetwork probing, all with resample ablation from the ``corrupt`` prompts and the logit
   difference at the last position as the metric, times each, and grades their top-k circuits
   with auto-circuit's own evaluation. Edges come back in our names (``"a0.h1->a1.h2.q"``);
3. checks that both sides see the same model (full-model logit difference on the same prompts)
   and, where :mod:`explainer.edges` exists, the same edges;
4. grades every method's circuits with our own code on our edge graph, and trains ours with and
   without the adversary on it (:func:`evaluate_ours`): held-out logit difference recovered and KL
   over MIB's ladder of edge counts, CPR and CMD, wall time, and the adversarial gap at budget 2 of
   every method's smallest circuit with ``f ≥ 0.9``. This needs explainer's edge units
   (``explainer.edges`` and ``Scrubber`` with ``units="edges"``); without them the table holds
   auto-circuit's own evaluation only, marked so.

Writes ``benchmarks/results/peers.json`` (scores of every edge, both evaluations, the command) and
``benchmarks/results/peers.md`` (the table)::

    make bench-peers                                   # builds .venv-peers, then runs this
    .venv/bin/python benchmarks/peers.py --models ioi  # one model (merged into the results)
    .venv/bin/python benchmarks/peers.py --reuse-peers # our side again, peers' scores kept
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from _results import RESULTS_DIR, write_record
from rich.console import Console
from rich.table import Table

from explainer.frontier import frontier_areas, mib_areas, mib_ladder, normalized_faithfulness
from explainer.metrics import logit_diff
from explainer.models import load_model
from explainer.models.tl import export_tl
from explainer.tasks import prompts_json, resolve_task
from explainer.zoo import resolve_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = RESULTS_DIR / "peers.json"
TABLE = RESULTS_DIR / "peers.md"
MODELS = ("induction", "ioi")
PEER_METHODS = ("eap", "ig", "acdc", "sp")
PEER_LABELS = {
    "eap": "edge attribution patching",
    "ig": "integrated gradients",
    "acdc": "ACDC",
    "sp": "subnetwork probing",
}
OURS = ("ours", "ours-no-adversary")
FAITHFUL = 0.9  # the gap and size columns are taken at the smallest circuit with f at least this
PARITY = 1e-3  # relative tolerance on the full model's logit difference, ours against TransformerLens
ATTACKS = ("greedy", "gradient")  # as benchmarks/frontier.py; exhaustive (--attacks) is slow on 110 edges


# --- 1. inputs for the peers ----------------------------------------------------------------------


def export_inputs(name: str, folder: Path) -> dict:
    """The model as TransformerLens files plus its training and held-out prompts, in ``folder``;
    returns our full model's logit difference on both (for the parity check)."""
    model_folder = resolve_model(name)
    export_tl(model_folder, folder / "model", overwrite=True)
    task = resolve_task(None, model_folder)
    net = load_model(model_folder)
    out = {}
    for split, batch in (("train", task.train_data()), ("heldout", task.heldout_data())):
        (folder / f"{split}.json").write_text(json.dumps(prompts_json(batch)))
        logits = net(batch.clean)[:, -1, :]
        out[split] = float(jnp.mean(logit_diff(logits, batch.answers, batch.wrong_answers)))
    return out


# --- 2. the peers, in their environment -----------------------------------------------------------


def run_peers(folder: Path, args: argparse.Namespace) -> dict:
    """``peers_run.py`` under ``--peers-python``; its JSON record."""
    python = Path(args.peers_python)
    if not python.exists():
        raise SystemExit(f"{python} does not exist; build the peers' environment first: make bench-peers")
    out = folder / "peers.json"
    command = [str(python), str(ROOT / "benchmarks" / "peers_run.py"), str(folder), "--out", str(out)]
    command += ["--methods", *args.methods, "--seed", str(args.seed)]
    command += ["--ig-samples", str(args.ig_samples), "--sp-epochs", str(args.sp_epochs)]
    # peers_run.py fixes auto-circuit's set orders itself; a fixed hash seed and one thread besides
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = folder / "peers.log"
    with open(log, "w") as stream:
        done = subprocess.run(command, env=env, stdout=stream, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text().replace("\r", "\n").strip().splitlines()[-15:]
        raise SystemExit(f"peers_run.py failed ({done.returncode}): {shlex.join(command)}\n" + "\n".join(tail))
    return json.loads(out.read_text())


# --- 3. same model, same graph --------------------------------------------------------------------


def edges_available() -> bool:
    """Whether explainer has edge units yet (``explainer/edges.py``)."""
    return importlib.util.find_spec("explainer.edges") is not None


def edge_names(config) -> dict[str, list[str]]:
    """``explainer.edges.edge_names``: the canonical edge name of every unit, per site."""
    return importlib.import_module("explainer.edges").edge_names(config)


def check_parity(name: str, record: dict, ours: dict) -> dict:
    """Both sides' full-model logit difference on the same prompts, and the same edge names."""
    out = {"logit_diff_ours": ours, "logit_diff_peers": record["full_logit_diff"]}
    worst = max(abs(ours[s] - record["full_logit_diff"][s]) / max(abs(ours[s]), 1e-9) for s in ours)
    out["logit_diff_relative_error"] = worst
    if worst > PARITY:
        raise SystemExit(f"{name}: the TransformerLens export disagrees with our model (relative error {worst:.2g})")
    if edges_available():
        mine = sorted(n for names in edge_names(load_model(resolve_model(name)).config).values() for n in names)
        if mine != sorted(record["edges"]):
            only_ours = sorted(set(mine) - set(record["edges"]))[:5]
            only_peers = sorted(set(record["edges"]) - set(mine))[:5]
            raise SystemExit(f"{name}: edge graphs differ; only ours {only_ours}, only auto-circuit's {only_peers}")
        out["edges_match"] = True
    return out


# --- auto-circuit's own evaluation, summarised like ours ------------------------------------------


def peer_summary(method: str, entry: dict, n_edges: int) -> dict:
    """One row from auto-circuit's evaluation of ``method``'s top-k circuits (held-out prompts).

    ``f`` is normalised as ours, ``(LD(C) − LD(∅)) / (LD(N) − LD(∅))``, with auto-circuit's own
    logit differences; CPR and CMD are MIB's areas over its ladder (``int(p · edges)`` edges asked
    for), as our frontiers' are; ``cpr_sizes``/``cmd_sizes`` are the areas over the edges kept.
    """
    rows = entry.get("autocircuit_eval", [])
    by_asked = {r["asked"]: r for r in rows}
    empty, full = by_asked.get(0), by_asked.get(n_edges)
    points = []
    for r in rows:
        f = (
            normalized_faithfulness(r["logit_diff"], empty["logit_diff"], full["logit_diff"])
            if empty and full
            else None
        )
        points.append({**r, "f": f})
    mib = [p for p in points if p["asked"] in set(mib_ladder(n_edges)) and p["f"] is not None]
    cpr, cmd = mib_areas([p["asked"] for p in mib], [p["f"] for p in mib], n_edges) if mib else (None, None)
    sizes = frontier_areas([p["edges"] for p in mib], [p["f"] for p in mib], n_edges) if mib else (None, None)
    faithful = [p for p in points if p["f"] is not None and p["f"] >= FAITHFUL and p["edges"] > 0]
    smallest = min(faithful, key=lambda p: p["edges"]) if faithful else None
    return {
        "method": method,
        "seconds": entry["seconds"],
        "cpr": cpr,
        "cmd": cmd,
        "cpr_sizes": sizes[0],
        "cmd_sizes": sizes[1],
        "edges_faithful": smallest["edges"] if smallest else None,
        "ld_percent_faithful": smallest["ld_recovered_percent"] if smallest else None,
        "kl_faithful": smallest["kl"] if smallest else None,
        "points": points,
    }


# --- 4. our side: every method's circuits graded by our code, and ours trained on edges -----------


def ranked(scores: dict[str, float], order: list[str]) -> list[str]:
    """Edges by importance, ties broken by our edge order (so top-k is exactly k edges)."""
    position = {name: i for i, name in enumerate(order)}
    return sorted(scores, key=lambda n: (-scores[n], position[n]))


def top_k_masks(scores: dict[str, float], names: dict[str, list[str]], counts: list[int]) -> list[dict]:
    """Keep masks (per site, one entry per edge unit) of the ``k`` best-scored edges for each ``k``."""
    order = [n for site in names for n in names[site]]
    best = ranked(scores, order)
    masks = []
    for k in counts:
        kept = set(best[:k])
        masks.append(
            {site: np.array([float(n in kept) for n in site_names], np.float32) for site, site_names in names.items()}
        )
    return masks


def summarize(method: str, graded: dict, seconds: float) -> dict:
    """A table row from :func:`explainer.frontier.grade.grade_masks`'s frontier (same form for every method):
    MIB's CPR/CMD over the ladder of edges asked for, and the areas over the edges kept."""
    keep = ("size", "kl_mean", "kl_p99", "logit_diff_recovered", "accuracy", "normalized_faithfulness", "gap", "kept")
    records = [{k: r.get(k) for k in keep} for r in graded["records"]]
    faithful = [r for r in records if r["normalized_faithfulness"] >= FAITHFUL and r["size"] > 0]
    smallest = min(faithful, key=lambda r: r["size"]) if faithful else None
    gaps = [r["gap"] for r in records if r["size"] > 0 and r["gap"] is not None]
    return {
        "method": method,
        "cpr": graded["cpr"],
        "cmd": graded["cmd"],
        "cpr_sizes": graded.get("cpr_sizes"),
        "cmd_sizes": graded.get("cmd_sizes"),
        "edges_faithful": smallest["size"] if smallest else None,
        "ld_recovered_faithful": smallest["logit_diff_recovered"] if smallest else None,
        "kl_faithful": smallest["kl_mean"] if smallest else None,
        "gap": smallest["gap"] if smallest else None,
        "gap_mean": sum(gaps) / len(gaps) if gaps else None,
        "seconds": seconds,
        "records": records,
    }


def sweep_takes_edges() -> bool:
    """Whether our training takes edge units yet (``TrainConfig.units``)."""
    import dataclasses

    from explainer.train.config import TrainConfig

    return "units" in {f.name for f in dataclasses.fields(TrainConfig)}  # a group since the settings were typed


def evaluate_ours(name: str, record: dict, args: argparse.Namespace) -> list[dict] | None:
    """OUR SIDE OF THE RACE (needs explainer's edge units; ``None`` until they exist).

    - ours: :func:`explainer.sweep` with ``units="edges"`` over MIB's ladder of edge counts,
      with and without the learned adversary (``--ours``); time = the whole sweep, training and
      grading;
    - every peer method's top-k circuits on the same ladder, graded by the same code
      (:func:`explainer.frontier.grade.grade_masks` on our edge scrubber: held-out prompts, resample
      ablation): LD recovered, KL, normalised faithfulness, CPR/CMD, and the adversarial gap at
      ``--budget`` (:mod:`adversary.discrete`) of every circuit; time = auto-circuit's scoring time.

    Interface used (:mod:`explainer.edges`, ``explainer/scrub.py``): ``Scrubber.build(model,
    train, units="edges")`` with sites ``blocks.{l}.attn.q|k|v.in``, ``blocks.{l}.mlp.in``,
    ``unembed.in`` whose units are writers (head-major at q/k/v), ``edge_names(config) -> {site:
    [name per unit]}`` in the canonical names, and the training setting ``units="edges"``.
    """
    if not edges_available():
        return None
    from explainer.frontier.grade import grade_masks
    from explainer.frontier.sweep import sweep
    from explainer.scrub import Scrubber

    folder = resolve_model(name)
    net = load_model(folder)
    task = resolve_task(None, folder)
    train, heldout = task.train_data(), task.heldout_data()
    scrubber = Scrubber.build(net, train, units="edges")
    names = edge_names(net.config)
    if list(names) != list(scrubber.sites) or any(len(names[s]) != scrubber.n_units[s] for s in names):
        raise SystemExit(f"{name}: edge_names does not match the edge scrubber's sites and units")
    counts = mib_ladder(record["n_edges"])
    rows = []
    for adversary, label in (("learned", "ours"), ("none", "ours-no-adversary")):
        if label not in args.ours:
            continue
        if not sweep_takes_edges():
            print(f"{name}: {label} skipped: training has no edge units yet (TrainConfig.units)", flush=True)
            continue
        settings = {"steps": args.steps} if args.steps else {}
        started = time.perf_counter()
        frontier = sweep(
            name,
            units="edges",
            sizes=counts,
            adversary=adversary,
            budget=args.budget,
            ablations=(),
            progress=False,
            seed=args.seed,
            **settings,
        )
        rows.append(summarize(label, frontier, time.perf_counter() - started))
        rows[-1]["timings"] = {k: float(v) for k, v in (frontier.get("timings") or {}).items()}  # per phase
        print(f"{name}: {label} CPR {rows[-1]['cpr']:.3f} CMD {rows[-1]['cmd']:.3f}", flush=True)
    for method, entry in record["methods"].items():
        masks = top_k_masks(entry["scores"], names, counts)
        graded = grade_masks(
            scrubber,
            train,
            heldout,
            masks,
            budget=args.budget,
            seed=args.seed,
            attack_methods=args.attacks,
            budgets=counts,
        )
        rows.append(summarize(method, graded, entry["seconds"]))
        print(f"{name}: {method} CPR {rows[-1]['cpr']:.3f} CMD {rows[-1]['cmd']:.3f}", flush=True)
    return rows


def verdict(rows: list[dict]) -> dict:
    """Issue 6's acceptance on one model: CMD ≤ the best peer's, gap ≤ every peer's, time ≤ SP's."""
    peers = [r for r in rows if r["method"] in PEER_METHODS]
    out = {}
    for me in (r for r in rows if r["method"] in OURS):
        losses = []
        best_cmd = min(peers, key=lambda r: r["cmd"])
        if me["cmd"] > best_cmd["cmd"] + 1e-6:
            losses.append(f"CMD {me['cmd']:.4f} > {best_cmd['method']} {best_cmd['cmd']:.4f}")
        for p in peers:
            if me["gap"] is not None and p["gap"] is not None and me["gap"] > p["gap"] + 1e-6:
                losses.append(f"gap {me['gap']:.3g} > {p['method']} {p['gap']:.3g}")
        sp = next((p for p in peers if p["method"] == "sp"), None)
        if sp is not None and me["seconds"] > sp["seconds"]:
            losses.append(f"time {me['seconds']:.0f} s > sp {sp['seconds']:.0f} s")
        out[me["method"]] = {"passed": not losses, "losses": losses}
    return out


# --- tables ---------------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def peer_table_rows(models: dict) -> list[list[str]]:
    rows = []
    for name, entry in models.items():
        for s in entry["peers_summary"]:
            ladder = ", ".join(f"{p['edges']}:{p['ld_recovered_percent']:.0f}" for p in s["points"])
            rows.append(
                [
                    name,
                    s["method"],
                    f"{s['seconds']:.1f}",
                    _fmt(s["edges_faithful"]),
                    _fmt(s["ld_percent_faithful"], 1),
                    _fmt(s["kl_faithful"]),
                    _fmt(s["cpr"]),
                    _fmt(s["cmd"]),
                    ladder,
                ]
            )
    return rows


PEER_COLUMNS = ("model", "method", "seconds", "edges @f≥0.9", "LD %", "KL", "CPR", "CMD", "edges:LD% ladder")
OUR_COLUMNS = ("model", "method", "edges @f≥0.9", "LD rec", "KL", "CPR", "CMD", "gap@2", "mean gap", "seconds")


def our_table_rows(models: dict) -> list[list[str]]:
    rows = []
    for name, entry in models.items():
        for r in entry.get("ours") or []:
            rows.append(
                [
                    name,
                    r["method"],
                    _fmt(r["edges_faithful"]),
                    _fmt(r["ld_recovered_faithful"]),
                    _fmt(r["kl_faithful"], 4),
                    _fmt(r["cpr"]),
                    _fmt(r["cmd"]),
                    _fmt(r["gap"], 4),
                    _fmt(r["gap_mean"], 4),
                    f"{r['seconds']:.1f}",
                ]
            )
    return rows


def show(models: dict) -> None:
    console = Console(width=200)
    if any(e.get("ours") for e in models.values()):
        table = Table(title="every method's circuits graded by our code (held-out, resample; gap at budget 2)")
        for c in OUR_COLUMNS:
            table.add_column(c, justify="left" if c in ("model", "method") else "right")
        for row in our_table_rows(models):
            table.add_row(*row)
        console.print(table)
    table = Table(title="auto-circuit's own evaluation of its methods (held-out, tree patching, resample)")
    for c in PEER_COLUMNS:
        table.add_column(c, justify="left" if c in ("model", "method", "edges:LD% ladder") else "right")
    for row in peer_table_rows(models):
        table.add_row(*row)
    console.print(table)


def _markdown(columns, rows) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def write_markdown(models: dict, path: Path, command: str, versions: dict) -> None:
    lines = [
        "# Peer race: auto-circuit against explainer on the same edge graph",
        "",
        f"Made by `{command}`; `make bench-peers` regenerates every model.",
        "",
        "Same prompts (the task's training split to fit, held-out split to grade), same resample",
        "ablation (the `corrupt` prompts), metric: logit difference at the last position. Peers run in",
        "`.venv-peers` (" + ", ".join(f"{k} {v}" for k, v in versions.items()) + "; one torch thread).",
        "",
    ]
    if any(e.get("ours") for e in models.values()):
        lines += ["## Every method's circuits graded by our code", ""]
        lines += _markdown(OUR_COLUMNS, our_table_rows(models)) + [""]
        if not any(r["method"] in OURS for e in models.values() for r in e.get("ours") or []):
            lines += [
                "Our explainer trained on the edge graph (with and without the adversary) is not in this",
                'table yet: it needs training with `units="edges"`; rerun with `--reuse-peers` to add it.',
                "",
            ]
        for name, entry in models.items():
            for label, v in (entry.get("verdict") or {}).items():
                state = "pass" if v["passed"] else "FAIL: " + "; ".join(v["losses"])
                lines.append(f"- {name}, {label}: {state}")
        for name, entry in models.items():
            for r in entry.get("ours") or []:
                if r.get("timings"):  # where our sweep's time went
                    parts = ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in r["timings"].items())
                    lines.append(f"- {name}, {r['method']}: {r['seconds']:.0f} s in all; {parts}")
        lines.append("")
    else:
        lines += [
            "**Our side is pending**: grading every method's circuits with our scrubber (and training ours",
            "on the edge graph, with the gap at budget 2) needs explainer's edge units",
            '(`explainer/edges.py`, `Scrubber(units="edges")`); `benchmarks/peers.py --reuse-peers` adds',
            "it to these results once they exist.",
            "",
        ]
    lines += ["## auto-circuit's own evaluation of its circuits", ""]
    lines += [
        "Top-k edges by each method's scores, run by auto-circuit (`run_circuits`, tree patching: the",
        "circuit keeps the clean run, every other edge is resampled). `LD %` is auto-circuit's logit",
        "difference recovered (difference of means) at the smallest circuit whose normalised",
        "faithfulness `f = (LD − LD(∅)) / (LD(N) − LD(∅))` is at least 0.9; CPR/CMD over MIB's ladder.",
        "`seconds`: scoring time (one torch thread, 2-core machine).",
        "",
    ]
    lines += _markdown(PEER_COLUMNS, peer_table_rows(models)) + [""]
    for name, entry in models.items():
        p = entry["parity"]
        lines.append(
            f"- {name}: {entry['peers']['n_edges']} edges; full-model LD (held-out) ours "
            f"{p['logit_diff_ours']['heldout']:.4f}, TransformerLens {p['logit_diff_peers']['heldout']:.4f}"
        )
    path.write_text("\n".join(lines) + "\n")


# --- main -----------------------------------------------------------------------------------------


def run_model(name: str, args: argparse.Namespace, earlier: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"peers-{name}-") as tmp:
        folder = Path(args.work) / name if args.work else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        ours_ld = export_inputs(name, folder)
        if args.reuse_peers and "peers" in earlier:
            record = earlier["peers"]
        else:
            started = time.perf_counter()
            record = run_peers(folder, args)
            print(f"{name}: peers done in {time.perf_counter() - started:.0f} s", flush=True)
    entry = {"peers": record, "parity": check_parity(name, record, ours_ld)}
    entry["peers_summary"] = [peer_summary(m, e, record["n_edges"]) for m, e in record["methods"].items()]
    entry["ours"] = evaluate_ours(name, record, args)
    if entry["ours"] is None:
        print(f"{name}: our side skipped: explainer.edges does not exist yet (edge units)", flush=True)
    else:
        entry["verdict"] = verdict(entry["ours"])
    return entry


def recompute(entry: dict) -> dict:
    """A saved model entry's areas and verdict again, from its records (no training, no peers):
    MIB's CPR/CMD over the ladder of edges asked for, and the areas over the edges kept."""
    n_edges = entry["peers"]["n_edges"]
    counts = mib_ladder(n_edges)
    entry["peers_summary"] = [peer_summary(m, e, n_edges) for m, e in entry["peers"]["methods"].items()]
    for row in entry.get("ours") or []:
        f = [r["normalized_faithfulness"] for r in row["records"]]
        if len(f) != len(counts):
            raise SystemExit(f"{row['method']}: {len(f)} records for {len(counts)} rungs; rerun without --report")
        row["cpr"], row["cmd"] = mib_areas(counts, f, n_edges)
        row["cpr_sizes"], row["cmd_sizes"] = frontier_areas([r["size"] for r in row["records"]], f, n_edges)
    if entry.get("ours"):
        entry["verdict"] = verdict(entry["ours"])
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="zoo models")
    parser.add_argument("--methods", nargs="+", default=list(PEER_METHODS), choices=PEER_METHODS)
    parser.add_argument("--ours", nargs="*", default=list(OURS), choices=OURS, help="our frontiers to train")
    parser.add_argument("--peers-python", default=str(ROOT / ".venv-peers" / "bin" / "python"))
    parser.add_argument("--ig-samples", type=int, default=50)
    parser.add_argument("--sp-epochs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=None, help="our training steps (default: the sweep's)")
    parser.add_argument("--budget", type=int, default=2, help="adversary budget of the gap")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), help="discrete adversaries of the gap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="keep the exported inputs and peer logs here")
    parser.add_argument("--reuse-peers", action="store_true", help="keep the peers' scores already in the results")
    parser.add_argument("--report", action="store_true", help="only recompute areas and verdicts of the saved results")
    args = parser.parse_args(argv)
    if args.report:
        record = json.loads(RESULTS.read_text())
        models = {name: recompute(entry) for name, entry in record["models"].items()}
        RESULTS.write_text(json.dumps({**record, "models": models}, indent=2) + "\n")
        show(models)
        versions = next(iter(models.values()))["peers"]["versions"]
        write_markdown(models, TABLE, record["command"], versions)
        print(f"rewrote {RESULTS} and {TABLE}")
        return
    for name in args.models:
        resolve_model(name)  # fail early on a typo
    earlier = json.loads(RESULTS.read_text()).get("models", {}) if RESULTS.is_file() else {}
    models = dict(earlier)
    for name in args.models:
        models[name] = run_model(name, args, earlier.get(name, {}))
        write_record(RESULTS, args, models=models)  # after every model, so a cut-off run keeps its results
    show({n: models[n] for n in args.models})
    versions = next(iter(models.values()))["peers"]["versions"]
    write_markdown(models, TABLE, shlex.join(sys.orig_argv), versions)
    print(f"wrote {RESULTS} and {TABLE}")


if __name__ == "__main__":
    main()
