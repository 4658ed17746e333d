"""tracr import: parity with tracr's own model, sound ground truth, the CLI, and recovery by training."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import explainer
from explainer.metrics import truth_scores
from explainer.models import load_model
from explainer.models.native import to_state_dict
from explainer.tasks import resolve_task
from explainer.zoo import load_truth, resolve_model
from explainer.zoo.ground_truth import check, reader_units
from explainer.zoo.tracr_compile import RECIPES, UNSUPPORTED, compile_program, program_names, to_native
from explainer.zoo.tracr_import import ZOO

KL_BUDGET = explainer.TrainConfig().penalty.kl_budget


@pytest.fixture(scope="module", params=sorted(ZOO))
def shipped(request):
    """A shipped tracr model, its prompts and card, and the program compiled afresh by tracr."""
    name = request.param
    folder = resolve_model(name)
    card = json.loads((folder / "card.json").read_text())
    compiled = compile_program(**ZOO[name])
    return name, load_model(folder), resolve_task(None, folder).batch, card, compiled


def test_shipped_weights_are_a_fresh_import(shipped):
    _, model, _, card, compiled = shipped
    readout = {k: card["tracr"][k] for k in ("threshold", "scale")} if "threshold" in card["tracr"] else None
    fresh = to_state_dict(to_native(compiled, readout))
    assert fresh.keys() == to_state_dict(model).keys()
    for name, value in to_state_dict(model).items():
        np.testing.assert_array_equal(value, fresh[name], err_msg=name)
    assert card["tracr"]["residual_labels"] == compiled.assembled.residual_labels


def test_forward_matches_tracr(shipped):
    """Every site's residual, and the decoded output, equal those of tracr's assembled model."""
    _, model, batch, card, compiled = shipped
    theirs = jax.jit(compiled.assembled.forward)(compiled.assembled.params, batch.clean)
    logits, ours = model.run(batch.clean, capture=model.sites)
    residuals = [theirs.transformer_output.input_embeddings, *theirs.transformer_output.residuals]
    for i, site in enumerate(model.sites):
        np.testing.assert_allclose(ours[site], residuals[i], atol=1e-5, err_msg=site)
    if card["tracr"]["output"] == "categorical":
        assert (logits.argmax(-1)[:, 1:] == theirs.unembedded_output[:, 1:]).all()
    else:
        s, theta = card["tracr"]["scale"], card["tracr"]["threshold"]
        value = (logits[..., 0] - logits[..., 1]) / (2 * s) + theta
        np.testing.assert_allclose(value[:, 1:], theirs.unembedded_output[:, 1:], atol=1e-5)
    assert card["accuracy"] == 1.0


def test_truth_is_faithful_minimal_and_closed(shipped):
    name, model, batch, _, _ = shipped
    truth = load_truth(resolve_model(name))
    readers = reader_units(model)
    assert all(set(units) <= set(readers[site]) for site, units in truth.items())
    result = check(model, batch, truth)
    assert result["kl_max"] < 1e-6  # keeping exactly the truth is the full model
    assert result["drop_min"] > 5 * KL_BUDGET, result["drop"]  # every unit is needed, beyond the budget
    assert result["add_max"] < 1e-6  # every other unit is idle


@pytest.mark.parametrize("name", ["tracr-frac-prevs", "tracr-reverse"])
def test_training_recovers_the_truth(name):
    e = explainer.explain(name, progress=False)
    assert truth_scores(e.kept, load_truth(resolve_model(name)))["f1"] == 1.0
    assert e.faithfulness["kl_mean"] <= KL_BUDGET


def cli(*args):
    return subprocess.run([sys.executable, "-m", "explainer.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_imports_a_program(tmp_path):
    out = tmp_path / "hist"
    proc = cli("zoo", "import-tracr", "hist", out, "--max-seq-len", "4", "--vocab", "x,y,z", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["program"] == "make_hist" and result["accuracy"] == 1.0
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "model.safetensors",
        "prompts.json",
        "truth.json",
        "card.json",
    }
    card = json.loads((out / "card.json").read_text())
    assert card["kind"] == "tracr" and set(card["tracr"]["tokens"]) == {"BOS", "compiler_pad", "x", "y", "z"}
    resolve_task(None, out).check(load_model(out).config)
    again = cli("zoo", "import-tracr", "hist", out)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_cli_unknown_program_lists_the_valid_ones(tmp_path):
    proc = cli("zoo", "import-tracr", "make_revrse", tmp_path / "m")
    assert proc.returncode == 2
    assert "did you mean 'make_reverse'" in proc.stderr
    assert all(name in proc.stderr for name in program_names())
    assert not (tmp_path / "m").exists()


def test_every_lib_function_has_a_recipe():
    import inspect

    from tracr.compiler import lib

    functions = {n for n, f in vars(lib).items() if inspect.isfunction(f) and f.__module__ == lib.__name__}
    assert functions == set(RECIPES) | set(UNSUPPORTED)


def test_a_length_program_gets_prompts_of_several_lengths(tmp_path):
    """make_length answers the same for every input of one length: it is imported with prompts of
    every length, left-padded, each counterfactual at least as long ("positions": "end"), and a
    ground truth as sound as the shipped programs'."""
    from tracr.compiler import lib
    from tracr.rasp import rasp

    from explainer.metrics import accuracy
    from explainer.models.padding import PAD, lengths

    out = tmp_path / "length"
    proc = cli("zoo", "import-tracr", "length", out, "--max-seq-len", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["accuracy"] == 1.0 and result["prompts"] == 512 and result["note"] is None
    assert result["truth_labels"] == {
        "blocks.0.attn.in": ["tokens:BOS", "tokens:a", "tokens:b", "tokens:c"],  # the BOS is where the length is read
        "blocks.0.mlp.in": ["length_1_selector_width_attn_output"],
        "unembed.in": ["length_1:1", "length_1:2", "length_1:3", "length_1:4"],
    }
    card = json.loads((out / "card.json").read_text())
    assert card["tracr"]["prompt_lengths"] == [1, 2, 3, 4] and card["tracr"]["positions"] == "end"
    assert card["accuracy"] == 1.0 and card["tracr"]["truth_labels"] == result["truth_labels"]
    assert json.loads((out / "prompts.json").read_text())["positions"] == "end"

    model, batch = load_model(out), resolve_task(None, out).batch
    assert batch.positions == "end"
    clean, corrupt = np.asarray(lengths(batch.clean)), np.asarray(lengths(batch.corrupt))
    assert set(clean.tolist()) == {2, 3, 4} and (corrupt > clean).all()  # BOS and 1-3 tokens, longer counterfactuals
    logits = model(batch.clean)
    assert float(accuracy(logits[:, -1], batch.answers, batch.wrong_answers)) == 1.0
    # every real position after BOS decodes to the program's own output there, padded as the prompt is
    tokens = card["tracr"]["tokens"]
    for row, decoded in zip(np.asarray(batch.clean)[:40], np.asarray(logits.argmax(-1))[:40], strict=True):
        word = [tokens[t] for t in row if t != PAD][1:]
        expected = rasp.evaluate(lib.make_length(), word)
        assert [card["tracr"]["outputs"][k] for k in decoded[-len(word) :]] == [str(v) for v in expected]

    result = check(model, batch, load_truth(out))
    assert result["kl_max"] < 1e-6 and result["add_max"] < 1e-6
    assert result["drop_min"] > 5 * KL_BUDGET, result["drop"]
