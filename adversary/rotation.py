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
