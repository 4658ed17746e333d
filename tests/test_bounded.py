"""The finishing passes and the attacks evaluate a number of masks that does not grow with the
number of units.

Repair, prune and trim on random one-layer models of 400 and of 4,000 units (two sites of width
``d_model``), counted by the oracle (:attr:`explainer.finish.search.KLOracle.evaluations`). Where
scoring every candidate is cheap (at most ``EXACT_UNITS`` units and ``EXACT_FLOPS``) every candidate
is scored (the small models keep their exact searches); elsewhere backward passes rank them and
the rounds are bounded, so the count has a ceiling set by the constants alone, the same for 400
units and for 4,000. The same holds for an attack with every method (``attack_all``), whose
exhaustive search runs only where scoring every set is cheap (``EXHAUSTIVE_FLOPS``).
"""

import json

import equinox as eqx
import jax
import numpy as np
import pytest

from explainer import edges
from explainer.finish.oracle import EXACT_FLOPS, EXACT_UNITS, RANK_BOUND, SCREEN_PROMPTS, SHORTLIST, KLOracle, exact
from explainer.finish.search import MAX_ROUNDS, _rounds, prune, repair, trim
from explainer.masks import Layout
from explainer.models import ModelConfig, init_random
from explainer.scrub import Scrubber
from explainer.tasks import resolve_task
from explainer.tasks.base import Batch
from explainer.zoo import resolve_model

# per round: the screen of at most RANK_BOUND candidates, the shortlist on every prompt, and at most
# log2(EXACT_UNITS) + 1 blocks or prefixes
PER_ROUND = RANK_BOUND + 2 * SHORTLIST + int(np.log2(EXACT_UNITS)) + 2
CEILING = MAX_ROUNDS * PER_ROUND + 2


def setup_of(d_model: int) -> tuple[Scrubber, Batch]:
    """A random one-layer model of ``2 * d_model`` units and 16 prompts of 5 tokens."""
    cfg = ModelConfig(n_layers=1, d_model=d_model, n_heads=2, d_head=8, d_vocab=13, n_ctx=6, attn_only=True)
    model = init_random(cfg, jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 3)
    clean, corrupt = (jax.random.randint(k, (16, 5), 0, 13) for k in keys[:2])
    answers = jax.random.randint(keys[2], (16, 1), 0, 13)
    batch = Batch(clean=clean, corrupt=corrupt, answers=answers, wrong_answers=(answers + 1) % 13)
    return Scrubber.build(model, batch), batch


def oracle_of(d_model: int) -> KLOracle:
    scrubber, batch = setup_of(d_model)
    return KLOracle(scrubber, batch, screen_prompts=8)


PASSES = {
    "repair": lambda oracle, half: repair(oracle, half, 1e-9, max_added=oracle.n_units),
    "prune": lambda oracle, half: prune(oracle, half),
    "trim": lambda oracle, half: trim(oracle, half, 0.05),
}


