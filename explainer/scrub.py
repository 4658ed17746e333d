"""The scrubbed forward pass and its ablation sources.

At each site ``s`` the reader's input is ``B (m ⊙ Bᵀh + (1 − m) ⊙ Bᵀr)``: ``h`` is the scrubbed
run's own residual at ``s``, ``r`` the replacement at ``s``. The replacement comes from the
*ablation*:

- ``resample`` (default): the full model's residual at ``s`` on the task's counterfactual input, or
  on a permutation of the batch when the task has none (causal-scrubbing style; a prompt is then
  resampled from prompts of its own length);
- ``mean``: the full model's mean residual at ``s`` over the task's training prompts, per position
  (counted from the end; the mean at a position is over the prompts that reach it);
- ``zero``: zeros;
- ``optimal``: a learned constant per site, position and unit (Li & Janson's optimal ablation),
  started at the ``mean`` and fitted for a given keep mask by :func:`explainer.optimal.fit_optimal`.

With every mask all ones the scrubbed model is the full model, bit for bit; with resample and every
mask all zeros it is the full model on the resample input.

Prompts of different lengths are left-padded (:mod:`explainer.models.padding`): every prompt ends
at the last position, the one the metrics read. A counterfactual has its clean prompt's length, or
(``"positions": "end"``, :mod:`explainer.tasks.prompts`) is longer: its run is its own (its own
padding, positions counted from its own first token), and a clean position reads the counterfactual's
activation at the same place counted from the end, which left padding puts in the same column.

With ``units="edges"`` a unit is a writer into a reader instead of a residual dimension
(:mod:`explainer.edges`): the replacement then holds every writer's output, ``{"writers": ...}``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from explainer import edges
from explainer.errors import ExplainerError, did_you_mean
from explainer.masks import STANDARD, Basis, LearnedBasis, Mask
from explainer.models.padding import same_length_permutation
from explainer.models.transformer import Reads, SiteEdits, Transformer
from explainer.tasks.base import Batch

ABLATIONS = ("resample", "mean", "zero", "optimal")
UNITS = ("dims", "edges")
Replacement = dict[str, Float[Array, "batch seq ..."]]  # edges: [batch, seq, writers, d_model]
SiteMeans = dict[str, Float[Array, "seq ..."]]


def check_sites(model: Transformer, sites) -> tuple[str, ...]:
    """Validate site names against ``model``; errors list the valid ones."""
    valid = model.sites
    for site in sites:
        if site not in valid:
            layers = model.config.n_layers
            raise ExplainerError(
                f"site {site!r} does not exist; this model has blocks 0-{layers - 1} and sites "
                f"{', '.join(valid)} ({did_you_mean(site, valid).split('? ')[0]})"
            )
    return tuple(sites)


def check_ablation(ablation: str) -> str:
    if ablation not in ABLATIONS:
        raise ExplainerError(f"unknown ablation {ablation!r}; {did_you_mean(ablation, ABLATIONS)}")
    return ablation


def check_units(units: str) -> str:
    if units not in UNITS:
        raise ExplainerError(f"unknown units {units!r}; {did_you_mean(units, UNITS)}")
    return units


def capture(
    model: Transformer, tokens: Int[Array, "batch seq"], sites, units: str = "dims"
) -> tuple[Float[Array, "batch seq vocab"], Replacement]:
    """The full model's logits and what a replacement holds: the residual at each site (dims), or
    every writer's output (edges)."""
    if units == "edges":
        logits, writes = edges.run(model, tokens, capture=True)
        return logits, {edges.WRITERS: writes}
    return model.run(tokens, capture=sites)


@eqx.filter_jit
def _capture(model: Transformer, tokens: Int[Array, "batch seq"], sites, units: str):
    """:func:`capture`, compiled with the model as an argument: a function that closed over it would
    bake its weights into the program as constants (gigabytes, and minutes of compiling, on a model
    of Qwen2.5-0.5B's size)."""
    return capture(model, tokens, sites, units)


