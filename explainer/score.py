"""Scoring stacks of keep masks: the one place where masks meet prompts.

A :class:`Reference` is a fixed set of prompts and what every mask is scored against there: the
full model's logits and one replacement. A :class:`Scorer` evaluates a stack of flat keep masks
``[K, units]`` (in its :class:`~explainer.masks.Layout`'s order) on one reference with one policy:

- masks are evaluated ``chunk`` at a time under ``vmap``; ``chunk`` defaults to
  :func:`mask_chunk`, so that one call holds about :data:`CHUNK_ELEMENTS` residual elements;
- a short last chunk is padded by repeating its last row, so that every call has one shape and
  compiles once per reduction (a compile costs more than the padded rows on any model);
- chunks run on CPU threads (:func:`explainer.parallel.cpu_workers`), one chunk per thread.

What a mask yields is a *reduction* of its scrubbed logits against the reference: the mean KL,
the mean KL and logit difference, the per-prompt divergence from reference logits, or the logits
themselves. Reductions are module-level functions or frozen dataclasses, so that a compiled
program is reused by every call that asks for the same one. :func:`evaluate_keep` and
:func:`measure` score masks on every prompt of a batch (in chunks of prompts, each with its own
replacement) for evaluation and the frontier; the searches (``polish``, ``baselines``, the
discrete adversaries) hold one :class:`Scorer` on a fixed subset of prompts, or a
:class:`GroupedScorer` (one per length group) where those prompts have mixed lengths.

>>> from explainer.models import load_model
>>> from explainer.tasks import resolve_task
>>> from explainer.zoo import resolve_model
>>> folder = resolve_model("planted-distractor")
>>> data = resolve_task(None, folder).train_data()
>>> scrubber = Scrubber.build(load_model(folder), data)
>>> scorer = Scorer(scrubber, Reference.of(scrubber, data.take(jnp.arange(32)), jax.random.key(0)))
>>> [round(float(v), 6) for v in scorer(np.ones((2, scorer.layout.n_units)), mean_kl)]
[0.0, 0.0]
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from explainer import metrics
from explainer.masks import Layout, Mask
from explainer.metrics import divergence, kl_divergence, logit_diff
from explainer.models.padding import MIN_SAVING, last_columns, length_groups, lengths, same_length_permutation
from explainer.parallel import cpu_workers, thread_map
from explainer.scrub import Replacement, Scrubber, SiteMeans, broadcast_constants
from explainer.tasks.base import Batch

CHUNK_ELEMENTS = 2**18  # residual elements (prompts × positions × d_model) one vmapped call should hold
MAX_CHUNK = 64  # masks per vmapped call, at most
PROMPT_CHUNK = 512  # prompts per reference when a whole batch is scored (evaluate_keep, measure)
TRACES: collections.Counter[str] = collections.Counter()  # traces of the compiled evaluations (tests)


class Reference(NamedTuple):
    """Prompts and what masks are scored against on them: ``full`` (logits at the last position;
    the full model's, or any other reference such as a scrubbed run's) and one ``replacement``."""

    tokens: Int[Array, "batch seq"]
    full: Float[Array, "batch vocab"]
    replacement: Replacement
    answers: Int[Array, "batch n_answers"]
    wrong_answers: Int[Array, "batch n_wrong"]

    @classmethod
    def of(cls, scrubber: Scrubber, batch: Batch, key: PRNGKeyArray) -> Reference:
        full, replacement = scrubber.reference(batch, key)
        return cls(batch.clean, full, replacement, batch.answers, batch.wrong_answers)

    def against(self, logits: Float[Array, "batch vocab"]) -> Reference:
        """The same prompts and replacement, scored against ``logits`` instead."""
        return self._replace(full=logits)

    def head(self, n: int) -> Reference:
        """The first ``n`` prompts."""
        return jax.tree.map(lambda x: x[:n], self)


# --- reductions: (scrubbed logits, reference) -> what one mask yields -----------------------------


def mean_kl(logits, ref: Reference):
    """Mean KL(full ‖ scrubbed) over the prompts."""
    return kl_divergence(ref.full, logits).mean()


def kl_and_logit_diff(logits, ref: Reference):
    """Mean KL and mean logit difference over the prompts, as ``[2]``."""
    return jnp.stack(
        [kl_divergence(ref.full, logits).mean(), logit_diff(logits, ref.answers, ref.wrong_answers).mean()]
    )


def mean_logit_diff(logits, ref: Reference):
    """Mean logit difference of the scrubbed model."""
    return logit_diff(logits, ref.answers, ref.wrong_answers).mean()


def scrubbed(logits, ref: Reference):
    """The scrubbed logits themselves (``[prompts, vocab]``)."""
    return logits


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Per-prompt divergence ``kind`` (:func:`explainer.metrics.divergence`) of the scrubbed
    logits from the reference's, as ``[prompts]`` (``mean=False``) or their mean."""

    kind: str
    mean: bool = False

    def __call__(self, logits, ref: Reference):
        values = divergence(self.kind, ref.full, logits)
        return values.mean() if self.mean else values


