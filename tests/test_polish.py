"""Repair and the open restart: the safeguards that follow training in KL-budget mode."""

import jax
import numpy as np
import pytest

import explainer
from explainer.finish.oracle import SHORTLIST, KLOracle, shortlist, within
from explainer.finish.search import nearest_drop, prune, repair, trim
from explainer.metrics import truth_scores
from explainer.models import load_model
from explainer.scrub import Scrubber
from explainer.tasks import resolve_task
from explainer.train.config import TrainConfig
from explainer.zoo import load_truth, resolve_model

KL_BUDGET = TrainConfig().penalty.kl_budget


@pytest.fixture(scope="module")
def sort_oracle():
    folder = resolve_model("tracr-sort")
    task = resolve_task(None, folder)
    oracle = KLOracle(Scrubber.build(load_model(folder), task.train_data()), task.train_data())
    truth = load_truth(folder)
    keep = {site: np.isin(np.arange(n), truth.get(site, [])) for site, n in oracle.layout}
    return oracle, oracle.flat(keep)


def with_spares(truth: np.ndarray, n: int = 32, seed: int = 0) -> np.ndarray:
    """The truth plus ``n`` spare units (seeded): a start for trim with many units to drop, at a
    fraction of the rounds of starting from every unit."""
    spare = np.flatnonzero(truth == 0)
    start = truth.copy()
    start[np.random.default_rng(seed).choice(spare, min(n, spare.size), replace=False)] = 1.0
    return start


@pytest.mark.parametrize("holes", [1, 2])
def test_repair_adds_back_exactly_the_missing_units(sort_oracle, holes):
    oracle, truth = sort_oracle
    kept = np.flatnonzero(truth)
    rng = np.random.default_rng(holes)
    missing = rng.choice(kept, holes, replace=False)
    holed = truth.copy()
    holed[missing] = 0.0
    assert oracle.kl(holed)[0] > KL_BUDGET
    repaired, added = repair(oracle, holed, KL_BUDGET)
    assert sorted(added) == sorted(int(u) for u in missing)
    assert np.array_equal(repaired, truth)
    assert oracle.kl(repaired)[0] <= KL_BUDGET


def test_screen_is_the_oracle_on_its_first_prompts(sort_oracle):
    oracle, truth = sort_oracle
    folder = resolve_model("tracr-sort")
    task = resolve_task(None, folder)
    small = KLOracle(oracle.scrubber, task.train_data(), max_prompts=32, screen_prompts=0)
    assert oracle.screen is not None and small.screen is None
    rows = np.stack([truth, np.zeros_like(truth), np.roll(truth, 3)])
    np.testing.assert_allclose(oracle.screen.kl(rows), small.kl(rows), rtol=1e-5, atol=1e-6)
    assert not np.allclose(oracle.kl(rows), small.kl(rows))  # a different, larger set of prompts


def test_an_oracle_scores_the_same_in_threads(sort_oracle):
    """Chunks of masks scored in two threads get exactly the scores of one thread, in order, and
    rows already scored come from memory."""
    oracle, truth = sort_oracle
    rows = (np.random.default_rng(0).random((5 * oracle.chunk + 3, oracle.n_units)) < 0.5).astype(np.float32)
    rows[0] = truth
    fresh = {}
    for workers in (1, 2):
        fresh[workers] = KLOracle(oracle.scrubber, _sort_data(), 0)
        fresh[workers].workers = workers
    one, two = fresh[1]._scores(rows), fresh[2]._scores(rows)
    assert np.array_equal(one, two) and one[0, 0] <= 1e-6 < one[1:, 0].min()
    assert np.array_equal(fresh[2].kl(rows[::-1]), two[::-1, 0])


def _sort_data():
    return resolve_task(None, resolve_model("tracr-sort")).train_data()


