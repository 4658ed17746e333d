"""The peer side of the race: auto-circuit's edge-scoring methods on one exported model.

Runs INSIDE the peers' environment (``.venv-peers``, built by ``make bench-peers``: torch,
transformer_lens 2.x, auto-circuit 1.0.1); it never imports ``explainer``, which lives in the other
environment. ``benchmarks/peers.py`` (our environment) writes its input folder and reads its output.

Input folder ``IN``:

- ``IN/model/config.json`` (``HookedTransformerConfig`` keyword arguments) and
  ``IN/model/model.safetensors`` (its state dict), as ``explainer export-model MODEL IN/model``
  writes them;
- ``IN/train.json`` and ``IN/heldout.json``: prompts files (``{"prompts": [{"clean", "corrupt",
  "answers", "wrong_answers"}]}``, token ids, one length), our task's training and held-out splits.

For each method it scores every edge of auto-circuit's factorised edge graph with separate q/k/v
inputs per head (110 edges for 2 layers x 4 heads with MLPs) on the training prompts, with
**resample** ablation (a scrubbed edge carries its writer's value on the ``corrupt`` prompt) and the
logit difference (answer minus wrong answer at the last position) as the metric:

- ``eap``: edge attribution patching (auto-circuit's fast form: the gradient of the logit
  difference with respect to the edge masks at the clean run, ``mask_val=0``);
- ``ig``: integrated gradients of the same masks from clean to corrupt (``--ig-samples`` steps:
  50 by default, as auto-circuit's "Integrated Edge Gradients (Logit Grad)" preset; its logit-diff
  preset takes 1000, about 9 minutes per 2-layer zoo model on one core);
- ``acdc``: ACDC (KL at the last position, one pass per threshold of ``--acdc-taus``, 1e-5 to 0.1
  by default, finer than auto-circuit's preset of 1e-6 to 1e-3 so that the ranking has more
  levels; a pruned edge scores the smallest threshold that pruned it, never-pruned edges score
  above every threshold);
- ``sp``: subnetwork probing in auto-circuit's "tree" form (clean input, hard-concrete masks learn
  which edges to scrub; preset learning rate 0.1 and lambda 0.5, ``--sp-epochs`` 200 as the
  "Subnetwork Edge Probing" preset, where the tree preset takes 2000). auto-circuit
  hard-codes token-wise *mean* ablation for it; here it is switched to resample ablation like the
  others.

auto-circuit keeps its edges and its patch wrappers in Python sets (ordered by string hashes and
object ids), so its ACDC and subnetwork probing differ from run to run; :func:`load_model` fixes
both orders, and with one torch thread and ``--seed`` every method gives the same scores each run.

Scores are importances (higher = more important: ``|gradient|`` for eap and ig, as auto-circuit ranks
them). Edge names use explainer's canonical scheme ``"{writer}->{reader}"``: writers ``embed``,
``a{l}.h{h}``, ``m{l}``; readers ``a{l}.h{h}.q|k|v``, ``m{l}``, ``logits`` (auto-circuit's ``Resid
Start``, ``A0.1``, ``MLP 0``, ``A1.2.Q``, ``Resid End``). For the apples-to-apples check it also
evaluates each method's top-k circuits with auto-circuit's own code (``run_circuits`` with
``TREE_PATCH``: circuit edges keep the clean run, the rest are resampled) on the held-out prompts,
over a ladder of edge counts: logit difference recovered (auto-circuit's ``answer_diff_percent``,
difference of means) and KL to the full model. Output: one JSON (``--out``)::

    .venv-peers/bin/python benchmarks/peers_run.py IN --out IN/peers.json --methods eap acdc
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.optim.adam

# auto-circuit's subnetwork probing calls torch.optim.adam.Adam; torch 2.13's torch/optim/__init__.py
# deletes that attribute after importing the module, and re-importing does not put it back
torch.optim.adam = sys.modules["torch.optim.adam"]
torch.set_num_threads(1)  # 2 shared cores here; one thread also keeps results the same run to run

from auto_circuit.data import PromptDataLoader, PromptDataset  # noqa: E402
from auto_circuit.metrics.prune_metrics.answer_diff_percent import answer_diff_percent  # noqa: E402
from auto_circuit.metrics.prune_metrics.kl_div import measure_kl_div  # noqa: E402
from auto_circuit.prune import run_circuits  # noqa: E402
from auto_circuit.prune_algos import subnetwork_probing as sp_module  # noqa: E402
from auto_circuit.prune_algos.ACDC import acdc_prune_scores  # noqa: E402
from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores  # noqa: E402
from auto_circuit.types import AblationType, PatchType  # noqa: E402
from auto_circuit.utils.ablation_activations import batch_src_ablations  # noqa: E402
from auto_circuit.utils.graph_utils import patchable_model  # noqa: E402
from ordered_set import OrderedSet  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

METHODS = ("eap", "ig", "acdc", "sp")
LADDER_PERCENTAGES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
ACDC_TAUS = tuple(b * 10.0**e for e in range(-5, 0) for b in (1, 3)) + (0.1,)
NEVER_PRUNED = 10.0  # ACDC score of an edge no threshold pruned (above every threshold tried)


# --- names --------------------------------------------------------------------------------------


def writer_name(name: str) -> str:
    """Our writer name for an auto-circuit source node.

    >>> [writer_name(n) for n in ("Resid Start", "A1.3", "MLP 0")]
    ['embed', 'a1.h3', 'm0']
    """
    if name == "Resid Start":
        return "embed"
    if m := re.fullmatch(r"A(\d+)\.(\d+)", name):
        return f"a{m[1]}.h{m[2]}"
    if m := re.fullmatch(r"MLP (\d+)", name):
        return f"m{m[1]}"
    raise ValueError(f"unknown auto-circuit source node {name!r}")


def reader_name(name: str) -> str:
    """Our reader name for an auto-circuit destination node.

    >>> [reader_name(n) for n in ("A0.1.Q", "A1.0.V", "MLP 1", "Resid End")]
    ['a0.h1.q', 'a1.h0.v', 'm1', 'logits']
    """
    if name == "Resid End":
        return "logits"
    if m := re.fullmatch(r"A(\d+)\.(\d+)\.([QKV])", name):
        return f"a{m[1]}.h{m[2]}.{m[3].lower()}"
    if m := re.fullmatch(r"MLP (\d+)", name):
        return f"m{m[1]}"
    raise ValueError(f"unknown auto-circuit destination node {name!r}")


def edge_name(edge) -> str:
    return f"{writer_name(edge.src.name)}->{reader_name(edge.dest.name)}"


def ladder(total: int, percentages=LADDER_PERCENTAGES) -> list[int]:
    """Edge counts to evaluate: each percentage of ``total`` rounded up and rounded down, plus 0.

    >>> ladder(110)
    [0, 1, 2, 3, 5, 6, 11, 22, 55, 110]
    """
    counts = {0}
    for p in percentages:
        counts.update({math.ceil(p * total - 1e-9), int(p * total)})
    return sorted(counts)


# --- model and prompts --------------------------------------------------------------------------


def load_model(folder: Path):
    """The exported HookedTransformer made patchable on auto-circuit's edge graph (q/k/v apart)."""
    kwargs = json.loads((folder / "config.json").read_text())
    kwargs.update(use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True)
    tl_model = HookedTransformer(HookedTransformerConfig(**kwargs))
    tl_model.load_state_dict(load_file(str(folder / "model.safetensors")))
    tl_model.eval()
    for p in tl_model.parameters():
        p.requires_grad_(False)
    model = patchable_model(tl_model, factorized=True, slice_output="last_seq", separate_qkv=True)
    # auto-circuit keeps the edges in a set whose order follows string hashes; ACDC walks that
    # order, so fix it (destination layer, destination, then latest writer first, as ACDC does).
    order = sorted(model.edges, key=lambda e: (e.dest.layer, e.dest.name, -e.src.src_idx))
    model.edges = OrderedSet(order)
    # its wrappers sit in sets hashed by object id, so the order of the mask parameters (and so which
    # edge gets which hard-concrete sample in subnetwork probing) changes run to run: fix it too
    for attr in ("wrappers", "src_wrappers", "dest_wrappers"):
        setattr(model, attr, OrderedSet(sorted(getattr(model, attr), key=lambda w: w.module_name)))
    model.patch_masks = {w.module_name: w.patch_mask for w in model.dest_wrappers}
    return model