Reduction = Callable[[Array, Reference], Any]


# --- the one evaluation policy --------------------------------------------------------------------


def mask_chunk(n_prompts: int, positions: int, d_model: int) -> int:
    """Masks per vmapped call: a power of two from 1 to :data:`MAX_CHUNK` whose prompts ×
    positions × ``d_model`` comes nearest :data:`CHUNK_ELEMENTS`.

    >>> mask_chunk(256, 15, 64), mask_chunk(32, 15, 64), mask_chunk(256, 4, 10)
    (1, 8, 32)
    """
    per_mask = n_prompts * positions * d_model
    return int(min(MAX_CHUNK, max(1, 2 ** round(math.log2(CHUNK_ELEMENTS / per_mask)))))


@eqx.filter_jit
def _evaluate(scrubber: Scrubber, ref: Reference, rows, layout: Layout, reduce: Reduction, constants):
    TRACES["evaluate"] += 1

    def one(row, consts):
        replacement = ref.replacement if consts is None else broadcast_constants(consts, ref.tokens.shape[0])
        return reduce(scrubber.logits(ref.tokens, layout.split(row), replacement), ref)

    if constants is None:
        return jax.vmap(lambda row: one(row, None))(rows)
    return jax.vmap(one)(rows, constants)


@eqx.filter_jit
def _gradients(scrubber: Scrubber, ref: Reference, points, layout: Layout, reduce: Reduction):
    TRACES["gradients"] += 1

    def value(row):
        return reduce(scrubber.logits(ref.tokens, layout.split(row), ref.replacement), ref)

    return jax.vmap(jax.grad(value))(points)


class Scorer:
    """Stacks of flat keep masks scored on one :class:`Reference` (see the module docstring)."""

    def __init__(
        self,
        scrubber: Scrubber,
        ref: Reference,
        layout: Layout | None = None,
        chunk: int | None = None,
        workers: int | None = None,
    ):
        self.scrubber, self.ref = scrubber, ref
        self.layout = Layout.of([(s, scrubber.n_units[s]) for s in scrubber.sites]) if layout is None else layout
        tokens = np.shape(ref.tokens)
        self.chunk = mask_chunk(tokens[0], tokens[1], scrubber.model.config.d_model) if chunk is None else chunk
        self.workers = cpu_workers() if workers is None else workers

    def __call__(self, rows: np.ndarray, reduce: Reduction, constants: Sequence[SiteMeans] | None = None) -> np.ndarray:
        """``reduce`` of each row's scrubbed logits, stacked (host float64). With ``constants``
        (one per row, ``optimal`` ablation) each row replaces its excluded units by its own."""
        rows = np.atleast_2d(np.asarray(rows, np.float32))
        if not len(rows):
            return np.zeros((0,), np.float64)

        def run(padded: np.ndarray, start: int, n: int):
            consts = None
            if constants is not None:
                group = list(constants[start : start + n])
                group += [group[-1]] * (self.chunk - n)
                consts = {s: jnp.stack([c[s] for c in group]) for s in group[0]}
            return _evaluate(self.scrubber, self.ref, jnp.asarray(padded), self.layout, reduce, consts)

        return self._chunked(rows, run)

    def gradients(self, points: np.ndarray, reduce: Reduction) -> np.ndarray:
        """The gradient of ``reduce`` (a scalar one) with respect to the relaxed flat mask, at each
        row of ``points`` (one backward pass per row), ``chunk`` rows per call as scoring does, so
        that many rows (integrated gradients' steps) on a large batch fit in memory."""
        points = np.atleast_2d(np.asarray(points, np.float32))
        if len(points) <= self.chunk:  # one call of the rows as they are
            return np.asarray(_gradients(self.scrubber, self.ref, jnp.asarray(points), self.layout, reduce), np.float64)
        return self._chunked(
            points,
            lambda padded, start, n: _gradients(self.scrubber, self.ref, jnp.asarray(padded), self.layout, reduce),
        )

    def _chunked(self, rows: np.ndarray, run: Callable[[np.ndarray, int, int], Any]) -> np.ndarray:
        """``run(padded, start, n)`` on each chunk of ``rows`` (its first row ``start``, ``n`` rows,
        padded to ``chunk`` by repeating the last, so that every call has one shape), chunks on CPU
        threads; the first ``n`` results of each, concatenated (host float64)."""

        def chunk(start: int) -> np.ndarray:
            part = rows[start : start + self.chunk]
            padded = np.concatenate([part, np.repeat(part[-1:], self.chunk - len(part), axis=0)])
            return np.asarray(run(padded, start, len(part)), np.float64)[: len(part)]

        return np.concatenate(thread_map(chunk, range(0, len(rows), self.chunk), self.workers))


