"""Discrete adversaries on the planted models, whose correct explanations are known exactly."""

import json

import jax
import numpy as np
import pytest

from adversary import METHODS, AttackResult, attack, attack_all
from explainer.errors import ExplainerError
from explainer.score import TRACES
from explainer.scrub import Scrubber
from explainer.tasks import resolve_task
from explainer.zoo import load_truth, resolve_model

PLANTED = ("planted-distractor", "planted-cancel", "planted-joint")
CHEAP = ("greedy", "random", "gradient")
# Explanations that leave something to find: the truth minus these units.
DROPPED = {
    "planted-distractor": {"unembed.in": [1]},
    "planted-cancel": {"unembed.in": [6, 7]},
    "planted-joint": {"blocks.0.mlp.in": [1]},
}


@pytest.fixture(scope="module")
def setups(planted_models):
    """Per planted model: its scrubber, held-out prompts and ground-truth kept units."""
    out = {}
    for name, model in planted_models.items():
        folder = resolve_model(name)
        task = resolve_task(None, folder)
        out[name] = (
            Scrubber.build(model, task.train_data()),
            task.heldout_data(),
            load_truth(folder),
        )
    return out


def keep_mask(scrubber, kept, drop=None):
    """A binary keep mask over every site of ``scrubber``: ``kept`` minus ``drop``."""
    drop = drop or {}
    mask = {site: np.zeros(n, np.float32) for site, n in scrubber.n_units.items()}
    for site, units in kept.items():
        mask[site][[u for u in units if u not in drop.get(site, [])]] = 1.0
    return mask


@pytest.mark.parametrize("name", PLANTED)
def test_truth_leaves_no_gap(setups, name, getkey):
    scrubber, batch, truth = setups[name]
    keep = keep_mask(scrubber, truth)
    best, every = attack_all(scrubber, batch, keep, budget=2, key=getkey())
    assert [r.method for r in every] == list(METHODS)
    for result in every:
        assert result.gap["kl_max"] < 1e-4, (result.method, result.gap)
        assert abs(result.accuracy_change) < 1e-6
        assert set(result.reincluded) == set(keep)
        assert result.size == 0  # nothing moved the predictions: no set is reported as a finding
    assert best.gap["kl_mean"] == max(r.gap["kl_mean"] for r in every)


def test_cancellation_pair_is_found(setups, getkey):
    scrubber, batch, truth = setups["planted-cancel"]
    keep = keep_mask(scrubber, truth, DROPPED["planted-cancel"])
    result = attack(scrubber, batch, keep, budget=1, method="exhaustive", key=getkey())
    assert result.gap["kl_mean"] > 0.5
    assert result.reincluded["unembed.in"] in ([6], [7])
    assert result.reincluded["blocks.0.attn.in"] == []
    assert result.evaluations == 18  # 9 + 9 excluded units, one set each
    assert result.accuracy_change < -0.2  # one half of the pair swamps the class pathway
    assert result.logit_diff_change < 0.0


@pytest.mark.parametrize("budget", [1, 2])
@pytest.mark.parametrize("name", PLANTED)
def test_cheap_methods_within_ten_percent_of_exhaustive(setups, name, budget, getkey):
    scrubber, batch, truth = setups[name]
    keep = keep_mask(scrubber, truth, DROPPED[name])
    key = getkey()
    exact = attack(scrubber, batch, keep, budget, "exhaustive", key).gap["kl_mean"]
    assert exact > 0.5
    for method in CHEAP:
        found = attack(scrubber, batch, keep, budget, method, key)
        assert found.gap["kl_mean"] >= 0.9 * exact, (method, found.gap, exact)
        assert found.size <= budget


@pytest.mark.parametrize("name", ["planted-cancel", "planted-joint"])
def test_gradient_ranking_alone_finds_a_unit_that_matters(setups, name, getkey):
    """With one verified candidate per step the gradient's ranking decides: a random ranking would
    pick one of the many inert units."""
    scrubber, batch, truth = setups[name]
    keep = keep_mask(scrubber, truth, DROPPED[name])
    result = attack(scrubber, batch, keep, 1, "gradient", getkey(), verify=1)
    assert result.evaluations == 1
    assert result.gap["kl_mean"] > 0.5


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "symmetric"])
def test_divergences(setups, kind, getkey):
    scrubber, batch, truth = setups["planted-cancel"]
    keep = keep_mask(scrubber, truth, DROPPED["planted-cancel"])
    result = attack(scrubber, batch, keep, 1, "exhaustive", getkey(), divergence=kind)
    assert result.divergence == kind
    assert result.reincluded["unembed.in"] in ([6], [7])
    gap = result.gap
    assert 0.5 < gap["kl_p50"] <= gap["kl_p90"] <= gap["kl_p99"] <= gap["kl_max"]


