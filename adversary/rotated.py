"""The rotated attack: the adversary searching in its own rotation of the excluded subspace.

:mod:`adversary.rotation` holds the geometry (rotations that fix the kept columns); this module
trains or draws such a rotation against an explanation (:func:`adversary_bases`), attacks in it
(:func:`rotated_attack`), and closes what it finds (:func:`close_attacks`): the finishing pass that
adds units back while a rotated attack still moves a finished explanation by more than its budget.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from adversary.discrete import _keys, attack_all
from adversary.learned import LearnedAdversary, train_adversary
from adversary.rotation import (
    basis_matrix,
    check_adversary_basis,
    directions,
    excluded_rotation,
    haar_bases,
    rotatable,
)
from explainer.masks import OrthogonalBasis
from explainer.metrics import divergence as measure
from explainer.score import in_order, length_references
from explainer.scrub import Scrubber

LEARN_STEPS = 200
LEARN_RESTARTS = 8


def adversary_bases(
    scrubber: Scrubber,
    batch,
    keep: Mapping[str, np.ndarray],
    basis: str,
    budget: int,
    key: PRNGKeyArray,
    divergence: str = "kl",
    steps: int = LEARN_STEPS,
    restarts: int = LEARN_RESTARTS,
) -> dict[str, OrthogonalBasis]:
    """The bases a discrete attack searches in when the adversary uses its own basis.

    ``random``: a Haar-random rotation of each site's excluded columns. ``learned``: the rotation
    of the in-loop adversary (basis ``learned``, ``restarts`` restarts, ``steps`` adam steps)
    trained against this explanation on ``batch``; of its restarts, the one whose own hard
    re-inclusion moves the scrubbed model most. ``own``: no change (empty). The prompts are scored
    in length groups, as the discrete attack scores them (:func:`explainer.score.length_references`).
    """
    check_adversary_basis(basis)
    if basis == "own":
        return {}
    replacement_key, _ = _keys(key)  # the replacement the discrete attack will use
    if basis == "random":
        return haar_bases(scrubber, keep, jax.random.fold_in(key, 1))
    mask = {s: jnp.asarray(v, jnp.float32) for s, v in keep.items()}
    groups, refs = length_references(scrubber, batch, replacement_key)  # the prompts in length groups
    tokens = tuple(r.tokens for r in refs)
    replacement = tuple(r.replacement for r in refs)
    scrubbed = tuple(scrubber.logits(r.tokens, mask, r.replacement) for r in refs)
    adversary = LearnedAdversary(budget=budget, restarts=restarts, basis="learned", divergence=divergence)
    whole = (lambda x: x[0]) if len(refs) == 1 else (lambda x: x)  # one group: the arrays themselves
    params = train_adversary(
        adversary, scrubber, whole(tokens), mask, whole(replacement), whole(scrubbed), steps, jax.random.fold_in(key, 2)
    )
    sites = [s for s in rotatable(scrubber) if s in mask]
    best, best_gap = {}, -np.inf
    for r in range(adversary.rows):  # the first restart stays in the explanation's own basis
        bases = {
            s: OrthogonalBasis(basis_matrix(scrubber, s) @ excluded_rotation(params["skew"][s][r], mask[s]))
            for s in sites
        }
        chosen = adversary.best(params, mask, r)
        widened = {s: mask[s].at[jnp.asarray(chosen.get(s, []), int)].set(1.0) for s in mask}
        rotated_scrubber = scrubber.with_bases(bases)
        per_group = [
            measure(divergence, s, rotated_scrubber.logits(t, widened, r))
            for t, s, r in zip(tokens, scrubbed, replacement, strict=True)
        ]
        gap = float(in_order(groups, per_group).mean())
        if gap > best_gap:
            best, best_gap = bases, gap
    return best


CLOSE_CANDIDATES = 3  # excluded units tried per re-included direction, the largest components first
CLOSE_MAX_ADDED = 8  # units close_attacks adds at most


def rotated_attack(
    scrubber: Scrubber,
    batch,
    keep: Mapping[str, np.ndarray],
    basis: str,
    budget: int,
    key: PRNGKeyArray,
    divergence: str = "kl",
) -> tuple[float, dict[str, list[list[float]]]]:
    """The strongest discrete attack (greedy, and exhaustive where it fits) in the adversary's basis
    (:func:`adversary_bases`) on ``batch``: its mean gap and the residual directions it
    re-includes, per site."""
    bases = adversary_bases(scrubber, batch, keep, basis, budget, key, divergence)
    best, _ = attack_all(scrubber.with_bases(bases), batch, keep, budget, key, divergence, ("greedy", "exhaustive"))
    return float(best.gap["kl_mean"]), directions(bases, best.reincluded)


def close_attacks(
    scrubber: Scrubber,
    batch,
    keep: Mapping[str, np.ndarray],
    basis: str,
    budget: int,
    tolerance: float,
    key: PRNGKeyArray,
    divergence: str = "kl",
    admissible=None,
    candidates: int = CLOSE_CANDIDATES,
    max_added: int = CLOSE_MAX_ADDED,
) -> tuple[dict[str, np.ndarray], list[tuple[str, int]], float]:
    """Add excluded units back while the rotated attack (:func:`rotated_attack`) still moves the
    explanation by more than ``tolerance``: each round tries, for every direction the attack
    re-includes, the ``candidates`` excluded units with the largest components along it (in the
    explanation's own coordinates), attacks each widened explanation again, and keeps the one with
    the smallest gap, if it is smaller. ``admissible(keep)`` (e.g. its KL within the budget) can
    refuse a candidate. Returns the keep mask, the units added and the last gap.

    A direction that mixes a read but constant dimension with a varying excluded one (the key
    dimension of planted-cancel's head) moves the attention; the varying dimension is its largest
    component, but keeping it leaves the constant one to mix with the next, while keeping the
    constant one closes every such direction. So candidates are graded by the attack, not by their
    component. In the loop a rotated adversary can leave such an attack open when training ends: on
    one machine planted-cancel trained with seed 0 kept four spare dimensions of the head's input
    but not the key dimension (rotated gap 3.19 nats on the training prompts; 0 once it is added).
    """
    keep = {s: np.asarray(v, np.float32).copy() for s, v in keep.items()}
    gap, found = rotated_attack(scrubber, batch, keep, basis, budget, key, divergence)
    added: list[tuple[str, int]] = []
    while gap > tolerance and len(added) < max_added:
        options: list[tuple[str, int]] = []
        for site, vectors in found.items():
            excluded = np.flatnonzero(keep[site] < 0.5)
            for vector in vectors:
                weight = np.abs(np.asarray(basis_matrix(scrubber, site)).T @ np.asarray(vector))
                options += [(site, int(u)) for u in excluded[np.argsort(-weight[excluded], kind="stable")][:candidates]]
        best = None
        for site, unit in dict.fromkeys(options):  # in order, without repeats
            trial = {s: v.copy() for s, v in keep.items()}
            trial[site][unit] = 1.0
            if admissible is not None and not admissible(trial):
                continue
            trial_gap, trial_found = rotated_attack(scrubber, batch, trial, basis, budget, key, divergence)
            if best is None or trial_gap < best[0]:
                best = (trial_gap, trial_found, trial, (site, unit))
        if best is None or best[0] >= gap:
            break
        gap, found, keep = best[0], best[1], best[2]
        added.append(best[3])
    return keep, added, gap