class GroupedScorer:
    """A :class:`Scorer` per length group of a batch's prompts (``groups``, index arrays, and
    ``refs`` as :func:`length_references` gives them): what scoring the batch at once gives, to
    float rounding, with each group padded only to its own longest prompt. Per-prompt values come
    back in the batch's order; a mean over prompts, and its gradient, is the groups' weighted by
    their prompts. One group is its :class:`Scorer`'s results as they are, bit for bit.

    >>> from explainer.models import load_model
    >>> from explainer.models.padding import pad_left
    >>> from explainer.tasks import Batch, resolve_task
    >>> from explainer.zoo import resolve_model
    >>> folder = resolve_model("planted-distractor")
    >>> scrubber = Scrubber.build(load_model(folder), resolve_task(None, folder).train_data())
    >>> tokens = jnp.asarray(pad_left([[1, 2, 3, 4]] * 2 + [[5]] * 8))
    >>> batch = Batch(tokens, None, jnp.zeros((10, 1), jnp.int32), jnp.ones((10, 1), jnp.int32))
    >>> grouped = GroupedScorer.of(scrubber, batch, jax.random.key(0))
    >>> rows = np.ones((1, grouped.layout.n_units))
    >>> len(grouped.groups), grouped.per_prompt(rows, Divergence("kl")).shape, grouped.mean(rows, mean_kl).tolist()
    (2, (1, 10), [0.0])
    """

    def __init__(self, scrubber: Scrubber, groups, refs, layout=None, chunk=None, workers=None):
        self.groups = [np.asarray(g) for g in groups]
        self.scorers = [Scorer(scrubber, ref, layout, chunk, workers) for ref in refs]
        self.scrubber, self.layout = scrubber, self.scorers[0].layout
        self.n_prompts = sum(len(g) for g in self.groups)

    @classmethod
    def of(cls, scrubber: Scrubber, batch: Batch, key: PRNGKeyArray, layout=None, chunk=None) -> GroupedScorer:
        """``batch``'s prompts in :func:`length_references`' groups, replacements drawn with ``key``."""
        return cls(scrubber, *length_references(scrubber, batch, key), layout, chunk)

    @property
    def refs(self) -> list[Reference]:
        return [s.ref for s in self.scorers]

    @property
    def chunk(self) -> int:
        """Masks per vmapped call (the largest of the groups'); setting it sets every group's."""
        return max(s.chunk for s in self.scorers)

    @chunk.setter
    def chunk(self, n: int) -> None:
        for s in self.scorers:
            s.chunk = n

    @property
    def workers(self) -> int:
        return self.scorers[0].workers

    @workers.setter
    def workers(self, n: int) -> None:
        for s in self.scorers:
            s.workers = n

    def per_prompt(self, rows: np.ndarray, reduce: Reduction) -> np.ndarray:
        """``reduce`` (per prompt: prompts on axis 1) of each row, in the batch's order of prompts."""
        return in_order(self.groups, [s(rows, reduce) for s in self.scorers], axis=1)

    def mean(self, rows: np.ndarray, reduce: Reduction) -> np.ndarray:
        """``reduce`` (a mean over prompts, such as :func:`mean_kl`) of each row, over all prompts."""
        return self.weighted([s(rows, reduce) for s in self.scorers])

    def gradients(self, points: np.ndarray, reduce: Reduction) -> np.ndarray:
        """:meth:`Scorer.gradients` of ``reduce`` (a scalar mean over prompts) over all prompts."""
        return self.weighted([s.gradients(points, reduce) for s in self.scorers])

    def weighted(self, values: Sequence[Any]):
        """Per-group means (one per group) as the mean over all prompts; one group's as it is."""
        if len(values) == 1:
            return values[0]
        return sum(v * (len(g) / self.n_prompts) for v, g in zip(values, self.groups, strict=True))

    def head(self, n: int, chunk: int | None = None) -> GroupedScorer:
        """The first ``n`` prompts, scored as here: each group's rows among them, the same references."""
        groups, refs = [], []
        for group, ref in zip(self.groups, self.refs, strict=True):
            rows = np.flatnonzero(group < n)
            rows = rows[np.argsort(group[rows], kind="stable")]  # the batch's order within a group
            if rows.size:
                groups.append(group[rows])
                refs.append(_rows(ref, jnp.asarray(rows)))
        return GroupedScorer(self.scrubber, groups, refs, self.layout, chunk, self.workers)