def test_shortlist_scores_the_most_promising_rows_exactly(sort_oracle):
    oracle, truth = sort_oracle
    missing = int(np.flatnonzero(truth)[0])
    holed = truth.copy()
    holed[missing] = 0.0
    excluded = np.flatnonzero(holed < 0.5)
    rows = np.repeat(holed[None], len(excluded), axis=0)
    rows[np.arange(len(excluded)), excluded] = 1.0
    assert len(rows) > SHORTLIST
    kls = shortlist(oracle, rows)
    finite = np.flatnonzero(np.isfinite(kls))
    assert len(finite) == SHORTLIST
    np.testing.assert_array_equal(kls[finite], oracle.kl(rows[finite]))
    assert excluded[int(np.argmin(kls))] == missing  # the unit that repairs it is on the list
    np.testing.assert_array_equal(shortlist(oracle, rows[:5]), oracle.kl(rows[:5]))  # few rows: all exact


def test_prune_drops_more_free_units_than_one_shortlist(sort_oracle):
    oracle, truth = sort_oracle
    rng = np.random.default_rng(0)
    spare = rng.choice(np.flatnonzero(truth < 0.5), SHORTLIST + 10, replace=False)
    padded = truth.copy()
    padded[spare] = 1.0
    assert oracle.kl(padded)[0] <= KL_BUDGET
    np.testing.assert_array_equal(prune(oracle, padded), truth)


class CreepingOracle(KLOracle):
    """Ten units, each of whose removals raises the KL by 0.9e-6 (within float noise alone, not
    together), scored exactly."""

    def __init__(self):
        self.n_units, self.mask_flops, self.screen = 10, 0.0, None

    def kl(self, rows):
        return 0.05 + 0.9e-6 * (self.n_units - (np.atleast_2d(rows) > 0.5).sum(axis=1))


def test_prune_never_raises_the_kl_past_float_noise_in_steps():
    """Each removal is within float noise of the KL before it, but "costs nothing" is measured from
    the lowest KL reached: one unit goes, not all ten (which would raise the KL by 9e-6)."""
    oracle, everything = CreepingOracle(), np.ones(10, np.float32)
    pruned = prune(oracle, everything)
    assert int(pruned.sum()) == 9
    assert oracle.kl(pruned)[0] <= oracle.kl(everything)[0] + 1e-6


def test_repair_leaves_a_faithful_explanation_alone(sort_oracle):
    oracle, truth = sort_oracle
    repaired, added = repair(oracle, truth, KL_BUDGET)
    assert added == [] and np.array_equal(repaired, truth)


def test_repair_stops_when_no_single_unit_helps(sort_oracle):
    oracle, truth = sort_oracle
    empty = np.zeros_like(truth)
    before = oracle.kl(empty)[0]
    repaired, added = repair(oracle, empty, KL_BUDGET, max_added=3)
    assert len(added) <= 3
    assert oracle.kl(repaired)[0] <= before


def test_sort_is_recovered_exactly_with_the_safeguards_and_not_without():
    """From mostly closed gates the SelectorWidth path of sort never opens (no gradient); the open
    restart finds it, and repair adds back the one unit whose gate closed for good."""
    truth = load_truth(resolve_model("tracr-sort"))
    e = explainer.explain("tracr-sort", progress=False)
    assert truth_scores(e.kept, truth)["f1"] == 1.0
    assert e.faithfulness["kl_mean"] <= KL_BUDGET
    assert e.history["open_restart"] == [1.0] and e.history["kl_finished"][0] <= KL_BUDGET
    bare = explainer.explain("tracr-sort", progress=False, repair=False, open_restart=False)
    assert truth_scores(bare.kept, truth)["f1"] < 1.0
    assert "open_restart" not in bare.history


def test_safeguards_do_not_touch_other_penalty_modes():
    e = explainer.explain("planted-distractor", target_size=2, adversary="none", steps=300, progress=False)
    assert "repaired" not in e.history