@pytest.fixture(scope="module")
def counts():
    """Masks each pass evaluates on both models, both in the bounded regime (``EXACT_UNITS`` set below
    400 for the count; the shipped models, all under the real ``EXACT_UNITS``, keep exact searches)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("explainer.finish.oracle.EXACT_UNITS", 100)
        yield _count()
    assert EXACT_UNITS >= 392  # the largest shipped model (paren) is searched exactly


def _count() -> dict[tuple[str, int], int]:
    out = {}
    for d_model in (200, 2000):
        oracle = oracle_of(d_model)
        half = (np.random.default_rng(0).random(oracle.n_units) < 0.5).astype(np.float32)
        for name, run in PASSES.items():
            before = oracle.evaluations
            run(oracle, half)
            out[name, oracle.n_units] = oracle.evaluations - before
    return out


@pytest.mark.parametrize("name", list(PASSES))
def test_a_pass_evaluates_a_bounded_number_of_masks(counts, name):
    small, large = counts[name, 400], counts[name, 4000]
    assert small <= CEILING and large <= CEILING, (small, large, CEILING)  # one ceiling for both sizes
    assert large < 4000 / 2  # well under one mask per unit: no round scores every unit


def test_a_round_scores_every_candidate_only_where_that_is_cheap(monkeypatch):
    """Exact searches are chosen by cost as well as by units: the same units on a model whose masks
    cost more to score than ``EXACT_FLOPS`` in all are searched in bounded rounds instead."""
    oracle = oracle_of(8)  # 16 units
    cost = oracle.n_units * oracle.mask_flops
    assert oracle.n_units <= EXACT_UNITS and cost <= EXACT_FLOPS and exact(oracle)
    assert _rounds(oracle) == oracle.n_units + 1  # exact: as many rounds as it needs
    monkeypatch.setattr("explainer.finish.oracle.EXACT_FLOPS", cost / 2)
    assert not exact(oracle)
    assert _rounds(oracle) == MAX_ROUNDS  # the searches take the bounded path


def test_the_cost_line_keeps_ground_truth_exact_and_not_a_wide_model_of_few_edges():
    """paren's dimensions, the costliest round of a ground-truth model, fit ``EXACT_FLOPS`` with room
    to spare; a 2-layer model of Qwen2.5-0.5B's width with its 382 edges does not."""
    folder = resolve_model("paren")
    paren = ModelConfig.from_json(json.loads((folder / "config.json").read_text()))
    seq = resolve_task(None, folder).train_data().clean.shape[1]
    paren_units = len(paren.sites) * paren.d_model
    assert paren_units * SCREEN_PROMPTS * paren.scored_flops(seq) < EXACT_FLOPS / 2
    qwen = ModelConfig(
        n_layers=2, d_model=896, n_heads=14, d_head=64, n_key_value_heads=2, d_mlp=4864, d_vocab=151936,
        n_ctx=32768, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
    )  # fmt: skip
    units = sum(edges.edge_units(qwen, edges.edge_sites(qwen)).values())
    assert units == 382 and units <= EXACT_UNITS
    assert units * SCREEN_PROMPTS * qwen.scored_flops(16) > EXACT_FLOPS


def _attack_counts(scrubber: Scrubber, batch: Batch) -> dict[str, int]:
    """Sets each method of an attack with every method scored, at budget 1 against half the units."""
    from adversary.discrete import attack_all

    n = sum(scrubber.n_units.values())
    half = (np.random.default_rng(0).random(n) < 0.5).astype(np.float32)
    keep = Layout.of(scrubber.n_units).split(half)
    _, every = attack_all(scrubber, batch, keep, 1, jax.random.key(0))
    return {r.method: r.evaluations for r in every}


def test_an_attack_with_every_method_scores_a_bounded_number_of_sets(monkeypatch):
    """``attack_all`` scores every excluded unit (``exhaustive``) only where that is cheap
    (``EXHAUSTIVE_FLOPS``, here placed between the two models as the real one lies between the
    ground-truth models and real ones); its other methods score a number of sets set by their
    settings alone. So one ceiling holds for the attack on 400 units and on 4,000."""
    from adversary import discrete

    setups = {2 * d_model: setup_of(d_model) for d_model in (200, 2000)}
    cost = {n: n / 2 * s.model.config.scored_flops(5) * len(b.clean) for n, (s, b) in setups.items()}
    monkeypatch.setattr(discrete, "EXHAUSTIVE_FLOPS", 1.5 * cost[400])
    assert cost[4000] > 1.5 * cost[400]
    counts = {n: _attack_counts(*setup) for n, setup in setups.items()}
    assert "exhaustive" in counts[400] and "exhaustive" not in counts[4000]
    options = discrete.OPTIONS
    ceiling = (
        options["greedy"]["restarts"] * discrete.GREEDY_ALL
        + options["random"]["samples"]
        + options["gradient"]["verify"]
        + options["learned"]["restarts"]
    )  # each method's most sets at budget 1, whatever the number of units
    assert max(sum(c.values()) for c in counts.values()) <= ceiling, counts  # one ceiling for both sizes
    assert sum(counts[4000].values()) < 2000 / 2, counts  # well under one set per excluded unit


