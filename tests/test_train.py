import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import explainer
from explainer.api import evaluate_keep
from explainer.masks import as_mask
from explainer.scrub import Scrubber
from explainer.tasks import resolve_task
from explainer.train.config import TrainConfig
from explainer.train.step import init_state, make_step
from explainer.zoo import load_truth, resolve_model

SEEDS = range(5)
PAIR = [6, 7]


def _setup(name, planted_models, **kw):
    folder = resolve_model(name)
    task = resolve_task(None, folder)
    return Scrubber.build(planted_models[name], task.train_data(), **kw), task


def _keep(scrubber, kept):
    return as_mask({s: np.isin(np.arange(n), kept.get(s, [])) for s, n in scrubber.n_units.items()})


def _nonempty(kept):
    return {s: u for s, u in kept.items() if u}


def test_step_is_traced_once(planted_models):
    scrubber, task = _setup("planted-joint", planted_models)
    config = TrainConfig.of(steps=5)
    optimizer = optax.adam(config.optimiser.lr)
    step, counter = make_step(scrubber, task.train_data(), config, optimizer)
    state = init_state(scrubber, config, optimizer)
    for _ in range(5):
        state, _ = step(state)
    assert counter["traces"] == 1
    assert int(state.step) == 5


@pytest.mark.parametrize("name", ["planted-distractor", "planted-cancel", "planted-joint"])
def test_planted_truth_is_faithful_minimal_and_closed(name, planted_models):
    """The shipped ground truth is right: faithful, every unit needed, every other unit idle."""
    scrubber, task = _setup(name, planted_models)
    truth = load_truth(resolve_model(name))
    batch = task.heldout_data()
    assert evaluate_keep(scrubber, batch, _keep(scrubber, truth))["kl_max"] < 1e-6
    for site, units in truth.items():
        for unit in units:
            fewer = {**truth, site: [u for u in units if u != unit]}
            assert evaluate_keep(scrubber, batch, _keep(scrubber, fewer))["kl_mean"] > 0.5, (site, unit)
    for site, n in scrubber.n_units.items():
        for unit in sorted(set(range(n)) - set(truth.get(site, []))):
            more = {**truth, site: sorted(truth.get(site, []) + [unit])}
            assert evaluate_keep(scrubber, batch, _keep(scrubber, more))["kl_max"] < 1e-6, (site, unit)


@pytest.mark.parametrize("adversary", ["none", "learned"])
@pytest.mark.parametrize("name", ["planted-distractor", "planted-joint"])
@pytest.mark.parametrize("seed", SEEDS)
def test_recovers_planted_truth_exactly(name, seed, adversary):
    e = explainer.explain(name, seed=seed, adversary=adversary, progress=False)
    assert _nonempty(e.kept) == _nonempty(load_truth(resolve_model(name)))
    assert e.faithfulness["kl_mean"] <= 0.01
    assert e.history["traces"] == [1]


@pytest.mark.parametrize("seed", SEEDS)
def test_cancellation_pair_is_dropped_without_adversary(seed, planted_models):
    e = explainer.explain("planted-cancel", seed=seed, adversary="none", progress=False)
    truth = load_truth(resolve_model("planted-cancel"))
    without_pair = {s: [u for u in units if not (s == "unembed.in" and u in PAIR)] for s, units in truth.items()}
    assert _nonempty(e.kept) == without_pair
    assert e.faithfulness["kl_mean"] <= 0.01  # dropping both looks faithful ...
    scrubber, task = _setup("planted-cancel", planted_models)
    for unit in PAIR:  # ... but re-including either one is not
        one = {**e.kept, "unembed.in": sorted(e.kept["unembed.in"] + [unit])}
        assert evaluate_keep(scrubber, task.heldout_data(), _keep(scrubber, one))["kl_mean"] > 0.5


