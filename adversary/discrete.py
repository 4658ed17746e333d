"""Discrete adversaries: grade a finished explanation by re-including units it excluded.

A finished explanation is a binary keep mask ``m`` (``{site: 0/1 vector over units}``); it claims
that the units it excludes do not matter. An adversary picks a set ``a`` of at most ``budget``
excluded units and re-includes them: the reader sees the scrubbed run's own value there, i.e. the
keep mask becomes ``m ∨ a``. The *gap* of ``a`` is, per prompt, ``D(S_m ‖ S_{m∨a})`` between the
scrubbed model's last-position logits without and with ``a`` (``D`` is ``kl``, ``reverse_kl``
or ``symmetric``, see :func:`explainer.metrics.divergence`). Every adversary maximises the mean gap
over the batch, with one fixed replacement for every candidate set.

- ``greedy``: ``restarts`` × up to ``budget`` steps; each step adds the best of a sample of the
  remaining excluded units (the completeness search of Wang et al.'s IOI paper);
- ``random``: ``samples`` random sets, most of exactly ``budget`` units, some smaller;
- ``gradient``: rank the remaining units by the gradient of the mean gap with respect to a relaxed
  re-inclusion vector, verify the top ``verify`` exactly, add the best, repeat;
- ``exhaustive``: every set of 1..``budget`` units; refuses above ``max_sets`` sets. Among
  :func:`attack_all`'s methods it runs only where scoring every set is cheap
  (:data:`EXHAUSTIVE_FLOPS`), so an attack with every method scores a number of sets bounded by
  the settings, whatever the number of excluded units.

Whatever a method proposes is evaluated exactly, in chunks of ``chunk`` sets vmapped over
candidates (padded to a fixed size, so each (scrubber, batch) shape compiles once; by default the
size :func:`explainer.score.mask_chunk` gives every scorer, which holds a fixed amount of work
whatever the model's width and the prompts' number), and the best set
any of its evaluations found wins. Re-including a unit can also make the scrubbed model *better*
(cancellation): the gap measures any change, in either direction.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from explainer.errors import ExplainerError, did_you_mean
from explainer.masks import Layout
from explainer.metrics import DIVERGENCES, accuracy, divergence, logit_diff
from explainer.progress import Timings, say
from explainer.score import Divergence, GroupedScorer, Scorer, in_order, length_references, scrubbed
from explainer.scrub import Scrubber
from explainer.tasks.base import Batch

METHODS = ("greedy", "random", "gradient", "exhaustive", "learned")
CHUNK = None  # sets per vmapped call: None is the scorer's own (explainer.score.mask_chunk)
OPTIONS: dict[str, dict[str, Any]] = {
    "greedy": {"restarts": 4, "sample": None, "chunk": CHUNK},
    "random": {"samples": 256, "chunk": CHUNK},
    "gradient": {"verify": 8, "probes": 4, "chunk": CHUNK},
    "exhaustive": {"max_sets": 20000, "chunk": CHUNK},
    "learned": {"steps": 200, "restarts": 8, "chunk": CHUNK},
}
# attack_all runs exhaustive only where scoring all its sets costs at most this (multiply-adds as two,
# by ModelConfig.scored_flops over the attacked prompts): every ground-truth model at the budgets it
# is graded at, and no model whose units are too many or too costly to score one by one
EXHAUSTIVE_FLOPS = 2e11
PROGRESS_EVERY = 10.0  # seconds between a running method's progress lines (with progress)
GREEDY_ALL = 128  # greedy's first restart tries every remaining unit per step up to this many
RANDOM_FULL_SIZE = 0.75  # share of random sets with exactly ``budget`` units
QUANTILES = (0.5, 0.9, 0.99)

UnitSet = tuple[int, ...]  # sorted indices into the list of excluded units

TOO_MANY_SETS = (
    "exhaustive search at budget {budget} would evaluate {count} sets of the {n} excluded units, "
    "more than max_sets={limit}; use a smaller --budget, another method (greedy, random, "
    "gradient), or raise max_sets"
)


@dataclasses.dataclass
class AttackResult:
    """The strongest re-inclusion one adversary found, with its effect on the scrubbed model.

    ``gap`` holds the chosen divergence's per-prompt values summarised as ``kl_mean``, ``kl_p50``,
    ``kl_p90``, ``kl_p99`` and ``kl_max`` (named ``kl_*`` whatever ``divergence`` is).
    ``accuracy_change`` and ``logit_diff_change`` are ``S_{m∨a}`` minus ``S_m``; ``evaluations``
    counts the distinct sets evaluated exactly.
    """

    method: str
    budget: int
    reincluded: dict[str, list[int]]
    gap: dict[str, float]
    accuracy_change: float
    logit_diff_change: float
    evaluations: int
    seconds: float
    divergence: str = "kl"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of re-included units."""
        return sum(len(units) for units in self.reincluded.values())

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the content of a run's ``attack.json``)."""
        return {**dataclasses.asdict(self), "size": self.size}


