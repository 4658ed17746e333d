"""Counterfactuals of another length (``"positions": "end"``) and tracr programs whose answer is a length.

A clean prompt and its counterfactual correspond counted from the end: left padding puts both ends
in the last column, and the counterfactual's run is its own (its padding, its positions), so every
resampled activation is the one the counterfactual has alone, unpadded.
"""

from __future__ import annotations

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from explainer import edges
from explainer.errors import ExplainerError
from explainer.models import ModelConfig, init_random
from explainer.models.native import save_model
from explainer.models.padding import length_groups, lengths
from explainer.scrub import Scrubber, capture, scrubbed_logits
from explainer.tasks import Batch, PromptsTask, parse_prompts, prompts_json

ATOL = 1e-5
SMALL = dict(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=20, n_ctx=16)
LLAMA = dict(normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, act_fn="silu")
CONFIGS = {"gpt2": ModelConfig(**SMALL), "llama-gqa": ModelConfig(**SMALL, **LLAMA, n_key_value_heads=2)}


def longer_corrupt_prompts(n: int, seed: int = 0) -> dict:
    """Clean prompts of 2-6 tokens, each with a counterfactual 0-3 tokens longer."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = 2 + i % 5
        out.append(
            {
                "clean": rng.integers(0, 20, length).tolist(),
                "corrupt": rng.integers(0, 20, length + i % 4).tolist(),
                "answers": [1],
                "wrong_answers": [2],
            }
        )
    return {"prompts": out, "positions": "end"}


def test_lengths_that_differ_need_positions_end():
    pair = {"clean": [1, 2, 3], "corrupt": [4, 5, 6, 7], "answers": [1], "wrong_answers": [2]}
    refused = r"prompt 0: 'corrupt' has 4 tokens but 'clean' has 3; .*\"positions\": \"end\" at the top"
    with pytest.raises(ExplainerError, match=refused):
        parse_prompts({"prompts": [pair]})
    with pytest.raises(ExplainerError, match="'positions' is 'ends'; did you mean 'end'"):
        parse_prompts({"prompts": [pair], "positions": "ends"})
    shorter = {**pair, "clean": [1, 2, 3, 4, 5], "corrupt": [6, 7]}
    with pytest.raises(ExplainerError, match=r"'corrupt' has 2 tokens but 'clean' has 5; .* first 3 position\(s\)"):
        parse_prompts({"prompts": [pair, shorter], "positions": "end"})
    data = {"prompts": [pair, {**pair, "clean": [8], "corrupt": [9]}], "positions": "end"}
    batch = parse_prompts(data)
    assert batch.positions == "end" and batch.clean.shape == batch.corrupt.shape == (2, 4)
    assert batch.clean.tolist() == [[-1, 1, 2, 3], [-1, -1, -1, 8]] and batch.corrupt[1].tolist() == [-1, -1, -1, 9]
    assert prompts_json(batch) == data  # the field round-trips; files without it are written without it
    PromptsTask(batch).check(CONFIGS["gpt2"])
    same = Batch(batch.clean, batch.corrupt, batch.answers, batch.wrong_answers)  # built in code: "start"
    with pytest.raises(ExplainerError, match="prompt 0: 'corrupt' has 4 tokens but 'clean' has 3"):
        PromptsTask(same).check(CONFIGS["gpt2"])


@pytest.mark.parametrize(("name", "units"), [("llama-gqa", "dims"), ("gpt2", "edges")])
def test_resampling_reads_the_counterfactual_alone(name, units):
    """The replacement at a clean prompt's positions is the counterfactual's own activation there,
    counted from the end, as the counterfactual computes it alone and unpadded; the scrubbed logits
    of each prompt are those of scrubbing it alone against its counterfactual alone."""
    model = init_random(CONFIGS[name], jax.random.key(1), std=0.3)
    data = longer_corrupt_prompts(8)
    batch = parse_prompts(data)
    scrubber = Scrubber.build(model, batch, units=units)
    full, repl = scrubber.reference(batch, jax.random.key(0))
    rng = np.random.default_rng(0)
    keep = {s: jnp.asarray(rng.random(n) < 0.5, jnp.float32) for s, n in scrubber.n_units.items()}
    scrubbed = np.asarray(eqx.filter_jit(scrubber.logits)(batch.clean, keep, repl))
    run_alone = eqx.filter_jit(lambda tokens: capture(model, tokens, scrubber.sites, units)[1])  # jitted: faster
    scrub_alone = eqx.filter_jit(edges.run if units == "edges" else scrubbed_logits)
    for i in (1, 3, 6):  # counterfactuals 1, 3 and 2 tokens longer (the rest of the batch pads around them)
        p, n = data["prompts"][i], len(data["prompts"][i]["clean"])
        alone = run_alone(jnp.asarray([p["corrupt"]]))
        for site, value in alone.items():  # the clean prompt's columns: its last n positions
            np.testing.assert_allclose(repl[site][i, -n:], value[0, -n:], atol=ATOL, rtol=0, err_msg=site)
        cut = {s: v[:, -n:] for s, v in alone.items()}
        one = scrub_alone(model, jnp.asarray([p["clean"]]), keep, cut)
        np.testing.assert_allclose(scrubbed[i], (one[0] if units == "edges" else one)[0, -1], atol=1e-4, rtol=0)
    assert not np.allclose(scrubbed, np.asarray(full), atol=1e-3)  # the mask does replace something


def test_length_groups_keep_a_longer_counterfactuals_first_tokens():
    """Scoring in length groups narrows a group to its longest prompt *or counterfactual*, so a
    counterfactual longer than every clean prompt of its group is not cut."""
    data = longer_corrupt_prompts(24)
    for i, p in enumerate(data["prompts"][:16]):  # many short pairs and a few long: several groups
        p["clean"] = p["clean"][:2]
        p["corrupt"] = p["corrupt"][:2] + [3] * (i % 4)
    batch = parse_prompts(data)
    assert len(length_groups(np.asarray(lengths(batch.clean)))) > 1
    model = init_random(CONFIGS["llama-gqa"], jax.random.key(2), std=0.3)
    scrubber = Scrubber.build(model, batch)
    scored_in_groups_as_at_once(scrubber, batch)


def scored_in_groups_as_at_once(scrubber: Scrubber, batch: Batch) -> None:
    """Scoring ``batch`` in length groups gives what one reference over all of it gives."""
    from explainer.score import Layout, Reference, Scorer, prompt_scores, prompt_stats

    rng = np.random.default_rng(1)
    masks = [{s: rng.random(n) < 0.5 for s, n in scrubber.n_units.items()} for _ in range(2)]
    full, stats = prompt_scores(scrubber, batch, masks, seed=3)
    layout = Layout.of([(s, scrubber.n_units[s]) for s in scrubber.sites])
    ref = Reference.of(scrubber, batch, jax.random.fold_in(jax.random.key(3), 0))
    flat = np.stack([layout.flat(m, np.float32) for m in masks])
    np.testing.assert_allclose(full, np.asarray(prompt_stats(ref.full, ref)), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(stats, Scorer(scrubber, ref, layout)(flat, prompt_stats, None), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["longer", "mapped"])
def test_a_prompts_file_of_other_length_counterfactuals_trains_and_evaluates(tmp_path, kind):
    """Counterfactuals longer than their prompts (``"positions": "end"``) or mapped position by
    position: a run trains, saves, and evaluates again to the same numbers."""
    import explainer

    name, data = ("gpt2", longer_corrupt_prompts(20)) if kind == "longer" else ("llama-gqa", mapped_prompts(20))
    save_model(init_random(CONFIGS[name], jax.random.key(0), std=0.3), tmp_path / "model")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(data))
    e = explainer.explain(
        tmp_path / "model", prompts, out=tmp_path / "run", steps=10, adversary="none", repair=False,
        open_restart=False, progress=False,
    )  # fmt: skip
    again = explainer.load(tmp_path / "run").evaluate()
    assert np.isfinite(e.faithfulness["kl_mean"])
    assert again["faithfulness"]["kl_mean"] == pytest.approx(e.faithfulness["kl_mean"], abs=1e-5)


def mapped_prompts(n: int, seed: int = 0) -> dict:
    """Clean prompts of 2-6 tokens, each with a counterfactual of 2-7 tokens (shorter or longer) and
    a map from every clean position to a random counterfactual position (any order, repeats allowed)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        clean, corrupt = rng.integers(0, 20, 2 + i % 5).tolist(), rng.integers(0, 20, 2 + (i * 3) % 6).tolist()
        mapped = rng.integers(0, len(corrupt), len(clean)).tolist()
        out.append({"clean": clean, "corrupt": corrupt, "positions": mapped, "answers": [1], "wrong_answers": [2]})
    return {"prompts": out}


