"""Discrete attacks on prompts of mixed lengths score them in length groups
(:func:`explainer.score.length_references`): the same gaps, gradients and attack results, to float
rounding, as padding every prompt to the longest; a batch of one length is scored at once."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import explainer.score
from adversary import attack
from adversary.discrete import _keys, _Oracle
from adversary.learned import LearnedAdversary, grouped_gaps
from explainer.models import ModelConfig, init_random
from explainer.scrub import Scrubber
from explainer.tasks import parse_prompts

ATOL = 1e-5
SMALL = dict(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=20, n_ctx=16)
LLAMA = dict(normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, act_fn="silu")
SKEWED = [2] * 10 + [3] * 6 + [4] * 4 + [12] * 3 + [14]  # many short prompts and a few long ones


@pytest.fixture(scope="module")
def setup():
    """A tiny Llama-style model, mixed-length prompts in shuffled order, and a keep mask."""
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 20, SKEWED[i]).tolist() for i in rng.permutation(len(SKEWED))]
    batch = parse_prompts({"prompts": [{"clean": r, "answers": [1], "wrong_answers": [2]} for r in rows]})
    model = init_random(ModelConfig(**SMALL, **LLAMA, n_key_value_heads=2), jax.random.key(2), std=0.3)
    scrubber = Scrubber.build(model, batch, sites=["blocks.1.attn.in", "unembed.in"])
    keep = {s: (rng.random(n) < 0.5).astype(np.float32) for s, n in scrubber.n_units.items()}
    return scrubber, batch, keep


@pytest.fixture
def together(monkeypatch):
    """Within the block: every batch padded together (one length group), as before groups."""

    def padded_together():
        monkeypatch.setattr(explainer.score, "length_groups", lambda n, **_: [np.arange(len(n))])

    return padded_together


def test_the_oracle_scores_groups_as_the_batch_at_once(setup, together):
    scrubber, batch, keep = setup
    key = jax.random.key(1)
    grouped = _Oracle(scrubber, batch, keep, "kl", key, 8)
    together()
    whole = _Oracle(scrubber, batch, keep, "kl", key, 8)
    assert len(grouped.groups) > 1 and len(whole.groups) == 1
    assert sum(r.tokens.size for r in grouped.scorer.refs) < 0.6 * whole.scorer.refs[0].tokens.size
    np.testing.assert_allclose(grouped.ref, whole.ref, atol=ATOL, rtol=0)  # S_m, in the batch's order
    rng = np.random.default_rng(1)
    drawn = [tuple(rng.choice(grouped.n_excluded, 3, replace=False).tolist()) for _ in range(6)]
    sets = [(0,), (1, 5), (2, 3, 7), *drawn]
    gaps = grouped.gaps(sets)
    assert gaps.max() > 1e-2  # the sets move the scrubbed model: the comparison sees the replacements
    np.testing.assert_allclose(gaps, whole.gaps(sets), atol=ATOL, rtol=0)
    points = rng.uniform(size=(3, grouped.n_excluded))
    grads = grouped.gradients(points)
    assert np.abs(grads).max() > 1e-2
    np.testing.assert_allclose(grads, whole.gradients(points), atol=ATOL, rtol=0)
    a, b = grouped.effect(sets[-1]), whole.effect(sets[-1])
    np.testing.assert_allclose(list(a["gap"].values()), list(b["gap"].values()), atol=ATOL, rtol=0)
    assert a["logit_diff_change"] == pytest.approx(b["logit_diff_change"], abs=ATOL)


@pytest.mark.parametrize("basis", ["own", "learned"])  # learned: adversary.rotated.adversary_bases trains it
def test_the_learned_adversary_takes_length_groups(setup, basis):
    scrubber, batch, keep = setup
    oracle = _Oracle(scrubber, batch, keep, "kl", jax.random.key(1), 8)
    tokens, replacement, scrubbed = oracle.prompts()
    assert isinstance(tokens, tuple) and len(tokens) == len(oracle.groups)
    adversary = LearnedAdversary(budget=2, restarts=3, basis=basis)
    mask = {s: jnp.asarray(v) for s, v in keep.items()}
    params = adversary.init(jax.random.key(3), scrubber.n_units)
    gaps = eqx.filter_jit(grouped_gaps)  # one program: op by op, every group compiles each operation
    grouped = gaps(adversary, params, scrubber, tokens, mask, scrubbed, replacement, jax.random.key(4))
    _, whole_replacement = scrubber.reference(batch, _keys(jax.random.key(1))[0])  # the same partners
    whole = gaps(adversary, params, scrubber, batch.clean, mask, oracle.ref, whole_replacement, jax.random.key(4))
    assert float(whole.max()) > 1e-2
    np.testing.assert_allclose(grouped, whole, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("method", "options"), [("greedy", {}), ("gradient", {}), ("learned", {"steps": 10})])
def test_an_attack_finds_what_it_found_padded_together(setup, together, method, options):
    scrubber, batch, keep = setup
    grouped = attack(scrubber, batch, keep, 2, method, jax.random.key(5), **options)
    together()
    whole = attack(scrubber, batch, keep, 2, method, jax.random.key(5), **options)
    assert grouped.reincluded == whole.reincluded and grouped.evaluations == whole.evaluations
    assert grouped.gap["kl_mean"] > 1e-2
    assert grouped.gap["kl_mean"] == pytest.approx(whole.gap["kl_mean"], abs=ATOL)


def test_a_batch_of_one_length_is_scored_at_once(setup):
    """One length: the oracle of before groups, bit for bit (columns of padding only are cut off)."""
    from explainer.score import Divergence, Reference, Scorer, scrubbed

    scrubber, batch, keep = setup
    short = batch.take(jnp.flatnonzero((batch.clean >= 0).sum(1) == 2))  # ten prompts, padded to 14
    oracle = _Oracle(scrubber, short, keep, "kl", jax.random.key(1), 8)
    assert len(oracle.scorer.refs) == 1 and oracle.scorer.refs[0].tokens.shape == (10, 2)
    narrow = type(short)(short.clean[:, -2:], None, short.answers, short.wrong_answers)
    exact = _Oracle(scrubber, narrow, keep, "kl", jax.random.key(1), 8)
    assert exact.scorer.refs[0].tokens is narrow.clean and not isinstance(exact.prompts()[0], tuple)
    sets = [(0,), (1, 2)]
    reference = Reference.of(scrubber, narrow, _keys(jax.random.key(1))[0])  # the oracle before groups
    before = Scorer(scrubber, reference, exact.layout, 8)(exact.base[None], scrubbed)[0]
    scorer = Scorer(scrubber, reference.against(jnp.asarray(before, jnp.float32)), exact.layout, 8)
    np.testing.assert_array_equal(exact.gaps(sets), scorer(exact.masks(sets), Divergence("kl")).mean(axis=1))
    np.testing.assert_array_equal(oracle.gaps(sets), exact.gaps(sets))
