"""The ``explainer`` command line: a thin shell over :mod:`explainer.api`.

Every command takes ``--json`` and then prints one JSON object as its last line of stdout
(progress and messages go to stderr). Mistakes print ``error: ...`` naming the fix and exit with
status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from explainer.cli_common import (
    _emit,
    _fail,
    _join_cluster,
    _warn,
    app,
    config_from_options,
    given_settings,
    setting_option,
    use_compile_cache,
)
from explainer.errors import ExplainerError


@app.command()
def train(
    model: str | None = typer.Option(None, "--model", "-m", help="Zoo name or model folder (required)."),
    task: str | None = typer.Option(
        None, "--task", "-t", help="Prompts file or built-in task; default: the model's own prompts."
    ),
    config: Path | None = typer.Option(None, "--config", help="TOML file of training settings."),
    lam: float | None = setting_option("lam"),
    target_size: int | None = setting_option("target_size"),
    kl_budget: float | None = setting_option("kl_budget"),
    ablation: str | None = setting_option("ablation"),
    steps: int | None = setting_option("steps"),
    seed: int | None = setting_option("seed"),
    init_logit: float | None = setting_option("init_logit"),
    init_from: str | None = setting_option("init_from"),
    adversary: str | None = typer.Option(
        None, "--adversary", help="learned (default): train against an adversary in the loop; none."
    ),
    adversary_basis: str | None = typer.Option(
        None,
        "--adversary-basis",
        help="What the in-loop adversary re-includes: own (default) units, or directions of a random "
        "or learned rotation of the excluded subspace.",
    ),
    checkpoint_every: int | None = setting_option("checkpoint_every"),
    devices: int | None = setting_option("devices"),
    remat: bool | None = setting_option("remat"),
    shard_weights: bool | None = setting_option("shard_weights"),
    dtype: str | None = setting_option("dtype"),
    distributed: bool = typer.Option(
        False, "--distributed", help="Join a multi-host JAX cluster first (jax.distributed; see docs/guide.md)."
    ),
    basis: str | None = setting_option("basis"),
    positional: bool | None = setting_option("positional"),
    units: str | None = setting_option("units"),
    trim: bool | None = setting_option("trim"),
    trim_ld_floor: float | None = setting_option("trim_ld_floor"),
    trim_refit_steps: int | None = setting_option("trim_refit_steps"),
    rewrites: list[str] | None = setting_option("rewrites"),
    run: Path | None = typer.Option(None, "--out", "-o", help="Run folder to write (default runs/MODEL-sSEED)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue the interrupted run RUN from its last checkpoint, with its settings."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Learn an explanation and save it as a run folder (or continue one with --resume RUN)."""
    settings = given_settings(locals())
    from explainer.api import explain, resume_run

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
        built = config_from_options(config, settings)
        run = run or Path("runs") / f"{Path(model).name}-s{settings.get('seed', 0)}"
        expl = explain(
            model,
            task,
            built,
            out=run,
            overwrite=overwrite,
            adversary=_in_loop_adversary(adversary, adversary_basis),
            progress=progress,
        )
    _warn(expl.result())
    _emit(expl.result(), as_json, expl.summary() + f"\nsaved to {run}")


def _in_loop_adversary(name: str | None, basis: str | None) -> Any:
    """``--adversary`` and ``--adversary-basis`` as what :func:`explainer.api.explain` takes."""
    if basis is None or basis == "own":
        return name or "learned"
    if (name or "learned") != "learned":
        _fail(f"--adversary-basis {basis} sets the learned adversary's basis; drop it or use --adversary learned")
    from adversary.learned import make_adversary

    return make_adversary("learned", basis=basis)


RUN_DTYPE = "The model's weights and activations: float32, bfloat16 or float16 (default: the run's own dtype)."


