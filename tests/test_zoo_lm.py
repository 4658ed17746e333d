"""The zoo language model's recipe, end to end at smoke size: tokenizer, training, tasks, folder."""

import json

import pytest

from explainer.models import load_model
from explainer.tasks import resolve_task
from explainer.tasks.prompts import PromptsTask
from explainer.zoo.lm_training import LM_RECIPES, SMOKE, TASKS, stdlib_files, write_lm


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("pylm") / "pylm"
    write_lm("pylm", out, recipe=SMOKE, progress=False)
    return out


def test_the_recipe_is_a_llama_that_fits_the_zoo():
    cfg = LM_RECIPES["pylm"].config
    assert cfg.normalization_type == "RMS" and cfg.positional_embedding_type == "rotary"
    assert cfg.gated_mlp and cfg.n_key_value_heads < cfg.n_heads
    embed = 2 * cfg.d_vocab * cfg.d_model
    per_layer = 2 * cfg.d_model * cfg.n_heads * cfg.d_head + 2 * cfg.d_model * cfg.n_key_value_heads * cfg.d_head
    per_layer += 3 * cfg.d_model * cfg.d_mlp
    assert 4 * (embed + cfg.n_layers * per_layer) <= 10_000_000  # float32 weights within the zoo's budget


def test_the_corpus_is_a_fixed_split_of_the_standard_library():
    train, held = stdlib_files(LM_RECIPES["pylm"])
    assert train and held and not set(train) & set(held)
    assert [f.name for f in train] == sorted(f.name for f in train)
    assert (train, held) == stdlib_files(LM_RECIPES["pylm"])


def test_smoke_recipe_writes_a_loadable_folder_with_text_tasks(folder):
    card = json.loads((folder / "card.json").read_text())
    assert card["training"]["final_loss"] < card["training"]["first_loss"]
    assert card["training"]["traces"] == 1
    assert card["training"]["repeat_share"] == 0.25 and card["training"]["repeat_periods"] == [8, 16]
    assert card["corpus"]["heldout_files"] and not set(card["corpus"]["heldout_files"]) & set(
        card["corpus"]["train_files"]
    )
    model = load_model(folder)
    assert model.config.d_vocab == card["corpus"]["vocab_size"]
    assert (folder / "tokenizer.json").is_file()
    assert set(card["shipped_tasks"]) == set(TASKS)  # the smoke recipe ships every task
    for task, file in card["shipped_tasks"].items():
        prompts = json.loads((folder / file).read_text())["prompts"]
        assert all(isinstance(p["clean"], str) and isinstance(p["answers"][0], str) for p in prompts)
        loaded = PromptsTask.from_file(folder / file, model_folder=folder)
        loaded.check(model.config)
        assert len(loaded.batch) == card["tasks"][task]["prompts"]
        assert 0.0 <= card["tasks"][task]["accuracy"] <= 1.0
    induction = json.loads((folder / "prompts.json").read_text())["prompts"]
    assert all(p["clean"] != p["corrupt"] for p in induction)
    assert resolve_task(None, folder).name == "induction"


def test_an_explanation_trains_on_the_text_prompts(folder):
    from explainer import explain

    explanation = explain(str(folder), steps=20, adversary="none", progress=False)
    assert set(explanation.kept) <= set(load_model(folder).sites)