def test_a_prompt_may_map_its_positions_one_by_one():
    pair = {"clean": [1, 2, 3], "corrupt": [4, 5], "positions": [1, 0, 1], "answers": [1], "wrong_answers": [2]}
    plain = {"clean": [6, 7], "corrupt": [8, 9], "answers": [1], "wrong_answers": [2]}
    batch = parse_prompts({"prompts": [pair, plain]})
    # columns: clean [1, 2, 3] fills columns 0-2, corrupt [4, 5] columns 1-2; the plain pair keeps its own
    assert batch.position_map.tolist() == [[2, 1, 2], [0, 1, 2]]
    assert prompts_json(batch) == {"prompts": [pair, plain]}  # the map round-trips; none is written for the plain pair
    PromptsTask(batch).check(CONFIGS["gpt2"])
    refusals = [
        ({**pair, "positions": [0, 1]}, "'positions' has 2 entries but 'clean' has 3 tokens"),
        ({**pair, "positions": [0, 2, 1]}, r"names corrupt position 2, but 'corrupt' has 2 tokens \(positions 0..1\)"),
        ({**pair, "positions": "end"}, "inside a prompt it is a list of corrupt positions"),
        ({**pair, "positions": [0, -1, 1]}, "negative token id"),
    ]
    for prompt, message in refusals:
        with pytest.raises(ExplainerError, match=message):
            parse_prompts({"prompts": [prompt]})
    alone = {k: v for k, v in pair.items() if k != "corrupt"}
    with pytest.raises(ExplainerError, match="the prompt has no 'corrupt'"):
        parse_prompts({"prompts": [alone]})
    onto_padding = dataclasses.replace(batch, position_map=batch.position_map.at[0, 0].set(0))
    with pytest.raises(ExplainerError, match="prompt 0: its position map sends a clean position to .* padding"):
        PromptsTask(onto_padding).check(CONFIGS["gpt2"])


