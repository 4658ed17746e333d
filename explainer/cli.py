"""The ``explainer`` command line: a thin shell over :mod:`explainer.api`.

Every command takes ``--json`` and then prints one JSON object as its last line of stdout
(progress and messages go to stderr). Mistakes print ``error: ...`` naming the fix and exit with
status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from explainer.errors import ExplainerError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Learn small, faithful, adversarially robust explanations of transformer behaviours.",
)
zoo_app = typer.Typer(help="Models shipped with explainer.", invoke_without_command=True)
app.add_typer(zoo_app, name="zoo")
import_app = typer.Typer(help="Bring your own model: convert a checkpoint into a model folder.", no_args_is_help=True)
app.add_typer(import_app, name="import")
out = Console()
err = Console(stderr=True)


def _emit(result: dict[str, Any], as_json: bool, text: str | None = None) -> None:
    if as_json:
        print(json.dumps(result, default=str))
    elif text is not None:
        out.print(text, highlight=False, markup=False)


def _fail(message: str) -> None:
    raise ExplainerError(message)


def _join_cluster(requested: bool) -> None:
    """``--distributed`` or ``EXPLAINER_COORDINATOR``: join a multi-host cluster before JAX starts."""
    from explainer.parallel import init_distributed

    if init_distributed(requested=requested):
        err.print("joined the JAX cluster (jax.distributed)", highlight=False)


@zoo_app.callback()
def zoo(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the shipped models, their tasks, accuracy and ground truth."""
    if ctx.invoked_subcommand is not None:
        return
    from explainer.models.zoo import zoo_entries

    entries = zoo_entries()
    result = {"models": [e.to_json() for e in entries]}
    if as_json:
        _emit(result, True)
        return
    table = Table(title="explainer zoo")
    for column in ("name", "task", "accuracy", "ground truth"):
        table.add_column(column, no_wrap=True)
    for e in entries:
        truth = "-" if e.ground_truth is None else f"{sum(map(len, e.ground_truth.values()))} units"
        acc = "-" if e.accuracy is None else f"{100 * e.accuracy:.1f}%"
        table.add_row(e.name, e.task, acc, truth)
    out.print(table)
    for e in entries:
        out.print(f"[bold]{e.name}[/]: {e.description}", highlight=False)
        if e.ground_truth:
            out.print("    truth: " + ", ".join(f"{s} {u}" for s, u in e.ground_truth.items() if u), highlight=False)


