"""Baselines on planted models with known truth: valid sets, sensible rankings, the true optimum."""

import jax
import numpy as np
import pytest

from explainer.baselines import METHODS, RANKINGS, acdc, baseline_frontier, baseline_masks, exhaustive, rank
from explainer.errors import ExplainerError
from explainer.models import load_model
from explainer.scrub import Scrubber
from explainer.tasks import resolve_task
from explainer.zoo import load_truth, resolve_model


def _setup(name):
    folder = resolve_model(name)
    task = resolve_task(None, folder)
    return Scrubber.build(load_model(folder), task.train_data()), task, load_truth(folder)


@pytest.fixture(scope="module")
def distractor():
    return _setup("planted-distractor")


def _kept(mask):
    return {s: np.flatnonzero(v).tolist() for s, v in mask.items() if v.any()}


def _size(mask):
    return int(sum(v.sum() for v in mask.values()))


@pytest.mark.parametrize("method", METHODS)
def test_every_baseline_returns_valid_sets(distractor, method):
    scrubber, task, _ = distractor
    sizes = [0, 1, 2, 3]
    masks = baseline_masks(method, scrubber, task.train_data(), sizes, jax.random.key(0))
    assert len(masks) == len(sizes)
    for k, mask in zip(sizes, masks, strict=True):
        assert mask is not None
        assert set(mask) == set(scrubber.sites)
        for site, v in mask.items():
            assert v.shape == (scrubber.n_units[site],) and np.isin(v, (0, 1)).all()
        if method in RANKINGS or method == "exhaustive":
            assert _size(mask) == k
        else:
            assert _size(mask) <= k


@pytest.mark.parametrize("method", ["attribution", "integrated_gradients"])
def test_attribution_ranks_the_true_units_first(distractor, method):
    scrubber, task, truth = distractor
    scores = rank(method, scrubber, task.train_data(), jax.random.key(0))
    flat = np.concatenate([scores[s] for s in scrubber.sites])
    offsets = dict(zip(scrubber.sites, np.cumsum([0] + [scrubber.n_units[s] for s in scrubber.sites]), strict=False))
    true_units = {int(offsets[s]) + u for s, units in truth.items() for u in units}
    assert set(np.argsort(-flat)[: len(true_units)].tolist()) == true_units


def test_gradients_at_many_points_run_in_chunks(distractor):
    """Integrated gradients' points in chunks of the scorer's size: what one call over all of them gives."""
    from explainer.score import Reference, Scorer, mean_logit_diff

    scrubber, task, _ = distractor
    ref = Reference.of(scrubber, task.train_data(), jax.random.key(0))
    points = np.random.default_rng(0).uniform(size=(5, sum(scrubber.n_units.values())))
    whole = Scorer(scrubber, ref, chunk=8).gradients(points, mean_logit_diff)
    chunked = Scorer(scrubber, ref, chunk=2).gradients(points, mean_logit_diff)
    assert chunked.shape == whole.shape == points.shape and np.abs(whole).max() > 1e-3
    np.testing.assert_allclose(chunked, whole, atol=1e-6, rtol=0)


def test_rankings_are_seeded_and_searches_are_not_rankings(distractor):
    scrubber, task, _ = distractor
    a = rank("random", scrubber, task.train_data(), jax.random.key(1))
    b = rank("random", scrubber, task.train_data(), jax.random.key(1))
    assert all(np.array_equal(a[s], b[s]) for s in scrubber.sites)
    with pytest.raises(ExplainerError, match="search"):
        rank("acdc", scrubber, task.train_data(), jax.random.key(0))
    with pytest.raises(ExplainerError, match="unknown baseline"):
        rank("randm", scrubber, task.train_data(), jax.random.key(0))


@pytest.mark.parametrize("name", ["planted-distractor", "planted-joint"])
def test_exhaustive_and_acdc_find_the_truth_at_its_size(name):
    scrubber, task, truth = _setup(name)
    k = sum(len(u) for u in truth.values())
    [best] = exhaustive(scrubber, task.train_data(), [k], jax.random.key(0))
    assert _kept(best) == {s: u for s, u in truth.items() if u}
    found = [_kept(m) for m in acdc(scrubber, task.train_data(), jax.random.key(0), thresholds=[1e-3])]
    assert found == [{s: u for s, u in truth.items() if u}]


def test_exhaustive_leaves_out_sizes_over_its_limit(distractor):
    scrubber, task, _ = distractor
    small, big, too_many = exhaustive(scrubber, task.train_data(), [1, 10, 21], jax.random.key(0), max_sets=100)
    assert small is not None and _size(small) == 1
    assert big is None and too_many is None  # C(20, 10) > 100 sets; 21 > 20 units


def test_baseline_frontier_has_the_sweep_keys():
    f = baseline_frontier("attribution", "planted-distractor", sizes=[1, 2, 40], budget=1, ablations=["mean"])
    assert [r["size"] for r in f["records"]] == [1, 2, 20]  # sizes past the unit count are the full model
    for r in f["records"]:
        assert {"run", "size", "kl_mean", "kl_p99", "logit_diff_recovered", "accuracy", "gap"} <= set(r)
        assert r["run"] is None
    # MIB's areas: f = 0 up to 5 % of the units (the 1-unit set), 1 from 10 % (2 units) on
    assert f["cpr"] == pytest.approx(0.925) and f["cmd"] == pytest.approx(0.074)
    assert f["cpr_sizes"] == pytest.approx(0.925) and f["cmd_sizes"] == pytest.approx(0.025)
    assert set(f["ablations"]) == {"mean"}