def broadcast_constants(constants: SiteMeans, n: int) -> Replacement:
    """Per-position constants (means, optimal ablation) as the replacement of ``n`` prompts."""
    return {s: jnp.broadcast_to(c, (n, *c.shape)) for s, c in constants.items()}


def last(logits: Float[Array, "batch seq vocab"]) -> Float[Array, "batch vocab"]:
    """The last position's logits, in float32 (what every loss and score reads, whatever the model's dtype)."""
    return logits[:, -1, :].astype(jnp.float32)


def scrubbed_logits(
    model: Transformer,
    tokens: Int[Array, "batch seq"],
    keep: Mask,
    replacement: Replacement,
    bases: dict[str, Basis] | None = None,
    remat: bool = False,
    positional: bool = False,
    last: bool = False,
) -> Float[Array, "batch _ vocab"]:
    """Logits of the model whose reader at each masked site sees kept units from its own run and
    the rest from ``replacement``. Sites absent from ``keep`` are left alone. ``remat``: recompute
    each block in the backward pass (``jax.checkpoint``) instead of storing its activations.
    ``last``: the last position's logits alone (``Transformer.run``), as the scrubber reads them."""
    edit = MaskEdits(keep, replacement, dict(bases or {}), positional)
    return model(tokens, edit=edit, remat=remat, last=last)


class MaskEdits(SiteEdits):
    """The scrubbed reads as data per site (so that layers of one shape run as one loop): the
    site's basis, keep mask and replacement; sites absent from ``keep`` are left alone."""

    keep: Mask
    replacement: Replacement
    bases: dict[str, Basis]
    positional: bool = eqx.field(static=True, default=False)

    def data(self, site: str):
        if site not in self.keep:
            return None
        return self.bases.get(site, STANDARD), self.keep[site], self.replacement[site]

    def apply(self, data, h: Reads) -> Reads:
        basis, keep, replacement = data
        # every position, or (``last``, after the last block's attention) the last position alone
        seq, positions = h.shape[-2], replacement.shape[-2]
        m = keep.reshape(positions, -1)[positions - seq :] if self.positional else keep  # (position, unit)
        return basis.mix(h, replacement[..., positions - seq :, :], m)