@zoo_app.command("train")
def zoo_train(
    name: str = typer.Argument(..., help="Trained zoo model: induction, direct, ioi or paren."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the shipped weights use 0)."),
    folder: Path | None = typer.Option(None, "--out", "-o", help="Model folder to write (default zoo/NAME)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Retrain a trained zoo model from a seed: its weights, prompts.json and card.json."""
    from explainer.models.training import shipped_accuracy, write_trained

    folder = folder or Path("zoo") / name
    card = write_trained(name, folder, seed=seed, progress=progress, overwrite=overwrite)
    result = {
        "name": name,
        "out": str(folder),
        "seed": seed,
        "task": card["task"],
        "accuracy": card["accuracy"],
        "top1_accuracy": card["top1_accuracy"],
        "shipped_accuracy": shipped_accuracy(name),
        "train_seconds": card["training"]["train_seconds"],
    }
    text = (
        f"trained {name} (seed {seed}) in {result['train_seconds']} s: held-out accuracy "
        f"{100 * card['accuracy']:.1f}%, top-1 {100 * card['top1_accuracy']:.1f}% "
        f"(shipped model: {100 * (result['shipped_accuracy'] or 0):.1f}%)\nwrote {folder}"
    )
    _emit(result, as_json, text)


@zoo_app.command("import-tracr")
def zoo_import_tracr(
    program: str = typer.Argument(..., help="A function of tracr.compiler.lib, e.g. make_reverse or frac_prevs."),
    folder: Path = typer.Argument(..., metavar="OUT", help="Model folder to write."),
    vocab: str | None = typer.Option(None, "--vocab", help="Comma-separated tokens, e.g. a,b,c (default per program)."),
    max_seq_len: int = typer.Option(5, "--max-seq-len", help="Longest input, BOS not counted."),
    bos: str = typer.Option("BOS", "--bos", help="The compiler's BOS token."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompts."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Compile a RASP program with tracr into a model folder with prompts and ground truth."""
    from explainer.models.tracr_import import import_tracr

    result = import_tracr(
        program, folder, vocab=vocab, max_seq_len=max_seq_len, bos=bos, seed=seed, overwrite=overwrite
    )
    lines = [f"{result['program']}: {result['n_layers']} layers, d_model {result['d_model']}"]
    if result["note"]:
        lines.append(f"note: {result['note']}")
    else:
        lines.append(f"accuracy {100 * result['accuracy']:.1f}% on {result['prompts']} prompts; ground truth:")
        lines += [f"    {site}: {', '.join(labels)}" for site, labels in result["truth_labels"].items()]
    _emit(result, as_json, "\n".join(lines) + f"\nwrote {folder}")


@app.command()
def train(
    model: str | None = typer.Option(None, "--model", "-m", help="Zoo name or model folder (required)."),
    task: str | None = typer.Option(
        None, "--task", "-t", help="Prompts file or built-in task; default: the model's own prompts."
    ),
    config: Path | None = typer.Option(None, "--config", help="TOML file of training settings."),
    lam: float | None = typer.Option(None, "--lambda", help="Fixed size penalty (nats per kept unit)."),
    target_size: int | None = typer.Option(None, "--target-size", help="Train an explanation of exactly N units."),
    kl_budget: float | None = typer.Option(
        None, "--kl-budget", help="Smallest explanation with KL <= this (default 0.01)."
    ),
    ablation: str | None = typer.Option(None, "--ablation", help="resample (default), mean, zero or optimal."),
    steps: int | None = typer.Option(None, "--steps", help="Training steps (default 1500)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default 0)."),
    adversary: str | None = typer.Option(
        None, "--adversary", help="learned (default): train against an adversary in the loop; none."
    ),
    adversary_basis: str | None = typer.Option(
        None,
        "--adversary-basis",
        help="What the in-loop adversary re-includes: own (default) units, or directions of a random "
        "or learned rotation of the excluded subspace.",
    ),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", help="Checkpoint into OUT.partial/ every N steps (default 250; 0: never)."
    ),
    devices: int | None = typer.Option(
        None, "--devices", help="Split each step's batch across N devices (default: all JAX sees)."
    ),
    remat: bool | None = typer.Option(
        None, "--remat/--no-remat", help="Recompute each block in the backward pass: less memory (default off)."
    ),
    distributed: bool = typer.Option(
        False, "--distributed", help="Join a multi-host JAX cluster first (jax.distributed; see the README)."
    ),
    basis: str | None = typer.Option(
        None, "--basis", help="What a unit is: standard (default), pca, gradient, learned, or a .safetensors/.npz file."
    ),
    positional: bool | None = typer.Option(
        None, "--positional/--no-positional", help="One gate per (position, unit) (fixed-length prompts)."
    ),
    units: str | None = typer.Option(
        None, "--units", help="What a unit is: dims (residual dimensions, default) or edges (writer -> reader)."
    ),
    trim: bool | None = typer.Option(
        None, "--trim/--no-trim", help="After training, drop every unit the KL budget can lose (default off)."
    ),
    trim_ld_floor: float | None = typer.Option(
        None,
        "--trim-ld-floor",
        help="With --trim, keep the logit difference recovered (training prompts) at least this (default 0.9).",
    ),
    trim_refit_steps: int | None = typer.Option(
        None,
        "--trim-refit-steps",
        help="With --trim and --basis learned, steps that refit the rotation to a smaller set (default 300; 0: none).",
    ),
    rewrite: list[str] | None = typer.Option(
        None,
        "--rewrite",
        help="Rewrite an MLP as a fitted f plus a remainder that is one unit: blocks.L.mlp=linear, "
        "=rank-R or =mean (mlps=FORM: every MLP). Repeatable.",
    ),
    run: Path | None = typer.Option(None, "--out", "-o", help="Run folder to write (default runs/MODEL-sSEED)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue the interrupted run RUN from its last checkpoint, with its settings."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Learn an explanation and save it as a run folder (or continue one with --resume RUN)."""
    from explainer.api import explain, resume_run

    settings = {
        "lam": lam,
        "target_size": target_size,
        "kl_budget": kl_budget,
        "ablation": ablation,
        "steps": steps,
        "seed": seed,
        "checkpoint_every": checkpoint_every,
        "devices": devices,
        "remat": remat,
        "basis": basis,
        "positional": positional,
        "units": units,
        "trim": trim,
        "trim_ld_floor": trim_ld_floor,
        "trim_refit_steps": trim_refit_steps,
        "rewrites": rewrite or None,
    }
    _join_cluster(distributed)
    if resume is not None:
        if overwrite:
            _fail("--resume continues a run and --overwrite starts one again; give one of them")
        if run is not None and Path(run).resolve() != resume.resolve():
            _fail(f"--resume {resume} writes that run; drop --out {run}")
        if adversary_basis is not None:
            _fail("--resume continues with the adversary the run was started with; drop --adversary-basis")
        run = resume
        expl = resume_run(resume, progress, model=model, task=task, config=config, adversary=adversary, **settings)
    else:
        if model is None:
            _fail("missing option --model: pass a zoo name or a model folder (or --resume RUN)")
        run = run or Path("runs") / f"{Path(model).name}-s{seed or 0}"
        expl = explain(
            model,
            task,
            config,
            out=run,
            overwrite=overwrite,
            adversary=_in_loop_adversary(adversary, adversary_basis),
            progress=progress,
            **settings,
        )
    _emit(expl.result(), as_json, expl.summary() + f"\nsaved to {run}")


def _in_loop_adversary(name: str | None, basis: str | None) -> Any:
    """``--adversary`` and ``--adversary-basis`` as what :func:`explainer.api.explain` takes."""
    if basis is None or basis == "own":
        return name or "learned"
    if (name or "learned") != "learned":
        _fail(f"--adversary-basis {basis} sets the learned adversary's basis; drop it or use --adversary learned")
    from adversary.learned import make_adversary

    return make_adversary("learned", basis=basis)


@app.command("eval")
def evaluate_cmd(
    run: Path = typer.Argument(..., help="Run folder."),
    task: str | None = typer.Option(None, "--task", "-t", help="Evaluate on another prompts file or task."),
    ablation: str | None = typer.Option(None, "--ablation", help="Evaluate under another ablation."),
    truth: bool = typer.Option(False, "--truth", help="Score kept units against the model's ground truth."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Re-measure a saved explanation on held-out prompts."""
    from explainer.api import evaluate, open_run
    from explainer.metrics import truth_scores
    from explainer.models import load_truth

    result = evaluate(run, task, ablation)
    f = result["faithfulness"]
    text = (
        f"{run}: size {result['size']}, ablation {result['ablation']}, task {result['task']}\n"
        f"KL mean {f['kl_mean']:.4g}  p90 {f['kl_p90']:.4g}  p99 {f['kl_p99']:.4g}  max {f['kl_max']:.4g} nats\n"
        f"logit diff recovered {f['logit_diff_recovered']:.3f}  accuracy {f['accuracy']:.3f} "
        f"(full model {f['accuracy_full']:.3f})"
    )
    for site, check in result["illusion"].items():
        flagged = f"; possible illusion (effect through a dormant direction): units {check['flagged']}"
        text += f"\n{site}: kept directions {100 * check['mean_used_share']:.0f}% in the reader's input space"
        text += flagged if check["flagged"] else ""
    if truth:
        expl, _, folder = open_run(run)
        known = load_truth(folder)
        if expl.config.get("units") == "edges":
            _fail("--truth scores residual dimensions and this run has edge units; train with --units dims")
        if known is None:
            _fail(f"model {str(folder)!r} has no truth.json; --truth needs a model with a ground truth")
        result["truth"] = {**truth_scores(expl.kept, known), "ground_truth": known}
        t = result["truth"]
        text += f"\nvs ground truth: precision {t['precision']:.3f} recall {t['recall']:.3f} F1 {t['f1']:.3f}"
    _emit(result, as_json, text)


@app.command()
def attack(
    run: Path = typer.Argument(..., help="Run folder."),
    budget: int = typer.Option(1, "--budget", "-k", help="How many excluded units the adversary may re-include."),
    method: str = typer.Option("all", "--method", help="greedy, random, gradient, exhaustive or all."),
    divergence: str = typer.Option("kl", "--divergence", help="kl, reverse_kl or symmetric."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the searches."),
    adversary_basis: str = typer.Option(
        "own",
        "--adversary-basis",
        help="own: re-include the explanation's units; random or learned: directions of a rotation "
        "of the excluded subspace (catches what a rotated basis hides).",
    ),
    units: str | None = typer.Option(
        None, "--units", help="dims or edges: the run's units (checked; a run is attacked in the units it has)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Grade an explanation: re-include up to K excluded units (dimensions or edges) to move its predictions."""
    from explainer.api import attack_run, check_run_units

    if units is not None:
        check_run_units(run, units)

    result = attack_run(run, budget, method, seed, divergence, adversary_basis=adversary_basis)
    gap = result["gap"]
    lines = [
        f"{run}: strongest attack at budget {budget}"
        + (f" ({result['strongest']})" if method == "all" else f" ({method})")
        + ("" if adversary_basis == "own" else f", in the adversary's {adversary_basis} basis"),
        f"re-included {result['reincluded']}",
        f"gap: KL mean {gap['kl_mean']:.4g}, max {gap['kl_max']:.4g} nats; "
        f"accuracy change {result['accuracy_change']:+.3f}, logit diff change {result['logit_diff_change']:+.3f}",
    ]
    for r in result.get("methods", []):
        lines.append(f"  {r['method']:<10} gap {r['gap']['kl_mean']:.4g}  re-included {r['reincluded']}")
    _emit(result, as_json, "\n".join(lines) + f"\nwrote {Path(run) / 'attack.json'}")


@app.command()
def show(
    run: Path = typer.Argument(..., help="Run folder."),
    png: Path | None = typer.Option(None, "--png", help="Where to write the heatmap (default RUN/masks.png)."),
    graph: Path | None = typer.Option(
        None,
        "--graph",
        help="Also draw the circuit to this PNG: kept edges as a layered graph (--units edges runs), "
        "or kept units per reader (dimension runs).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Summarise a run and draw its masks (sites × units) with the training curves (and its circuit)."""
    from explainer.api import open_run
    from explainer.metrics import truth_scores
    from explainer.models import load_truth
    from explainer.plotting import plot_circuit, plot_explanation

    expl, net, folder = open_run(run, check_weights=False)
    truth = load_truth(folder)
    picture = plot_explanation(expl, png or Path(run) / "masks.png", truth)
    result = {**expl.result(), "png": str(picture)}
    text = expl.summary()
    if graph is not None:
        result["graph"] = str(plot_circuit(expl, graph, net.config))
    if expl.config.get("units") == "edges":
        from explainer.edges import edge_names

        names = edge_names(net.config, list(expl.n_units))
        result["edges"] = [names[site][u] for site, units in expl.kept.items() for u in units]
        text += f"\nkept edges: {', '.join(result['edges']) or 'none'}"
    if truth is not None and expl.config.get("units") != "edges":  # ground truths list dimensions
        result["truth"] = truth_scores(expl.kept, truth)
        text += f"\nground truth {truth}: F1 {result['truth']['f1']:.3f}"
    _emit(result, as_json, text + f"\nwrote {picture}" + (f" and {result['graph']}" if graph is not None else ""))


@app.command()
def compare(
    run_a: Path = typer.Argument(..., help="First run folder."),
    run_b: Path = typer.Argument(..., help="Second run folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Put two explanations side by side: shared and differing units per site, and their metrics."""
    from explainer.compare import compare_runs, describe

    result = compare_runs(run_a, run_b)
    _emit(result, as_json, describe(result))


@app.command()
def sweep(
    model: str | None = typer.Option(None, "--model", "-m", help="Zoo name or model folder (required)."),
    task: str | None = typer.Option(None, "--task", "-t", help="Prompts file or built-in task."),
    lambdas: str | None = typer.Option(None, "--lambdas", help="Fixed penalties, e.g. 0.001,0.01,0.1."),
    sizes: str | None = typer.Option(None, "--sizes", help="Target sizes, e.g. 1,2,4,8 (default: MIB's ladder)."),
    config: Path | None = typer.Option(None, "--config", help="TOML file of training settings."),
    adversary: str | None = typer.Option(None, "--adversary", help="learned (default) or none."),
    budget: int | None = typer.Option(None, "--budget", "-k", help="Attack budget of the reported gap (default 2)."),
    ablation: str | None = typer.Option(None, "--ablation", help="Training ablation (default resample)."),
    ablations: str | None = typer.Option(
        None,
        "--ablations",
        help="Also report the frontier under these ablations (default resample,mean,zero,optimal; '' none).",
    ),
    strategy: str | None = typer.Option(
        None,
        "--strategy",
        help="continuation (one rung after another, warm-started; two states at a time), vmap (every rung "
        "at once: one compiled run over a batch of states, two per rung of sizes; faster on a GPU, frontiers "
        "differ) or auto (default: continuation).",
    ),
    direction: str | None = typer.Option(
        None,
        "--direction",
        help="How a ladder of sizes trains: both (default; continuation: up from the smallest size and "
        "down from the largest from open gates; vmap: every rung from the initial gates and from open "
        "gates; each rung the better), up or down.",
    ),
    steps: int | None = typer.Option(
        None, "--steps", help="Training steps of the first rung and of each open restart (default 1500)."
    ),
    continuation_steps: int | None = typer.Option(
        None, "--continuation-steps", help="Most training steps of every later rung (default: a quarter of --steps)."
    ),
    patience: int | None = typer.Option(
        None,
        "--patience",
        help="On a ladder of sizes without an adversary, a later rung or an open restart stops once its "
        "explanation has not changed for N steps (default 100; 0: never stops early).",
    ),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default 0)."),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", help="Checkpoint into OUT.partial/ every N steps (default 250; 0: never)."
    ),
    devices: int | None = typer.Option(
        None, "--devices", help="Split each step's batch across N devices (default: all JAX sees)."
    ),
    remat: bool | None = typer.Option(
        None, "--remat/--no-remat", help="Recompute each block in the backward pass: less memory (default off)."
    ),
    units: str | None = typer.Option(
        None, "--units", help="What a unit is: dims (residual dimensions, default) or edges (writer -> reader)."
    ),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Sweep folder to write (required)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing sweep folder."),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue the interrupted sweep OUT from its checkpoints, with its settings."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print frontier.json as the last line."),
) -> None:
    """Train a ladder of explanations (sizes or penalties) and grade each: the frontier (or continue
    an interrupted sweep with --resume OUT)."""
    from explainer.sweep import PATIENCE, resume_sweep
    from explainer.sweep import sweep as run_sweep

    settings = {
        "ablation": ablation,
        "steps": steps,
        "seed": seed,
        "checkpoint_every": checkpoint_every,
        "devices": devices,
        "remat": remat,
        "units": units,
    }
    listed = [a.strip() for a in ablations.split(",") if a.strip()] if ablations is not None else None
    if resume is not None:
        if overwrite:
            _fail("--resume continues a sweep and --overwrite starts one again; give one of them")
        if out_dir is not None and Path(out_dir).resolve() != resume.resolve():
            _fail(f"--resume {resume} writes that sweep; drop --out {out_dir}")
        out_dir = resume
        given = {"model": model, "task": task, "lambdas": lambdas, "sizes": sizes, "config": config}
        given |= {"adversary": adversary, "budget": budget, "ablations": listed, "strategy": strategy}
        given |= {"direction": direction, "patience": patience, "continuation_steps": continuation_steps}
        result = resume_sweep(resume, progress, **given, **settings)
        model = result["model"].get("name") or result["model"]["path"]
    else:
        if model is None:
            _fail("missing option --model: pass a zoo name or a model folder (or --resume OUT)")
        if out_dir is None:
            _fail("missing option --out: the sweep folder to write")
        result = run_sweep(
            model,
            task,
            lambdas=lambdas,
            sizes=sizes,
            config=config,
            adversary=adversary or "learned",
            budget=2 if budget is None else budget,
            ablations=listed if listed is not None else ["resample", "mean", "zero", "optimal"],
            strategy=strategy or "auto",
            direction=direction or "both",
            continuation_steps=continuation_steps,
            patience=PATIENCE if patience is None else patience,
            out=out_dir,
            overwrite=overwrite,
            progress=progress,
            **settings,
        )
    head = f"frontier of {model} ({result['mode']}, {result['strategy']})"
    lines = [f"{head}: CPR {result['cpr']:.3f}, CMD {result['cmd']:.3f}, KL area {result['kl_area']:.4g} nats"]
    lines.append(f"  {'size':>5} {'KL mean':>9} {'KL p99':>9} {'f':>6} {'LD rec':>7} {'acc':>6} {'gap':>8}  run")
    for r in result["records"]:
        lines.append(
            f"  {r['size']:>5} {r['kl_mean']:>9.4g} {r['kl_p99']:>9.4g} {r['normalized_faithfulness']:>6.3f} "
            f"{r['logit_diff_recovered']:>7.3f} {r['accuracy']:>6.3f} {r['gap']:>8.4g}  {r['run']}"
        )
    for name, g in result.get("ablations", {}).items():
        lines.append(f"  under {name:<8} CPR {g['cpr']:.3f}  CMD {g['cmd']:.3f}  KL area {g['kl_area']:.4g} nats")
    _emit(result, as_json, "\n".join(lines) + f"\nwrote {Path(out_dir) / 'frontier.json'} and frontier.png")


@import_app.command("hf")
def import_hf_cmd(
    src: Path = typer.Argument(..., help="Hugging Face GPT-2 checkpoint folder (config.json + model.safetensors)."),
    folder: Path = typer.Argument(..., metavar="OUT", help="Model folder to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Convert a GPT-2-family Hugging Face checkpoint into a model folder (LayerNorm kept, nothing folded)."""
    from explainer.models.hf_import import import_hf

    r = import_hf(src, folder, overwrite=overwrite)
    text = (
        f"{src} ({r['weights']}): GPT-2, {r['n_layers']} layers, d_model {r['d_model']}, {r['n_heads']} heads, "
        f"vocabulary {r['d_vocab']}, context {r['n_ctx']}, {r['parameters']:,} parameters\nwrote {folder}"
    )
    _emit(r, as_json, text)


@import_app.command("tl")
def import_tl_cmd(
    src: Path = typer.Argument(..., help="Folder with a HookedTransformerConfig JSON and a state dict."),
    folder: Path = typer.Argument(..., metavar="OUT", help="Model folder to write."),
    config: Path | None = typer.Option(None, "--config", help="The config JSON (default SRC/config.json)."),
    weights: Path | None = typer.Option(None, "--weights", help="The state dict (default: the one in SRC)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Convert TransformerLens files (config JSON + state dict) into a model folder."""
    from explainer.models.tl import import_tl

    r = import_tl(src, folder, overwrite=overwrite, config=config, weights=weights)
    _emit(r, as_json, f"{src}: {r['n_layers']} layers, d_model {r['d_model']}\nwrote {folder}")


@app.command("export-model")
def export_model_cmd(
    model: str = typer.Argument(..., help="Zoo name or model folder."),
    folder: Path = typer.Argument(..., metavar="OUT", help="Folder to write."),
    fmt: str = typer.Option("tl", "--format", help="tl: HookedTransformerConfig JSON + state dict (safetensors)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing folder written by this command."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Write a model as TransformerLens files, loadable with HookedTransformer.load_state_dict."""
    from explainer.models.tl import export_tl

    if fmt != "tl":
        _fail(f"unknown model format {fmt!r}; valid: tl")
    r = export_tl(model, folder, overwrite=overwrite)
    _emit(r, as_json, f"wrote {folder}/config.json (HookedTransformerConfig) and {folder}/model.safetensors")


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="Run folder."),
    fmt: str = typer.Option("json", "--format", help="json (per-unit scores) or mib (MIB circuit file)."),
    target: Path | None = typer.Option(None, "--out", "-o", help="File to write (default RUN/units.json or mib.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Export an explanation: per-unit importance scores, or a MIB circuit-localisation file."""
    from explainer.export import export_run

    r = export_run(run, fmt, target)
    what = f"{r['units']} units" if fmt == "json" else f"{r['edges']} edges, {r['edges_in_graph']} in the circuit"
    _emit(r, as_json, f"{run}: size {r['size']}; {what}\nwrote {r['out']}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: project errors become ``error: ...`` and exit status 2.

    Usage errors (an unknown flag, a missing option) are click's: they also exit with status 2.
    ``argv`` (default: the command line) lets tests run a command in-process.
    """
    try:
        app(args=argv, prog_name="explainer")
    except ExplainerError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