@pytest.mark.parametrize(("name", "units"), [("llama-gqa", "dims"), ("gpt2", "edges")])
def test_resampling_reads_the_mapped_counterfactual_positions(name, units):
    """Under a position map, the replacement at each clean position is the counterfactual's own
    activation (computed alone, unpadded) at the position the map names; scoring in length groups,
    which narrows each group's columns, gives what one reference over the whole batch gives."""
    model = init_random(CONFIGS[name], jax.random.key(1), std=0.3)
    data = mapped_prompts(24)
    batch = parse_prompts(data)
    scrubber = Scrubber.build(model, batch, units=units)
    _, repl = scrubber.reference(batch, jax.random.key(0))
    run_alone = eqx.filter_jit(lambda tokens: capture(model, tokens, scrubber.sites, units)[1])
    for i in (1, 4, 8):  # corrupt shorter, longer, and of the clean prompt's length
        p, n = data["prompts"][i], len(data["prompts"][i]["clean"])
        alone = run_alone(jnp.asarray([p["corrupt"]]))
        for site, value in alone.items():
            np.testing.assert_allclose(repl[site][i, -n:], value[0, np.asarray(p["positions"])], atol=ATOL, rtol=0)
    assert len(length_groups(np.asarray(lengths(batch.clean)))) > 1
    scored_in_groups_as_at_once(scrubber, batch)


@pytest.mark.parametrize(("ablation", "units"), [("resample", "dims"), ("optimal", "dims")])
def test_training_batches_come_from_one_length_group(ablation, units):
    """Prompts of 3 and of 12 tokens train in two length groups, each padded to its own longest
    prompt; a step on a group computes what the same step computes with the group's prompts padded
    to the longest of all (padding changes no logit), and each group compiles the step once; a run
    too short to pay for a second compile trains in one group."""
    from explainer.train import TrainConfig, init_state, make_optimizer, make_step
    from explainer.train.loop import LengthGroups

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 20, 3 if i % 2 else 12).tolist() for i in range(16)]
    data = parse_prompts(
        {"prompts": [{"clean": r, "corrupt": rng.integers(0, 20, len(r)).tolist(), "answers": [1],
                      "wrong_answers": [2]} for r in rows]}
    )  # fmt: skip
    model = init_random(CONFIGS["llama-gqa"], jax.random.key(0), std=0.3)
    scrubber = Scrubber.build(model, data, ablation=ablation, units=units)
    config = TrainConfig.of(batch_size=4, steps=2000, init_logit=0.0)  # long enough to pay for two compiles
    optimizer = make_optimizer(config)
    short, _ = make_step(scrubber, data, config.replace(steps=100), optimizer)
    assert not isinstance(short.operands, LengthGroups)  # a short run trains in one group
    grouped, counter = make_step(scrubber, data, config, optimizer)
    assert isinstance(grouped.operands, LengthGroups) and grouped.operands.sizes == (8, 8)
    widths = sorted(part[1].clean.shape[1] for part in grouped.operands.parts)
    assert widths == [3, 12]
    state = init_state(scrubber, config, optimizer)
    for n in range(6):
        part = grouped.operands.at(n)
        short = part[1].clean.shape[1] == 3
        padded_data = data.take(jnp.asarray(np.flatnonzero(np.asarray(lengths(data.clean)) == (3 if short else 12))))
        padded, _ = make_step(scrubber, padded_data, config, optimizer)  # one length: one group, not narrowed
        assert padded_data.clean.shape[1] == 12 and not isinstance(padded.operands, LengthGroups)
        after, metrics = grouped(state, part)
        same, expected = padded(state)
        for name in ("loss", "kl", "size"):
            np.testing.assert_allclose(metrics[name], expected[name], atol=1e-5, rtol=1e-5, err_msg=f"step {n} {name}")
        for site in after.gates.logits:
            np.testing.assert_allclose(after.gates.logits[site], same.gates.logits[site], atol=1e-5, rtol=1e-4)
        state = after
    assert counter["traces"] == 2