def test_target_size_and_fixed_lambda():
    truth = _nonempty(load_truth(resolve_model("planted-distractor")))
    sized = explainer.explain("planted-distractor", target_size=2, adversary="none", progress=False)
    assert sized.size == 2 and _nonempty(sized.kept) == truth
    fixed = explainer.explain("planted-distractor", lam=0.05, adversary="none", progress=False)
    assert _nonempty(fixed.kept) == truth
    assert fixed.history["lambda"][0] == fixed.history["lambda"][-1] == pytest.approx(0.05)


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_other_ablations_train(ablation):
    e = explainer.explain("planted-joint", ablation=ablation, adversary="none", progress=False)
    assert e.config["ablation"] == ablation
    assert e.faithfulness["kl_mean"] <= 0.01


def test_same_seed_same_gates_bit_for_bit():
    a = explainer.explain("planted-joint", seed=3, steps=300, progress=False)
    b = explainer.explain("planted-joint", seed=3, steps=300, progress=False)
    for site in a.gate_logits:
        np.testing.assert_array_equal(a.gate_logits[site], b.gate_logits[site])
    c = explainer.explain("planted-joint", seed=4, steps=300, progress=False)
    assert any(not np.array_equal(a.gate_logits[s], c.gate_logits[s]) for s in a.gate_logits)


def test_site_subset(planted_models):
    e = explainer.explain("planted-joint", sites=["unembed.in"], steps=300, progress=False)
    assert list(e.n_units) == ["unembed.in"] and e.kept["unembed.in"] == [3]
    assert jnp.isfinite(e.faithfulness["kl_mean"])


def test_gates_start_by_their_units_integrated_gradients_rank():
    """``init_from`` names a ranking: the best-ranked unit starts open, the units tied with the
    lowest score at ``init_logit``, the rest in rank order between; on a planted model the truth's
    units rank first. From a closed start (``init_from="logit"``) no gates are given."""
    from explainer.score import IG_STEPS, attribution, fit_scorer
    from explainer.train.step import OPEN_LOGIT, start_gates

    folder = resolve_model("planted-distractor")
    data = resolve_task(None, folder).train_data()
    scrubber = Scrubber.build(explainer.load_model(folder), data)
    assert start_gates(scrubber, data, TrainConfig()) is None
    config = TrainConfig.of(init_from="integrated_gradients")
    gates = start_gates(scrubber, data, config)
    logits = np.concatenate([np.asarray(gates.logits[s]) for s in scrubber.sites])
    scores = attribution(fit_scorer(scrubber, data, jax.random.key(0)), IG_STEPS)
    assert logits.max() == pytest.approx(OPEN_LOGIT) and logits.min() == pytest.approx(-1.0)
    order = np.argsort(scores, kind="stable")
    assert np.all(np.diff(logits[order]) >= 0)  # monotone in the score
    truth = load_truth(folder)
    in_truth = np.concatenate([np.isin(np.arange(scrubber.n_units[s]), truth.get(s, [])) for s in scrubber.sites])
    assert logits[in_truth].min() > logits[~in_truth].max()


def test_a_ladder_starts_from_the_ranked_gates_too(monkeypatch):
    """A ladder of sizes whose gates start by their integrated-gradients rank finds the planted
    units at each rung, as from the default start."""
    import explainer.frontier.ladder as ladder_module
    from explainer.frontier.ladder import train_ladder

    folder = resolve_model("planted-distractor")
    data = resolve_task(None, folder).train_data()
    scrubber = Scrubber.build(explainer.load_model(folder), data)
    config = TrainConfig.of(steps=300, init_from="integrated_gradients")
    started = []
    real = ladder_module.start_gates
    monkeypatch.setattr(ladder_module, "start_gates", lambda *a: started.append(real(*a)) or started[-1])
    rungs = train_ladder(scrubber, data, config, "sizes", [1, 2], direction="up")
    assert len(started) == 1 and started[0] is not None  # the ladder started from the ranked gates
    truth = load_truth(folder)
    assert [r.size for r in rungs] == [1, 2]
    assert {s: v.nonzero()[0].tolist() for s, v in rungs[1].keep.items() if v.any()} == truth
