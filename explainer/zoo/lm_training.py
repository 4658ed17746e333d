"""A real language model for the zoo: a small Llama-architecture model trained on Python source.

The corpus is text every machine has offline: the top-level ``*.py`` files of the running Python's
standard library (``sysconfig.get_paths()["stdlib"]``), sorted by name; every
``HELDOUT_EVERY``-th file is held out (the task prompts come from those files only). The same
Python minor version gives the same files; the card records the version, the file names and a
digest of the text.

The recipe trains its own byte-level BPE tokenizer with ``tokenizers`` on the training files, then
a causal transformer with RMSNorm, rotary positions, a gated SiLU MLP and grouped-query attention
by next-token cross-entropy (optax ``adamw``, jitted chunks of ``lax.scan``, traced once). A
``repeat_share`` of each batch's windows repeat a span of their own text throughout (its length drawn
per window from ``repeat_periods``, else half the window): the text is the corpus's own, and the
repeats are where copying from context pays (induction heads).

Tasks are text prompts (strings, tokenized by the folder's ``tokenizer.json``) cut from the
held-out files, all of one token length:

- ``induction``: the prompt ends inside the second occurrence of an identifier that is several
  tokens long; the answer is the identifier's next token as it was spelled earlier in the prompt.
  The counterfactual respells the earlier occurrence with another token that often follows the same
  prefix, which becomes the wrong answer; only a model that copies from context tells them apart.
- ``repeat``: a span of held-out code followed by its first tokens again; the answer is the span's
  next token. The counterfactual respells that token in the first copy with another token that
  often follows the one before it (the wrong answer), as ``induction`` does; the token before the
  answer occurs once in the span, so the copy is unambiguous.
- ``brackets``: the next token closes a bracket; the wrong answer is the same token with another
  bracket kind (``)`` against ``]``).

The card gives the full model's accuracy on every task and a bigram baseline (counts from the
training files) on the same prompts; a task is shipped only when the model reaches
``SHIP_ACCURACY``. ``explainer zoo train pylm`` calls :func:`write_lm`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from explainer.errors import ExplainerError
from explainer.models.config import ModelConfig
from explainer.models.native import init_random, save_model, write_json
from explainer.models.transformer import Transformer
from explainer.progress import progress_bar

EOT = "<|endoftext|>"
HELDOUT_EVERY = 10  # files 9, 19, 29, ... of the sorted list are held out
SHIP_ACCURACY = 0.8
TASKS = ("induction", "repeat", "brackets")
_IDENT_START = re.compile(r"^ ?[A-Za-z_][A-Za-z0-9_]*$")
_IDENT_PART = re.compile(r"^[A-Za-z0-9_]+$")
_SWAP = {")": "]", "]": ")", "}": ")"}


@dataclasses.dataclass(frozen=True)
class LMRecipe:
    """How the zoo language model is trained: corpus, tokenizer, architecture, optimiser, prompts."""

    config: ModelConfig
    description: str
    vocab_size: int = 2048
    seq: int = 128  # training window (tokens)
    steps: int = 2400
    chunk: int = 25  # optimiser steps per jitted call
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    max_files: int | None = None  # use only the first files of the sorted list (the smoke recipe)
    max_chars: int | None = None  # cut each file to this many characters (the smoke recipe)
    prompt_len: int = 64
    repeat_span: int = 24  # tokens of the span a ``repeat`` prompt repeats
    repeat_prefix: int = 12  # tokens of the span repeated before the answer
    n_prompts: int = 400
    ship_accuracy: float = SHIP_ACCURACY  # a task is shipped when the model reaches this accuracy
    eval_every: int = 200  # steps between scores of the tasks during training (the card's curve)
    repeat_share: float = 0.0  # share of each batch's windows that repeat their first P tokens throughout
    repeat_periods: tuple[int, ...] = ()  # P, drawn per window from these (none: half the window)

    def __post_init__(self) -> None:
        assert self.steps % self.chunk == 0, f"steps must be a multiple of {self.chunk}"


def _llama(n_layers: int, d_model: int, n_heads: int, n_kv: int, d_mlp: int, vocab: int, n_ctx: int) -> ModelConfig:
    return ModelConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        n_key_value_heads=n_kv,
        d_mlp=d_mlp,
        d_vocab=vocab,
        n_ctx=n_ctx,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        eps=1e-6,
        positional_embedding_type="rotary",
    )


LM_RECIPES: dict[str, LMRecipe] = {
    "pylm": LMRecipe(
        config=_llama(4, 128, 4, 2, 384, 2048, 128),
        description="4-layer Llama-architecture language model (RMSNorm, rotary, gated SiLU MLP, grouped-query "
        "attention) with its own BPE tokenizer, trained on the Python standard library's source (a quarter of "
        "each batch's windows repeat their first 8, 16, 32 or 64 tokens throughout)",
        repeat_share=0.25,
        repeat_periods=(8, 16, 32, 64),
    ),
}

# a few steps of a tiny model on a tiny corpus: the pipeline end to end, for tests
SMOKE = LMRecipe(
    config=_llama(2, 32, 4, 2, 64, 300, 64),
    description="smoke version of pylm",
    vocab_size=300,
    seq=32,
    steps=40,
    chunk=20,
    batch_size=8,
    lr=1e-2,
    warmup=5,
    max_files=20,
    max_chars=20_000,
    prompt_len=32,
    n_prompts=40,
    eval_every=20,
    ship_accuracy=0.0,  # ship every task, to exercise the folder
    repeat_share=0.25,
    repeat_periods=(8, 16),
)


def lm_recipe(name: str) -> LMRecipe:
    if name not in LM_RECIPES:
        raise ExplainerError(f"no language-model recipe named {name!r}; valid: {', '.join(sorted(LM_RECIPES))}")
    return LM_RECIPES[name]


# --- corpus and tokenizer ------------------------------------------------------------------------


def stdlib_files(r: LMRecipe) -> tuple[list[Path], list[Path]]:
    """The training and held-out files: the stdlib's top-level ``*.py``, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda p: p.name)
    if r.max_files is not None:
        files = files[: r.max_files]
    if len(files) < 2:
        raise ExplainerError(f"found {len(files)} Python files in the standard library at {root}; need at least 2")
    held = [f for i, f in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return [f for f in files if f not in held], held


def read_texts(files: list[Path], r: LMRecipe) -> list[str]:
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return [t[: r.max_chars] for t in texts] if r.max_chars is not None else texts


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenization, no prefix space) with ``EOT``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_corpus(tok: Any, texts: list[str]) -> np.ndarray:
    """The texts' token ids, one stream, each file followed by ``EOT``."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, np.int32)


# --- training --------------------------------------------------------------------------------------


def lm_loss(model: Transformer, windows: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over every position of ``windows`` ``[batch, seq + 1]``."""
    logp = jax.nn.log_softmax(model(windows[:, :-1]), axis=-1)
    return -jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1).mean()


