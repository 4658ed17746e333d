"""The adversary in its own basis: rotations of the excluded subspace (adversary.rotation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import explainer
from adversary.discrete import attack, attack_all
from adversary.learned import LearnedAdversary
from adversary.rotated import adversary_bases, close_attacks, rotated_attack
from adversary.rotation import directions, excluded_rotation, rotated
from explainer.api import attack_explanation
from explainer.errors import ExplainerError
from explainer.masks import OrthogonalBasis
from explainer.models import load_model
from explainer.scrub import Scrubber
from explainer.tasks import resolve_task
from explainer.zoo import resolve_model

HALF = 2**-0.5


@pytest.fixture(scope="module")
def hidden():
    """planted-cancel's unembedding in a basis that hides the cancelling pair: dims 6 and 7 are
    replaced by their sum (read, but zero on every input) and their difference (varies, unread).
    The explanation keeps dim 1 only. No single unit of this basis moves anything when re-included;
    a direction across the sum and the difference (dim 6 itself) moves the logits by many nats."""
    folder = resolve_model("planted-cancel")
    task = resolve_task(None, folder)
    b = np.eye(10, dtype=np.float32)
    b[[6, 7], 6] = HALF
    b[[6, 7], 7] = [HALF, -HALF]
    bases = {"unembed.in": OrthogonalBasis(jnp.asarray(b))}
    scrubber = Scrubber.build(load_model(folder), task.train_data(), ["unembed.in"], bases=bases)
    return scrubber, task.heldout_data(), {"unembed.in": np.eye(10, dtype=np.float32)[1]}


def test_a_rotation_of_the_excluded_subspace_keeps_the_scrubbed_model(hidden, getkey):
    scrubber, batch, keep = hidden
    mask = {s: jnp.asarray(v) for s, v in keep.items()}
    _, repl = scrubber.reference(batch, getkey())
    skew = {"unembed.in": jax.random.normal(getkey(), (10, 10))}
    r = np.asarray(excluded_rotation(skew["unembed.in"], mask["unembed.in"]))
    np.testing.assert_allclose(r.T @ r, np.eye(10), atol=1e-5)
    np.testing.assert_allclose(r[:, 1], np.eye(10)[1], atol=1e-6)  # the kept unit stays put
    before = scrubber.logits(batch.clean, mask, repl)
    after = rotated(scrubber, mask, skew).logits(batch.clean, mask, repl)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=1e-4)


def test_the_rotated_adversary_finds_what_the_explanations_basis_hides(hidden):
    scrubber, batch, keep = hidden
    own, every = attack_all(scrubber, batch, keep, 1, jax.random.key(0))
    assert all(r.gap["kl_mean"] < 1e-6 for r in every)  # every unit-wise method, exhaustive included
    gaps = {}
    for basis in ("random", "learned"):
        bases = adversary_bases(scrubber, batch, keep, basis, 1, jax.random.key(0))
        found = attack(scrubber.with_bases(bases), batch, keep, 1, "exhaustive", jax.random.key(0))
        gaps[basis] = found.gap["kl_mean"]
        if basis == "learned":  # it learns the hidden dimension: dim 6 (or 7), up to sign
            direction = np.abs(directions(bases, found.reincluded)["unembed.in"][0])
            assert max(direction[6], direction[7]) > 0.9
    assert gaps["random"] > 0.1
    assert gaps["learned"] > 5.0 and gaps["learned"] >= gaps["random"]


def test_trained_against_the_rotated_adversary_an_explanation_withstands_the_rotated_attack():
    """planted-cancel in the standard basis. Trained against the unit-wise adversary the
    explanation keeps the truth, but the rotated attack breaks it through the head's key
    dimension (dim 2: read, constant on the task, so resampling it alone is harmless, while a
    direction mixing it with a varying excluded dimension moves the attention). Trained against
    the rotated adversary, the explanation keeps dim 2 as well and withstands that attack."""
    folder = resolve_model("planted-cancel")
    task, net = resolve_task(None, folder), load_model(folder)
    gaps, runs = {}, {}
    for basis in ("own", "learned"):
        runs[basis] = explainer.explain("planted-cancel", adversary=LearnedAdversary(basis=basis), progress=False)
        attacked = attack_explanation(runs[basis], net, task, 1, "exhaustive", adversary_basis="learned")
        gaps[basis] = attacked["gap"]["kl_mean"]
    turned = runs["learned"]
    assert turned.history["traces"] == [1] and turned.config["adversary_basis"] == "learned"
    assert 2 not in runs["own"].kept["blocks.0.attn.in"] and 2 in turned.kept["blocks.0.attn.in"]
    assert turned.faithfulness["kl_mean"] <= 0.01
    assert gaps["own"] > 1.0 and gaps["learned"] < 0.01


def test_close_attacks_keeps_the_key_dimension_not_the_largest_component():
    """planted-cancel's truth plus four spare dimensions of the head's input (0, 1, 3, 4, 8 of
    ``blocks.0.attn.in``), but not the key dimension 2: the rotated attack mixes dim 2 with
    varying excluded dimensions (which of them has the largest component follows the CPU's float
    path: on some machines one of them, on others dim 2). Closing the attack keeps dim 2, the one
    unit that closes every such direction, and the gap goes to zero."""
    folder = resolve_model("planted-cancel")
    data = resolve_task(None, folder).train_data()
    scrubber = Scrubber.build(load_model(folder), data)
    keep = {s: np.zeros(10, np.float32) for s in scrubber.sites}
    keep["blocks.0.attn.in"][[0, 1, 3, 4, 8]] = 1.0
    keep["unembed.in"][[1, 6, 7]] = 1.0
    key = jax.random.key(0)
    gap, found = rotated_attack(scrubber, data, keep, "learned", 1, key)
    direction = np.abs(np.asarray(found["blocks.0.attn.in"][0]))
    assert gap > 1.0 and direction[2] > 0.1 and (np.delete(direction, 2) > 0.1).any()
    closed, added, after = close_attacks(scrubber, data, keep, "learned", 1, 0.01, key)
    assert added == [("blocks.0.attn.in", 2)] and after <= 0.01
    assert np.flatnonzero(closed["blocks.0.attn.in"]).tolist() == [0, 1, 2, 3, 4, 8]
    refused, none, same = close_attacks(scrubber, data, keep, "learned", 1, 0.01, key, admissible=lambda k: False)
    assert none == [] and same == gap and np.array_equal(refused["blocks.0.attn.in"], keep["blocks.0.attn.in"])


def test_attack_takes_the_adversary_basis(tmp_path):
    folder = resolve_model("planted-cancel")
    e = explainer.explain("planted-cancel", basis="gradient", steps=400, progress=False)
    task, net = resolve_task(None, folder), load_model(folder)
    own = attack_explanation(e, net, task, 1, "exhaustive")
    learned = attack_explanation(e, net, task, 1, "exhaustive", adversary_basis="learned")
    assert own["adversary_basis"] == "own" and own["directions"] == {}
    assert learned["gap"]["kl_mean"] > 1.0 > 100 * own["gap"]["kl_mean"]
    assert len(next(iter(learned["directions"].values()))[0]) == 10
    with pytest.raises(ExplainerError, match="unknown adversary basis"):
        attack_explanation(e, net, task, 1, "exhaustive", adversary_basis="rotated")
    with pytest.raises(ExplainerError, match="unknown adversary basis"):
        LearnedAdversary(basis="rotated")
