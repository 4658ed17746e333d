"""Frontier metrics on hand-made curves, batched measurement, and the optimal ablation."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from explainer.api import evaluate_keep
from explainer.errors import ExplainerError
from explainer.frontier import (
    add_normalized,
    empty_mask,
    frontier_areas,
    full_mask,
    loss_recovered,
    mib_areas,
    mib_kl_area,
    mib_ladder,
    normalized_faithfulness,
)
from explainer.masks import as_mask
from explainer.metrics import faithfulness
from explainer.optimal import fit_constants, fit_optimal, for_mask
from explainer.score import measure
from explainer.scrub import ABLATIONS, Scrubber
from explainer.tasks import resolve_task
from explainer.zoo import resolve_model


def test_mib_ladder():
    assert mib_ladder(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert mib_ladder(30) == [0, 1, 3, 6, 15, 30]


@pytest.mark.parametrize(
    ("sizes", "f", "total", "cpr", "cmd"),
    [
        ([0, 10], [1.0, 1.0], 10, 1.0, 0.0),  # faithful everywhere
        ([0, 10], [0.0, 1.0], 10, 0.5, 0.5),  # a straight line from nothing to the full model
        ([0, 5, 10], [0.0, 1.0, 1.0], 10, 0.75, 0.25),  # faithful from half the units on
        ([5], [0.0], 10, 0.25, 0.25),  # (1, 1) is appended: one triangle from x = 0.5
        ([0, 5, 10], [0.0, 1.5, 1.0], 10, 1.0, 0.5),  # overshoot counts in CMD, not against CPR
        ([2, 2, 10], [0.2, 0.6, 1.0], 10, 0.64, 0.16),  # equal sizes keep the best f
    ],
)
def test_frontier_areas_on_known_curves(sizes, f, total, cpr, cmd):
    got = frontier_areas(sizes, f, total)
    assert got == pytest.approx((cpr, cmd))


@pytest.mark.parametrize(
    ("budgets", "f", "total", "cpr", "cmd"),
    [
        ([1], [1.0], 1000, 0.999, 0.0),  # faithful from 0.1 % on
        ([1000], [1.0], 1000, 0.25, 0.749),  # the full model counts at 100 % only
        ([0], [0.0], 1000, 0.25, 0.749),  # nothing, then the full model at 100 % (appended)
        ([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], [1.0] * 10, 1000, 0.999, 0.0),
        ([10], [1.0], 1000, 0.0025 + 0.99, 0.004 + 0.0025),  # faithful from 1 % on; nothing below
        # equal budgets keep the best f (0.6 from 0.2 % on; the full model at 100 %)
        ([2, 2], [0.2, 0.6], 1000, 0.0003 + 0.498 * 0.6 + 0.4, 0.0007 + 0.498 * 0.4 + 0.1),
    ],
)
def test_mib_areas_are_trapezoids_over_the_percentages(budgets, f, total, cpr, cmd):
    assert mib_areas(budgets, f, total) == pytest.approx((cpr, cmd))


@pytest.mark.parametrize(
    ("budgets", "kl", "area"),
    [
        ([10], [0.0], 0.003 + 0.009 + 0.0075),  # the empty set's 3 nats below 1 %, faithful from 1 %
        ([10, 10], [1.0, 0.0], 0.003 + 0.009 + 0.0075),  # equal budgets keep the lowest KL
        ([0], [3.0], 3.0 * 0.499 + 1.5 * 0.5),  # nothing, then the full model (KL 0) at 100 %
        ([0, 1000], [3.0, 0.5], 3.0 * 0.499 + 1.75 * 0.5),  # a budget of every unit is read as given
        ([10, 20], [math.nan, 0.0], 3.0 * 0.019 - 1.5 * 0.01),  # a NaN offers nothing: empty below 2 %
    ],
)
def test_mib_kl_area_is_the_same_reading_of_the_kl(budgets, kl, area):
    assert mib_kl_area(budgets, kl, 1000, empty_kl=3.0) == pytest.approx(area)
    assert math.isnan(mib_kl_area([1], [math.nan], 1000, empty_kl=3.0))


def test_mib_areas_credit_no_size_a_method_does_not_offer():
    """The straight line between two points of a frontier is not an explanation: on planted-joint's
    30 units, a method offering only 0 and 4 units must not beat one that also offers 3 units."""
    sparse = mib_areas([0, 1, 3, 6], [0.0, 0.0, 0.0, 1.0], 30)  # nothing up to 3 units, the truth at 6
    dense = mib_areas([0, 1, 3, 6], [0.0, 0.0, 0.57, 1.0], 30)
    assert dense[0] > sparse[0] and dense[1] < sparse[1]
    assert frontier_areas([0, 4], [0.0, 1.0], 30)[0] > frontier_areas([0, 3, 4], [0.0, 0.57, 1.0], 30)[0]


def test_frontier_areas_ignore_nan_and_need_units():
    assert frontier_areas([0, 5, 10], [0.0, math.nan, 1.0], 10) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError):
        frontier_areas([1], [1.0], 0)


def test_normalisations():
    assert normalized_faithfulness(1.0, 1.0, 3.0) == 0.0
    assert normalized_faithfulness(3.0, 1.0, 3.0) == 1.0
    assert math.isnan(normalized_faithfulness(1.0, 2.0, 2.0))
    assert loss_recovered(0.5, 2.0, 0.5) == 1.0
    assert loss_recovered(2.0, 2.0, 0.5) == 0.0


@pytest.fixture(scope="module")
def distractor():
    folder = resolve_model("planted-distractor")
    task = resolve_task(None, folder)
    from explainer.models import load_model

    return load_model(folder), task


def _truth(scrubber):
    keep = empty_mask(scrubber.n_units)
    keep["blocks.0.attn.in"][0] = keep["unembed.in"][1] = 1
    return keep


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_measure_agrees_with_scoring_one_mask_directly(distractor, ablation):
    model, task = distractor
    scrubber = Scrubber.build(model, task.train_data(), ablation=ablation)
    masks = [empty_mask(scrubber.n_units), _truth(scrubber), full_mask(scrubber.n_units)]
    batched = measure(scrubber, task.heldout_data(), masks, seed=3)
    heldout = task.heldout_data()
    full, replacement = scrubber.reference(heldout, jax.random.fold_in(jax.random.key(3), 0))
    for mask, got in zip(masks, batched, strict=True):
        logits = scrubber.logits(heldout.clean, as_mask(mask), replacement)  # one mask, directly
        want = faithfulness(full, logits, heldout.answers, heldout.wrong_answers)
        assert evaluate_keep(scrubber, heldout, as_mask(mask), 3) == {k: got[k] for k in want}
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-4), key
    scored = add_normalized(batched, batched[0])
    assert scored[0]["normalized_faithfulness"] == 0.0 and scored[0]["loss_recovered"] == 0.0
    assert scored[2]["normalized_faithfulness"] == pytest.approx(1.0)
    assert scored[2]["loss_recovered"] == pytest.approx(1.0)


def test_optimal_is_an_ablation_and_starts_at_the_mean(distractor):
    model, task = distractor
    assert "optimal" in ABLATIONS
    mean = Scrubber.build(model, task.train_data(), ablation="mean")
    optimal = Scrubber.build(model, task.train_data(), ablation="optimal")
    for site in mean.sites:
        np.testing.assert_array_equal(mean.means[site], optimal.means[site])


def test_optimal_constants_fit_from_a_bad_start_and_keep_kept_units(distractor):
    model, task = distractor
    train = task.train_data()
    scrubber = Scrubber.build(model, train, ablation="optimal")
    zeros = eqx.tree_at(lambda s: s.means, scrubber, {s: jnp.zeros_like(m) for s, m in scrubber.means.items()})
    keep = empty_mask(scrubber.n_units)
    keep["blocks.0.attn.in"][0] = 1
    [constants] = fit_constants(zeros, train, [keep], steps=300)
    start, mean, fitted = measure(scrubber, train, [keep] * 3, constants=[zeros.means, scrubber.means, constants])
    assert fitted["kl_mean"] < start["kl_mean"] - 0.005  # from zeros, the fit reaches the mean's level or better
    assert fitted["kl_mean"] <= mean["kl_mean"] + 0.01
    np.testing.assert_array_equal(constants["blocks.0.attn.in"][:, 0], 0.0)  # a kept unit gets no gradient
    refit = fit_optimal(zeros, train, keep, steps=300)
    np.testing.assert_allclose(refit.means["unembed.in"], constants["unembed.in"], rtol=1e-5, atol=1e-6)
    resample = Scrubber.build(model, train)
    assert for_mask(resample, train, keep) is resample


def test_optimal_constants_never_end_worse_than_the_means():
    """On tracr-frac-prevs the mean ablation of this 3-unit explanation is exact (KL 0); Adam's first
    steps from the means used to leave the constants at KL 10 nats. The fit keeps the best it saw."""
    folder = resolve_model("tracr-frac-prevs")
    from explainer.models import load_model

    model, task = load_model(folder), resolve_task(None, folder)
    train, heldout = task.train_data(), task.heldout_data()
    scrubber = Scrubber.build(model, train, ablation="optimal")
    keep = empty_mask(scrubber.n_units)
    keep["blocks.0.mlp.in"][9] = keep["blocks.1.attn.in"][6] = keep["unembed.in"][0] = 1
    [constants] = fit_constants(scrubber, train, [keep])
    mean_fit, fitted_fit = measure(scrubber, train, [keep] * 2, constants=[scrubber.means, constants])
    assert fitted_fit["kl_mean"] <= mean_fit["kl_mean"] + 1e-6
    mean_out, fitted_out = measure(scrubber, heldout, [keep] * 2, constants=[scrubber.means, constants])
    assert mean_out["kl_mean"] < 1e-4 and fitted_out["kl_mean"] < 1e-3


def test_a_better_start_is_taken_and_a_worse_one_is_not(distractor):
    """``starts`` (constants learned with a mask) are a second starting point: the fit begins from
    whichever of them and the scrubber's constants scores better, so it is never worse than either."""
    model, task = distractor
    train = task.train_data()
    scrubber = Scrubber.build(model, train, ablation="optimal")
    zeros = eqx.tree_at(lambda s: s.means, scrubber, {s: jnp.zeros_like(m) for s, m in scrubber.means.items()})
    keep = empty_mask(scrubber.n_units)
    keep["blocks.0.attn.in"][0] = 1
    bad = {s: m + 5.0 for s, m in zeros.means.items()}
    from_good, from_bad = fit_constants(zeros, train, [keep, keep], steps=6, starts=[scrubber.means, bad])
    kls = measure(scrubber, train, [keep] * 4, constants=[zeros.means, scrubber.means, from_good, from_bad])
    zero_kl, mean_kl, from_good_kl, from_bad_kl = (k["kl_mean"] for k in kls)
    assert mean_kl < zero_kl - 1e-3  # the other start is the better one here
    assert from_good_kl <= mean_kl + 1e-6
    assert from_bad_kl <= zero_kl + 1e-6
    with pytest.raises(ExplainerError, match="starting constants"):
        fit_constants(scrubber, train, [keep], steps=6, starts=[scrubber.means, bad])


def test_training_under_optimal_learns_constants_with_the_gates(tmp_path):
    """Under ``ablation="optimal"`` the constants train with the gates, are saved with the run and
    start the evaluation's fit; the evaluation is never worse than the means on the fitting prompts."""
    import explainer
    from explainer.evaluation import run_scrubber

    e = explainer.explain("planted-distractor", ablation="optimal", steps=300, progress=False)
    model, task = e._bound
    means = Scrubber.build(model, task.train_data(), ablation="optimal").means
    assert e.constants is not None and set(e.constants) == set(means)
    assert any(not np.allclose(e.constants[s], means[s]) for s in means)  # they moved while training
    loaded = explainer.load(e.save(tmp_path / "run"))
    for site, values in e.constants.items():
        np.testing.assert_array_equal(loaded.constants[site], values)
    scrubber = run_scrubber(loaded, model, task.train_data())
    keep = loaded.mask()
    fitted, at_means = measure(scrubber, task.train_data(), [keep] * 2, constants=[scrubber.means, means])
    assert fitted["kl_mean"] <= at_means["kl_mean"] + 1e-6
    plain = explainer.explain("planted-distractor", steps=50, progress=False)
    assert plain.constants is None