def load_prompts(path: Path, batch_size: int | None) -> PromptDataLoader:
    prompts = json.loads(path.read_text())["prompts"]

    def col(key: str) -> torch.Tensor:
        return torch.tensor([p[key] for p in prompts], dtype=torch.long)

    dataset = PromptDataset(col("clean"), col("corrupt"), col("answers"), col("wrong_answers"))
    size = min(batch_size or len(prompts), len(prompts))
    return PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=size, shuffle=False)


# --- methods ------------------------------------------------------------------------------------


def _resample_ablations(model, dataloader, ablation_type=None, clean_corrupt=None):
    """Stand-in for subnetwork probing's hard-coded mean ablation: resample from the corrupt prompts."""
    return batch_src_ablations(model, dataloader, AblationType.RESAMPLE, clean_corrupt="corrupt")


def run_method(method: str, model, train: PromptDataLoader, args: argparse.Namespace) -> dict:
    """Scores (auto-circuit's ``PruneScores``, per destination module) and the settings used."""
    if method == "eap":
        settings = {"grad_function": "logit", "answer_function": "avg_diff", "mask_val": 0.0}
        return {"settings": settings, "prune_scores": mask_gradient_prune_scores(model, train, None, **settings)}
    if method == "ig":
        settings = {"grad_function": "logit", "answer_function": "avg_diff", "integrated_grad_samples": args.ig_samples}
        return {"settings": settings, "prune_scores": mask_gradient_prune_scores(model, train, None, **settings)}
    if method == "acdc":
        # one ACDC pass per threshold; auto-circuit gives a pruned edge the smallest tau that pruned it
        scores = acdc_prune_scores(model, train, None, tao_exps=[0], tao_bases=list(args.acdc_taus))
        # inf (never pruned) -> a finite score above every tau, so the JSON stays plain numbers
        scores = {mod: torch.where(torch.isinf(s), torch.full_like(s, NEVER_PRUNED), s) for mod, s in scores.items()}
        settings = {"taus": list(args.acdc_taus), "faithfulness_target": "kl_div", "never_pruned": NEVER_PRUNED}
        return {"settings": settings, "prune_scores": scores}
    if method == "sp":
        settings = {
            "learning_rate": 0.1,
            "epochs": args.sp_epochs,
            "regularize_lambda": 0.5,
            "mask_fn": "hard_concrete",
            "tree_optimisation": True,
            "ablation": "resample",
        }
        original = sp_module.batch_src_ablations
        sp_module.batch_src_ablations = _resample_ablations
        try:
            kwargs = {k: v for k, v in settings.items() if k != "ablation"}
            scores = sp_module.subnetwork_probing_prune_scores(model, train, None, show_train_graph=False, **kwargs)
        finally:
            sp_module.batch_src_ablations = original
        return {"settings": settings, "prune_scores": scores}
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def edge_scores(model, prune_scores: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(importance, signed score) per edge, in our names; importance = |score| as auto-circuit ranks."""
    signed = {edge_name(e): float(e.prune_score(prune_scores)) for e in model.edges}
    return {k: abs(v) for k, v in signed.items()}, signed


# --- auto-circuit's own evaluation --------------------------------------------------------------


def evaluate(model, heldout: PromptDataLoader, prune_scores: dict, counts: list[int]) -> list[dict]:
    """Top-k circuits scored by auto-circuit itself (tree patching, resample ablation, held-out).

    Ties in the scores can make a circuit larger than asked (auto-circuit keeps every edge at the
    threshold); ``edges`` is the size it ran.
    """
    rows = []
    for k in counts:
        outs = run_circuits(model, heldout, [k], prune_scores, PatchType.TREE_PATCH, AblationType.RESAMPLE)
        (size,) = outs
        percent = answer_diff_percent(model, heldout, outs)[0][0][1]
        kl = measure_kl_div(model, heldout, outs)[0][1]
        ld = _mean_logit_diff(outs[size], heldout)
        rows.append({"asked": k, "edges": int(size), "ld_recovered_percent": percent, "kl": kl, "logit_diff": ld})
    return rows


def _mean_logit_diff(outs: dict, loader: PromptDataLoader) -> float:
    from auto_circuit.utils.tensor_ops import batch_avg_answer_diff

    return float(torch.stack([batch_avg_answer_diff(outs[b.key], b) for b in loader]).mean())


def full_logit_diff(model, loader: PromptDataLoader) -> float:
    with torch.inference_mode():
        return _mean_logit_diff({b.key: model(b.clean)[model.out_slice] for b in loader}, loader)


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="input folder: model/, train.json, heldout.json")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--ig-samples", type=int, default=50, help="integrated-gradient steps (presets: 50, 1000)")
    parser.add_argument("--sp-epochs", type=int, default=200, help="subnetwork-probing epochs (presets: 200, 2000)")
    parser.add_argument("--acdc-taus", type=float, nargs="+", default=list(ACDC_TAUS), help="ACDC KL thresholds")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: all in one)")
    parser.add_argument("--ladder", type=int, nargs="+", default=None, help="edge counts to evaluate")
    parser.add_argument("--no-eval", action="store_true", help="skip auto-circuit's own evaluation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = load_model(args.folder / "model")
    train = load_prompts(args.folder / "train.json", args.batch_size)
    heldout = load_prompts(args.folder / "heldout.json", args.batch_size)
    counts = sorted(set(args.ladder)) if args.ladder else ladder(model.n_edges)
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {p: version(p) for p in ("auto-circuit", "transformer-lens", "torch", "numpy")},
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "hash_seed": os.environ.get("PYTHONHASHSEED"),
        "n_edges": model.n_edges,
        "edges": sorted(edge_name(e) for e in model.edges),
        "n_train": len(train.dataset),
        "n_heldout": len(heldout.dataset),
        "full_logit_diff": {"train": full_logit_diff(model, train), "heldout": full_logit_diff(model, heldout)},
        "ladder": counts,
        "methods": {},
    }
    for method in args.methods:
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        started = time.perf_counter()
        result = run_method(method, model, train, args)
        seconds = time.perf_counter() - started
        scores, signed = edge_scores(model, result["prune_scores"])
        entry = {"seconds": seconds, "settings": result["settings"], "scores": scores, "signed": signed}
        if not args.no_eval:
            entry["autocircuit_eval"] = evaluate(model, heldout, result["prune_scores"], counts)
        record["methods"][method] = entry
        print(f"{method}: {seconds:.1f} s", file=sys.stderr, flush=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
