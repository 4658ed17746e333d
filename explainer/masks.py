"""Masks over units: hard-concrete gates (L0 relaxation), bases, and size.

A *keep mask* ``m`` maps each site to a vector over its units: 1 keeps the unit (the reader sees the
run's own value), 0 excludes it (the reader sees the replacement). While training, ``m`` is sampled
from hard-concrete gates (Louizos et al., 2018), which put real mass on exactly 0 and exactly 1 and
give a differentiable expected size; a finished explanation is binary.

A *basis* says what a unit is: coordinates of ``Bᵀh`` for an orthonormal ``B`` per site.
The standard basis (``B = I``) is the default and mixes without any matrix product, so a mask of
all ones reproduces the full model bit for bit.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

# Hard-concrete stretch interval and temperature (Louizos et al.'s defaults).
GAMMA, ZETA, BETA = -0.1, 1.1, 2.0 / 3.0

Mask = dict[str, Float[Array, " units"]]


class Basis(eqx.Module):
    """How a site's residual is cut into units."""

    def mix(self, h: Float[Array, "*b d"], r: Float[Array, "*b d"], keep: Float[Array, "..."]):
        """``B (keep ⊙ Bᵀh + (1 − keep) ⊙ Bᵀr)``: kept units from ``h``, the rest from ``r``
        (``keep``: one per unit, per position and unit, or one broadcast over ``d``).

        Computed in float32, the mask's and the basis's precision, and returned in ``h``'s dtype
        (a bfloat16 model's activations: ``--dtype``); keep=1 still returns ``h`` exactly."""
        return self._mix(h.astype(jnp.float32), r.astype(jnp.float32), keep).astype(h.dtype)

    def _mix(self, h, r, keep):
        raise NotImplementedError


class StandardBasis(Basis):
    """Units are residual dimensions. Exact at both ends: keep=1 gives ``h``, keep=0 gives ``r``."""

    def _mix(self, h, r, keep):
        return keep * h + (1.0 - keep) * r


class OrthogonalBasis(Basis):
    """Units are coordinates in the orthonormal columns of ``matrix``.

    Written as ``h + B((1 − keep) ⊙ Bᵀ(r − h))`` so that keep=1 still returns ``h`` exactly.
    """

    matrix: Float[Array, "d d"]

    def _mix(self, h, r, keep):
        return h + ((1.0 - keep) * ((r - h) @ self.matrix)) @ self.matrix.T


class LearnedBasis(Basis):
    """An orthogonal basis trained with the mask: ``start · expm(A − Aᵀ)``.

    The matrix exponential of a skew-symmetric matrix is a rotation, so the basis stays orthonormal
    whatever ``A`` the optimiser makes; ``start`` is fixed (no gradient flows into it).
    """

    start: Float[Array, "d d"]
    skew: Float[Array, "d d"]

    @classmethod
    def init(cls, start: ArrayLike) -> LearnedBasis:
        start = jnp.asarray(start, jnp.float32)
        return cls(start, jnp.zeros_like(start))

    @property
    def matrix(self) -> Float[Array, "d d"]:
        rotation = jax.scipy.linalg.expm(self.skew - self.skew.T)
        return jax.lax.stop_gradient(self.start) @ rotation

    def _mix(self, h, r, keep):
        b = self.matrix
        return h + ((1.0 - keep) * ((r - h) @ b)) @ b.T


STANDARD = StandardBasis()