@pytest.mark.parametrize("method", METHODS)
def test_same_key_same_result(setups, method):
    scrubber, batch, truth = setups["planted-joint"]
    keep = keep_mask(scrubber, truth, {"blocks.0.mlp.in": [1, 2]})
    options = {"samples": 32} if method == "random" else {}
    runs = [attack(scrubber, batch, keep, 2, method, jax.random.key(7), **options).to_json() for _ in range(2)]
    for run in runs:
        run.pop("seconds")
    assert runs[0] == runs[1]


def test_to_json_is_json(setups, getkey):
    scrubber, batch, truth = setups["planted-distractor"]
    result = attack(scrubber, batch, keep_mask(scrubber, truth, DROPPED["planted-distractor"]), 1, key=getkey())
    assert isinstance(result, AttackResult)
    data = json.loads(json.dumps(result.to_json()))
    assert data["method"] == "greedy" and data["budget"] == 1 and data["divergence"] == "kl"
    assert data["reincluded"] == {"blocks.0.attn.in": [], "unembed.in": [1]}
    assert {"kl_mean", "kl_max", "kl_p50", "kl_p90", "kl_p99"} <= set(data["gap"])
    for field in ("accuracy_change", "logit_diff_change", "evaluations", "seconds", "size"):
        assert field in data


def test_no_retrace_across_methods_budgets_and_masks(setups, getkey):
    scrubber, batch, truth = setups["planted-joint"]
    attack_all(scrubber, batch, keep_mask(scrubber, truth, DROPPED["planted-joint"]), 1, getkey())
    traced = dict(TRACES)
    for drop, budget in (({"unembed.in": [3]}, 2), ({"blocks.0.attn.in": [0]}, 3), (None, 1)):
        attack_all(scrubber, batch, keep_mask(scrubber, truth, drop), budget, getkey(), restarts=2)
    assert dict(TRACES) == traced


def bad_input_cases(keep):
    """(arguments of ``attack`` that should fail, a phrase the error must contain)."""
    half = {**keep, "unembed.in": np.full(10, 0.5, np.float32)}
    return [
        (dict(keep=keep, budget=0), "--budget 1 or more"),
        (dict(keep=keep, budget=17), "excludes only 16 units; use --budget 16 or less"),
        (dict(keep=keep, budget=1, method="greedyy"), "did you mean 'greedy'"),
        (dict(keep=keep, budget=1, divergence="js"), "valid: kl, reverse_kl, symmetric"),
        (dict(keep=keep, budget=1, method="random", restarts=2), "unknown option 'restarts'"),
        (dict(keep=keep, budget=1, restarts=0), "restarts=1 or more"),
        (
            dict(keep=keep, budget=3, method="exhaustive", max_sets=100),
            "use a smaller --budget, another method",
        ),
        (dict(keep=half, budget=1), "not binary"),
        (dict(keep={**keep, "blocks.0.mlp.in": np.zeros(10)}, budget=1), "does not mask"),
        (dict(keep={"unembed.in": np.ones(3)}, budget=1), "one entry per unit"),
        (dict(keep={"unembed.in": np.ones(10)}, budget=1), "excludes no units"),
    ]


def test_bad_input_names_the_fix(setups):
    scrubber, batch, truth = setups["planted-cancel"]
    keep = keep_mask(scrubber, truth)  # excludes 9 + 7 = 16 units
    for kwargs, phrase in bad_input_cases(keep):
        with pytest.raises(ExplainerError) as err:
            attack(scrubber, batch, **kwargs)
        assert phrase in str(err.value), (kwargs, str(err.value))
    with pytest.raises(ExplainerError, match="unknown option 'restart'"):
        attack_all(scrubber, batch, keep, 1, restart=2)


def test_progress_announces_each_method_and_the_learned_steps(setups, getkey, capsys, monkeypatch):
    """With ``progress`` every method is a phase on stderr (started, then done with its seconds),
    and a running method says how far it is; ``timings`` gains each method's seconds."""
    from adversary import discrete
    from explainer.progress import Timings

    monkeypatch.setattr(discrete, "PROGRESS_EVERY", 0.0)  # every progress line, not one per interval
    scrubber, batch, truth = setups["planted-cancel"]
    keep = keep_mask(scrubber, truth, DROPPED["planted-cancel"])
    timings = Timings()
    _, every = attack_all(
        scrubber, batch, keep, 1, getkey(), methods=("greedy", "learned"), progress=True, timings=timings, steps=3
    )
    err = capsys.readouterr().err.splitlines()
    assert list(timings) == ["reference", "greedy", "learned"] and [r.method for r in every] == ["greedy", "learned"]
    for phase in ("reference", "greedy", "learned"):
        assert f"{phase} ..." in err and any(line.startswith(f"{phase} done [") for line in err)
    assert [line.split(" [")[0] for line in err if line.startswith("learned: step")] == [
        f"learned: step {i}/3" for i in (1, 2, 3)
    ]
    assert any(line.startswith("greedy: ") and "sets scored" in line for line in err)
    attack_all(scrubber, batch, keep, 1, getkey(), methods=("greedy",))
    assert capsys.readouterr().err == ""  # silent without progress
