"""The finishing searches' KL oracle on prompts of mixed lengths scores them in length groups
(:class:`explainer.score.GroupedScorer`): the same KL, logit difference recovered and attribution,
to float rounding, as padding every prompt to the longest."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import explainer.score
from explainer.finish.oracle import KLOracle
from explainer.models import ModelConfig, init_random
from explainer.scrub import Scrubber
from explainer.tasks import parse_prompts

ATOL = 1e-5
SMALL = dict(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=20, n_ctx=16)
SKEWED = [2] * 10 + [3] * 6 + [4] * 4 + [12] * 3 + [14]  # many short prompts and a few long ones


@pytest.fixture(scope="module")
def setup():
    """A tiny model and mixed-length prompts in shuffled order, answered by the model's most likely
    token against its least likely (a logit difference recovered far from 0/0)."""
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 20, SKEWED[i]).tolist() for i in rng.permutation(len(SKEWED))]
    batch = parse_prompts({"prompts": [{"clean": r, "answers": [1], "wrong_answers": [2]} for r in rows]})
    model = init_random(ModelConfig(**SMALL), jax.random.key(2), std=0.3)
    scrubber = Scrubber.build(model, batch, sites=["blocks.1.attn.in", "unembed.in"])
    full, _ = scrubber.reference(batch, jax.random.key(0))
    answers, wrong = jnp.argmax(full, -1)[:, None], jnp.argmin(full, -1)[:, None]
    return scrubber, dataclasses.replace(batch, answers=answers, wrong_answers=wrong)


def test_the_kl_oracle_scores_groups_as_the_prompts_at_once(setup, monkeypatch):
    scrubber, batch = setup
    grouped = KLOracle(scrubber, batch, seed=1, max_prompts=20, screen_prompts=12)
    monkeypatch.setattr(explainer.score, "length_groups", lambda n, **_: [np.arange(len(n))])  # padded together
    whole = KLOracle(scrubber, batch, seed=1, max_prompts=20, screen_prompts=12)
    assert len(grouped.scorer.groups) > 1 and len(grouped.screen.scorer.groups) > 1
    assert len(whole.scorer.groups) == 1 and whole.scorer.refs[0].tokens.shape == (20, 14)
    assert sorted(np.concatenate(grouped.screen.scorer.groups).tolist()) == list(range(12))
    rng = np.random.default_rng(1)
    rows = (rng.random((6, grouped.n_units)) < 0.5).astype(np.float32)
    rows[0] = 1.0
    kl = grouped.kl(rows)
    assert kl[0] < 1e-6 < 1e-2 < kl[1:].min()  # the masks move the scrubbed model
    np.testing.assert_allclose(kl, whole.kl(rows), atol=ATOL, rtol=0)
    np.testing.assert_allclose(grouped.logit_diff_recovered(rows), whole.logit_diff_recovered(rows), atol=ATOL, rtol=0)
    assert grouped.full_logit_diff == pytest.approx(whole.full_logit_diff, abs=ATOL)
    np.testing.assert_allclose(grouped.screen.kl(rows), whole.screen.kl(rows), atol=ATOL, rtol=0)
    for row in rows[1:3]:  # on the screen's prompts, over its groups
        attribution = grouped.attribution(row)
        assert np.abs(attribution).max() > 1e-2
        np.testing.assert_allclose(attribution, whole.attribution(row), atol=ATOL, rtol=0)
