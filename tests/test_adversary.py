"""The adversary in the loop and as a grader: the acceptance checks of the min-max design."""

import jax
import numpy as np
import optax
import pytest

import explainer
from adversary import attack
from adversary.learned import LearnedAdversary, make_adversary
from explainer.api import attack_run
from explainer.errors import ExplainerError
from explainer.models import load_model
from explainer.scrub import Scrubber
from explainer.tasks import resolve_task
from explainer.train.config import TrainConfig
from explainer.train.step import init_state, make_step
from explainer.zoo import load_truth, resolve_model

SEEDS = range(5)


def _nonempty(kept):
    return {s: u for s, u in kept.items() if u}


def _setup(name):
    folder = resolve_model(name)
    task = resolve_task(None, folder)
    return Scrubber.build(load_model(folder), task.train_data()), task, load_truth(folder)


@pytest.mark.parametrize("seed", SEEDS)
def test_adversary_keeps_the_cancellation_pair(seed):
    e = explainer.explain("planted-cancel", seed=seed, adversary="learned", progress=False)
    assert _nonempty(e.kept) == load_truth(resolve_model("planted-cancel"))
    assert e.faithfulness["kl_mean"] <= 0.01


def test_attack_gap_is_ten_times_smaller_with_the_adversary(tmp_path):
    robust = explainer.explain("planted-cancel", seed=0, adversary="learned", progress=False, out=tmp_path / "adv")
    fragile = explainer.explain("planted-cancel", seed=0, adversary="none", progress=False, out=tmp_path / "none")
    gap_robust = attack_run(robust.path, budget=1, method="all")["gap"]["kl_mean"]
    gap_fragile = attack_run(fragile.path, budget=1, method="all")["gap"]["kl_mean"]
    assert gap_fragile > 0.5
    assert gap_robust * 10 <= gap_fragile
    assert (tmp_path / "adv" / "attack.json").is_file()
    assert "attack" in explainer.load(tmp_path / "adv").summary()


# explanations that leave something to find: the truth minus one or two of its units
HOLES = [
    ("planted-cancel", "unembed.in", [6, 7]),
    ("planted-distractor", "unembed.in", [1]),
    ("planted-joint", "blocks.0.mlp.in", [1]),
    ("planted-joint", "blocks.0.mlp.in", [2]),
    ("planted-joint", "blocks.0.attn.in", [0]),
]


def _holed(scrubber, truth, site, units):
    kept = {s: [u for u in truth.get(s, []) if not (s == site and u in units)] for s in scrubber.sites}
    return {s: np.isin(np.arange(n), kept[s]).astype(np.float32) for s, n in scrubber.n_units.items()}


@pytest.mark.parametrize("name, site, units", HOLES)
def test_learned_adversary_finds_nine_tenths_of_the_exhaustive_optimum(name, site, units):
    scrubber, task, truth = _setup(name)
    keep = _holed(scrubber, truth, site, units)
    batch = task.heldout_data()
    best = attack(scrubber, batch, keep, 1, "exhaustive", jax.random.key(0)).gap["kl_mean"]
    learned = attack(scrubber, batch, keep, 1, "learned", jax.random.key(0), steps=200)
    assert best > 0.5
    assert learned.gap["kl_mean"] >= 0.9 * best
    assert sum(map(len, learned.reincluded.values())) == 1


def test_minmax_step_is_traced_once_and_records_the_gap():
    scrubber, task, _ = _setup("planted-cancel")
    config = TrainConfig.of(steps=4)
    optimizer = optax.adam(config.optimiser.lr)
    adversary = LearnedAdversary(steps=2, restarts=3)
    step, counter = make_step(scrubber, task.train_data(), config, optimizer, adversary)
    state = init_state(scrubber, config, optimizer, adversary)
    for _ in range(4):
        state, metrics = step(state)
    assert counter["traces"] == 1
    params, _ = state.adversary
    assert params["unembed.in"].shape == (3, 10)
    assert float(metrics["gap"]) >= 0.0


@pytest.mark.parametrize(
    "settings",
    [
        dict(warm_start=False, steps=3),
        dict(budget=None, penalty=0.05),
        dict(divergence="symmetric"),
        dict(divergence="reverse_kl", budget=2),
    ],
)
def test_adversary_options_train(settings):
    e = explainer.explain("planted-cancel", adversary=LearnedAdversary(**settings), steps=300, progress=False)
    assert np.isfinite(e.history["gap"]).all() and e.config["adversary"] == "learned"


def test_adversary_errors():
    with pytest.raises(ExplainerError, match="did you mean 'learned'"):
        make_adversary("lerned")
    with pytest.raises(ExplainerError, match="penalty"):
        LearnedAdversary(budget=None)
    with pytest.raises(ExplainerError, match="did you mean 'symmetric'"):
        LearnedAdversary(divergence="symetric")
    with pytest.raises(ExplainerError, match="adversary 'none'"):
        explainer.explain("planted-cancel", adversary_weight=0.0, progress=False)
