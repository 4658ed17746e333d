"""Prompts of different lengths (left padding) and text prompts (a model folder's tokenizer.json).

Padding never changes a prompt's logits: a prompt alone and the same prompt left-padded among longer
ones agree to ``PAD_ATOL`` at every real position, for GPT-2-style (learned positions) and
Llama-style (rotary, grouped-query, sliding-window) models, in the plain and the edge forward.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from explainer import edges
from explainer.errors import ExplainerError
from explainer.models import ModelConfig, init_random
from explainer.models.padding import PAD, length_groups, lengths, pad_left, same_length_permutation
from explainer.scrub import Scrubber, site_means
from explainer.tasks import Batch, PromptsTask, parse_prompts, prompts_json, resolve_task

PAD_ATOL = 1e-5
SMALL = dict(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=20, n_ctx=16)
LLAMA = dict(normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, act_fn="silu")
CONFIGS = {
    "gpt2": ModelConfig(**SMALL),
    "llama-gqa": ModelConfig(**SMALL, **LLAMA, n_key_value_heads=2),
    "llama-window-partial": ModelConfig(
        **SMALL, **LLAMA, rotary_dim=2, use_local_attn=True, window_size=3, attn_types=("local", "global")
    ),
    "neox-parallel": ModelConfig(**SMALL, positional_embedding_type="rotary", rotary_dim=2, parallel_attn_mlp=True),
}
ROWS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15], [16]]


@pytest.mark.parametrize("name", CONFIGS)
def test_padding_never_changes_a_prompts_logits(name):
    model = init_random(CONFIGS[name], jax.random.key(0))
    tokens = jnp.asarray(pad_left(ROWS))
    batch, final = np.asarray(model(tokens)), np.asarray(model(tokens, last=True))
    by_edges = np.asarray(edges.run(model, tokens)[0])
    for i, row in enumerate(ROWS):
        alone = np.asarray(model(jnp.asarray([row])))[0]
        np.testing.assert_allclose(batch[i, -len(row) :], alone, atol=PAD_ATOL, rtol=0)
        np.testing.assert_allclose(final[i, -1], alone[-1], atol=PAD_ATOL, rtol=0)
        np.testing.assert_allclose(by_edges[i, -len(row) :], alone, atol=PAD_ATOL, rtol=0)
    assert np.isfinite(batch).all()  # padding positions too: no empty attention row


def test_resampling_keeps_each_prompt_to_its_own_length():
    tokens = jnp.asarray(pad_left([[1], [2, 3], [4], [5, 6], [7, 8, 9], [1, 2]]))
    for seed in range(5):
        perm = same_length_permutation(jax.random.key(seed), tokens)
        assert sorted(np.asarray(perm).tolist()) == list(range(6))
        np.testing.assert_array_equal(lengths(tokens)[perm], lengths(tokens))
    even = jnp.ones((7, 3), jnp.int32)  # no padding: exactly jax.random.permutation
    np.testing.assert_array_equal(
        same_length_permutation(jax.random.key(3), even), jax.random.permutation(jax.random.key(3), 7)
    )


def test_means_leave_padding_out():
    model = init_random(CONFIGS["gpt2"], jax.random.key(0))
    tokens = jnp.asarray(pad_left([[1, 2, 3], [4]]))
    means = site_means(model, tokens, ["blocks.0.attn.in"])["blocks.0.attn.in"]
    alone = model.run(jnp.asarray([[1, 2, 3]]), capture=["blocks.0.attn.in"])[1]["blocks.0.attn.in"][0]
    np.testing.assert_allclose(means[:2], alone[:2], atol=1e-6)  # only the long prompt reaches them


@pytest.mark.parametrize("units", ["dims", "edges"])
def test_scrubber_ends_with_mixed_lengths(units):
    model = init_random(CONFIGS["llama-gqa"], jax.random.key(1))
    prompts = [
        {"clean": row, "corrupt": row[::-1], "answers": [1], "wrong_answers": [2]} for row in ROWS for _ in range(2)
    ]
    batch = parse_prompts({"prompts": prompts})
    scrubber = Scrubber.build(model, batch, units=units)
    full, repl = scrubber.reference(batch, jax.random.key(0))
    ones = {s: jnp.ones(n) for s, n in scrubber.n_units.items()}
    zeros = {s: jnp.zeros(n) for s, n in scrubber.n_units.items()}
    np.testing.assert_allclose(scrubber.logits(batch.clean, ones, repl), full, atol=1e-5, rtol=0)
    on_corrupt = model(batch.corrupt)[:, -1]
    np.testing.assert_allclose(scrubber.logits(batch.clean, zeros, repl), on_corrupt, atol=1e-4, rtol=0)


SKEWED = [2] * 10 + [3] * 6 + [4] * 4 + [12] * 3 + [14]  # many short prompts and a few long ones


@pytest.mark.parametrize(
    ("units", "ablation", "corrupt"),
    [("dims", "resample", False), ("dims", "mean", True), ("edges", "resample", True), ("edges", "optimal", True)],
)
def test_length_groups_score_as_padding_everything_together(units, ablation, corrupt):
    """Scoring prompts in length groups gives each prompt what scoring the whole batch at once gives
    it (to float rounding), in the order the prompts were given; resampled prompts keep their pairs."""
    from explainer.score import Layout, Reference, Scorer, prompt_scores, prompt_stats

    rng = np.random.default_rng(0)
    order = rng.permutation(len(SKEWED))  # lengths mixed up in the file
    rows = [rng.integers(0, 20, SKEWED[i]).tolist() for i in order]
    prompts = [{"clean": r, "answers": [1], "wrong_answers": [2]} for r in rows]
    if corrupt:
        prompts = [p | {"corrupt": rng.integers(0, 20, len(p["clean"])).tolist()} for p in prompts]
    batch = parse_prompts({"prompts": prompts})
    assert len(length_groups(np.asarray(lengths(batch.clean)))) > 1
    model = init_random(CONFIGS["llama-gqa"], jax.random.key(2), std=0.3)
    scrubber = Scrubber.build(model, batch, ablation=ablation, units=units)
    masks = [{s: rng.random(n) < 0.5 for s, n in scrubber.n_units.items()} for _ in range(3)]
    masks.append({s: np.ones(n, bool) for s, n in scrubber.n_units.items()})  # nothing replaced: the full model
    constants = [scrubber.means] * len(masks) if ablation == "optimal" else None
    full, stats = prompt_scores(scrubber, batch, masks, seed=3, constants=constants)
    # the batch at once, padded to its longest prompt (the single-group path of prompt_scores)
    layout = Layout.of([(s, scrubber.n_units[s]) for s in scrubber.sites])
    flat = np.stack([layout.flat(m, np.float32) for m in masks])
    ref = Reference.of(scrubber, batch, jax.random.fold_in(jax.random.key(3), 0))
    np.testing.assert_allclose(full, np.asarray(prompt_stats(ref.full, ref)), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(
        stats, Scorer(scrubber, ref, layout)(flat, prompt_stats, constants), atol=1e-4, rtol=1e-5
    )
    assert stats[:3, :, 0].max() > 1e-2  # the masks change the logits: the comparison sees the replacements
    np.testing.assert_allclose(stats[3], full, atol=1e-4, rtol=1e-5)


def test_mixed_length_prompts_parse_and_round_trip():
    data = {"prompts": [{"clean": r, "answers": [1], "wrong_answers": [2]} for r in ROWS]}
    batch = parse_prompts(data)
    assert batch.clean.shape == (4, 7) and int(batch.clean[0, 0]) == PAD
    assert prompts_json(batch) == data
    with pytest.raises(ExplainerError, match="'corrupt' has 2 tokens but 'clean' has 3"):
        parse_prompts({"prompts": [{"clean": [1, 2, 3], "corrupt": [1, 2], "answers": [1], "wrong_answers": [2]}]})
    task = PromptsTask(batch)
    task.check(CONFIGS["gpt2"])
    bad = batch.clean.at[1, 3].set(PAD)  # padding after a real token
    with pytest.raises(ExplainerError, match="only before a prompt's first token"):
        PromptsTask(Batch(bad, None, batch.answers, batch.wrong_answers)).check(CONFIGS["gpt2"])


WORDS = "the cat dog sat ran on a mat rug red blue big small and".split()


def make_tokenizer():
    """A word-level tokenizer trained here, with a ``<s>`` prepended to every prompt (as Llama's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)] * 3, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def text_prompts(n: int = 24, corrupt: bool = False) -> dict:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        words = rng.choice(WORDS, size=2 + i % 5).tolist()
        p = {"clean": " ".join(words), "answers": "mat", "wrong_answers": ["rug", "dog"]}
        if corrupt:
            p["corrupt"] = " ".join(rng.choice(WORDS, size=len(words)).tolist())
        out.append(p)
    return {"prompts": out}


def test_text_prompts_are_tokenized():
    tok = make_tokenizer()
    batch = parse_prompts(text_prompts(4, corrupt=True), tokenizer=tok)
    first = [t for t in np.asarray(batch.clean[0]).tolist() if t != PAD]
    assert first == tok.encode(text_prompts(4)["prompts"][0]["clean"]).ids and first[0] == 1
    assert batch.answers.shape == (4, 1) and batch.wrong_answers.shape == (4, 2)
    assert int(batch.answers[0, 0]) == tok.token_to_id("mat")
    with pytest.raises(ExplainerError, match=r"answer 'red cat' is not one token: .* 2 \['red', 'cat'\]"):
        parse_prompts({"prompts": [{"clean": "the cat", "answers": "red cat", "wrong_answers": "dog"}]}, tokenizer=tok)


def explainer_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "explainer.cli", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny random Llama checkpoint with a tokenizer.json, imported with ``explainer import hf``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("text")
    tok = make_tokenizer()
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=tok.get_vocab_size(), max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "hf")
    tok.save(str(root / "hf" / "tokenizer.json"))
    explainer_cli("import", "hf", root / "hf", root / "model")
    assert (root / "model" / "tokenizer.json").is_file()
    return root


def test_a_llama_folder_trains_from_text_prompts_of_mixed_lengths(llama_folder, cli_here):
    prompts = llama_folder / "prompts.json"
    prompts.write_text(json.dumps(text_prompts()))
    run = llama_folder / "run"
    model = llama_folder / "model"
    explainer_cli("train", "--model", model, "--task", prompts, "--steps", "30", "--out", run, "--no-progress")
    evaluated = cli_here("eval", run, "--json")  # the run's own commands, in this process
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["faithfulness"]
    attacked = cli_here("attack", run, "-k", "2", "--method", "greedy", "--no-progress")
    assert attacked.returncode == 0, attacked.stderr[-3000:]
    task = resolve_task(prompts, model)
    assert len(set(np.asarray(lengths(task.batch.clean)).tolist())) == 5


def test_text_needs_the_folders_tokenizer(tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(text_prompts(4)))
    with pytest.raises(ExplainerError, match="gives text, but there is no tokenizer"):
        resolve_task(prompts, tmp_path)