class Scrubber(eqx.Module):
    """A model, the sites it masks, and where replacements come from.

    >>> import jax
    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> from explainer.tasks import resolve_task
    >>> folder = resolve_model("planted-distractor")
    >>> model, task = load_model(folder), resolve_task(None, folder)
    >>> scrubber = Scrubber.build(model, task.train_data())
    >>> batch = task.heldout_data()
    >>> full, repl = scrubber.reference(batch, jax.random.key(0))
    >>> ones = {s: jnp.ones(n) for s, n in scrubber.n_units.items()}
    >>> bool((scrubber.logits(batch.clean, ones, repl) == full).all())
    True
    """

    model: Transformer
    sites: tuple[str, ...] = eqx.field(static=True)
    ablation: str = eqx.field(static=True)
    means: SiteMeans | None
    bases: dict[str, Basis]
    remat: bool = eqx.field(static=True, default=False)
    positions: int | None = eqx.field(static=True, default=None)  # position-specific masks: prompt length
    units: str = eqx.field(static=True, default="dims")  # "edges": a unit is a writer into the site

    @classmethod
    def build(
        cls,
        model: Transformer,
        train: Batch,
        sites=None,
        ablation: str = "resample",
        bases: dict[str, Basis] | None = None,
        positional: bool = False,
        units: str = "dims",
    ) -> Scrubber:
        """``positional``: one unit per (position, dimension), flat index ``position · d_model + dim``
        (tasks of fixed length; the prompts' length is taken from ``train``). ``units="edges"``: units
        are writers (:mod:`explainer.edges`); ``sites`` then default to the edge graph's readers."""
        check_ablation(ablation)
        if check_units(units) == "edges":
            edges.check_model(model)
            if bases or positional:
                raise ExplainerError("edge units have no basis and no positions; use --units dims for those options")
            sites = edges.check_edge_sites(model.config, edges.edge_sites(model.config) if sites is None else sites)
        else:
            sites = check_sites(model, model.sites if sites is None else sites)
        means = site_means(model, train.clean, sites, units=units) if ablation in ("mean", "optimal") else None
        positions = int(train.clean.shape[1]) if positional else None
        return cls(model, sites, ablation, means, dict(bases or {}), positions=positions, units=units)

    @property
    def n_units(self) -> dict[str, int]:
        if self.units == "edges":
            return edges.edge_units(self.model.config, self.sites)
        d = self.model.config.d_model  # a rewrite's remainder (``.mlp.rest``) is one unit, broadcast over d
        return {site: (1 if site.endswith(".mlp.rest") else d) * (self.positions or 1) for site in self.sites}

    @property
    def learned(self) -> dict[str, LearnedBasis]:
        """The bases training moves (``--basis learned``), by site; empty when every basis is fixed."""
        return {site: b for site, b in self.bases.items() if isinstance(b, LearnedBasis)}

    def split_learned(self) -> tuple[Scrubber, Scrubber]:
        """``(learned, rest)``: the scrubber's learned bases and everything else, as two halves of
        one pytree (``eqx.partition``); ``eqx.combine(learned, rest)`` is the scrubber again.
        Training differentiates ``learned`` and carries it in its state, so that a basis stays in
        one place while it trains (:mod:`explainer.train.step`)."""
        spec = jax.tree.map(
            lambda x: jax.tree.map(lambda _: True, x) if _is_learned(x) else False, self, is_leaf=_is_learned
        )
        return eqx.partition(self, spec)

    def with_bases(self, bases: dict[str, Basis]) -> Scrubber:
        """The same scrubber with ``bases`` replacing the bases of their sites: another basis, such as
        a rotated adversary's or a refit one."""
        if not bases:
            return self
        return eqx.tree_at(lambda s: s.bases, self, {**self.bases, **bases})

    def replacement(self, batch: Batch, key: PRNGKeyArray) -> Replacement:
        """The replacement ``r`` at every site, for ``batch`` (no gradient flows into it)."""
        if self.ablation == "resample":
            source = batch.corrupt
            if source is None:
                source = batch.clean[same_length_permutation(key, batch.clean)]
            _, cache = capture(self.model, source, self.sites, self.units)
            cache = batch.at_clean_positions(cache)  # a permutation has no map: its columns correspond
        elif self.ablation in ("mean", "optimal"):  # optimal: the learned constants
            assert self.means is not None
            cache = broadcast_constants(self.means, batch.clean.shape[0])
        elif self.units == "edges":
            shape = (*batch.clean.shape, len(edges.writer_names(self.model.config)), self.model.config.d_model)
            cache = {edges.WRITERS: jnp.zeros(shape, jnp.float32)}
        else:
            shape = batch.clean.shape + (self.model.config.d_model,)
            cache = {s: jnp.zeros(shape, jnp.float32) for s in self.sites}
        return jax.lax.stop_gradient(cache)

    def reference(self, batch: Batch, key: PRNGKeyArray) -> tuple[Float[Array, "batch vocab"], Replacement]:
        """The full model's last-position logits on ``batch.clean`` and the replacements (one
        compiled program: the polish's oracle, the adversaries and the graders call it outside a
        step, where op-by-op dispatch compiled each operation of the forward pass separately)."""
        return _reference(self, batch, key)

    def logits(self, tokens: Int[Array, "batch seq"], keep: Mask, replacement: Replacement):
        """Last-position logits of the scrubbed model."""
        if self.units == "edges":
            return last(edges.run(self.model, tokens, keep, replacement, last=True)[0])
        positional = self.positions is not None
        if positional and tokens.shape[1] != self.positions:
            raise ExplainerError(
                f"position-specific masks were built for prompts of length {self.positions}, got {tokens.shape[1]}; "
                "use prompts of one length (or masks that are not position-specific)"
            )
        return last(scrubbed_logits(self.model, tokens, keep, replacement, self.bases, self.remat, positional, True))


def _is_learned(x) -> bool:
    return isinstance(x, LearnedBasis)


