import json

import numpy as np
import pytest

from explainer.errors import ExplainerError
from explainer.tasks import PromptsTask, parse_prompts, prompts_json, resolve_task
from explainer.tasks.planted import first_class_prompts, xor_class_prompts
from explainer.zoo import resolve_model


def _p(clean=(1, 2), corrupt=(3, 2), answers=(1,), wrong=(3,)):
    return {"clean": list(clean), "corrupt": list(corrupt), "answers": list(answers), "wrong_answers": list(wrong)}


def test_roundtrip():
    batch = parse_prompts({"prompts": [_p(), _p(clean=(4, 5), corrupt=(5, 4))]})
    again = parse_prompts(prompts_json(batch))
    np.testing.assert_array_equal(again.clean, batch.clean)
    np.testing.assert_array_equal(again.corrupt, batch.corrupt)


def test_corrupt_may_be_left_out():
    batch = parse_prompts({"prompts": [{"clean": [1], "answers": [1], "wrong_answers": [2]}] * 2})
    assert batch.corrupt is None


@pytest.mark.parametrize(
    "data, message",
    [
        ({"prompts": []}, "no prompts"),
        ({"items": []}, "'prompts' list"),
        ({"prompts": [_p(corrupt=(1,))]}, "a counterfactual must have its clean prompt's length"),
        ({"prompts": [_p(clean=(-1, 2))]}, "negative token id"),
        ({"prompts": [{**_p(), "clean": "a b", "corrupt": "b a"}]}, "gives text, but there is no tokenizer"),
        ({"prompts": [_p(), {"clean": [1, 2], "answers": [1], "wrong_answers": [2]}]}, "for every prompt or for none"),
        ({"prompts": [_p(answers=())]}, "at least one token"),
        ({"prompts": [{**_p(), "lables": [1]}]}, "unknown key"),
        ({"prompts": [_p(clean=(1, "a"))]}, "integer token ids"),
        ({"prompts": [_p(), _p(answers=(1, 2))]}, "unequal 'answers' lengths"),
    ],
)
def test_bad_prompts_are_named(data, message):
    with pytest.raises(ExplainerError, match=message):
        parse_prompts(data)


def test_out_of_vocabulary_and_too_long(planted_models):
    cfg = planted_models["planted-joint"].config
    with pytest.raises(ExplainerError, match="token 12, out of the model's vocabulary"):
        PromptsTask(parse_prompts({"prompts": [_p(clean=(1, 12)), _p()]})).check(cfg)
    with pytest.raises(ExplainerError, match="n_ctx=2"):
        PromptsTask(parse_prompts({"prompts": [_p(clean=(1, 2, 3), corrupt=(1, 2, 3))] * 2})).check(cfg)


def test_files(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ExplainerError, match="is empty"):
        resolve_task(empty)
    broken = tmp_path / "broken.json"
    broken.write_text('{"prompts": [')
    with pytest.raises(ExplainerError, match="not valid JSON"):
        resolve_task(broken)
    with pytest.raises(ExplainerError, match="does not exist"):
        resolve_task(tmp_path / "missing.json")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"prompts": [_p()] * 12}))
    task = resolve_task(good)
    assert len(task.train_data()) + len(task.heldout_data()) == 12


def test_resolution():
    folder = resolve_model("planted-joint")
    assert resolve_task(None, folder).name == "xor-class"
    assert resolve_task("first-class").name == "first-class"
    with pytest.raises(ExplainerError, match="did you mean 'xor-class'"):
        resolve_task("xor-clas")
    with pytest.raises(ExplainerError, match="no prompts.json"):
        resolve_task(None, None)


def test_heldout_split_is_disjoint_and_fixed():
    task = resolve_task(None, resolve_model("planted-distractor"))
    again = resolve_task(None, resolve_model("planted-distractor"))
    np.testing.assert_array_equal(task.heldout_data().clean, again.heldout_data().clean)
    assert len(task.heldout_data()) == round(0.2 * 512)


def test_planted_tasks_have_counterfactuals_that_flip_the_answer(planted_models):
    for name, prompts in (("planted-distractor", first_class_prompts()), ("planted-joint", xor_class_prompts())):
        model = planted_models[name]
        clean = np.asarray(model(prompts.clean)[:, -1]).argmax(-1)
        corrupt = np.asarray(model(prompts.corrupt)[:, -1]).argmax(-1)
        np.testing.assert_array_equal(clean, prompts.answers[:, 0])
        np.testing.assert_array_equal(corrupt, prompts.wrong_answers[:, 0])