def train_lm(
    r: LMRecipe,
    stream: np.ndarray,
    seed: int = 0,
    progress: bool = True,
    log: Any = None,
    evaluate: Callable[[Transformer], dict[str, Any]] | None = None,
) -> tuple[Transformer, dict[str, Any]]:
    """Train ``r``'s model on random windows of the token ``stream``; returns it and a record.

    With ``evaluate``, its result every ``r.eval_every`` steps goes into the record's ``curve``
    (and to ``log``, a text file, with each chunk's loss)."""
    start = time.perf_counter()
    k_init, k_data = jax.random.split(jax.random.key(seed))
    model = init_random(r.config, k_init)
    schedule = optax.warmup_cosine_decay_schedule(0.0, r.lr, r.warmup, r.steps, end_value=r.lr / 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=r.weight_decay))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    data = jnp.asarray(stream)
    offsets = jnp.arange(r.seq + 1)
    repeats = round(r.batch_size * r.repeat_share)
    periods = jnp.asarray(r.repeat_periods or ((r.seq + 1) // 2,), jnp.int32)
    counter = {"traces": 0}

    @eqx.filter_jit
    def chunk(model, opt_state, keys):
        counter["traces"] += 1

        def one_step(carry, key):
            model, opt_state = carry
            starts = jax.random.randint(key, (r.batch_size,), 0, data.shape[0] - r.seq - 1)
            # a b c a b c a b c ...: each repeated window of its own period
            period = periods[jax.random.randint(jax.random.fold_in(key, 1), (r.batch_size, 1), 0, len(periods))]
            rows = jnp.where(jnp.arange(r.batch_size)[:, None] < repeats, offsets[None, :] % period, offsets)
            loss, grads = eqx.filter_value_and_grad(lm_loss)(model, data[starts[:, None] + rows])
            with jax.numpy_dtype_promotion("standard"):
                updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
            return (eqx.apply_updates(model, updates), opt_state), loss

        (model, opt_state), losses = jax.lax.scan(one_step, (model, opt_state), keys)
        return model, opt_state, losses

    keys = jax.random.split(k_data, r.steps).reshape(r.steps // r.chunk, r.chunk)
    losses, curve = [], []
    with progress_bar(progress, r.steps, "training pylm") as advance:
        for i, chunk_keys in enumerate(keys):
            model, opt_state, chunk_losses = chunk(model, opt_state, chunk_keys)
            losses.append(np.asarray(chunk_losses))
            advance((i + 1) * r.chunk, f"loss {float(losses[-1].mean()):.4f}")
            if log is not None:
                print(
                    f"step {(i + 1) * r.chunk} loss {float(losses[-1].mean()):.4f} {time.perf_counter() - start:.0f} s",
                    file=log,
                    flush=True,
                )
            step = (i + 1) * r.chunk
            if evaluate is not None and (step % r.eval_every == 0 or step == r.steps):
                curve.append({"step": step, "loss": float(losses[-1].mean()), **evaluate(model)})
                if log is not None:
                    print(curve[-1], file=log, flush=True)
    losses = np.concatenate(losses)
    record = {
        "seed": seed,
        "steps": r.steps,
        "batch_size": r.batch_size,
        "seq": r.seq,
        "lr": r.lr,
        "weight_decay": r.weight_decay,
        "repeat_share": r.repeat_share,
        "repeat_periods": list(r.repeat_periods),
        "tokens_seen": r.steps * r.batch_size * r.seq,
        "first_loss": float(losses[: r.chunk].mean()),
        "final_loss": float(losses[-r.chunk :].mean()),
        "train_seconds": round(time.perf_counter() - start, 1),
        "traces": counter["traces"],
        "curve": curve,
    }
    return model, record


# --- tasks -------------------------------------------------------------------------------------------


def _followers(stream: np.ndarray, vocab: int) -> np.ndarray:
    """Bigram counts ``[vocab, vocab]`` of the training stream."""
    counts = np.zeros((vocab, vocab), np.int64)
    np.add.at(counts, (stream[:-1], stream[1:]), 1)
    return counts


def _roundtrips(tok: Any, ids: list[int]) -> str | None:
    """The text of ``ids`` when encoding it gives ``ids`` back, else ``None``."""
    text = tok.decode(ids)
    return text if tok.encode(text).ids == ids else None


def _one_token(tok: Any, i: int) -> str | None:
    text = tok.decode([i])
    return text if tok.encode(text, add_special_tokens=False).ids == [i] else None


def induction_prompts(tok: Any, held: list[np.ndarray], bigrams: np.ndarray, r: LMRecipe) -> list[dict[str, Any]]:
    """Prompts ending inside a repeated identifier; answer: its next token as spelled before."""
    vocab = tok.get_vocab_size()
    pieces = [tok.decode([i]) for i in range(vocab)]
    start_ok = np.array([bool(_IDENT_START.match(p)) for p in pieces])
    part_ok = np.array([bool(_IDENT_PART.match(p)) for p in pieces])
    L = r.prompt_len
    out: list[dict[str, Any]] = []
    seen: set[tuple[int, int, int]] = set()
    for f, ids in enumerate(held):
        for p in range(L - 1, len(ids) - 1):
            a, b = int(ids[p]), int(ids[p + 1])
            if not (start_ok[a] and part_ok[b]):
                continue
            window = ids[p - L + 1 : p + 1]
            earlier = np.flatnonzero(window[:-2] == a)  # an earlier a with its follower inside the window
            if len(earlier) == 0 or not np.all(window[earlier + 1] == b):
                continue
            alternatives = [int(c) for c in np.argsort(-bigrams[a], kind="stable")[:8] if c != b and bigrams[a, c] > 0]
            for c in alternatives:
                if not part_ok[c] or np.any(window == c):
                    continue
                corrupt = window.copy()
                corrupt[earlier + 1] = c
                clean_text, corrupt_text = _roundtrips(tok, window.tolist()), _roundtrips(tok, corrupt.tolist())
                answer, wrong = _one_token(tok, b), _one_token(tok, c)
                if None in (clean_text, corrupt_text, answer, wrong) or (f, a, b) in seen:
                    continue
                seen.add((f, a, b))
                out.append(
                    {"clean": clean_text, "corrupt": corrupt_text, "answers": [answer], "wrong_answers": [wrong]}
                )
                break
    return out


def repeat_prompts(tok: Any, held: list[np.ndarray], bigrams: np.ndarray, r: LMRecipe) -> list[dict[str, Any]]:
    """Prompts of a span of held-out code and its first ``repeat_prefix`` tokens again; answer: the
    span's next token, wrong answer: a frequent follower of the token before it, respelled into the
    first copy by the counterfactual."""
    span, j = r.repeat_span, r.repeat_prefix
    out: list[dict[str, Any]] = []
    for ids in held:
        for p in range(0, len(ids) - span, span):  # disjoint spans
            window = ids[p : p + span]
            a, b = int(window[j - 1]), int(window[j])
            if np.count_nonzero(window == a) != 1:
                continue
            alternatives = [int(c) for c in np.argsort(-bigrams[a], kind="stable")[:8] if c != b and bigrams[a, c] > 0]
            for c in alternatives:
                if np.any(window == c):
                    continue
                corrupt = window.copy()
                corrupt[j] = c
                clean_text = _roundtrips(tok, [*window.tolist(), *window[:j].tolist()])
                corrupt_text = _roundtrips(tok, [*corrupt.tolist(), *window[:j].tolist()])
                answer, wrong = _one_token(tok, b), _one_token(tok, c)
                if None in (clean_text, corrupt_text, answer, wrong):
                    continue
                out.append(
                    {"clean": clean_text, "corrupt": corrupt_text, "answers": [answer], "wrong_answers": [wrong]}
                )
                break
    return out


def bracket_prompts(tok: Any, held: list[np.ndarray], r: LMRecipe) -> list[dict[str, Any]]:
    """Prompts whose next token closes a bracket; the wrong answer swaps the bracket kind."""
    vocab = tok.get_vocab_size()
    pieces = [tok.decode([i]) for i in range(vocab)]
    ids_of = {p: i for i, p in enumerate(pieces)}
    swap = {}
    for i, p in enumerate(pieces):
        if p and p[0] in _SWAP and (_SWAP[p[0]] + p[1:]) in ids_of and _one_token(tok, i) is not None:
            j = ids_of[_SWAP[p[0]] + p[1:]]
            if _one_token(tok, j) is not None:
                swap[i] = j
    L = r.prompt_len
    out = []
    for ids in held:
        for p in range(L - 1, len(ids) - 1, 7):  # a stride keeps neighbouring prompts apart
            b = int(ids[p + 1])
            if b not in swap:
                continue
            window = ids[p - L + 1 : p + 1].tolist()
            text = _roundtrips(tok, window)
            if text is None:
                continue
            out.append({"clean": text, "answers": [pieces[b]], "wrong_answers": [pieces[swap[b]]]})
    return out


def _pick(prompts: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    order = np.random.default_rng(0).permutation(len(prompts))[:n]
    return [prompts[i] for i in sorted(order)]


def score(model: Transformer, tok: Any, prompts: list[dict[str, Any]], bigrams: np.ndarray) -> dict[str, float]:
    """The model's accuracy (answer above wrong answer; top-1) and the bigram baseline's on ``prompts``."""
    clean = np.asarray([tok.encode(p["clean"]).ids for p in prompts], np.int32)
    ans = np.asarray([tok.encode(p["answers"][0], add_special_tokens=False).ids[0] for p in prompts])
    wrong = np.asarray([tok.encode(p["wrong_answers"][0], add_special_tokens=False).ids[0] for p in prompts])
    logits = np.concatenate(
        [np.asarray(model(jnp.asarray(clean[i : i + 64]), last=True)[:, -1]) for i in range(0, len(clean), 64)]
    )
    rows = np.arange(len(prompts))
    result = {
        "accuracy": float(np.mean(logits[rows, ans] > logits[rows, wrong])),
        "top1_accuracy": float(np.mean(logits.argmax(-1) == ans)),
        "bigram_accuracy": float(np.mean(bigrams[clean[:, -1], ans] > bigrams[clean[:, -1], wrong])),
        "prompts": len(prompts),
    }
    if "corrupt" in prompts[0]:
        corrupt = np.asarray([tok.encode(p["corrupt"]).ids for p in prompts], np.int32)
        cl = np.concatenate(
            [np.asarray(model(jnp.asarray(corrupt[i : i + 64]), last=True)[:, -1]) for i in range(0, len(corrupt), 64)]
        )
        result["corrupt_accuracy"] = float(np.mean(cl[rows, wrong] > cl[rows, ans]))  # it follows the respelling
    return result


# --- the folder ------------------------------------------------------------------------------------


def write_lm(
    name: str,
    folder: str | os.PathLike,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    recipe: LMRecipe | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Train the zoo language model ``name`` and write its folder; returns its card.

    The folder gets ``config.json``, ``model.safetensors``, ``tokenizer.json``, ``prompts.json``
    (the first shipped task of ``TASKS``, induction when it is shipped), ``prompts-TASK.json`` for
    every other shipped task and ``card.json`` (corpus, accuracies of every task, shipped or not,
    training record; its ``task`` and ``accuracy`` are those of ``prompts.json``, or of induction
    when nothing is shipped).
    """
    from explainer.models.folders import check_out

    r = recipe or lm_recipe(name)
    folder = Path(folder)
    check_out(folder, overwrite)
    start = time.perf_counter()
    train_files, held_files = stdlib_files(r)
    train_texts, held_texts = read_texts(train_files, r), read_texts(held_files, r)
    tok = train_tokenizer(train_texts, r.vocab_size)
    if tok.get_vocab_size() != r.config.d_vocab:
        raise ExplainerError(f"the tokenizer has {tok.get_vocab_size()} tokens, the config {r.config.d_vocab}")
    stream = encode_corpus(tok, train_texts)
    bigrams = _followers(stream, r.config.d_vocab)
    held = [np.asarray(e.ids, np.int32) for e in tok.encode_batch(held_texts)]
    made = {
        "induction": _pick(induction_prompts(tok, held, bigrams, r), r.n_prompts),
        "repeat": _pick(repeat_prompts(tok, held, bigrams, r), r.n_prompts),
        "brackets": _pick(bracket_prompts(tok, held, r), r.n_prompts),
    }
    made = {task: prompts for task, prompts in made.items() if len(prompts) >= 2}
    prepare_seconds = round(time.perf_counter() - start, 1)

    def evaluate(model: Transformer) -> dict[str, float]:
        return {task: score(model, tok, prompts, bigrams)["accuracy"] for task, prompts in made.items()}

    model, record = train_lm(r, stream, seed=seed, progress=progress, log=log, evaluate=evaluate)
    scores = {task: score(model, tok, prompts, bigrams) for task, prompts in made.items()}
    shipped = [t for t in TASKS if t in scores and scores[t]["accuracy"] >= r.ship_accuracy]
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    tok.save(str(tmp / "tokenizer.json"))
    files = {t: "prompts.json" if i == 0 else f"prompts-{t}.json" for i, t in enumerate(shipped)}
    for task, file in files.items():
        write_json(tmp / file, {"prompts": made[task]})
    main = scores.get(shipped[0] if shipped else "induction", {})
    digest = hashlib.sha256("\0".join(train_texts + held_texts).encode()).hexdigest()
    card = {
        "name": name,
        "task": shipped[0] if shipped else None,
        "kind": "trained",
        "accuracy": main.get("accuracy"),
        "top1_accuracy": main.get("top1_accuracy"),
        "tasks": scores,
        "shipped_tasks": files,
        "ship_threshold": r.ship_accuracy,
        "heldout": "every prompt is cut from standard-library files the tokenizer and model never saw",
        "description": r.description,
        "corpus": {
            "python": f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
            "stdlib": "top-level *.py of sysconfig.get_paths()['stdlib'], sorted by name"
            + (f", first {r.max_files}" if r.max_files else "")
            + (f", each cut to {r.max_chars} characters" if r.max_chars else ""),
            "train_files": [f.name for f in train_files],
            "heldout_files": [f.name for f in held_files],
            "sha256": digest,
            "train_tokens": int(len(stream)),
            "vocab_size": tok.get_vocab_size(),
        },
        "training": {
            **record,
            "prepare_seconds": prepare_seconds,
            "parameters": int(sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)))),
            "command": f"explainer zoo train {name} --seed {seed}",
        },
    }
    write_json(tmp / "card.json", card)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return card


def main() -> None:  # pragma: no cover - the full run (python -m explainer.zoo.lm_training OUT)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("pylm")
    card = write_lm("pylm", out, overwrite=True, progress=False, log=sys.stdout)
    print({k: card[k] for k in ("accuracy", "top1_accuracy", "tasks", "shipped_tasks")})


if __name__ == "__main__":
    main()
