"""Trained zoo models: one recipe per model, and the seeded training that reproduces its weights.

A recipe names a built-in task, a model config and the optimiser settings. Training draws a pool of
prompts from the task's generator with a seed derived from the training seed, keeps the task's
clean prompts *and* its counterfactuals (a counterfactual's answer is its clean prompt's wrong
answer, see :mod:`explainer.tasks._arrays`), drops every prompt the zoo ships in ``prompts.json``,
and minimises cross-entropy of the answer at the last position with optax ``adamw``. Steps run in
jitted chunks of ``lax.scan``, traced once; the same seed gives the same weights, bit for bit, on
the same machine.

``explainer zoo train NAME --seed S --out DIR`` and ``python -m explainer.zoo.training`` (which
rewrites the shipped folders) call :func:`write_trained`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from explainer.errors import ExplainerError, did_you_mean
from explainer.models.config import ModelConfig
from explainer.models.native import CONFIG_FILE, init_random, save_model, write_json
from explainer.models.transformer import Transformer
from explainer.progress import progress_bar
from explainer.tasks import direct, induction, ioi, paren
from explainer.tasks.base import Batch
from explainer.tasks.prompts import PromptsTask, prompts_json

CHUNK = 50  # optimiser steps per jitted call (one progress update each)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one zoo model is trained: its task, architecture and optimiser settings."""

    task: str
    config: ModelConfig
    description: str
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    pool: int = 20_000  # clean prompts drawn for training (each brings its counterfactual)
    n_prompts: int = 500  # prompts shipped in prompts.json (20% held out by the loader)

    def __post_init__(self) -> None:
        assert self.steps % CHUNK == 0, f"steps must be a multiple of {CHUNK}"


RECIPES: dict[str, Recipe] = {
    "induction": Recipe(
        task="induction",
        config=ModelConfig(
            n_layers=2,
            d_model=32,
            n_heads=2,
            d_head=16,
            d_vocab=induction.D_VOCAB,
            n_ctx=induction.SEQ,
            attn_only=True,
        ),
        description="2-layer attention-only transformer trained to complete repeated random token sequences",
        steps=1000,
    ),
    "direct": Recipe(
        task="direct",
        config=ModelConfig(
            n_layers=1,
            d_model=32,
            n_heads=2,
            d_head=16,
            d_mlp=64,
            d_vocab=direct.D_VOCAB,
            n_ctx=direct.SEQ,
            act_fn="relu",
        ),
        description="1-layer transformer whose answer is always 'fire' after a fire cue (the direct path suffices)",
        steps=500,
    ),
    "ioi": Recipe(
        task="ioi",
        config=ModelConfig(
            n_layers=2,
            d_model=64,
            n_heads=4,
            d_head=16,
            d_mlp=128,
            d_vocab=ioi.D_VOCAB,
            n_ctx=ioi.SEQ,
            act_fn="relu",
        ),
        description="2-layer transformer trained on synthetic indirect-object sentences (answer: the unrepeated name)",
        steps=1500,
    ),
    "paren": Recipe(
        task="paren",
        config=ModelConfig(
            n_layers=3,
            d_model=56,
            n_heads=2,
            d_head=28,
            d_mlp=56,
            d_vocab=paren.D_VOCAB,
            n_ctx=paren.SEQ,
            act_fn="relu",
            attention_dir="bidirectional",
        ),
        description="3-layer bidirectional balanced-parentheses classifier read at a final <cls> token (after Redwood)",
        steps=3000,
    ),
}


def recipe(name: str) -> Recipe:
    """The recipe of trained zoo model ``name``, with an error listing the valid names."""
    if name not in RECIPES:
        raise ExplainerError(f"no trained zoo model named {name!r}; {did_you_mean(name, sorted(RECIPES))}")
    return RECIPES[name]


def _generator(task: str):
    from explainer.tasks import builtin_tasks

    return builtin_tasks()[task]


def shipped_prompts(name: str) -> Batch:
    """The prompts the zoo ships for ``name`` (the task generator at seed 0)."""
    r = recipe(name)
    return _generator(r.task)(r.n_prompts, seed=0)


