"""The trained zoo models: shipped weights load, cards tell the truth, and training reproduces them."""

import json

import numpy as np
import pytest

from explainer.models import load_model
from explainer.tasks import builtin_tasks, resolve_task, task_names
from explainer.tasks.prompts import PromptsTask
from explainer.zoo import resolve_model, zoo_names
from explainer.zoo.training import RECIPES, measure, shipped_prompts, training_pool

TRAINED = ("induction", "direct", "ioi", "paren")


def last_json(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def card(name):
    return json.loads((resolve_model(name) / "card.json").read_text())


def test_every_recipe_is_shipped_and_its_task_is_built_in():
    assert set(TRAINED) == set(RECIPES)
    assert set(TRAINED) <= set(zoo_names())
    assert set(TRAINED) <= set(task_names())


@pytest.mark.parametrize("name", TRAINED)
def test_card_accuracy_matches_a_recomputation(name):
    folder = resolve_model(name)
    model = load_model(folder)
    task = resolve_task(None, folder)
    task.check(model.config)  # prompts fit: length, vocabulary, answers
    assert task.name == name and len(task.batch) >= 200
    heldout = task.heldout_data()
    recorded, measured = card(name), measure(model, heldout)
    assert recorded["kind"] == "trained" and recorded["task"] == name
    for key in ("accuracy", "top1_accuracy"):
        assert recorded[key] >= 0.99
        assert abs(measured[key] - recorded[key]) <= 1 / len(heldout) + 1e-6  # one prompt of slack across machines
    assert (folder / "model.safetensors").stat().st_size < 1_000_000


@pytest.mark.parametrize("name", TRAINED)
def test_shipped_prompts_are_the_seeded_generator_and_never_trained_on(name):
    shipped = resolve_task(None, resolve_model(name)).batch
    again = builtin_tasks()[name](len(shipped), seed=0)
    for field in ("clean", "corrupt", "answers", "wrong_answers"):
        np.testing.assert_array_equal(getattr(shipped, field), getattr(again, field))
    if name == "induction":  # the cheapest pool to draw
        tokens, _ = training_pool(name, seed=0)
        seen = {row.tobytes() for row in tokens}
        assert not any(row.tobytes() in seen for row in np.asarray(shipped_prompts(name).clean))


@pytest.mark.parametrize("name", TRAINED)
def test_counterfactuals_have_the_wrong_answer_as_their_answer(name):
    """The task contract training relies on: a corrupt prompt's answer is its clean prompt's wrong answer."""
    model = load_model(resolve_model(name))
    batch = resolve_task(None, resolve_model(name)).heldout_data()
    logits = model(batch.corrupt)[:, -1]
    assert float(np.mean(np.argmax(logits, -1) == np.asarray(batch.wrong_answers[:, 0]))) >= 0.99


def test_retraining_induction_from_its_seed_reproduces_its_accuracy(tmp_path, cli_here):
    out = tmp_path / "induction"
    result = last_json(cli_here("zoo", "train", "induction", "--seed", "0", "--out", out, "--json", "--no-progress"))
    assert result["out"] == str(out) and result["task"] == "induction"
    assert abs(result["accuracy"] - card("induction")["accuracy"]) <= 0.01
    assert result["shipped_accuracy"] == card("induction")["accuracy"]
    retrained = json.loads((out / "card.json").read_text())
    assert retrained["training"]["traces"] == 1  # the jitted update is traced once
    assert (out / "prompts.json").read_text() == (resolve_model("induction") / "prompts.json").read_text()
    load_model(out)
    refused = cli_here("zoo", "train", "induction", "--out", out, "--no-progress")  # exists: needs --overwrite
    assert refused.returncode == 2 and "--overwrite" in refused.stderr


def test_zoo_json_lists_the_trained_models(cli_here):
    models = {m["name"]: m for m in last_json(cli_here("zoo", "--json"))["models"]}
    for name in TRAINED:
        assert models[name]["task"] == name
        assert models[name]["accuracy"] >= 0.99


@pytest.mark.parametrize(
    "args, message",
    [
        (["inductoin"], "no trained zoo model named 'inductoin'; did you mean 'induction'?"),
        (["planted-joint"], "valid: direct, induction, ioi, paren"),
    ],
)
def test_zoo_train_errors_clearly_on_an_unknown_name(args, message, tmp_path, cli_here):
    proc = cli_here("zoo", "train", *args, "--out", tmp_path / "m")
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


def test_zoo_train_never_touches_a_folder_that_is_not_a_model(tmp_path, cli_here):
    (tmp_path / "notes.txt").write_text("keep me")
    proc = cli_here("zoo", "train", "direct", "--out", tmp_path, "--overwrite")
    assert proc.returncode == 2 and "not a model folder" in proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_the_language_model_ships_only_tasks_it_performs_and_its_card_is_right():
    """pylm's card: every shipped task at the ship threshold or above, recomputed on its prompts."""
    folder = resolve_model("pylm")
    recorded, model = card("pylm"), load_model(folder)
    assert (folder / "model.safetensors").stat().st_size <= 10_000_000
    assert recorded["shipped_tasks"]["induction"] == "prompts.json" and recorded["task"] == "induction"
    for task, file in recorded["shipped_tasks"].items():
        batch = PromptsTask.from_file(folder / file, model_folder=folder).batch
        assert len(batch) == recorded["tasks"][task]["prompts"]
        measured = measure(model, batch)
        assert recorded["tasks"][task]["accuracy"] >= recorded["ship_threshold"] >= 0.8
        for key in ("accuracy", "top1_accuracy"):
            assert abs(measured[key] - recorded["tasks"][task][key]) <= 1 / len(batch) + 1e-6
    unshipped = set(recorded["tasks"]) - set(recorded["shipped_tasks"])
    assert all(recorded["tasks"][t]["accuracy"] < recorded["ship_threshold"] for t in unshipped)
