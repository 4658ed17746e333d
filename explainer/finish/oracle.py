"""The KL oracle every finishing search scores masks with, and how a round picks its candidates.

The KL is that of a finished (binary) explanation on a fixed subset of the training prompts with one
fixed replacement, so a search's result is deterministic. Candidates are scored by
:class:`explainer.score.Scorer` (vmapped chunks sized to the work of one mask, on every CPU core),
with the scores one thread would give; prompts of mixed lengths in length groups
(:class:`explainer.score.GroupedScorer`), each padded only to its own longest prompt.

Where a round has more candidates than :data:`SHORTLIST`, every candidate is first scored on the
oracle's first :data:`SCREEN_PROMPTS` prompts (its ``screen``: the same prompts and replacement,
fewer of them), and only the most promising are scored on all of them (:func:`shortlist`). A
search that moves blocks of units may draw them past the shortlist, in the screen's order
(:func:`extended`): a block is taken only when it holds on every prompt.

Where a round's candidates fit a fixed cost, every candidate is evaluated (:func:`exact`): at most
:data:`EXACT_UNITS` of them, and at most :data:`EXACT_FLOPS` to score them all on the screen (by
:meth:`~explainer.models.config.ModelConfig.scored_flops`), so that a wide or deep model of few
units is not searched exhaustively. Otherwise the candidates are first ranked by attribution: the
gradient of the KL with respect to the mask (one backward pass, :meth:`KLOracle.attribution`) gives
each unit's first-order effect, and only the best :data:`RANK_BOUND` are screened
(:func:`candidates`; repair and prune score prefixes of that order, and of one taken halfway,
instead: :mod:`explainer.finish.search`). :attr:`KLOracle.evaluations` counts the masks a search
scored.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from explainer.score import GroupedScorer, Reference, kl_and_logit_diff, mean_kl, mean_logit_diff, scoring_groups
from explainer.scrub import Scrubber
from explainer.tasks.base import Batch

SCREEN_PROMPTS = 32  # prompts of the screen that ranks a round's candidates
SHORTLIST = 32  # candidates of a round scored on every prompt
MAX_ORACLE_PROMPTS = 256  # prompts an oracle scores, the first of its data
EXACT_UNITS = 512  # a round with at most this many candidates scores every one (every shipped model)
EXACT_FLOPS = 1e11  # ... and when scoring them all costs at most this (every ground-truth model)
RANK_BOUND = 128  # beyond that, the candidates a round screens, ranked first by attribution


@eqx.filter_jit
def _references(scrubber: Scrubber, data: Batch, key, n: int, screen: int) -> tuple[Reference, Reference | None]:
    """What an oracle scores against: the first ``n`` prompts of ``data`` and (``screen`` > 0) the
    first ``screen`` of them, with one replacement. One compiled program: op by op, each slice is
    compiled on its own."""
    whole = Reference.of(scrubber, jax.tree.map(lambda x: x[:n], data), key)
    return whole, (whole.head(screen) if screen else None)


class KLOracle:
    """Exact mean KL (and logit difference recovered) of binary keep masks on a fixed set of
    prompts (flat masks over all units): the first ``max_prompts`` of ``data``, with one fixed
    replacement, scored by a :class:`explainer.score.GroupedScorer`. Prompts of one length (every
    shipped model), or lengths not worth a group's compile, are one group, padded together as one
    :class:`~explainer.score.Reference`; prompts of mixed lengths are scored in length groups,
    each padded only to its own longest prompt, with the resample partners of all of them (the
    same scores, to float rounding, as padding all together). Its ``screen`` is the same oracle on
    the first ``screen_prompts`` of them (``None`` when there are no more than that), on which
    :func:`shortlist` ranks candidates: the same prompts and replacement, fewer of them (over
    length groups, each group's rows among those prompts).

    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> from explainer.tasks import resolve_task
    >>> folder = resolve_model("planted-distractor")
    >>> task = resolve_task(None, folder)
    >>> oracle = KLOracle(Scrubber.build(load_model(folder), task.train_data()), task.train_data())
    >>> [round(float(v), 6) for v in oracle.kl(np.ones((1, oracle.n_units)))]
    [0.0]
    """

    def __init__(
        self,
        scrubber: Scrubber,
        data: Batch,
        seed: int = 0,
        max_prompts: int = MAX_ORACLE_PROMPTS,
        chunk: int | None = None,
        screen_prompts: int = SCREEN_PROMPTS,
    ):
        n = min(len(data), max_prompts)
        screen = screen_prompts if 0 < screen_prompts < n else 0  # a screen only when it has fewer prompts
        # the cost of scoring one mask where a round scores every candidate: on the screen if any
        self.mask_flops = scrubber.model.config.scored_flops(int(data.clean.shape[1])) * (screen or n)
        key = jax.random.key(seed)
        if len(scoring_groups(scrubber, data.clean[:n])) == 1:  # one length: one padded reference
            whole, head = _references(scrubber, data, key, n, screen)
            self._set(GroupedScorer(scrubber, [np.arange(n)], [whole], chunk=chunk))
            heads = None if head is None else GroupedScorer(scrubber, [np.arange(screen)], [head], chunk=chunk)
        else:
            self._set(GroupedScorer.of(scrubber, data.take(jnp.arange(n)), key, chunk=chunk))
            heads = self.scorer.head(screen, chunk) if screen else None
        self.screen: KLOracle | None = None  # the first screen_prompts prompts, when there are more
        if heads is not None:
            self.screen = KLOracle.__new__(KLOracle)
            self.screen._set(heads)
            self.screen.mask_flops = self.mask_flops
            self.screen.screen = None

    def _set(self, scorer: GroupedScorer) -> None:
        self.scorer, self.scrubber, self.layout = scorer, scorer.scrubber, scorer.layout
        self.n_units = self.layout.n_units
        self.full_logit_diff = float(scorer.weighted([float(mean_logit_diff(r.full, r)) for r in scorer.refs]))
        self._memory: dict[bytes, tuple[float, float]] = {}
        self._evaluated = 0  # distinct masks scored (forward passes of one mask)
        self.gradients = 0  # attributions computed (backward passes of one mask)

    @property
    def chunk(self) -> int:
        return self.scorer.chunk

    @property
    def workers(self) -> int:
        return self.scorer.workers

    @workers.setter
    def workers(self, n: int) -> None:
        self.scorer.workers = n

    @property
    def evaluations(self) -> int:
        """Masks scored so far, on all prompts and on the screen together."""
        return self._evaluated + (self.screen.evaluations if getattr(self, "screen", None) is not None else 0)

    def attribution(self, flat: np.ndarray) -> np.ndarray:
        """Each unit's first-order effect on the KL at ``flat``: ``∂KL/∂m``, on the screen's prompts
        when there is a screen (one backward pass per length group)."""
        return self.gradient((np.asarray(flat, np.float32) > 0.5).astype(np.float32))

    def gradient(self, point: np.ndarray) -> np.ndarray:
        """``∂KL/∂m`` at a relaxed flat mask ``point`` (entries in [0, 1]), as :meth:`attribution`."""
        source = self.screen if getattr(self, "screen", None) is not None else self
        self.gradients += 1
        return source.scorer.gradients(np.asarray(point, np.float32)[None], mean_kl)[0]

    def kl(self, masks: np.ndarray) -> np.ndarray:
        """Mean KL of each row of ``masks`` (``[k, units]``).

        Rows already evaluated are answered from memory (the searches re-score many of the same
        masks: rungs of a ladder that prune to the same set, unchanged candidates across rounds).
        """
        return self._scores(masks)[:, 0]

    def logit_diff_recovered(self, masks: np.ndarray) -> np.ndarray:
        """Mean logit difference of each row's explanation over the full model's (same prompts)."""
        scores = self._scores(masks)[:, 1]
        return scores / self.full_logit_diff if self.full_logit_diff != 0 else np.full(len(scores), np.nan)

    def _scores(self, masks: np.ndarray) -> np.ndarray:
        masks = np.atleast_2d(np.asarray(masks, np.float32)) > 0.5
        keys = [row.tobytes() for row in np.packbits(masks, axis=1)]
        first: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self._memory:
                first.setdefault(key, i)
        todo = list(first.values())  # one evaluation per distinct new row
        self._evaluated += len(todo)
        if todo:
            scores = self.scorer.mean(masks[todo].astype(np.float32), kl_and_logit_diff)
            for i, (a, b) in zip(todo, scores, strict=True):
                self._memory[keys[i]] = (float(a), float(b))
        return np.array([self._memory[key] for key in keys], np.float64).reshape(len(keys), 2)

    def flat(self, keep: dict[str, np.ndarray]) -> np.ndarray:
        return self.layout.flat(keep)

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return self.layout.split(np.asarray(flat) > 0.5)


def candidates(oracle: KLOracle, flat: np.ndarray, units: np.ndarray, value: float) -> np.ndarray:
    """``units`` whose mask entries a search would set to ``value``: all of them where a round
    scores every candidate (:func:`exact`), else the :data:`RANK_BOUND` whose change the
    KL's gradient predicts to lower the KL most (:meth:`KLOracle.attribution`), in unit order.

    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> from explainer.tasks import resolve_task
    >>> folder = resolve_model("planted-distractor")
    >>> task = resolve_task(None, folder)
    >>> oracle = KLOracle(Scrubber.build(load_model(folder), task.train_data()), task.train_data())
    >>> candidates(oracle, np.zeros(oracle.n_units), np.arange(oracle.n_units), 1.0).size  # few: all
    20
    """
    units = np.asarray(units)
    if exact(oracle) or units.size <= RANK_BOUND:
        return units
    change = oracle.attribution(flat)[units] * (value - np.asarray(flat, np.float64)[units])
    return np.sort(units[np.argsort(change, kind="stable")[:RANK_BOUND]])


def exact(oracle: KLOracle) -> bool:
    """Whether searches on ``oracle``'s model score every candidate, one unit a round, as long as
    they need: models of at most :data:`EXACT_UNITS` units whose every unit's mask costs at most
    :data:`EXACT_FLOPS` to score in all (every ground-truth model; not a wide model of few units,
    such as a 2-layer model of Qwen2.5's width with 382 edges)."""
    return oracle.n_units <= EXACT_UNITS and oracle.n_units * oracle.mask_flops <= EXACT_FLOPS


def within(oracle: KLOracle, flat: np.ndarray, budget: float, ld_floor: float | None = None) -> bool:
    """``flat``'s KL is within ``budget`` and, with ``ld_floor``, its logit difference recovered at
    least ``ld_floor`` (the oracle's prompts): what :func:`~explainer.finish.search.trim` keeps to.
    A KL that is not finite (a refit rotation gone to NaN) is never within."""
    if not oracle.kl(flat)[0] <= budget:
        return False
    return ld_floor is None or bool(oracle.logit_diff_recovered(flat)[0] >= ld_floor)


def _kl_rows(oracle: KLOracle, rows: np.ndarray) -> np.ndarray:
    return oracle.kl(rows) if len(rows) else np.zeros(0)


def shortlist(oracle: KLOracle, rows: np.ndarray, keep: int = SHORTLIST) -> np.ndarray:
    """The KL of each row of ``rows``: exact for the ``keep`` rows with the lowest KL on the
    oracle's screen, ``inf`` for the rest (all exact when there are no more than ``keep`` rows or
    the oracle has no screen).

    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> from explainer.tasks import resolve_task
    >>> folder = resolve_model("planted-distractor")
    >>> task = resolve_task(None, folder)
    >>> oracle = KLOracle(Scrubber.build(load_model(folder), task.train_data()), task.train_data())
    >>> kls = shortlist(oracle, np.eye(oracle.n_units, dtype=np.float32), keep=3)
    >>> int(np.isfinite(kls).sum()), bool(kls.min() == oracle.kl(np.eye(oracle.n_units)).min())
    (3, True)
    """
    return screened(oracle, rows, keep)[0]


def screened(oracle: KLOracle, rows: np.ndarray, keep: int = SHORTLIST) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`shortlist`'s KLs, and each row's KL on the screen (``None`` where every row was
    scored exactly)."""
    if oracle.screen is None or len(rows) <= keep:
        return _kl_rows(oracle, rows), None
    on_screen = oracle.screen.kl(rows)
    best = np.argsort(on_screen, kind="stable")[:keep]
    out = np.full(len(rows), np.inf)
    out[best] = oracle.kl(rows[best])
    return out, on_screen


def extended(oracle: KLOracle, flat: np.ndarray, order: np.ndarray, kls: np.ndarray, screen, better) -> np.ndarray:
    """``order`` (indices of rows scored exactly, best first) followed by the rows the shortlist
    left out whose screen KL ``better(kl, the screen's KL of flat)`` accepts, the best first: the
    longer list a round's blocks are drawn from. A block is checked on every prompt before it is
    taken, so the screen only proposes."""
    if screen is None:
        return order
    base = float(oracle.screen.kl(flat)[0])
    rest = [i for i in np.argsort(screen, kind="stable") if not np.isfinite(kls[i]) and better(float(screen[i]), base)]
    return np.concatenate([order, np.asarray(rest, order.dtype)])