@app.command("eval")
def evaluate_cmd(
    run: Path = typer.Argument(..., help="Run folder."),
    task: str | None = typer.Option(None, "--task", "-t", help="Evaluate on another prompts file or task."),
    ablation: str | None = typer.Option(None, "--ablation", help="Evaluate under another ablation."),
    truth: bool = typer.Option(False, "--truth", help="Score kept units against the model's ground truth."),
    dtype: str | None = typer.Option(None, "--dtype", help=RUN_DTYPE),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Re-measure a saved explanation on held-out prompts."""
    from explainer.api import evaluate, open_run
    from explainer.metrics import truth_scores
    from explainer.zoo import load_truth

    result = evaluate(run, task, ablation, dtype)
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
    _warn(result)
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
    progress: bool = typer.Option(
        True,
        "--progress/--no-progress",
        help="Announce each phase on stderr (its seconds; how far a running method is).",
    ),
    dtype: str | None = typer.Option(None, "--dtype", help=RUN_DTYPE),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Attack an explanation: re-include up to K excluded units (dimensions or edges) to move its predictions;
    robust or fragile at that budget."""
    from explainer.api import attack_run, check_run_units

    if units is not None:
        check_run_units(run, units)

    result = attack_run(
        run, budget, method, seed, divergence, adversary_basis=adversary_basis, progress=progress, dtype=dtype
    )
    gap = result["gap"]
    lines = [
        result["verdict_text"],
        f"{run}: strongest attack at budget {budget}"
        + (f" ({result['strongest']})" if method == "all" else f" ({method})")
        + ("" if adversary_basis == "own" else f", in the adversary's {adversary_basis} basis"),
        f"re-included {', '.join(result['reincluded_names']) or 'nothing'}",
        f"gap: KL mean {gap['kl_mean']:.4g}, max {gap['kl_max']:.4g} nats; "
        f"accuracy change {result['accuracy_change']:+.3f}, logit diff change {result['logit_diff_change']:+.3f}",
    ]
    for r in result.get("methods", []):
        named = {s: u for s, u in r["reincluded"].items() if u}
        lines.append(f"  {r['method']:<10} gap {r['gap']['kl_mean']:.4g}  re-included {named}")
    if "exhaustive" in result.get("skipped", []):
        lines.append(
            "  exhaustive skipped: scoring every set costs too much here "
            "(--method exhaustive runs it alone, up to its max_sets sets)"
        )
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
    """Summarise a run and draw its masks (sites × units) with the training curves (and its circuit);
    for a sweep folder, list its rungs and draw its frontier."""
    from explainer.api import open_run
    from explainer.metrics import truth_scores
    from explainer.plotting import plot_circuit, plot_explanation
    from explainer.zoo import load_truth

    if (Path(run) / "frontier.json").is_file() and not (Path(run) / "explanation.json").is_file():
        if graph is not None:
            _fail(f"{run} is a sweep folder; draw one rung's circuit: explainer show {run}/runs/RUNG --graph FILE")
        _show_sweep(run, png, as_json)
        return
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


def _show_sweep(folder: Path, png: Path | None, as_json: bool) -> None:
    """``show SWEEP``: the sweep's rungs as a table and its frontier drawn (``frontier.png`` by default)."""
    from explainer.models.native import read_json
    from explainer.plotting import plot_frontier

    result = read_json(Path(folder) / "frontier.json")
    if not isinstance(result, dict) or not isinstance(result.get("records"), list):
        _fail(f"{Path(folder) / 'frontier.json'} is not a sweep's result; rerun the sweep")
    picture = plot_frontier({"ours": result}, png or Path(folder) / "frontier.png")
    lines = [_sweep_head(str(result["model"].get("name") or result["model"].get("path")), result)]
    lines += _rung_table(result["records"])
    _warn(result)
    _emit({**result, "png": str(picture)}, as_json, "\n".join(lines) + f"\nwrote {picture}")


def _sweep_head(model: str, result: dict[str, Any]) -> str:
    head = f"frontier of {model} ({result['mode']}, {result['strategy']})"
    return f"{head}: CPR {result['cpr']:.3f}, CMD {result['cmd']:.3f}, KL area {result['kl_area']:.4g} nats"


def _rung_table(records: list[dict[str, Any]]) -> list[str]:
    """One line per rung: size, target, faithfulness, gap and its run folder within the sweep's."""
    columns = f"{'size':>5} {'target':>7} {'KL mean':>9} {'KL p99':>9} {'f':>6} {'LD rec':>7} {'acc':>6} {'gap':>8}"
    lines = [f"  {columns}  run"]
    for r in records:
        run = Path(*Path(r["run"]).parts[-2:]) if r.get("run") else None  # runs/size-K-target-T
        lines.append(
            f"  {r['size']:>5} {r.get('target', '-'):>7} {r['kl_mean']:>9.4g} {r['kl_p99']:>9.4g} "
            f"{r['normalized_faithfulness']:>6.3f} {r['logit_diff_recovered']:>7.3f} {r['accuracy']:>6.3f} "
            f"{r['gap']:>8.4g}  {run or '-'}"
        )
    return lines


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
    ablation: str | None = setting_option("ablation"),
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
    steps: int | None = setting_option(
        "steps", "Training steps of the first rung and of each open restart (default {default})."
    ),
    continuation_steps: int | None = typer.Option(
        None, "--continuation-steps", help="Most training steps of every later rung (default: a quarter of --steps)."
    ),
    patience: int | None = typer.Option(
        None,
        "--patience",
        help="On a ladder of sizes, a later rung, the first one when the gates start from a ranking (the "
        "default), or an open restart stops once its explanation, and the adversary's attacks on it, have "
        "not changed for N steps (default 100; 0: never stops early).",
    ),
    seed: int | None = setting_option("seed"),
    checkpoint_every: int | None = setting_option("checkpoint_every"),
    devices: int | None = setting_option("devices"),
    remat: bool | None = setting_option("remat"),
    shard_weights: bool | None = setting_option("shard_weights"),
    dtype: str | None = setting_option("dtype"),
    units: str | None = setting_option("units"),
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
    settings = given_settings(locals())
    from explainer.frontier.sweep import resume_sweep
    from explainer.frontier.sweep import sweep as run_sweep

    listed = [a.strip() for a in ablations.split(",") if a.strip()] if ablations is not None else None
    given = {"lambdas": lambdas, "sizes": sizes, "adversary": adversary, "budget": budget, "ablations": listed}
    given |= {
        "strategy": strategy,
        "direction": direction,
        "patience": patience,
        "continuation_steps": continuation_steps,
    }
    given = {k: v for k, v in given.items() if v is not None}  # the rest: the library's defaults
    if resume is not None:
        if overwrite:
            _fail("--resume continues a sweep and --overwrite starts one again; give one of them")
        if out_dir is not None and Path(out_dir).resolve() != resume.resolve():
            _fail(f"--resume {resume} writes that sweep; drop --out {out_dir}")
        out_dir = resume
        result = resume_sweep(resume, progress, model=model, task=task, config=config, **given, **settings)
        model = result["model"].get("name") or result["model"]["path"]
    else:
        if model is None:
            _fail("missing option --model: pass a zoo name or a model folder (or --resume OUT)")
        if out_dir is None:
            _fail("missing option --out: the sweep folder to write")
        result = run_sweep(
            model,
            task,
            config=config_from_options(config, settings),
            out=out_dir,
            overwrite=overwrite,
            progress=progress,
            **given,
        )
    lines = [_sweep_head(str(model), result), *_rung_table(result["records"])]
    for name, g in result.get("ablations", {}).items():
        lines.append(f"  under {name:<8} CPR {g['cpr']:.3f}  CMD {g['cmd']:.3f}  KL area {g['kl_area']:.4g} nats")
    _warn(result)
    _emit(result, as_json, "\n".join(lines) + f"\nwrote {Path(out_dir) / 'frontier.json'} and frontier.png")


from explainer import cli_models  # noqa: E402, F401  (registers the zoo, import and export commands last)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: project errors become ``error: ...`` and exit status 2.

    Usage errors (an unknown flag, a missing option) are click's: they also exit with status 2.
    ``argv`` (default: the command line) lets tests run a command in-process. Compiled programs
    are kept on disk for the next command (:func:`~explainer.cli_common.use_compile_cache`).
    """
    use_compile_cache()
    try:
        app(args=argv, prog_name="explainer")
    except ExplainerError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