def test_trim_makes_the_explanation_minimal_for_its_budget(sort_oracle):
    """From the truth plus spare units, trim drops units only while the KL stays within the budget,
    and what is left loses the budget if any single unit goes."""
    oracle, truth = sort_oracle
    start = with_spares(truth)
    trimmed, dropped = trim(oracle, start, KL_BUDGET)
    assert len(dropped) == int(start.sum() - trimmed.sum()) > 0
    assert oracle.kl(trimmed)[0] <= KL_BUDGET
    kept = np.flatnonzero(trimmed)
    singles = np.repeat(trimmed[None], kept.size, axis=0)
    singles[np.arange(kept.size), kept] = 0.0
    assert (oracle.kl(singles) > KL_BUDGET).all()
    assert trimmed.sum() <= truth.sum()  # no larger than the compiled ground truth


def test_trim_keeps_the_logit_difference_floor(sort_oracle):
    """With ``ld_floor``, a unit goes only if the KL stays within budget *and* the logit difference
    recovered stays at least the floor; what is left can lose no single unit on those terms."""
    oracle, truth = sort_oracle
    everything = np.ones_like(truth)
    assert oracle.logit_diff_recovered(everything)[0] == pytest.approx(1.0)
    kept_all, dropped = trim(oracle, everything, KL_BUDGET, ld_floor=1.5)  # no explanation beats the model by half
    assert dropped == [] and np.array_equal(kept_all, everything)
    floor = 0.999
    trimmed, dropped = trim(oracle, with_spares(truth), KL_BUDGET, ld_floor=floor)
    assert dropped and oracle.kl(trimmed)[0] <= KL_BUDGET and oracle.logit_diff_recovered(trimmed)[0] >= floor
    kept = np.flatnonzero(trimmed)
    singles = np.repeat(trimmed[None], kept.size, axis=0)
    singles[np.arange(kept.size), kept] = 0.0
    assert ((oracle.kl(singles) > KL_BUDGET) | (oracle.logit_diff_recovered(singles) < floor)).all()


def test_trim_with_a_check_holds_on_both_oracles(sort_oracle):
    """With ``check``, a unit goes only if the explanation also stays within the budget on the
    check's oracle (here the same prompts under zero ablation, which the truth alone does not
    satisfy): what is left holds on both, and no single unit can go on both terms. Both oracles
    score the first 64 prompts: trim from every unit takes a round per unit dropped."""
    _, truth = sort_oracle
    folder = resolve_model("tracr-sort")
    data = resolve_task(None, folder).train_data()
    oracle = KLOracle(Scrubber.build(load_model(folder), data), data, max_prompts=64)
    check = KLOracle(Scrubber.build(load_model(folder), data, ablation="zero"), data, max_prompts=64)
    unchecked, _ = trim(oracle, with_spares(truth, 64), KL_BUDGET)
    assert not within(check, unchecked, KL_BUDGET)  # the resample-only trim fails the check
    everything = np.ones_like(truth)  # within both budgets (the truth alone is not, on the check)
    trimmed, dropped = trim(oracle, everything, KL_BUDGET, check=check)
    assert dropped and within(oracle, trimmed, KL_BUDGET) and within(check, trimmed, KL_BUDGET)
    for unit in np.flatnonzero(trimmed):
        less = trimmed.copy()
        less[unit] = 0.0
        assert not (within(oracle, less, KL_BUDGET) and within(check, less, KL_BUDGET))


def test_within_refuses_a_kl_that_is_not_finite():
    """A refit rotation gone to NaN gives a NaN KL: never within the budget, with or without a floor."""

    class NaNOracle(KLOracle):
        def __init__(self):  # no prompts: every mask scores NaN
            pass

        def kl(self, masks):
            return np.array([np.nan])

        def logit_diff_recovered(self, masks):
            return np.array([1.0])

    assert not within(NaNOracle(), np.ones(3), KL_BUDGET)
    assert not within(NaNOracle(), np.ones(3), KL_BUDGET, 0.9)


