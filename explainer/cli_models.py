"""The ``explainer`` commands about models: the zoo, importing checkpoints, exporting models and runs."""

from __future__ import annotations

from pathlib import Path
from typing import no_type_check

import typer
from rich.table import Table

from explainer.cli_common import _emit, _fail, app, import_app, out, zoo_app


@zoo_app.callback()
@no_type_check  # typer hands a group's callback its vendored click Context, a base of typer.Context
def zoo(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the shipped models, their tasks, accuracy and ground truth."""
    if ctx.invoked_subcommand is not None:
        return
    from explainer.zoo import zoo_entries

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
    name: str = typer.Argument(..., help="Trained zoo model: induction, direct, ioi, paren or pylm."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the shipped weights use 0)."),
    folder: Path | None = typer.Option(None, "--out", "-o", help="Model folder to write (default zoo/NAME)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Retrain a trained zoo model from a seed: its weights, prompts.json and card.json."""
    from explainer.errors import ExplainerError, did_you_mean
    from explainer.zoo.lm_training import LM_RECIPES, write_lm
    from explainer.zoo.training import RECIPES, shipped_accuracy, write_trained

    names = sorted({*RECIPES, *LM_RECIPES})
    if name not in names:
        raise ExplainerError(f"no trained zoo model named {name!r}; {did_you_mean(name, names)}")
    folder = folder or Path("zoo") / name
    write = write_lm if name in LM_RECIPES else write_trained
    card = write(name, folder, seed=seed, progress=progress, overwrite=overwrite)
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
    from explainer.zoo.tracr_import import import_tracr

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


@import_app.command("hf")
def import_hf_cmd(
    src: Path = typer.Argument(
        ...,
        help="Hugging Face checkpoint folder (config.json + model.safetensors, sharded too): gpt2, gpt_neox, "
        "llama, mistral, qwen2, gemma or gemma2; its tokenizer.json is copied when present.",
    ),
    folder: Path = typer.Argument(..., metavar="OUT", help="Model folder to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (last line)."),
) -> None:
    """Convert a Hugging Face checkpoint (GPT-2, GPT-NeoX/Pythia, Llama, Mistral, Qwen2, Gemma, Gemma-2) into a
    model folder (norms kept, nothing folded)."""
    from explainer.models.hf_import import import_hf

    r = import_hf(src, folder, overwrite=overwrite)
    text = (
        f"{src} ({r['weights']}): {r.get('model_type', 'gpt2')}, {r['n_layers']} layers, d_model {r['d_model']}, "
        f"{r['n_heads']} heads, "
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
    from explainer.zoo import resolve_model

    if fmt != "tl":
        _fail(f"unknown model format {fmt!r}; valid: tl")
    r = export_tl(resolve_model(model), folder, overwrite=overwrite)
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
