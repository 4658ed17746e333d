"""A Qwen2.5-0.5B-shaped checkpoint end to end: built, imported, explained.

Builds a random checkpoint of Qwen2.5-0.5B's shape with ``transformers`` (24 layers, d_model 896,
14 query heads over 2 key-value heads of 64, d_mlp 4,864, vocabulary 151,936, tied embeddings, q/k/v
biases, rotary base 10⁶; random weights, ``model.safetensors``), imports it with ``explainer import
hf`` as a user would, writes a prompts file of ``--prompts`` random prompts of ``--seq`` tokens (random
counterfactuals and answers), and runs ``explainer train`` on it for each of ``--units`` (dimensions,
edges; default settings otherwise, adversary on). Each command runs in a subprocess
(``growth.run_cli``): its wall seconds, peak resident memory and seconds per phase (``timings`` of
``explanation.json``) are recorded.

On a GPU the defaults are the check the model-families issue asks for (320 prompts × 16 tokens,
default steps). A CPU cannot train this model at that batch in reasonable time; there it runs small::

    python benchmarks/qwen_shape.py --prompts 32 --batch-size 8 --steps 10 --units dims

``--layers`` and ``--vocab`` shrink the shape (a smoke run of the script itself). Writes
``benchmarks/results/qwen-shape.json`` (``qwen-shape-gpu.json`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))

from _results import RESULTS_DIR, write_record  # noqa: E402
from growth import phase_row, random_prompts, run_cli  # noqa: E402

SHAPE = dict(  # Qwen2.5-0.5B's config.json, as transformers names it
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
)


def build_checkpoint(folder: Path, layers: int, vocab: int, seed: int = 0) -> dict:
    """Save a random Qwen2 checkpoint of the shape (``layers``, ``vocab`` as given) to ``folder``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    shape = {**SHAPE, "num_hidden_layers": layers, "vocab_size": vocab}
    model = Qwen2ForCausalLM(Qwen2Config(**shape, torch_dtype="float32"))
    model.save_pretrained(folder, safe_serialization=True)
    return {"parameters": sum(p.numel() for p in model.parameters()), **shape}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=320)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the library's)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per step (default: the library's)")
    parser.add_argument("--units", default="dims,edges", help="the kinds of unit to train, comma-separated")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--vocab", type=int, default=SHAPE["vocab_size"])
    parser.add_argument("--timeout", type=float, default=None, help="seconds per command before it is stopped")
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for the checkpoint and runs (default: a temporary one)"
    )
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    gpu = jax.devices()[0].platform == "gpu"
    out = args.out or RESULTS_DIR / ("qwen-shape-gpu.json" if gpu else "qwen-shape.json")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        shape = build_checkpoint(work / "hf", args.layers, args.vocab)
        built = time.perf_counter() - started
        print(f"built {shape['parameters']:,} parameters [{built:.0f}s]", file=sys.stderr, flush=True)
        imported = run_cli(["import", "hf", str(work / "hf"), str(work / "model"), "--json"], work / "import.log")
        print(f"imported [{imported['wall_s']:.0f}s]", file=sys.stderr, flush=True)
        prompts = work / "prompts.json"
        prompts.write_text(json.dumps(random_prompts(args.prompts, args.seq, args.vocab)))
        settings = work / "settings.toml"
        settings.write_text("" if args.batch_size is None else f"[optimiser]\nbatch_size = {args.batch_size}\n")
        rows = []
        for units in args.units.split(","):
            command = ["train", "--model", str(work / "model"), "--task", str(prompts), "--config", str(settings)]
            command += ["--units", units, "--out", str(work / f"run-{units}"), "--json", "--no-progress"]
            command += [] if args.steps is None else ["--steps", str(args.steps)]
            ran = run_cli(command, work / f"train-{units}.log", args.timeout)
            total = ran["result"].get("total_units")
            row = {"units_kind": units, **phase_row(f"train {units}", ran, total, 0.0)}
            row["size"] = ran["result"].get("size")
            del row["forward_flops"]
            rows.append(row)
            print(f"train {units}: {json.dumps(row)}", file=sys.stderr, flush=True)
    write_record(
        out,
        args,
        platform=jax.devices()[0].platform,
        shape=shape,
        build_s=round(built, 1),
        import_s=round(imported["wall_s"], 1),
        import_peak_rss_gb=round(imported["peak_rss_gb"], 2),
        rows=rows,
    )
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