def test_nearest_drop_prefers_the_removal_that_keeps_the_most(sort_oracle):
    """Among removals within the budget the one with the highest logit difference recovered;
    without a floor, or when none is within the budget, the one with the lowest KL."""
    oracle, truth = sort_oracle
    kept = np.flatnonzero(truth)
    rows = np.repeat(truth[None], kept.size, axis=0)
    rows[np.arange(kept.size), kept] = 0.0
    kls, lds = oracle.kl(rows), oracle.logit_diff_recovered(rows)
    assert (kls > KL_BUDGET).all()  # the truth is minimal: every removal leaves the budget
    assert np.array_equal(nearest_drop(oracle, truth, KL_BUDGET, 0.9), rows[np.argmin(kls)])
    everything = np.ones_like(truth)
    rows = np.repeat(everything[None], everything.size, axis=0)
    rows[np.arange(everything.size), np.arange(everything.size)] = 0.0
    kls, lds = oracle.kl(rows), oracle.logit_diff_recovered(rows)
    inside = np.flatnonzero(kls <= KL_BUDGET)
    assert inside.size
    best = nearest_drop(oracle, everything, KL_BUDGET, 0.9)
    assert oracle.logit_diff_recovered(best)[0] == lds[inside].max() and within(oracle, best, KL_BUDGET)
    assert oracle.kl(nearest_drop(oracle, everything, KL_BUDGET))[0] == kls.min()
    assert nearest_drop(oracle, np.zeros_like(truth), KL_BUDGET) is None


def test_trim_ld_floor_setting_is_checked():
    assert TrainConfig.of(trim_ld_floor=None).finishing.trim_ld_floor is None
    with pytest.raises(explainer.ExplainerError, match="trim_ld_floor"):
        TrainConfig.of(trim_ld_floor=float("nan"))
    assert TrainConfig.of(trim_refit_steps=0).finishing.trim_refit_steps == 0
    for bad in (-1, True):
        with pytest.raises(explainer.ExplainerError, match="trim_refit_steps"):
            TrainConfig.of(trim_refit_steps=bad)


def test_trim_setting_in_training():
    """``trim=True`` after two steps from open gates (nearly every unit kept): smaller, within budget, recorded."""
    kw = dict(adversary="none", steps=2, init_logit=3.0, progress=False, open_restart=False)
    plain = explainer.explain("planted-joint", **kw)
    trimmed = explainer.explain("planted-joint", trim=True, **kw)
    assert trimmed.history["trimmed"][0] == plain.size - trimmed.size > 0
    assert trimmed.history["kl_finished"][0] <= KL_BUDGET
    assert truth_scores(trimmed.kept, load_truth(resolve_model("planted-joint")))["f1"] == 1.0


def test_the_open_restart_trains_with_the_first_trainings_compiled_step(monkeypatch):
    """The open restart differs from the first training only in where the gates start, which the
    step never reads: it reuses that training's program (one trace in all), its training steps are
    timed apart, and a program made for other settings is refused."""
    from explainer.errors import ExplainerError
    from explainer.finish.passes import Candidate, Context, open_restart
    from explainer.progress import Timings
    from explainer.train import step
    from explainer.train.step import train_gates, train_program

    made, make_step = [], step.make_step
    monkeypatch.setattr(step, "make_step", lambda *a, **k: made.append(a[2]) or make_step(*a, **k))
    folder = resolve_model("planted-distractor")
    data = resolve_task(None, folder).train_data()
    scrubber, config = Scrubber.build(load_model(folder), data), TrainConfig.of(steps=20)
    program = train_program(scrubber, data, config)
    candidate = Candidate.of(train_gates(scrubber, data, config, progress=False, program=program), config)
    timings = Timings()
    context = Context(scrubber, data, config, None, False, None, program, timings)
    open_restart(candidate, context)  # the candidate's KL is unmeasured (inf), so the restart runs
    assert len(made) == 1 and program.counter["traces"] == 1
    assert timings["open_restart_train"] > 0
    with pytest.raises(ExplainerError, match="made for other training settings"):
        train_gates(scrubber, data, config.replace(lr=0.5), progress=False, program=program)
    compiled = []

    def listen(event: str, seconds: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:  # the step itself, jitted with its fault flags, compiles no more
        train_gates(scrubber, data, config.replace(init_logit=3.0), progress=False, program=program)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert len(made) == 1 and program.counter["traces"] == 1 and not compiled