def attack(
    scrubber: Scrubber,
    batch: Batch,
    keep: Mapping[str, Any],
    budget: int,
    method: str = "greedy",
    key: PRNGKeyArray | None = None,
    divergence: str = "kl",
    progress: bool = False,
    timings: Timings | None = None,
    **options: Any,
) -> AttackResult:
    """Find at most ``budget`` excluded units whose re-inclusion moves the scrubbed model most.

    ``keep`` is the explanation's binary keep mask over (some of) ``scrubber``'s sites; ``options``
    are the method's settings (see ``OPTIONS``). The same ``key`` gives the same result.
    ``progress``: the method announced on stderr as a phase (``greedy ...``, ``greedy done [Xs]``),
    with a line at most every :data:`PROGRESS_EVERY` seconds while it runs; ``timings`` (a
    :class:`~explainer.progress.Timings`) gains the method's seconds.

    >>> import jax, numpy as np
    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> from explainer.scrub import Scrubber
    >>> from explainer.tasks import resolve_task
    >>> folder = resolve_model("planted-cancel")
    >>> task = resolve_task(None, folder)
    >>> scrubber = Scrubber.build(load_model(folder), task.train_data())
    >>> keep = {s: np.zeros(10) for s in scrubber.sites}
    >>> keep["blocks.0.attn.in"][0] = keep["unembed.in"][1] = 1
    >>> result = attack(scrubber, task.heldout_data(), keep, 1, "exhaustive", jax.random.key(0))
    >>> result.reincluded, result.gap["kl_mean"] > 0.5
    ({'blocks.0.attn.in': [], 'unembed.in': [6]}, True)
    """
    started = time.perf_counter()
    _check_method(method)
    settings = _settings(method, options)
    keep = _check_attack(scrubber, keep, budget, divergence)
    if method == "exhaustive":
        _check_count(_n_excluded(keep), budget, settings["max_sets"])
    with (Timings() if timings is None else timings).phase(method, say=progress):
        oracle = _Oracle(scrubber, batch, keep, divergence, key, settings["chunk"], progress)
        return _run(oracle, method, budget, settings, key, started)


def attack_all(
    scrubber: Scrubber,
    batch: Batch,
    keep: Mapping[str, Any],
    budget: int,
    key: PRNGKeyArray | None = None,
    divergence: str = "kl",
    methods: Sequence[str] = METHODS,
    progress: bool = False,
    timings: Timings | None = None,
    **options: Any,
) -> tuple[AttackResult, list[AttackResult]]:
    """Run every method in ``methods`` (``exhaustive`` only when it has at most ``max_sets`` sets
    and scoring them all costs at most :data:`EXHAUSTIVE_FLOPS`: :func:`exhaustive_fits`);
    return the strongest result (largest mean gap; the earlier method on ties) and all of them.
    ``progress``: each method announced on stderr as a phase (``greedy ...``, ``greedy done [Xs]``),
    with a line at most every :data:`PROGRESS_EVERY` seconds while it runs; ``timings`` (a
    :class:`~explainer.progress.Timings`) gains ``reference`` (the scrubbed model's predictions
    every method is measured against) and each method's seconds.

    ``options`` is the union of the methods' settings; each method takes the ones it knows. Each
    per-method result equals :func:`attack` with the same arguments.

    >>> import jax, numpy as np
    >>> from explainer.models import load_model
    >>> from explainer.zoo import resolve_model
    >>> from explainer.scrub import Scrubber
    >>> from explainer.tasks import resolve_task
    >>> folder = resolve_model("planted-distractor")
    >>> task = resolve_task(None, folder)
    >>> scrubber = Scrubber.build(load_model(folder), task.train_data())
    >>> keep = {"blocks.0.attn.in": np.eye(10)[0], "unembed.in": np.eye(10)[1]}
    >>> best, every = attack_all(scrubber, task.heldout_data(), keep, 2, jax.random.key(0))
    >>> [r.method for r in every], best.gap["kl_mean"] < 1e-4
    (['greedy', 'random', 'gradient', 'exhaustive', 'learned'], True)
    """
    for method in methods:
        _check_method(method)
    known = set().union(*(OPTIONS[m] for m in methods)) if methods else set()
    unknown = sorted(set(options) - known)
    if not methods or unknown:
        what = f"unknown option {unknown[0]!r}" if unknown else "no methods given"
        valid = ", ".join(sorted(known))
        raise ExplainerError(f"{what}; valid options: {valid}; methods: {', '.join(METHODS)}")
    chunk = options.get("chunk", CHUNK)
    chunk = None if chunk is None else _positive("chunk", chunk)
    keep = _check_attack(scrubber, keep, budget, divergence)
    timings = Timings() if timings is None else timings
    with timings.phase("reference", say=progress):  # S_m and the scorers every method shares
        oracle = _Oracle(scrubber, batch, keep, divergence, key, chunk, progress)
    results = []
    for method in methods:
        settings = _settings(method, {k: v for k, v in options.items() if k in OPTIONS[method]})
        if method == "exhaustive" and not exhaustive_fits(
            oracle.n_excluded, budget, settings["max_sets"], oracle.mask_flops
        ):
            continue
        oracle.forget()
        with timings.phase(method, say=progress):
            results.append(_run(oracle, method, budget, settings, key))
    best = max(results, key=lambda r: r.gap["kl_mean"])  # max keeps the first of equals
    return best, results