def test_exhaustive_joins_every_ground_truth_attack_it_joined_before():
    """The bound keeps exhaustive search where the ground-truth models are graded: paren (the
    largest) at budget 1 and induction at budget 2, every unit excluded."""
    from adversary.discrete import OPTIONS, exhaustive_fits

    max_sets = OPTIONS["exhaustive"]["max_sets"]
    for name, budget in (("paren", 1), ("induction", 2)):
        folder = resolve_model(name)
        config = ModelConfig.from_json(json.loads((folder / "config.json").read_text()))
        prompts, seq = resolve_task(None, folder).heldout_data().clean.shape
        units = len(config.sites) * config.d_model
        assert exhaustive_fits(units, budget, max_sets, config.scored_flops(seq) * prompts), name


def _sparse_reader(monkeypatch) -> tuple[KLOracle, np.ndarray]:
    """A model of 600 units where all but 16 read nothing (their weights zero), in the bounded
    regime, and the mask of the units something reads."""
    monkeypatch.setattr("explainer.finish.oracle.EXACT_UNITS", 100)  # the bounded rounds
    cfg = ModelConfig(
        n_layers=1, d_model=300, n_heads=2, d_head=8, d_vocab=13, n_ctx=6, attn_only=True, normalization_type=None
    )
    model = init_random(cfg, jax.random.key(0))
    read = np.arange(cfg.d_model) < 8  # the dimensions anything reads
    weight = read.astype(np.float32)
    attn = model.blocks[0].attn
    zeroed = {name: getattr(attn, name) * weight[None, :, None] for name in ("W_Q", "W_K", "W_V")}
    model = eqx.tree_at(
        lambda m: (m.blocks[0].attn.W_Q, m.blocks[0].attn.W_K, m.blocks[0].attn.W_V, m.W_U),
        model,
        (zeroed["W_Q"], zeroed["W_K"], zeroed["W_V"], model.W_U * weight[:, None]),
    )
    _, batch = setup_of(8)
    oracle = KLOracle(Scrubber.build(model, batch), batch, screen_prompts=8)
    assert oracle.n_units == 600 and not exact(oracle)
    return oracle, oracle.flat({"blocks.0.attn.in": read, "unembed.in": read}) > 0.5


def test_a_bounded_prune_drops_free_units_in_blocks(monkeypatch):
    """Bounded rounds drop blocks of free units, in the orders the gradient predicts: prune from
    everything kept drops every unit that reads nothing, more than ``MAX_ROUNDS`` rounds of
    ``SHORTLIST`` could, and keeps the KL. Everything kept is the KL's minimum, where its gradient
    is zero: only the order halfway to the removal tells the units apart."""
    oracle, needed = _sparse_reader(monkeypatch)
    everything = np.ones(oracle.n_units, np.float32)
    pruned = prune(oracle, everything)
    assert not (pruned[~needed] > 0.5).any()  # every free unit dropped
    assert oracle.n_units - int(pruned.sum()) > MAX_ROUNDS * SHORTLIST
    assert oracle.kl(pruned)[0] <= oracle.kl(everything)[0] + 1e-6  # float noise, once over all rounds


def test_a_bounded_repair_brings_back_the_units_read(monkeypatch):
    """From nothing kept, a bounded repair (two backward passes and a few masks a round) adds back
    the units something reads, within a budget of their KL, and no unit that reads nothing."""
    oracle, needed = _sparse_reader(monkeypatch)
    nothing = np.zeros(oracle.n_units, np.float32)
    budget = 1e-6 + float(oracle.kl(needed.astype(np.float32))[0])
    before = oracle.evaluations
    repaired, added = repair(oracle, nothing, budget, max_added=oracle.n_units)
    assert oracle.kl(repaired)[0] <= budget
    assert not (repaired[~needed] > 0.5).any(), np.flatnonzero(repaired[~needed] > 0.5)
    assert oracle.evaluations - before < CEILING