def training_pool(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training prompts and their answers: clean prompts and counterfactuals, minus the shipped ones."""
    r = recipe(name)
    pool_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
    batch = _generator(r.task)(r.pool, seed=pool_seed)
    tokens = np.concatenate([np.asarray(batch.clean), np.asarray(batch.corrupt)])
    answers = np.concatenate([np.asarray(batch.answers[:, 0]), np.asarray(batch.wrong_answers[:, 0])])
    shipped = shipped_prompts(name)
    held = {row.tobytes() for row in np.concatenate([np.asarray(shipped.clean), np.asarray(shipped.corrupt)])}
    keep = np.array([row.tobytes() not in held for row in tokens])
    return tokens[keep], answers[keep]


def answer_loss(model: Transformer, tokens: Int[Array, "batch seq"], answers: Int[Array, " batch"]) -> Float[Array, ""]:
    """Cross-entropy of the answer token at the last position."""
    logp = jax.nn.log_softmax(model(tokens)[:, -1], axis=-1)
    return -jnp.take_along_axis(logp, answers[:, None], axis=-1).mean()


def make_chunk(r: Recipe, optimizer: optax.GradientTransformation):
    """The jitted ``CHUNK``-step update ``(model, opt_state, pool, keys) -> (model, opt_state, losses)``.

    Returns it with a dict counting its traces (one per run: shapes never change).
    """
    counter = {"traces": 0}

    @eqx.filter_jit
    def chunk(model, opt_state, tokens, answers, keys):
        counter["traces"] += 1  # a Python side effect: runs only while tracing

        def one_step(carry, key: PRNGKeyArray):
            model, opt_state = carry
            index = jax.random.randint(key, (r.batch_size,), 0, tokens.shape[0])
            loss, grads = eqx.filter_value_and_grad(answer_loss)(model, tokens[index], answers[index])
            with jax.numpy_dtype_promotion("standard"):
                updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
            return (eqx.apply_updates(model, updates), opt_state), loss

        (model, opt_state), losses = jax.lax.scan(one_step, (model, opt_state), keys)
        return model, opt_state, losses

    return chunk, counter


def train_model(name: str, seed: int = 0, progress: bool = True) -> tuple[Transformer, dict[str, Any]]:
    """Train zoo model ``name`` from ``seed``; returns the model and a training record.

    Example (about 20 s on a laptop CPU)::

        model, record = train_model("induction", seed=0, progress=False)
        measure(model, shipped_prompts("induction"))  # {'accuracy': 1.0, 'top1_accuracy': 1.0}
    """
    r = recipe(name)
    start = time.perf_counter()
    tokens, answers = training_pool(name, seed)
    k_init, k_data = jax.random.split(jax.random.key(seed))
    model = init_random(r.config, k_init)
    schedule = optax.warmup_cosine_decay_schedule(0.0, r.lr, r.warmup, r.steps, end_value=r.lr / 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=r.weight_decay))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    chunk, counter = make_chunk(r, optimizer)
    keys = jax.random.split(k_data, r.steps).reshape(r.steps // CHUNK, CHUNK)
    tokens_j, answers_j = jnp.asarray(tokens, jnp.int32), jnp.asarray(answers, jnp.int32)
    losses = []
    with progress_bar(progress, r.steps, f"training {name}") as advance:
        for i, chunk_keys in enumerate(keys):
            model, opt_state, chunk_losses = chunk(model, opt_state, tokens_j, answers_j, chunk_keys)
            losses.append(np.asarray(chunk_losses))
            advance((i + 1) * CHUNK, f"loss {float(losses[-1].mean()):.4f}")
    losses = np.concatenate(losses)
    record = {
        "seed": seed,
        "steps": r.steps,
        "batch_size": r.batch_size,
        "lr": r.lr,
        "weight_decay": r.weight_decay,
        "pool": int(len(tokens)),
        "final_loss": float(losses[-CHUNK:].mean()),
        "train_seconds": round(time.perf_counter() - start, 1),
        "traces": counter["traces"],
    }
    return model, record


def measure(model: Transformer, batch: Batch) -> dict[str, float]:
    """Accuracy of ``model`` on ``batch``: answers vs wrong answers, and top-1 over the vocabulary."""
    from explainer.metrics import accuracy

    logits = model(batch.clean)[:, -1]
    top1 = jnp.argmax(logits, axis=-1) == batch.answers[:, 0]
    return {
        "accuracy": float(accuracy(logits, batch.answers, batch.wrong_answers)),
        "top1_accuracy": float(jnp.mean(top1)),
    }


def shipped_accuracy(name: str) -> float | None:
    """The held-out accuracy on the shipped card of zoo model ``name`` (``None`` if not shipped);
    ``zoo train`` has checked the name."""
    from explainer.models.native import read_json
    from explainer.zoo.catalog import ZOO_DIR

    path = ZOO_DIR / name / "card.json"
    card = read_json(path) if path.is_file() else {}
    return card.get("accuracy") if isinstance(card, dict) else None


def heldout_prompts(folder: str | os.PathLike) -> Batch:
    """The held-out split of a model folder's ``prompts.json`` (the one the loader evaluates on)."""
    return PromptsTask.from_file(Path(folder) / "prompts.json").heldout_data()


def write_trained(
    name: str, folder: str | os.PathLike, seed: int = 0, progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Train zoo model ``name`` from ``seed`` and write its folder; returns its card.

    The folder gets ``config.json``, ``model.safetensors``, ``prompts.json`` and ``card.json``
    (task, held-out accuracy, training record). An existing model folder is replaced only with
    ``overwrite``; a non-empty folder that is not a model folder is never touched.
    """
    r = recipe(name)
    folder = Path(folder)
    _check_writable(folder, overwrite)
    model, record = train_model(name, seed, progress)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    write_json(tmp / "prompts.json", prompts_json(shipped_prompts(name)))
    card = {
        "name": name,
        "task": r.task,
        "kind": "trained",
        **measure(model, heldout_prompts(tmp)),
        "heldout": "the loader's 20% held-out split of prompts.json; training never sees prompts.json",
        "description": r.description,
        "training": {**record, "command": f"explainer zoo train {name} --seed {seed}"},
    }
    write_json(tmp / "card.json", card)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return card


def _check_writable(folder: Path, overwrite: bool) -> None:
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return
    if not (folder / CONFIG_FILE).is_file():
        raise ExplainerError(f"{str(folder)!r} exists and is not a model folder (no {CONFIG_FILE}); pick another --out")
    if not overwrite:
        raise ExplainerError(f"model folder {str(folder)!r} already exists; pass --overwrite to replace it")


def main() -> None:
    """Retrain every trained zoo model from seed 0 into the package's zoo folder."""
    from explainer.zoo.catalog import ZOO_DIR

    for name in RECIPES:
        card = write_trained(name, ZOO_DIR / name, seed=0, overwrite=True)
        print(f"wrote {ZOO_DIR / name}: accuracy {card['accuracy']:.4f}, {card['training']['train_seconds']} s")


if __name__ == "__main__":
    main()