class Gates(eqx.Module):
    """Hard-concrete gates, one log-alpha per unit per site. What a unit is belongs to the scrubber
    (:attr:`explainer.scrub.Scrubber.bases`), a learned basis included.

    >>> g = Gates.init({"unembed.in": 4}, logit=3.0)
    >>> round(float(g.expected_size()), 2)
    3.96
    >>> g.binary()["unembed.in"].tolist()
    [True, True, True, True]
    """

    logits: dict[str, Float[Array, " units"]]

    @classmethod
    def init(cls, n_units: dict[str, int], logit: float = 3.0) -> Gates:
        return cls({site: jnp.full((n,), logit, jnp.float32) for site, n in n_units.items()})

    def sample(self, key: PRNGKeyArray, beta: float = BETA, straight_through: bool = False) -> Mask:
        """A stochastic keep mask in [0, 1] (exact zeros and ones have positive probability).

        With ``straight_through`` the clip to [0, 1] passes gradients as if it were not there, so
        a gate that sampled exactly 0 still learns which way it should move.
        """
        keys = jax.random.split(key, len(self.logits))
        out = {}
        for k, (site, logit) in zip(keys, sorted(self.logits.items()), strict=True):
            u = jax.random.uniform(k, logit.shape, minval=1e-6, maxval=1.0 - 1e-6)
            s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + logit) / beta)
            stretched = s * (ZETA - GAMMA) + GAMMA
            z = jnp.clip(stretched, 0.0, 1.0)
            out[site] = stretched + jax.lax.stop_gradient(z - stretched) if straight_through else z
        return out

    def deterministic(self) -> Mask:
        """The gates' test-time value in [0, 1] (no noise)."""
        return {
            site: jnp.clip(jax.nn.sigmoid(logit) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
            for site, logit in self.logits.items()
        }

    def keep_probability(self, beta: float = BETA) -> Mask:
        """P(gate > 0) per unit: the expected-L0 contribution of each unit."""
        shift = beta * math.log(-GAMMA / ZETA)
        return {site: jax.nn.sigmoid(logit - shift) for site, logit in self.logits.items()}

    def expected_size(self, beta: float = BETA) -> Float[Array, ""]:
        """Expected number of kept units (the L0 penalty)."""
        return sum(p.sum() for p in self.keep_probability(beta).values())

    def binary(self) -> dict[str, jax.Array]:
        """The finished explanation: keep a unit iff its deterministic gate exceeds 1/2."""
        return {site: logit > 0.0 for site, logit in self.logits.items()}


def as_mask(kept: dict[str, ArrayLike]) -> Mask:
    """Boolean keep vectors as a float keep mask."""
    return {site: jnp.asarray(v, jnp.float32) for site, v in kept.items()}


def size(mask: Mask) -> int:
    """Number of kept units of a binary mask, summed over sites."""
    return int(sum(int(jnp.sum(v > 0.5)) for v in mask.values()))


class Layout(tuple):
    """The sites of a set of masks and their widths, in order: the one place that turns per-site
    masks into flat rows over every unit and back (the searches, baselines and adversaries score
    stacks of flat rows). Iterates as ``(site, width)`` pairs; hashable, so a jitted function can
    take it as a static argument.

    >>> import numpy as np
    >>> layout = Layout.of({"a": 2, "b": 3})
    >>> layout.n_units, layout.split(np.arange(5))["b"].tolist()
    (5, [2, 3, 4])
    >>> layout.flat({"a": [1, 0], "b": [0, 0, 1]}).tolist(), layout.top(np.array([5, 1, 4, 2, 3]), 2).tolist()
    ([1.0, 0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0, 0.0])
    >>> layout.locate(3)
    ('b', 1)
    """

    @classmethod
    def of(cls, n_units: dict[str, int] | list[tuple[str, int]]) -> Layout:
        """The layout of ``{site: width}`` (or ``(site, width)`` pairs), in their order."""
        pairs = n_units.items() if isinstance(n_units, dict) else n_units
        return cls((str(site), int(n)) for site, n in pairs)

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(site for site, _ in self)

    @property
    def n_units(self) -> int:
        return sum(n for _, n in self)

    @property
    def starts(self) -> dict[str, int]:
        """Each site's first flat unit."""
        out, start = {}, 0
        for site, n in self:
            out[site] = start
            start += n
        return out

    def split(self, row):
        """A flat row (numpy or JAX, units on the last axis) as ``{site: its units}``."""
        out, start = {}, 0
        for site, n in self:
            out[site] = row[..., start : start + n]
            start += n
        return out

    def flat(self, keep, dtype=None):
        """Per-site masks as one flat numpy row, in this layout's order (float32 by default)."""
        import numpy as np

        return np.concatenate([np.asarray(keep[site], dtype or np.float32) for site, _ in self])

    def top(self, scores, k: float | int):
        """The flat binary row keeping the ``k`` highest ``scores`` (ties: the earlier unit)."""
        import numpy as np

        chosen = np.zeros(np.shape(scores), np.float32)
        chosen[np.argsort(-np.asarray(scores), kind="stable")[: int(k)]] = 1.0
        return chosen

    def locate(self, unit: int) -> tuple[str, int]:
        """The site of flat unit ``unit`` and its index there."""
        for site, n in self:
            if unit < n:
                return site, unit
            unit -= n
        raise IndexError(f"unit out of range for a layout of {self.n_units} units")