@eqx.filter_jit
def _reference(scrubber: Scrubber, batch: Batch, key: PRNGKeyArray) -> tuple[Float[Array, "batch vocab"], Replacement]:
    full = jax.lax.stop_gradient(last(scrubber.model(batch.clean, last=True)))
    return full, scrubber.replacement(batch, key)


class ReferenceCache(eqx.Module):
    """The full model's last-position logits and site residuals on every training prompt.

    The reference and the replacements do not depend on the masks, so they are computed once
    instead of twice per step. For permutation resampling the cache holds the clean prompts'
    residuals, which a batch then permutes.
    """

    full: Float[Array, "n vocab"]
    sources: Replacement | None
    permute: bool = eqx.field(static=True)

    def take(self, scrubber: Scrubber, batch: Batch, index: Int[Array, " b"], key: PRNGKeyArray):
        """``(full, replacement)`` for the prompts at ``index`` (same values as ``reference``)."""
        full = self.full[index]
        if self.sources is None:  # mean and zero ablations need no forward pass
            return full, scrubber.replacement(batch, key)
        repl = {s: v[index] for s, v in self.sources.items()}
        if self.permute:
            perm = same_length_permutation(key, batch.clean)
            repl = {s: v[perm] for s, v in repl.items()}
        return full, repl


def cache_bytes(scrubber: Scrubber, data: Batch) -> int:
    """Memory a :class:`ReferenceCache` of ``data`` would take."""
    n, seq = data.clean.shape
    cfg = scrubber.model.config
    per_position = len(edges.writer_names(cfg)) if scrubber.units == "edges" else len(scrubber.sites)
    itemsize = scrubber.model.W_E.dtype.itemsize  # the residuals': the model's dtype; logits: float32
    return n * (itemsize * seq * cfg.d_model * per_position + 4 * cfg.vocab_out)


def build_cache(scrubber: Scrubber, data: Batch, chunk: int = 256) -> ReferenceCache:
    """Run the full model once over ``data`` and keep what every training step would recompute."""
    model, sites = scrubber.model, scrubber.sites
    run = lambda t: _capture(model, t, sites, scrubber.units)  # noqa: E731
    permute = scrubber.ablation == "resample" and data.corrupt is None
    fulls, sources = [], {}
    for start in range(0, len(data), chunk):
        part = data.take(jnp.arange(start, min(start + chunk, len(data))))
        logits, _ = run(part.clean)
        fulls.append(last(logits))
        if scrubber.ablation == "resample":
            _, cache = run(part.clean) if permute else run(part.corrupt)
            for site, value in part.at_clean_positions(cache).items():
                sources.setdefault(site, []).append(value)
    joined = {s: jnp.concatenate(v) for s, v in sources.items()} if scrubber.ablation == "resample" else None
    return ReferenceCache(jnp.concatenate(fulls), joined, permute)


def site_means(
    model: Transformer, tokens: Int[Array, "batch seq"], sites, chunk: int = 256, units: str = "dims"
) -> SiteMeans:
    """Per-position mean of the full model's residual at each site over ``tokens`` (edges: of every
    writer's output, ``{"writers": [seq, writers, d_model]}``). Left padding is left out: the mean
    at a position is over the prompts that reach it (and zero where none does)."""
    run = lambda t: _capture(model, t, sites, units)[1]  # noqa: E731
    padded = bool((tokens < 0).any())
    totals: dict[str, jax.Array] = {}
    for start in range(0, tokens.shape[0], chunk):
        part = tokens[start : start + chunk]
        cache = run(part)
        for site, h in cache.items():
            if padded:  # zero the padding positions: [batch, seq] -> broadcast over the trailing axes
                real = (part >= 0).reshape(*part.shape, *(1,) * (h.ndim - 2))
                h = jnp.where(real, h, 0.0)
            totals[site] = totals.get(site, 0.0) + h.sum(0, dtype=jnp.float32)  # float32 means, whatever the model's
    if not padded:
        return {site: total / tokens.shape[0] for site, total in totals.items()}
    counts = (tokens >= 0).sum(0).astype(jnp.float32)
    return {s: t / jnp.maximum(counts, 1.0).reshape(-1, *(1,) * (t.ndim - 1)) for s, t in totals.items()}
