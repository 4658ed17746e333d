"""The adversary's own basis: a rotation of the excluded subspace.

An explanation in a basis ``B`` keeps some of its columns and excludes the rest; the unit-wise
adversary re-includes excluded *columns*. But the claim "the excluded subspace does not matter"
does not depend on which basis of that subspace one writes it in, and a learned rotation can
line its units up so that no single excluded column moves anything while a direction across
several of them does (a cancelling pair, split into its sum and its difference, is the simplest
case). The adversary may therefore search in its own basis ``C = B R``, where ``R`` rotates only
the excluded coordinates:

- ``own``: ``R = I``, the explanation's units (the default);
- ``random``: ``R`` a random rotation of the excluded coordinates;
- ``learned``: ``R = expm(S)``, ``S`` skew-symmetric and zero outside the excluded block, trained
  by the adversary to maximise its gap (the same parameterisation as a learned basis).

Because ``R`` fixes every kept column, the keep mask means the same in ``C`` as in ``B``
(``C_E C_Eᵀ = B_E B_Eᵀ``): the scrubbed model is unchanged, and only what the adversary can
re-include differs. Sites whose units are not residual directions (a rewrite's remainder, or
position-specific masks) are left in their own basis.

>>> import numpy as np, jax.numpy as jnp
>>> keep = jnp.array([1.0, 0.0, 0.0])
>>> r = np.asarray(excluded_rotation(jnp.array([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]), keep))
>>> bool(np.allclose(r[:, 0], [1, 0, 0]) and np.allclose(r.T @ r, np.eye(3), atol=1e-5))
True
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from explainer.errors import ExplainerError, did_you_mean
from explainer.masks import Mask, OrthogonalBasis
from explainer.scrub import Scrubber

ADVERSARY_BASES = ("own", "random", "learned")
RANDOM_SCALE = 1.0  # std of the random skew entries: rotation angles of order one radian and more


def check_adversary_basis(basis: str) -> str:
    if basis not in ADVERSARY_BASES:
        raise ExplainerError(f"unknown adversary basis {basis!r}; {did_you_mean(str(basis), ADVERSARY_BASES)}")
    return basis


def rotatable(scrubber: Scrubber) -> tuple[str, ...]:
    """The sites whose units are residual directions (``d_model`` of them)."""
    if scrubber.positions is not None:
        raise ExplainerError(
            "the adversary cannot rotate position-specific units; use --adversary-basis own with --positional"
        )
    if scrubber.units == "edges":
        raise ExplainerError("edge units are whole writers, not directions; use --adversary-basis own with edges")
    d = scrubber.model.config.d_model
    return tuple(s for s, n in scrubber.n_units.items() if n == d)


def excluded_rotation(skew: Float[Array, "d d"], keep: Float[Array, " d"]) -> Float[Array, "d d"]:
    """``expm(S)`` with ``S = A − Aᵀ`` restricted to the coordinates ``keep`` excludes exactly (0):
    a rotation that leaves every other coordinate where it is."""
    free = jax.lax.stop_gradient((keep == 0).astype(skew.dtype))
    s = (skew - skew.T) * free[:, None] * free[None, :]
    return jax.scipy.linalg.expm(s)


def basis_matrix(scrubber: Scrubber, site: str) -> Float[Array, "d d"]:
    """The explanation's basis at ``site`` as a matrix (columns = units; identity when standard)."""
    basis = scrubber.bases.get(site)
    matrix = getattr(basis, "matrix", None)
    return jnp.eye(scrubber.model.config.d_model, dtype=jnp.float32) if matrix is None else matrix


def rotated(scrubber: Scrubber, keep: Mask, skews: Mapping[str, Float[Array, "d d"]]) -> Scrubber:
    """``scrubber`` in the adversary's basis ``B R`` at each site of ``skews`` (``R`` from the skew)."""
    return scrubber.with_bases(
        {
            site: OrthogonalBasis(basis_matrix(scrubber, site) @ excluded_rotation(s, keep[site]))
            for site, s in skews.items()
        }
    )


def random_skews(key: PRNGKeyArray, sites, d: int, shape: tuple[int, ...] = ()) -> dict[str, Array]:
    """Random skew parameters per site (``shape + (d, d)``), the start of both rotated adversaries."""
    keys = jax.random.split(key, len(sites))
    return {
        site: RANDOM_SCALE * jax.random.normal(k, (*shape, d, d), jnp.float32)
        for k, site in zip(keys, sorted(sites), strict=True)
    }


def haar_bases(scrubber: Scrubber, keep: Mapping[str, np.ndarray], key: PRNGKeyArray) -> dict[str, OrthogonalBasis]:
    """The explanation's bases with their excluded columns rotated uniformly at random (Haar)."""
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max)))
    out = {}
    for site in rotatable(scrubber):
        free = np.flatnonzero(np.asarray(keep[site]) == 0) if site in keep else np.array([], int)
        if len(free) < 2:
            continue
        q, r = np.linalg.qr(rng.normal(size=(len(free), len(free))))
        rotation = np.eye(len(keep[site]))
        rotation[np.ix_(free, free)] = q * np.sign(np.diag(r))
        out[site] = OrthogonalBasis(basis_matrix(scrubber, site) @ jnp.asarray(rotation, jnp.float32))
    return out


def directions(
    bases: Mapping[str, OrthogonalBasis], reincluded: Mapping[str, list[int]]
) -> dict[str, list[list[float]]]:
    """The residual directions (columns of the adversary's basis) of the re-included units."""
    return {
        site: [np.asarray(bases[site].matrix)[:, u].round(6).tolist() for u in units]
        for site, units in reincluded.items()
        if units and site in bases
    }


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
    re-inclusion moves the scrubbed model most. ``own``: no change (empty).
    """
    from adversary.discrete import _keys
    from adversary.learned import LearnedAdversary, train_adversary
    from explainer.metrics import divergence as measure

    check_adversary_basis(basis)
    if basis == "own":
        return {}
    replacement_key, _ = _keys(key)  # the replacement the discrete attack will use
    if basis == "random":
        return haar_bases(scrubber, keep, jax.random.fold_in(key, 1))
    mask = {s: jnp.asarray(v, jnp.float32) for s, v in keep.items()}
    _, replacement = scrubber.reference(batch, replacement_key)
    scrubbed = scrubber.logits(batch.clean, mask, replacement)
    adversary = LearnedAdversary(budget=budget, restarts=restarts, basis="learned", divergence=divergence)
    params = train_adversary(
        adversary, scrubber, batch.clean, mask, replacement, scrubbed, steps, jax.random.fold_in(key, 2)
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
        after = scrubber.with_bases(bases).logits(batch.clean, widened, replacement)
        gap = float(measure(divergence, scrubbed, after).mean())
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
    from adversary.discrete import attack_all

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
