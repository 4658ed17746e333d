"""The learned adversary: trained inside the loop, against the explanation as it trains.

It holds hard-concrete gates over every unit, in several restarts at once (a leading ``restarts``
axis, evaluated with ``vmap``). A sample re-includes units only where the explanation excludes
them (``a ⊆ ¬m``: the gate is multiplied by ``1 − m``); with a hard budget ``k`` only the ``k``
largest re-inclusions of each restart count, with a penalty ``ν`` instead every unit may be
re-included at a cost. The scrubbed model with ``m ∨ a`` keeps the re-included units at the
scrubbed run's own value, and the adversary ascends ``D(S_m ‖ S_{m∨a})`` per example, with ``D``
KL in either direction or their mean (re-inclusion can also *improve* predictions: cancellation,
negative components).

The restarts are combined by a smooth maximum (log-sum-exp at ``temperature`` nats), so the
explainer is pushed by the worst restart while every restart still receives its own gradient.

With ``basis`` ``random`` or ``learned`` the adversary re-includes units of its own basis: each
restart also holds a skew-symmetric matrix per site whose exponential rotates the excluded
coordinates (:mod:`adversary.rotation`), fixed at a random start or trained with the gates. It
then catches an effect that no single unit of the explanation's basis shows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from adversary.rotation import check_adversary_basis, random_skews, rotatable, rotated
from explainer.errors import ExplainerError, did_you_mean
from explainer.masks import BETA, GAMMA, ZETA, Mask
from explainer.metrics import DIVERGENCES, divergence
from explainer.scrub import Replacement, Scrubber

Params = dict[str, Float[Array, "restarts units"]]
State = dict  # Params, or {"gates": Params, "skew": {site: [restarts, units, units]}} in a rotated basis


@dataclasses.dataclass(frozen=True)
class LearnedAdversary:
    """Settings of the in-loop adversary (the state it learns is a separate pytree of gate logits).

    >>> LearnedAdversary(budget=2, restarts=4).name
    'learned'
    """

    budget: int | None = 1
    penalty: float = 0.0
    restarts: int = 2
    steps: int = 1
    lr: float = 0.1
    init_logit: float = 0.0
    divergence: str = "kl"
    warm_start: bool = True
    temperature: float = 0.01
    basis: str = "own"
    name: str = "learned"

    def __post_init__(self) -> None:
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            raise ExplainerError(f"adversary budget must be a positive integer or None, got {self.budget!r}")
        if self.budget is None and self.penalty <= 0:
            raise ExplainerError("an adversary without a budget needs a penalty > 0 per re-included unit")
        for name in ("restarts", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ExplainerError(f"adversary {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.divergence not in DIVERGENCES:
            raise ExplainerError(
                f"unknown divergence {self.divergence!r}; {did_you_mean(self.divergence, DIVERGENCES)}"
            )
        if self.lr <= 0 or self.temperature <= 0:
            raise ExplainerError("adversary lr and temperature must be positive")
        check_adversary_basis(self.basis)

    def init(self, key: PRNGKeyArray, n_units: dict[str, int]) -> State:
        """Gate logits per site, ``[rows, units]`` (:attr:`rows`), jittered so that restarts differ;
        in a rotated basis also ``{"gates": ..., "skew": {site: [rows, units, units]}}``, the first
        row's skew zero (the explanation's own basis)."""
        keys = jax.random.split(key, len(n_units))
        rows = self.rows
        gates = {
            site: self.init_logit + 0.5 * jax.random.normal(k, (rows, n), jnp.float32)
            for k, (site, n) in zip(keys, sorted(n_units.items()), strict=True)
        }
        if self.basis == "own":
            return gates
        widths = {n for n in n_units.values() if n > 1}
        skews = {}
        for n in sorted(widths):  # one random start per width; every site of that width draws its own
            sites = [s for s, m in n_units.items() if m == n]
            skews |= random_skews(jax.random.fold_in(key, n), sites, n, (rows,))
        return {"gates": gates, "skew": {s: v.at[0].set(0.0) for s, v in skews.items()}}

    @property
    def rows(self) -> int:
        """Restarts held: in a rotated basis one more than ``restarts``, the first of them fixed in
        the explanation's own basis (the identity is a rotation too), so that whatever a unit-wise
        adversary finds this one finds as well. Without it, planted-cancel trained against the
        learned rotation could drop its cancelling pair (dims 6 and 7 of ``unembed.in``: a gap of
        8.75 nats when one is re-included) while the rotated restarts chased the key dimension."""
        return self.restarts + (self.basis != "own")

    @property
    def named(self) -> bool:
        """Whether :meth:`best` names each restart's whole attack: units of a basis that does not
        move (its own, or a rotation fixed at a random start). A learned rotation moves the basis
        itself, which no set of units names, so a ladder never takes its still units for a settled
        attack (:func:`explainer.frontier.ladder.train_ladder`)."""
        return self.basis != "learned"

    @property
    def closes(self) -> bool:
        """Whether closing the rotated attacks (:func:`explainer.finish.passes.close_rotated`) can
        change an explanation: in a rotated basis only."""
        return self.basis != "own"

    def _parts(self, params: State) -> tuple[Params, dict[str, Array] | None]:
        """The gate logits and, in a rotated basis, the skew parameters (fixed when ``random``)."""
        if self.basis == "own":
            return params, None
        skew = params["skew"]
        if self.basis == "random":
            skew = jax.lax.stop_gradient(skew)
        return params["gates"], {s: v.at[0].set(0.0) for s, v in skew.items()}  # the first: own basis

    def reinclusion(self, params: Params, keep: Mask, key: PRNGKeyArray) -> Params:
        """A sampled re-inclusion ``a`` per restart, zero wherever ``keep`` is one.

        With a budget, the ``k`` excluded units whose noisy gates are largest *before* clipping are
        re-included (ranking clipped values would tie at 1 and always pick the same units), and
        gradients pass the clip straight through, so a gate sampled at exactly 0 or 1 still learns.
        """
        sites = sorted(params)
        keys = jax.random.split(key, len(sites))
        stretched, gated = {}, {}
        for k, site in zip(keys, sites, strict=True):
            logit = params[site]
            u = jax.random.uniform(k, logit.shape, minval=1e-6, maxval=1.0 - 1e-6)
            s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + logit) / BETA) * (ZETA - GAMMA) + GAMMA
            z = s + jax.lax.stop_gradient(jnp.clip(s, 0.0, 1.0) - s)
            free = 1.0 - keep[site]
            gated[site] = z * free
            stretched[site] = jax.lax.stop_gradient(jnp.where(free > 0.5, s, -jnp.inf))
        if self.budget is None:
            return gated
        chosen = _top_k_indicator(stretched, self.budget)
        return {s: gated[s] * chosen[s] for s in sites}

    def gaps(
        self,
        params: State,
        scrubber: Scrubber,
        tokens,
        keep: Mask,
        scrubbed: Float[Array, "batch vocab"],
        replacement: Replacement,
        key: PRNGKeyArray,
    ) -> Float[Array, " restarts"]:
        """Mean ``D(S_m ‖ S_{m∨a})`` per restart for a sampled ``a`` (differentiable in both).

        In a rotated basis ``a`` re-includes units of ``B R`` (``R`` from the restart's skew)."""
        gates, skews = self._parts(params)
        a = self.reinclusion(gates, keep, key)
        sites = rotatable(scrubber) if skews is not None else ()
        own = {s: skews[s] for s in sites if s in keep} if skews is not None else {}

        def one(a_r: Mask, skew_r) -> Float[Array, ""]:
            widened = {s: 1.0 - (1.0 - keep[s]) * (1.0 - a_r[s]) for s in keep}
            scr = rotated(scrubber, keep, skew_r) if skew_r else scrubber
            return divergence(self.divergence, scrubbed, scr.logits(tokens, widened, replacement)).mean()

        return jax.vmap(one)(a, own)

    def cost(self, params: State, keep: Mask) -> Float[Array, ""]:
        """The adversary's own size cost ``ν·E|a|`` (zero with a hard budget); no gradient to ``keep``."""
        if self.budget is not None:
            return jnp.zeros(())
        params, _ = self._parts(params)
        shift = BETA * math.log(-GAMMA / ZETA)
        free = {s: 1.0 - jax.lax.stop_gradient(keep[s]) for s in keep}
        size = sum((jax.nn.sigmoid(params[s] - shift) * free[s]).sum(-1) for s in params)
        return self.penalty * size.max()

    def combine(self, gaps: Float[Array, " restarts"]) -> Float[Array, ""]:
        """Smooth maximum over restarts: the worst restart counts."""
        t = self.temperature
        return t * (jax.nn.logsumexp(gaps / t) - math.log(gaps.shape[0]))

    def best(self, params: State, keep: Mask, restart: int = 0) -> dict[str, list[int]]:
        """The hard re-inclusion of one restart: its ``budget`` largest gate logits among excluded units
        (units of the restart's own basis when the adversary rotates)."""
        params, _ = self._parts(params)
        sites = sorted(params)
        flat = np.concatenate(
            [np.where(np.asarray(keep[s]) > 0.5, -np.inf, np.asarray(params[s][restart])) for s in sites]
        )
        k = self.budget if self.budget is not None else int((flat > 0).sum())
        order = [int(i) for i in np.argsort(-flat, kind="stable")[:k] if np.isfinite(flat[i])]
        bounds = np.cumsum([0] + [params[s].shape[-1] for s in sites])
        return {
            s: sorted(i - int(bounds[j]) for i in order if bounds[j] <= i < bounds[j + 1]) for j, s in enumerate(sites)
        }


def _top_k_indicator(score: Params, k: int) -> Params:
    """1 at the ``k`` largest scores of each restart (across all sites), 0 elsewhere."""
    sites = sorted(score)
    flat = jnp.concatenate([score[s] for s in sites], axis=-1)
    rank = jnp.argsort(jnp.argsort(-flat, axis=-1, stable=True), axis=-1)
    chosen = (rank < k).astype(jnp.float32)
    out, start = {}, 0
    for s in sites:
        n = score[s].shape[-1]
        out[s] = chosen[..., start : start + n]
        start += n
    return out


def learn_reinclusions(
    adversary: LearnedAdversary,
    scrubber: Scrubber,
    tokens,
    keep: Mask,
    replacement: Replacement | tuple[dict[str, Array], ...],
    scrubbed: Float[Array, "batch vocab"] | tuple[Array, ...],
    steps: int,
    key: PRNGKeyArray,
    on_step: Callable[[int, State], None] | None = None,
) -> list[dict[str, list[int]]]:
    """Train the adversary against a fixed explanation; return each restart's hard re-inclusion.

    This is the in-loop adversary used on its own, as a grader: ``steps`` ascent steps on
    ``combine(gaps) − cost`` with adam, then every restart's top-``budget`` excluded units.
    ``tokens``, ``replacement`` and ``scrubbed`` may be tuples, one entry per length group of the
    prompts (:func:`train_adversary`). ``on_step`` is called after each step (:func:`train_adversary`).
    """
    params = train_adversary(adversary, scrubber, tokens, keep, replacement, scrubbed, steps, key, on_step)
    return [adversary.best(params, keep, r) for r in range(adversary.rows)]


def train_adversary(
    adversary: LearnedAdversary,
    scrubber: Scrubber,
    tokens,
    keep: Mask,
    replacement: Replacement | tuple[dict[str, Array], ...],
    scrubbed: Float[Array, "batch vocab"] | tuple[Array, ...],
    steps: int,
    key: PRNGKeyArray,
    on_step: Callable[[int, State], None] | None = None,
):
    """The adversary's parameters after ``steps`` adam ascent steps against a fixed explanation
    (``on_step``: called after each with the steps done and the parameters, not yet computed: JAX
    runs them asynchronously).

    ``tokens``, ``replacement`` and ``scrubbed`` are the prompts, their replacement and ``S_m`` on
    them; or tuples of these, one entry per length group (:func:`explainer.score.length_references`),
    whose mean gaps are weighted by their prompts: the gaps of the prompts padded together, to
    float rounding, at the cost of each group's own width."""
    k_init, k_run = jax.random.split(key)
    n_units = {s: int(v.shape[-1]) for s, v in keep.items()}
    params = adversary.init(k_init, n_units)
    opt_state = optax.adam(adversary.lr).init(params)
    for i in range(steps):
        params, opt_state = _ascent_step(
            adversary, scrubber, tokens, keep, replacement, scrubbed, params, opt_state, jax.random.fold_in(k_run, i)
        )
        if on_step is not None:
            on_step(i + 1, params)
    return params


@eqx.filter_jit
def _ascent_step(adversary, scrubber, tokens, keep, replacement, scrubbed, params, opt_state, key):
    """One adam ascent step of a stand-alone adversary (module level, so compiled once per shape)."""

    def objective(p):
        gaps = grouped_gaps(adversary, p, scrubber, tokens, keep, scrubbed, replacement, key)
        return adversary.combine(gaps) - adversary.cost(p, keep)

    grads = jax.tree.map(jnp.negative, jax.grad(objective)(params))
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optax.adam(adversary.lr).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def grouped_gaps(adversary, params, scrubber, tokens, keep, scrubbed, replacement, key) -> Float[Array, " restarts"]:
    """:meth:`LearnedAdversary.gaps` on prompts given whole, or as tuples of length groups: then the
    groups' mean gaps weighted by their prompts (every group sees the same sampled re-inclusion)."""
    if not isinstance(tokens, tuple):
        return adversary.gaps(params, scrubber, tokens, keep, scrubbed, replacement, key)
    n = sum(t.shape[0] for t in tokens)
    parts = zip(tokens, scrubbed, replacement, strict=True)
    return sum(adversary.gaps(params, scrubber, t, keep, s, r, key) * (t.shape[0] / n) for t, s, r in parts)


ADVERSARIES = ("learned", "none")


def make_adversary(name: str | None, **settings) -> LearnedAdversary | None:
    """The in-loop adversary called ``name`` (``learned`` or ``none``), with ``settings``.

    >>> make_adversary("none") is None
    True
    """
    if name in (None, "none"):
        return None
    if name == "learned":
        return LearnedAdversary(**settings)
    raise ExplainerError(f"unknown adversary {name!r}; {did_you_mean(str(name), ADVERSARIES)}")