@eqx.filter_jit
def _rows(ref: Reference, rows) -> Reference:
    """Rows ``rows`` of every array of ``ref`` (one compiled program, not one per array)."""
    return jax.tree.map(lambda x: x[rows], ref)


# --- every prompt of a batch ----------------------------------------------------------------------


def prompt_stats(logits, ref: Reference):
    """Per prompt, what :func:`explainer.metrics.summarise` reads (``[prompts, 4]``)."""
    return metrics.prompt_stats(ref.full, logits, ref.answers, ref.wrong_answers)


# the full model's own stats, as one compiled program (op by op, each op compiles for each new
# number of prompts)
_full_stats = jax.jit(prompt_stats)


FIT_PROMPTS = 256  # prompts a ranking fits on (the first of the batch)
IG_STEPS = 16  # points on the path of integrated gradients


def fit_scorer(scrubber: Scrubber, batch: Batch, key: PRNGKeyArray) -> Scorer:
    """The scorer of the fitting prompts: the first :data:`FIT_PROMPTS` of ``batch``, one replacement."""
    fit = batch.take(jnp.arange(min(len(batch), FIT_PROMPTS)))
    return Scorer(scrubber, Reference.of(scrubber, fit, key))


def attribution(scorer: Scorer, steps: int = 1) -> np.ndarray:
    """Attribution patching per unit of ``scorer``'s flat layout (higher = more important): the size of
    the gradient of the mean logit difference with respect to the keep mask, at keep = 1 (``steps``
    1: one backward pass) or averaged over ``steps`` points on the path from 0 to 1 (integrated
    gradients)."""
    alphas = (np.arange(steps, dtype=np.float32) + 0.5) / steps if steps > 1 else np.ones(1, np.float32)
    grads = scorer.gradients(alphas[:, None] * np.ones((1, scorer.layout.n_units), np.float32), mean_logit_diff)
    return np.abs(grads.mean(axis=0))


def measure(
    scrubber: Scrubber,
    batch: Batch,
    masks: Sequence[dict[str, Any]],
    seed: int = 0,
    constants: Sequence[SiteMeans] | None = None,
    chunk: int = PROMPT_CHUNK,
) -> list[dict[str, float]]:
    """Faithfulness of each binary keep mask (``{site: vector}``) on every prompt of ``batch``:
    the keys of :func:`explainer.metrics.faithfulness`, plus the task ``loss`` and ``loss_full``
    (from :func:`prompt_scores`)."""
    masks = list(masks)
    if not masks:
        return []
    full, stats = prompt_scores(scrubber, batch, masks, seed, constants, chunk)
    return [metrics.summarise(row, full) for row in stats]