# --- checks ---------------------------------------------------------------------------------------


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ExplainerError(f"unknown attack method {method!r}; {did_you_mean(method, METHODS)}")


def _check_divergence(kind: str) -> None:
    if kind not in DIVERGENCES:
        raise ExplainerError(f"unknown divergence {kind!r}; {did_you_mean(kind, DIVERGENCES)}")


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ExplainerError(f"option {name} must be a positive integer (got {value!r}); pass {name}=1 or more")
    return int(value)


def _settings(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The method's settings: its defaults overridden by ``options`` (checked)."""
    defaults = OPTIONS[method]
    for name in options:
        if name not in defaults:
            raise ExplainerError(
                f"unknown option {name!r} for attack method {method!r}; " + did_you_mean(name, tuple(defaults))
            )
    settings = {**defaults, **options}
    return {k: v if v is None and k in ("sample", "chunk") else _positive(k, v) for k, v in settings.items()}


def _check_budget(budget: int, n_excluded: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ExplainerError(f"the attack budget must be a positive integer (got {budget!r}); use --budget 1 or more")
    if n_excluded == 0:
        raise ExplainerError("the explanation excludes no units, so there is nothing to re-include; no attack needed")
    if budget > n_excluded:
        raise ExplainerError(
            f"the explanation excludes only {n_excluded} units; use --budget {n_excluded} or less (got {budget})"
        )


def check_keep(scrubber: Scrubber, keep: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The keep mask as float32 0/1 vectors, checked against ``scrubber``'s sites and sizes."""
    if not isinstance(keep, Mapping) or not keep:
        raise ExplainerError("the keep mask must map site names to 0/1 vectors over units, e.g. {'unembed.in': [0, 1]}")
    out = {}
    for site, values in keep.items():
        if site not in scrubber.sites:
            raise ExplainerError(
                f"the keep mask has site {site!r}, which this scrubber does not mask; "
                f"{did_you_mean(str(site), scrubber.sites)} (or build the Scrubber with that site)"
            )
        v = np.asarray(values)
        n = scrubber.n_units[site]
        if v.shape != (n,):
            raise ExplainerError(f"the keep mask of {site!r} has shape {v.shape}; it needs one entry per unit: ({n},)")
        if not np.isin(v, (0, 1)).all():
            raise ExplainerError(
                f"the keep mask of {site!r} is not binary; threshold it first (e.g. Gates.binary() or mask > 0.5)"
            )
        out[site] = v.astype(np.float32)
    return out


def _check_attack(scrubber: Scrubber, keep: Mapping[str, Any], budget: int, kind: str) -> dict[str, np.ndarray]:
    keep = check_keep(scrubber, keep)
    check_request(keep, budget, kind)
    return keep


def check_request(keep: Mapping[str, Any], budget: int, divergence: str) -> None:
    """Refuse an attack whose ``budget`` or ``divergence`` cannot be run on the binary keep mask
    ``keep``, with an :class:`~explainer.errors.ExplainerError` that names the fix (before any
    model is run; :func:`attack` and :func:`attack_all` check this too).

    >>> check_request({"unembed.in": np.array([1.0, 0.0, 0.0])}, 3, "kl")
    Traceback (most recent call last):
    ...
    explainer.errors.ExplainerError: the explanation excludes only 2 units; use --budget 2 or less (got 3)
    """
    _check_divergence(divergence)
    _check_budget(budget, _n_excluded({s: np.asarray(v) for s, v in keep.items()}))


def exhaustive_fits(n_excluded: int, budget: int, max_sets: int, mask_flops: float) -> bool:
    """Whether :func:`attack_all` runs ``exhaustive``: at most ``max_sets`` sets of 1..``budget`` of
    the ``n_excluded`` units, and at most :data:`EXHAUSTIVE_FLOPS` to score them all at
    ``mask_flops`` each (``ModelConfig.scored_flops`` of the attacked prompts).

    >>> exhaustive_fits(100, 1, 20000, 1e8), exhaustive_fits(20000, 1, 20000, 1e8)
    (True, False)
    """
    count = _count_sets(n_excluded, budget)
    return count <= max_sets and count * mask_flops <= EXHAUSTIVE_FLOPS


def _n_excluded(keep: Mapping[str, np.ndarray]) -> int:
    return sum(int((v == 0).sum()) for v in keep.values())


def _count_sets(n: int, budget: int) -> int:
    return sum(math.comb(n, j) for j in range(1, budget + 1))


def _check_count(n: int, budget: int, max_sets: int) -> None:
    count = _count_sets(n, budget)
    if count > max_sets:
        raise ExplainerError(TOO_MANY_SETS.format(budget=budget, count=count, n=n, limit=max_sets))


# --- exact evaluation -----------------------------------------------------------------------------


class _Oracle:
    """Exact mean gaps of candidate sets (sorted tuples of indices into ``excluded``), cached.

    Holds the one replacement every candidate shares and ``S_m``, the reference of every gap. The
    prompts are scored in length groups (:class:`explainer.score.GroupedScorer`), each padded
    only to its own longest prompt, with the resample partners of the whole batch: the same gaps,
    to float rounding, as scoring the batch at once; a batch of one length is scored at once."""

    def __init__(self, scrubber, batch, keep, kind, key, chunk, progress=False):
        self.scrubber, self.batch, self.kind = scrubber, batch, kind
        self.progress, self.method = progress, ""
        self.started = self.said = time.perf_counter()
        self.layout = Layout.of({site: len(v) for site, v in keep.items()})
        self.base = np.concatenate(list(keep.values())).astype(np.float32)
        self.excluded = np.flatnonzero(self.base == 0)
        groups, references = length_references(scrubber, batch, _keys(key)[0])
        against = []  # each length group's reference, against that group's S_m
        for reference in references:
            ref = Scorer(scrubber, reference, self.layout, chunk)(self.base[None], scrubbed)[0]
            against.append(reference.against(jnp.asarray(ref, jnp.float32)))
        self.scorer = GroupedScorer(scrubber, groups, against, self.layout, chunk)
        self.groups = self.scorer.groups
        self.ref = in_order(self.groups, [r.full for r in against])  # S_m, in the batch's order
        tokens = np.asarray(batch.clean)
        self.mask_flops = scrubber.model.config.scored_flops(int(tokens.shape[1])) * int(tokens.shape[0])
        self.cache: dict[UnitSet, float] = {}

    @property
    def chunk(self) -> int:
        return self.scorer.chunk

    @property
    def n_excluded(self) -> int:
        return len(self.excluded)

    def forget(self) -> None:
        self.cache = {}

    def tell(self, text: str, wait: Any = None) -> None:
        """With ``progress``: ``text`` on stderr, at most every :data:`PROGRESS_EVERY` seconds, once
        the arrays ``wait`` (work that ``text`` reports done) are computed."""
        now = time.perf_counter()
        if self.progress and now - self.said >= PROGRESS_EVERY:
            jax.block_until_ready(wait)
            now = self.said = time.perf_counter()
            say(f"{self.method}: {text} [{now - self.started:.0f}s]")

    def masks(self, sets: Sequence[UnitSet]) -> np.ndarray:
        rows = np.repeat(self.base[None], len(sets), axis=0)
        for row, units in zip(rows, sets, strict=True):
            row[self.excluded[list(units)]] = 1.0
        return rows

    def prompts(self) -> tuple[Any, Any, Any]:
        """Tokens, replacement and ``S_m`` of the prompts: arrays when they are scored at once, tuples
        with one entry per length group otherwise (as :func:`adversary.learned.train_adversary` takes them)."""
        refs = self.scorer.refs
        if len(refs) == 1:
            return refs[0].tokens, refs[0].replacement, refs[0].full
        return tuple(r.tokens for r in refs), tuple(r.replacement for r in refs), tuple(r.full for r in refs)

    def gaps(self, sets: Iterable[UnitSet]) -> np.ndarray:
        """Mean gap of each set; new sets are evaluated by the scorers."""
        sets = [tuple(sorted(s)) for s in sets]
        new = list(dict.fromkeys(s for s in sets if s not in self.cache))
        if new:
            means = self.scorer.per_prompt(self.masks(new), Divergence(self.kind)).mean(axis=1)
            self.cache.update(zip(new, means.tolist(), strict=True))
            self.tell(f"{len(self.cache)} sets scored")
        return np.array([self.cache[s] for s in sets])

    def gradients(self, points: np.ndarray) -> np.ndarray:
        """Gradient of the mean gap at each relaxed point (rows over excluded units): with
        ``keep = m + (1 − m)·a``, ``∂/∂a = (1 − m)·∂/∂keep``; over length groups, the mean of the
        groups' gradients weighted by their prompts."""
        full = np.zeros((len(points), len(self.base)), np.float32)
        full[:, self.excluded] = points
        keep = self.base + (1.0 - self.base) * full
        grads = self.scorer.gradients(keep, Divergence(self.kind, mean=True))
        return (grads * (1.0 - self.base))[:, self.excluded]

    def best(self) -> UnitSet:
        """The evaluated set with the largest mean gap (on ties the smallest, then the earliest).

        When nothing moved the predictions at all, the answer is the empty set: reporting some
        arbitrary set with a zero gap would read like a finding.
        """
        units = max(self.cache, key=lambda units: (self.cache[units], -len(units)), default=())
        return units if units and self.cache[units] > 0.0 else ()

    def reincluded(self, units: UnitSet) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {site: [] for site, _ in self.layout}
        for flat in sorted(int(self.excluded[u]) for u in units):
            site, unit = self.layout.locate(flat)
            out[site].append(unit)
        return out

    def effect(self, units: UnitSet) -> dict[str, Any]:
        """Gap quantiles, accuracy and logit-diff changes of re-including ``units``."""
        before = self.ref
        after = jnp.asarray(self.scorer.per_prompt(self.masks([units]), scrubbed)[0], jnp.float32)
        gap = np.asarray(divergence(self.kind, before, after), np.float64)
        b = self.batch
        summary = {"kl_mean": float(gap.mean()), "kl_max": float(gap.max())}
        summary.update({f"kl_p{round(100 * q)}": float(np.quantile(gap, q)) for q in QUANTILES})
        return {
            "gap": summary,
            "accuracy_change": float(accuracy(after, b.answers, b.wrong_answers))
            - float(accuracy(before, b.answers, b.wrong_answers)),
            "logit_diff_change": float(logit_diff(after, b.answers, b.wrong_answers).mean())
            - float(logit_diff(before, b.answers, b.wrong_answers).mean()),
        }


def _keys(key: PRNGKeyArray | None) -> tuple[PRNGKeyArray, np.random.Generator]:
    """The replacement's key and a numpy generator for the search, both from ``key``."""
    key = jax.random.key(0) if key is None else key
    replacement_key, search_key = jax.random.split(key)
    seed = int(jax.random.randint(search_key, (), 0, np.iinfo(np.int32).max))
    return replacement_key, np.random.default_rng(seed)


def _run(
    oracle: _Oracle,
    method: str,
    budget: int,
    settings: dict[str, Any],
    key: PRNGKeyArray | None,
    started: float | None = None,
) -> AttackResult:
    started = time.perf_counter() if started is None else started
    oracle.method, oracle.started = method, time.perf_counter()
    oracle.said = oracle.started
    rng = _keys(key)[1]
    SEARCHES[method](oracle, budget, rng, **{k: v for k, v in settings.items() if k != "chunk"})
    best = oracle.best()
    effect = oracle.effect(best)
    return AttackResult(
        method=method,
        budget=int(budget),
        reincluded=oracle.reincluded(best),
        evaluations=len(oracle.cache),
        seconds=time.perf_counter() - started,
        divergence=oracle.kind,
        options={**settings, "chunk": oracle.chunk} if "chunk" in settings else dict(settings),
        **effect,
    )


# --- the searches ---------------------------------------------------------------------------------


def _step(oracle: _Oracle, current: UnitSet, pool: np.ndarray) -> UnitSet:
    """Add the unit of ``pool`` whose addition to ``current`` gives the largest gap."""
    sets = [tuple(sorted(current + (int(u),))) for u in pool]
    return sets[int(np.argmax(oracle.gaps(sets)))]


def _greedy(oracle: _Oracle, budget: int, rng: np.random.Generator, restarts: int, sample: int | None) -> None:
    """Restart 0 tries every remaining unit per step (up to ``GREEDY_ALL``) unless ``sample`` is
    set; later restarts try a random half (or ``sample``) of them, so they explore other paths."""
    for restart in range(restarts):
        current: UnitSet = ()
        for _ in range(budget):
            remaining = np.setdiff1d(np.arange(oracle.n_excluded), current)
            if sample is not None:
                size = sample
            elif restart == 0:
                size = GREEDY_ALL
            else:
                size = min(GREEDY_ALL, math.ceil(len(remaining) / 2))
            if size < len(remaining):
                remaining = np.sort(rng.choice(remaining, size, replace=False))
            current = _step(oracle, current, remaining)


def _random(oracle: _Oracle, budget: int, rng: np.random.Generator, samples: int) -> None:
    sets = []
    for _ in range(samples):
        size = budget if rng.random() < RANDOM_FULL_SIZE else int(rng.integers(1, budget + 1))
        sets.append(tuple(rng.choice(oracle.n_excluded, size, replace=False).tolist()))
    oracle.gaps(sets)


def _gradient(oracle: _Oracle, budget: int, rng: np.random.Generator, verify: int, probes: int) -> None:
    """Gradients are taken at the current set and at ``probes`` random relaxed points around it
    (remaining units uniform in [0, 1]): at the current set alone the gradient of a divergence from
    ``S_m`` vanishes (it is a minimum), and a cancelling pair has zero gradient wherever both units
    are equal. Units are ranked by their mean positive gradient."""
    current: UnitSet = ()
    for _ in range(budget):
        remaining = np.setdiff1d(np.arange(oracle.n_excluded), current)
        points = np.zeros((probes + 1, oracle.n_excluded))
        points[:, list(current)] = 1.0
        points[1:, remaining] = rng.uniform(size=(probes, len(remaining)))
        scores = np.maximum(oracle.gradients(points), 0.0).mean(axis=0)[remaining]
        top = remaining[np.argsort(-scores, kind="stable")[:verify]]
        current = _step(oracle, current, top)


def _exhaustive(oracle: _Oracle, budget: int, rng: np.random.Generator, max_sets: int) -> None:
    _check_count(oracle.n_excluded, budget, max_sets)
    for size in range(1, budget + 1):
        combos = itertools.combinations(range(oracle.n_excluded), size)
        while part := list(itertools.islice(combos, 64 * oracle.chunk)):
            oracle.gaps(part)


def _learned(oracle: _Oracle, budget: int, rng: np.random.Generator, steps: int, restarts: int) -> None:
    """The in-loop adversary trained on its own against this explanation; its sets verified exactly."""
    from adversary.learned import LearnedAdversary, learn_reinclusions

    keep = {site: jnp.asarray(part, jnp.float32) for site, part in oracle.layout.split(oracle.base).items()}
    adversary = LearnedAdversary(budget=budget, restarts=restarts, divergence=oracle.kind)
    key = jax.random.key(int(rng.integers(0, np.iinfo(np.int32).max)))
    tokens, replacement, scrubbed_m = oracle.prompts()
    found = learn_reinclusions(
        adversary,
        oracle.scrubber,
        tokens,
        keep,
        replacement,
        scrubbed_m,
        steps,
        key,
        on_step=lambda done, params: oracle.tell(f"step {done}/{steps}", wait=params),
    )
    position = {int(flat): i for i, flat in enumerate(oracle.excluded)}
    index = oracle.layout.starts
    oracle.gaps([tuple(position[index[s] + u] for s, units in sets.items() for u in units) for sets in found])


SEARCHES = {"greedy": _greedy, "random": _random, "gradient": _gradient, "exhaustive": _exhaustive, "learned": _learned}
