"""Import RASP programs compiled by tracr as native models, with their prompts and ground truth.

``import_tracr("make_reverse", "models/reverse")`` builds the program from ``tracr.compiler.lib``,
compiles it with tracr (``tracr-pypi``, the optional extra ``explainer[tracr]``) and writes a model
folder: ``config.json`` + ``model.safetensors`` (the native format), ``prompts.json``,
``truth.json`` and ``card.json``. ``python -m explainer.zoo.tracr_import`` rewrites the tracr
models shipped in the zoo (deterministically). tracr is imported inside functions only, so the core
never needs it.

How a compiled model maps onto the native format:

- tracr's residual stream is a direct sum of labelled one-hot spaces (``tokens:a``, ``indices:2``,
  ``one``, one space per RASP variable); it becomes ``d_model`` as is, in tracr's order. The labels
  are on the card (``tracr.residual_labels``).
- tokens: the compiler's vocabulary, BOS and PAD included, in tracr's encoding order
  (``tracr.tokens`` on the card). Every prompt starts with BOS; position 0 has no positional
  embedding, position ``i + 1`` carries ``indices:i``; ``n_ctx = max_seq_len + 1``.
- blocks: tracr's attention (bidirectional: ``attention_dir`` ``"bidirectional"``, tracr's default
  ``causal=False``) and ReLU MLP, with no LayerNorm (``normalization_type`` null), so the forward
  pass equals tracr's own assembled model. Layers tracr leaves empty have zero weights.
- output, read at the last position: tracr unembeds by projecting the residual onto the output
  variable's space. A *categorical* output keeps that projection, times ``LOGIT_SCALE``, as the
  logits over the output values (``tracr.outputs`` on the card): the argmax is tracr's decoded
  value and the right value leads by ``LOGIT_SCALE`` nats. A *numerical* output ``v`` (one residual
  dimension, e.g. ``frac_prevs``) becomes a logit pair ``(s (v - θ), -s (v - θ))``: output 0 means
  "above θ", output 1 "below θ". θ is the midpoint between two neighbouring values the program
  takes at the last position that best balances the prompts; ``s = LOGIT_SCALE / gap`` makes the
  closest values lead by ``LOGIT_SCALE`` nats. tracr's value is ``(logit_0 - logit_1) / 2s + θ``.

Prompts: random inputs of one length (the longest up to ``max_seq_len`` at which the answer varies),
each class of answer equally often; the counterfactual is another random input whose answer
differs, and ``wrong_answers`` is that answer. Answers come from evaluating the RASP program itself
(``rasp.evaluate``), so the card's accuracy measures the compiled model against the program.
A program whose answer only varies with the input's length (``make_length``) gets inputs of every
length up to ``max_seq_len`` instead, left-padded, each with a counterfactual of another answer at
least as long, positions corresponding counted from the end (``"positions": "end"`` in
``prompts.json``; ``tracr.prompt_lengths`` and ``tracr.positions`` on the card). Padding does not
change the model's answers: positions count from each prompt's first real token, BOS, which so
keeps position 0 and tracr's ``indices`` as in an unpadded input, and no real query attends to
padding.

Ground truth: per site, the dimensions the reader's weights read (tracr's craft blocks read only
their input spaces, so these are the labelled spaces each attention/MLP reads), pruned by
:func:`explainer.zoo.ground_truth.prune` to those that matter for the answer under resample
ablation with the prompts' counterfactuals. For prompts of one length, positions and the length are
the same in every prompt and its counterfactual, so index-derived variables are idle for the task,
and so is ``one``. With counterfactuals of other lengths a clean position reads the counterfactual's
residual at the same place counted from the end (for a longer one, not its BOS at the clean BOS),
and the truth is what the answer needs under exactly that resampling.

Programs are the functions of ``tracr.compiler.lib`` (``make_`` may be left out); those that need
an input SOp get ``rasp.tokens``, other arguments get fixed values
(:data:`explainer.zoo.tracr_compile.RECIPES` says which, and gives each program's default vocab).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from explainer.errors import ExplainerError
from explainer.models.native import CONFIG_FILE, save_model, write_json
from explainer.tasks.prompts import prompts_json
from explainer.zoo.tracr_compile import (
    DEFAULT_BOS,
    DEFAULT_MAX_SEQ_LEN,
    LOGIT_SCALE,
    Compiled,
    compile_program,
    parse_vocab,
    to_native,
)
from explainer.zoo.tracr_prompts import N_PROMPTS, make_prompts


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"tracr-pypi": version("tracr-pypi")}


def _card(name: str, compiled: Compiled, info: dict[str, Any] | None, truth, accuracy) -> dict[str, Any]:
    labels = compiled.assembled.residual_labels
    short = compiled.name.removeprefix("make_")
    tokens = sorted(compiled.token_ids, key=compiled.token_ids.get)
    tracr: dict[str, Any] = {
        "program": compiled.name,
        "arguments": compiled.recipe.arguments,
        "vocab": list(compiled.vocab),
        "max_seq_len": compiled.max_seq_len,
        "bos": compiled.bos,
        "tokens": tokens,
        "output": "categorical" if compiled.categorical else "numerical",
        "outputs": [str(v) for v in compiled.outputs] if compiled.categorical else ["above", "below"],
        "logit_scale": LOGIT_SCALE,
        "residual_labels": labels,
        "versions": _versions(),
    }
    if info is not None:
        if "length" in info:
            tracr["prompt_length"] = info["length"]
        else:  # several lengths, counterfactuals aligned at the end
            tracr["prompt_lengths"], tracr["positions"] = info["lengths"], info["positions"]
        if info["readout"] is not None:
            tracr |= info["readout"]
    if truth is not None:
        tracr["truth_labels"] = {site: [labels[u] for u in units] for site, units in truth.items() if units}
    what = f"tracr-compiled RASP program {compiled.name} ({compiled.recipe.arguments}), vocab {list(compiled.vocab)}"
    if info is None:
        what += "; no prompts: its answer at the last position is the same for every input"
    elif "lengths" in info:
        what += (
            f"; its answer only varies with the input's length: prompts of {min(info['lengths'])} to "
            f"{max(info['lengths'])} tokens (and BOS), each counterfactual at least as long, aligned at the end"
        )
    elif not compiled.categorical:
        what += f"; answer: is the value at the last position above {info['readout']['threshold']:.4g}"
    return {"name": name, "task": short, "kind": "tracr", "accuracy": accuracy, "description": what, "tracr": tracr}


def import_tracr(
    program: str | Any,
    out: str | os.PathLike,
    vocab: tuple | str | None = None,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    bos: str = DEFAULT_BOS,
    n_prompts: int = N_PROMPTS,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Compile ``tracr.compiler.lib.<program>`` (a name, or a ``rasp.SOp`` of your own with its
    ``vocab``) and write it as a model folder ``out`` with its prompts, ground truth and card.
    Returns a summary (what ``explainer zoo import-tracr --json`` prints). ``out`` must not exist,
    or be a model folder and ``overwrite`` set. ``vocab`` and the fixed arguments of each program
    are in :data:`~explainer.zoo.tracr_compile.RECIPES`.

    Example (needs ``explainer[tracr]``; compiling takes a few seconds)::

        import_tracr("make_hist", "models/hist", vocab="a,b,c", max_seq_len=4)
        from tracr.compiler import lib
        from tracr.rasp import rasp
        xy = lib.make_nary_sequencemap(lambda x, y: x * y, rasp.tokens, rasp.indices)
        import_tracr(xy, "models/xy", vocab=(1, 2))
    """
    out = Path(out)
    _check_out(out, overwrite)
    if isinstance(vocab, str):
        vocab = parse_vocab(vocab)
    compiled = compile_program(program, vocab, max_seq_len, bos)
    made = make_prompts(compiled, n_prompts, seed)
    batch, info = made if made is not None else (None, None)
    model = to_native(compiled, info["readout"] if info else None)
    truth, accuracy = None, None
    if batch is not None:
        from explainer.metrics import accuracy as accuracy_of
        from explainer.zoo.ground_truth import prune

        accuracy = float(accuracy_of(model(batch.clean)[:, -1], batch.answers, batch.wrong_answers))
        truth = prune(model, batch)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    if batch is not None:
        write_json(tmp / "prompts.json", prompts_json(batch))
        write_json(tmp / "truth.json", truth)
    card = _card(out.name, compiled, info, truth, accuracy)
    write_json(tmp / "card.json", card)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {
        "out": str(out),
        "program": compiled.name,
        "d_model": model.config.d_model,
        "n_layers": model.config.n_layers,
        "accuracy": accuracy,
        "truth": truth,
        "truth_labels": card["tracr"].get("truth_labels"),
        "prompts": None if batch is None else len(batch),
        "note": None if batch is not None else card["description"],
    }


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / CONFIG_FILE).is_file():
        raise ExplainerError(f"{str(out)!r} exists and is not a model folder; pick another OUT (it is left untouched)")
    if not overwrite:
        raise ExplainerError(f"model folder {str(out)!r} exists; pass --overwrite to replace it")


# --- the shipped tracr models ------------------------------------------------------------------

ZOO = {
    "tracr-frac-prevs": dict(program="make_frac_prevs", vocab=("a", "b", "c"), max_seq_len=5),
    "tracr-reverse": dict(program="make_reverse", vocab=("a", "b", "c"), max_seq_len=5),
    "tracr-sort": dict(program="make_sort", vocab=(1, 2, 3, 4), max_seq_len=4),
    "tracr-pair-balance": dict(program="make_pair_balance", vocab=("(", ")", "a"), max_seq_len=5),
}


def main() -> None:
    from explainer.zoo.catalog import ZOO_DIR

    for name, settings in ZOO.items():
        result = import_tracr(out=ZOO_DIR / name, overwrite=True, **settings)
        print("wrote", result["out"], "truth", result["truth_labels"])


if __name__ == "__main__":
    main()