def prompt_scores(
    scrubber: Scrubber,
    batch: Batch,
    masks: Sequence[dict[str, Any]],
    seed: int = 0,
    constants: Sequence[SiteMeans] | None = None,
    chunk: int = PROMPT_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt :func:`prompt_stats` of the full model (``[prompts, 4]``) and of each mask
    (``[masks, prompts, 4]``), in the order of ``batch``'s prompts.

    Prompts are scored ``chunk`` at a time, each chunk against its own replacement (key
    ``fold_in(seed, start)``); ``constants`` gives each mask its own ``optimal`` ablation constants
    (from :func:`explainer.optimal.fit_constants`). Within a chunk, prompts of similar length are
    scored together, each group padded only to its own longest prompt
    (:func:`~explainer.models.padding.length_groups`): the same numbers, to float rounding, as the
    chunk scored at once (a resampled prompt reads the prompt the chunk's permutation gives it).
    """
    layout = Layout.of([(s, scrubber.n_units[s]) for s in scrubber.sites])
    rows = np.stack([layout.flat(m, np.float32) for m in masks])
    key = jax.random.key(seed)
    fulls, parts = [], []
    for start in range(0, len(batch), chunk):
        part = batch.take(jnp.arange(start, min(start + chunk, len(batch))))
        groups, refs = length_references(scrubber, part, jax.random.fold_in(key, start))
        scored = []
        for ref in refs:
            width = ref.tokens.shape[1]
            consts = None if constants is None else [last_columns(c, width, axis=0) for c in constants]
            scored.append((_full_stats(ref.full, ref), Scorer(scrubber, ref, layout)(rows, prompt_stats, consts)))
        fulls.append(in_order(groups, [np.asarray(f) for f, _ in scored]))
        parts.append(in_order(groups, [p for _, p in scored], axis=1))
    return np.concatenate(fulls), np.concatenate(parts, axis=1)


def length_references(scrubber: Scrubber, batch: Batch, key: PRNGKeyArray) -> tuple[list[np.ndarray], list[Reference]]:
    """``batch``'s prompts in length groups (:func:`~explainer.models.padding.length_groups`, as
    index arrays) and a :class:`Reference` for each, narrowed to the group's longest prompt: what
    scoring every prompt of a batch costs less with, where a few long prompts would pad many short
    ones. Each prompt's numbers are those of ``Reference.of(scrubber, batch, key)``, to float
    rounding: resample partners are drawn on the whole batch before it is cut (the same
    permutation), and per-position replacements and constants are cut to each group's last
    columns. One group (one length, or groups not worth their compile) is
    ``Reference.of(scrubber, batch, key)`` itself, less any columns that are padding in every prompt;
    position-specific masks keep one group. Per-group results go back in order with :func:`in_order`.

    >>> from explainer.models import load_model
    >>> from explainer.models.padding import pad_left
    >>> from explainer.tasks import Batch, resolve_task
    >>> from explainer.zoo import resolve_model
    >>> folder = resolve_model("planted-distractor")
    >>> scrubber = Scrubber.build(load_model(folder), resolve_task(None, folder).train_data())
    >>> tokens = jnp.asarray(pad_left([[1, 2, 3, 4]] * 2 + [[5]] * 8))
    >>> batch = Batch(tokens, None, jnp.zeros((10, 1), jnp.int32), jnp.ones((10, 1), jnp.int32))
    >>> groups, refs = length_references(scrubber, batch, jax.random.key(0))
    >>> [g.tolist() for g in groups], [r.tokens.shape for r in refs]
    ([[2, 3, 4, 5, 6, 7, 8, 9], [0, 1]], [(8, 1), (2, 4)])
    """
    groups = scoring_groups(scrubber, batch.clean)
    if len(groups) == 1:
        by_length = scrubber.positions is None
        return groups, [_narrowed(scrubber, batch.narrowed() if by_length else batch, key)]
    if scrubber.ablation == "resample" and batch.corrupt is None:  # fix the pairs first
        batch = dataclasses.replace(batch, corrupt=batch.clean[same_length_permutation(key, batch.clean)])
    return groups, [_narrowed(scrubber, batch.take(jnp.asarray(g)).narrowed(), key) for g in groups]


def scoring_groups(
    scrubber: Scrubber, tokens: Int[Array, "batch seq"], min_saving: float = MIN_SAVING
) -> list[np.ndarray]:
    """The length groups (:func:`~explainer.models.padding.length_groups`) in which
    :func:`length_references` scores prompts ``tokens`` (and training samples them, with its own
    ``min_saving``): one group under position-specific masks, which take prompts of one length."""
    if scrubber.positions is not None:
        return [np.arange(len(tokens))]
    return length_groups(np.asarray(lengths(jnp.asarray(tokens))), min_saving=min_saving)


def _narrowed(scrubber: Scrubber, batch: Batch, key: PRNGKeyArray) -> Reference:
    """The reference of a (narrowed) batch, its per-position replacement cut to the batch's width."""
    ref = Reference.of(scrubber, batch, key)
    return ref._replace(replacement=last_columns(ref.replacement, ref.tokens.shape[1]))


def in_order(groups: Sequence[np.ndarray], values: Sequence[Any], axis: int = 0):
    """Per-group values (prompts along ``axis``, groups as :func:`length_references` gives them)
    joined back into the prompts' own order; one group's values are returned as they are.

    >>> in_order([np.array([1, 2]), np.array([0])], [np.array([10, 20]), np.array([0])]).tolist()
    [0, 10, 20]
    """
    if len(groups) == 1:
        return values[0]
    back = np.argsort(np.concatenate(groups))
    joined = jnp.concatenate(values, axis=axis) if isinstance(values[0], jax.Array) else np.concatenate(values, axis)
    return joined.take(back, axis=axis)


def evaluate_keep(
    scrubber: Scrubber, batch: Batch, keep: Mask, seed: int = 0, chunk: int = PROMPT_CHUNK
) -> dict[str, float]:
    """Faithfulness of one (binary) keep mask on ``batch``, as plain floats (:func:`measure`)."""
    scores = measure(scrubber, batch, [keep], seed, chunk=chunk)[0]
    return {k: v for k, v in scores.items() if k not in ("loss", "loss_full")}
