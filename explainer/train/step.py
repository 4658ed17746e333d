"""Training: hard-concrete gates trained by optax, one jitted step (stepped by
:mod:`explainer.train.loop`).

Loss per step (DESIGN.md, data flow)::

    D(ref ‖ S_m) + λ·size(m) + μ·D(S_m ‖ S_{m∨a})

``λ`` is fixed (``lam``) or learned by dual ascent (``kl_budget``, ``target_size``;
:mod:`explainer.train.dual`); the last term is present only when an adversary is passed in. The
adversary is any object with the :class:`InLoopAdversary` methods; the ``adversary`` package
provides them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from explainer import optimal
from explainer.errors import ExplainerError
from explainer.faults import checked_step
from explainer.masks import Gates, Layout, Mask
from explainer.metrics import kl_divergence
from explainer.models.padding import MIN_SAVING, last_columns
from explainer.parallel import DataParallel, data_parallel
from explainer.progress import Timings, progress_bar
from explainer.score import IG_STEPS, attribution, fit_scorer, scoring_groups
from explainer.scrub import Replacement, Scrubber, SiteMeans, broadcast_constants, build_cache, cache_bytes
from explainer.tasks.base import Batch
from explainer.train.config import TrainConfig
from explainer.train.dual import DualAscent, dual_ascent
from explainer.train.loop import LengthGroups, run_steps


@runtime_checkable
class InLoopAdversary(Protocol):
    """What the loop needs from an adversary trained alongside the explanation.

    Its learned state is a pytree of arrays (``init``); the loop owns its optax optimiser
    (``adam(lr)``) and ascends ``combine(gaps) − cost`` with it: ``steps − 1`` ascent-only updates,
    then one update that shares its forward pass with the explainer's step. ``gaps`` returns the
    mean ``D(S_m ‖ S_{m∨a})`` per restart and must be differentiable in both ``params`` and ``keep``.
    With ``warm_start`` false the state is re-initialised at every explainer step. An adversary
    may also say it ``closes`` (a rotated basis, with its ``basis``, ``budget`` and ``divergence``):
    :func:`explainer.finish.passes.fit` then closes the rotated attacks left open on the finished
    explanation (see there). One that names its attacks (``named`` true, ``rows``, and
    ``best(params, keep, restart)``: a restart's whole re-inclusion as units per site) lets a
    ladder's rung stop once the explanation and every attack on it have sat still
    (:func:`explainer.frontier.ladder.train_ladder`).
    """

    name: str
    steps: int
    lr: float
    warm_start: bool

    def init(self, key: PRNGKeyArray, n_units: dict[str, int]) -> Any: ...

    def gaps(
        self,
        params: Any,
        scrubber: Scrubber,
        tokens: Array,
        keep: Mask,
        scrubbed: Array,
        replacement: Replacement,
        key: PRNGKeyArray,
    ) -> Float[Array, " restarts"]: ...

    def combine(self, gaps: Float[Array, " restarts"]) -> Float[Array, ""]: ...

    def cost(self, params: Any, keep: Mask) -> Float[Array, ""]: ...


class TrainState(eqx.Module):
    """Everything a step reads and writes. ``learned``: the scrubber's learned bases as they stand
    (:meth:`Scrubber.split_learned`; no arrays when every basis is fixed), trained with the gates:
    the step's scrubber is the one it was made with, these bases in place. ``constants``: under
    the ``optimal`` ablation, the replacement constants learned with the gates and their Adam state
    (``None`` otherwise)."""

    gates: Gates
    learned: Scrubber
    opt_state: Any
    log_lambda: Float[Array, ""]
    adversary: Any
    step: Array
    key: PRNGKeyArray
    constants: Any = None


CACHE_LIMIT_BYTES = 256 * 2**20
# a length group beyond the first compiles the step once more; that is taken to cost about as much
# as this many steps, so a run groups its prompts only where each group saves that much padding
COMPILE_STEPS = 200


def training_saving(steps: int) -> float:
    """The share of the padded tokens a length group must save in a run of ``steps`` steps: at
    least :data:`~explainer.models.padding.MIN_SAVING`, as scoring asks, and enough steps' worth to
    pay for its compile (:data:`COMPILE_STEPS`), so that a short run trains in one group.

    >>> training_saving(1500), training_saving(100)
    (0.13333333333333333, 2.0)
    """
    return max(MIN_SAVING, COMPILE_STEPS / steps)


def make_step(scrubber: Scrubber, data: Batch, config: TrainConfig, optimizer, adversary=None):
    """The jitted training step ``state -> (state, metrics)``, and a dict counting its traces.

    The step is traced once per run, or once per length group: prompts of different lengths are
    grouped as scoring groups them (:func:`explainer.score.scoring_groups`) where a group saves
    enough for its compile (:func:`training_saving`), each group padded only to its own longest
    prompt, and each step samples its batch from one group
    (:class:`~explainer.train.loop.LengthGroups`). When the full model's outputs on the training
    prompts fit in ``CACHE_LIMIT_BYTES`` they are computed once, here, instead of in every step.

    With ``runtime.devices`` above one the batch is split across devices and the rest replicated,
    or with ``runtime.shard_weights`` the model's weights split too (:mod:`explainer.parallel`);
    with ``runtime.remat`` each block is recomputed in the backward pass.
    """
    batch_size = config.optimiser.batch_size
    parallel = data_parallel(config.runtime.devices, batch_size, config.runtime.shard_weights)
    _, scrubber = scrubber.split_learned()  # a learned basis trains in the state, not here

    def attach(learned, base: Scrubber) -> Scrubber:
        """``base``, the step's scrubber operand, with the learned bases as they stand (and remat,
        which the state's learned half, split from the scrubber as given, does not carry). The step
        passes its operand: closing over the scrubber here baked the model's weights into the
        compiled step as constants."""
        whole = eqx.combine(learned, base)
        return dataclasses.replace(whole, remat=True) if config.runtime.remat else whole

    groups = scoring_groups(scrubber, data.clean, training_saving(config.optimiser.steps))
    parts = [data] if len(groups) == 1 else [data.take(jnp.asarray(g)).narrowed() for g in groups]
    cached = sum(cache_bytes(scrubber, part) for part in parts) <= CACHE_LIMIT_BYTES
    caches = [build_cache(scrubber, part) if cached else None for part in parts]
    scrubber = parallel.put_weights(scrubber)
    operands = [(scrubber, *parallel.put_replicated(pair)) for pair in zip(parts, caches, strict=True)]
    counter = {"traces": 0}
    adv_optimizer = optax.adam(adversary.lr) if adversary is not None else None
    const_optimizer = constants_optimizer()
    dual = dual_ascent_of(config)

    def adversary_ascent(params, opt_state, grads):
        neg = jax.tree.map(jnp.negative, grads)  # ascent
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = adv_optimizer.update(neg, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @eqx.filter_jit
    def step(state: TrainState, operands) -> tuple[TrainState, dict[str, Array]]:
        counter["traces"] += 1  # a Python side effect: runs only while tracing
        scrubber, data, cache = operands
        state = parallel.replicate(state)
        key = jax.random.fold_in(state.key, state.step)
        k_batch, k_repl, k_gate, k_adv = jax.random.split(key, 4)
        index = jax.random.randint(k_batch, (batch_size,), 0, len(data))
        batch = parallel.shard(data.take(index))
        if cache is not None:
            ref, repl = cache.take(scrubber, batch, index, k_repl)
        else:
            ref, repl = scrubber.reference(batch, k_repl)
        width = batch.clean.shape[1]  # a length group's: per-position constants are cut to it
        ref, repl = parallel.shard((ref, last_columns(repl, width)))
        lam = jnp.exp(state.log_lambda)
        adv_params, adv_opt = state.adversary if adversary is not None else (None, None)
        current = attach(state.learned, scrubber)  # learned bases, if any, as they stand
        values, const_opt = state.constants if state.constants is not None else (None, None)
        if values is not None:  # optimal ablation: the constants as they stand replace excluded units
            repl = last_columns(broadcast_constants(values, batch.clean.shape[0]), width)

        if adversary is not None:
            if not adversary.warm_start:
                adv_params = adversary.init(jax.random.fold_in(k_adv, 1), scrubber.n_units)
                adv_opt = adv_optimizer.init(adv_params)
            keep_now = jax.lax.stop_gradient(state.gates.sample(k_gate))
            scrubbed_now = jax.lax.stop_gradient(current.logits(batch.clean, keep_now, repl))
            for i in range(adversary.steps - 1):  # ascent-only steps against the current explanation
                k_i = jax.random.fold_in(k_adv, 2 + i)

                def objective(p, k_i=k_i):
                    gaps = adversary.gaps(p, current, batch.clean, keep_now, scrubbed_now, repl, k_i)
                    return adversary.combine(gaps) - adversary.cost(p, keep_now)

                adv_params, adv_opt = adversary_ascent(adv_params, adv_opt, jax.grad(objective)(adv_params))

        def loss_fn(params):
            (gates, learned), adv, consts = params
            keep = gates.sample(k_gate, straight_through=adversary is not None)
            scr = attach(learned, scrubber)  # learned bases train with the gates
            replacement = repl if consts is None else last_columns(broadcast_constants(consts, len(batch)), width)
            scrubbed = scr.logits(batch.clean, keep, replacement)
            kl = kl_divergence(ref, scrubbed).mean()
            size = gates.expected_size()
            loss = kl + lam * size
            gap = objective = jnp.zeros(())
            if adversary is not None:
                gaps = adversary.gaps(adv, scr, batch.clean, keep, scrubbed, replacement, k_adv)
                gap = jnp.max(gaps)
                # the explainer descends and the adversary ascends this one objective; its cost
                # term depends on the adversary alone, so it pulls only the adversary
                objective = adversary.combine(gaps) - adversary.cost(adv, keep)
                loss = loss + config.adversary_weight * objective
            return loss, (kl, size, gap, objective)

        (loss, (kl, size, gap, objective)), (grads, adv_grads, const_grads) = jax.value_and_grad(loss_fn, has_aux=True)(
            ((state.gates, state.learned), adv_params, values)
        )
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int step counts with floats
            updates, opt_state = optimizer.update(grads, state.opt_state, (state.gates, state.learned))
            constants = None
            if values is not None:  # the constants descend the same loss as the gates
                const_updates, const_opt = const_optimizer.update(const_grads, const_opt, values)
                constants = (optax.apply_updates(values, const_updates), const_opt)
        gates, learned = eqx.apply_updates((state.gates, state.learned), updates)
        adv_state = None
        if adversary is not None:
            adv_state = adversary_ascent(adv_params, adv_opt, adv_grads)

        # the KL budget constrains the explanation itself, so λ follows the KL of the gates'
        # deterministic (noise-free) value: the sampled gates' KL is spiky (mostly zero, sometimes
        # several nats when a needed gate happens to close) and overstates the finished one's
        kl_det = jnp.zeros(())
        if config.penalty.mode == "kl_budget":
            det = state.gates.deterministic()
            kl_det = kl_divergence(ref, current.logits(batch.clean, det, repl)).mean()
        log_lambda = dual.update(state.log_lambda, kl_det if config.penalty.mode == "kl_budget" else size)
        new = TrainState(gates, learned, opt_state, log_lambda, adv_state, state.step + 1, state.key, constants)
        metrics = {
            "loss": loss,
            "kl": kl,
            "kl_deterministic": kl_det,
            "size": size,
            "lambda": lam,
            "gap": gap,
            "adversary_objective": objective,
        }
        return parallel.replicate((new, metrics))

    sizes = tuple(len(g) for g in groups)
    return TrainStep(step, operands[0] if len(parts) == 1 else LengthGroups(tuple(operands), sizes), parallel), counter


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The jitted step ``state -> (state, metrics)`` and the arrays it reads: model, prompts, cache.

    Those arrays are arguments of the compiled step, not constants it closes over: XLA copies
    constants into the program, which for a GPT-2-small-sized model cost gigabytes and minutes of
    compilation (``benchmarks/scale.py``). A caller that wraps the step in its own ``jit`` passes
    them on, ``step(state, step.operands)``, for the same reason. Across devices the state is first
    copied to every device, so that a fresh state and a stepped one compile only once.
    """

    fn: Callable
    operands: Any
    parallel: DataParallel

    def __call__(self, state: TrainState, operands: Any = None) -> tuple[TrainState, dict[str, Array]]:
        operands = self.operands if operands is None else operands
        if isinstance(operands, LengthGroups):  # a caller without the loop's step count: the state's
            operands = operands.at(int(state.step))
        state = self.parallel.put_replicated(state)
        return self.fn(state, operands)


def _bind(step, state: TrainState) -> tuple[tuple[Any, ...], TrainState]:
    """The arguments to pass ``step`` after the state, and the state placed where the step runs."""
    if not isinstance(step, TrainStep):  # any other ``state -> (state, metrics)`` callable
        return (), state
    return (step.operands,), step.parallel.put_replicated(state)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Adam on the gates; with a learned basis, a separate Adam (``basis_lr``) on its rotations.
    Its parameters are the pair ``(gates, learned)`` of :class:`TrainState`.

    A rotation moves every unit of its site at once, so it learns more slowly than the gates.
    """
    opt = config.optimiser
    if getattr(config.units, "basis", None) != "learned":
        return optax.adam(opt.lr)
    return optax.multi_transform({"gates": optax.adam(opt.lr), "basis": optax.adam(opt.basis_lr)}, _labels)


def _labels(params):
    """``"basis"`` for the learned rotations' leaves, ``"gates"`` for the rest."""

    def label(path, _):
        return "basis" if any(getattr(k, "name", None) == "bases" for k in path) else "gates"

    return jax.tree_util.tree_map_with_path(label, params)


def init_state(
    scrubber: Scrubber, config: TrainConfig, optimizer, adversary=None, gates: Gates | None = None
) -> TrainState:
    """The state before the first step: ``gates`` when given, else gates at ``optimiser.init_logit``,
    and ``scrubber``'s learned bases, if any, as they start (:func:`explainer.bases.build_bases`)."""
    opt, penalty = config.optimiser, config.penalty
    key = jax.random.key(opt.seed)
    k_adv, k_run = jax.random.split(key)
    learned, _ = scrubber.split_learned()
    gates = Gates.init(scrubber.n_units, opt.init_logit) if gates is None else gates
    fixed = penalty.lam if penalty.mode == "lambda" else None
    log_lambda = dual_ascent_of(config).init(opt.init_lambda if fixed is None else fixed)
    adv = None
    if adversary is not None:
        params = adversary.init(k_adv, scrubber.n_units)
        adv = (params, optax.adam(adversary.lr).init(params))
    constants = None
    if scrubber.ablation == "optimal" and scrubber.means is not None:  # learned from the means
        with jax.numpy_dtype_promotion("standard"):
            constants = (dict(scrubber.means), constants_optimizer().init(dict(scrubber.means)))
    return TrainState(
        gates,
        learned,
        optimizer.init(eqx.filter((gates, learned), eqx.is_array)),
        jnp.asarray(log_lambda, jnp.float32),
        adv,
        jnp.zeros((), jnp.int32),
        k_run,
        constants,
    )


def dual_ascent_of(config: TrainConfig) -> DualAscent:
    """The dual ascent on log λ of ``config``'s penalty: towards the KL budget or the target size
    (under a fixed ``lam``, λ stays where :func:`init_state` puts it)."""
    penalty, target = config.penalty, None
    if penalty.mode == "kl_budget":
        target = penalty.kl_budget
    elif penalty.mode == "target_size":
        target = penalty.target_size
    return dual_ascent(config.optimiser.dual_lr, penalty.mode, target)


def constants_optimizer() -> optax.GradientTransformation:
    """Adam on the optimal ablation's constants while the gates train (the fit's learning rate)."""
    return optax.adam(optimal.LR)


class Trained(NamedTuple):
    """What training returns: the gates, the scrubber whose units they mask (its learned bases, if
    any, as trained), the per-step history and the learned ``optimal`` ablation constants (``None``
    under other ablations)."""

    gates: Gates
    scrubber: Scrubber
    history: dict[str, list[float]]
    constants: SiteMeans | None = None


class TrainProgram(NamedTuple):
    """What :func:`train_gates` steps with: the optimiser, the jitted step of :func:`make_step` and
    its trace counter. Trainings that differ only in where the gates start (``init_logit``,
    ``init_from``) can share one, and so compile the step once (:func:`train_program`)."""

    optimizer: optax.GradientTransformation
    step: Callable
    counter: dict[str, int]
    checked: tuple[Callable, list[str]]  # what the loop runs: the step, jitted with its fault flags
    config: TrainConfig  # as made, with the gates' start as a training without a ranking has it
    adversary: InLoopAdversary | None

    def check(self, config: TrainConfig, adversary: InLoopAdversary | None) -> None:
        """Refuse to train with a step that would differ from this program's."""
        if _start_free(config) != self.config or adversary is not self.adversary:
            raise ExplainerError(
                "this training program was made for other training settings or another adversary; "
                "make one with train_program(scrubber, data, config, adversary) for these"
            )


def _start_free(config: TrainConfig) -> TrainConfig:
    """``config`` with the gates' start (which the step never reads) at the defaults."""
    return config.replace(init_logit=TrainConfig().optimiser.init_logit, init_from="logit")


def train_program(
    scrubber: Scrubber, data: Batch, config: TrainConfig, adversary: InLoopAdversary | None = None
) -> TrainProgram:
    """The :class:`TrainProgram` of training ``scrubber`` on ``data`` under ``config``."""
    optimizer = make_optimizer(config)
    step, counter = make_step(scrubber, data, config, optimizer, adversary)
    # the loop steps ``step(state, targets, operands)``: one state has no targets
    checked = checked_step(lambda state, _, operands: step(state, *operands))
    return TrainProgram(optimizer, step, counter, checked, _start_free(config), adversary)


def train_gates(
    scrubber: Scrubber,
    data: Batch,
    config: TrainConfig,
    adversary: InLoopAdversary | None = None,
    progress: bool = True,
    checkpoints: str | os.PathLike | None = None,
    timings: Timings | None = None,
    program: TrainProgram | None = None,
) -> Trained:
    """Train the gates, and ``scrubber``'s learned bases with them; returns both (the scrubber as
    trained) with the per-step history (loss, kl, size, lambda, gap) and, under the ``optimal``
    ablation, the constants learned with them (:class:`Trained`).
    ``timings`` gains ``compile`` (the first step, which compiles it) and ``train`` (the rest).
    ``program``, from :func:`train_program` with ``scrubber``, ``data``, ``adversary`` and a config
    that differs from ``config`` at most in where the gates start, reuses its compiled step.

    With a ``checkpoints`` folder, the state is saved there every ``runtime.checkpoint_every`` steps
    and at the end, and training continues from the newest good checkpoint found there. A NaN or
    inf in a loss term or gradient raises :class:`ExplainerError` naming the step and the term.
    """
    timings = Timings() if timings is None else timings
    gates = None
    if starts_ranked(config):
        with timings.phase("init_gates", say=progress):
            gates = start_gates(scrubber, data, config)
    program = train_program(scrubber, data, config, adversary) if program is None else program
    program.check(config, adversary)
    optimizer, plain, counter, checked = program.optimizer, program.step, program.counter, program.checked
    state = init_state(scrubber, config, optimizer, adversary, gates=gates)
    bound = isinstance(plain, TrainStep)  # else any ``state -> (state, metrics)`` callable
    with progress_bar(progress, config.optimiser.steps) as advance:
        state, history = run_steps(
            checked,
            state,
            None,
            (plain.operands,) if bound else (),
            config.optimiser.steps,
            checkpoints=checkpoints,
            every=config.runtime.checkpoint_every,
            describe=lambda m: f"kl {m['kl'][-1]:.4f}  size {m['size'][-1]:.1f}",
            advance=advance,
            place=plain.parallel.put_replicated if bound else None,
            timings=timings,
        )
    history["traces"] = [counter["traces"]]
    constants = None if state.constants is None else state.constants[0]
    return Trained(state.gates, eqx.combine(state.learned, scrubber.split_learned()[1]), history, constants)


def finish(gates: Gates, config: TrainConfig) -> dict[str, np.ndarray]:
    """Threshold the gates into the finished (binary) explanation."""
    if config.penalty.mode != "target_size":
        return {site: np.asarray(v) for site, v in gates.binary().items()}
    layout = Layout.of([(s, gates.logits[s].shape[0]) for s in sorted(gates.logits)])  # ties: sorted sites
    chosen = layout.top(layout.flat(gates.logits, np.float64), config.penalty.target_size) > 0.5
    return layout.split(chosen)


OPEN_LOGIT = 3.0


def starts_ranked(config: TrainConfig) -> bool:
    """Whether training starts its gates from a ranking (:func:`start_gates`): ``init_from`` names
    one (``auto``, not yet made concrete, counts as ``logit``) and ``init_logit`` is below open (from
    open gates every rank starts open)."""
    return config.optimiser.init_from not in ("logit", "auto") and config.optimiser.init_logit < OPEN_LOGIT


def start_gates(scrubber: Scrubber, data: Batch, config: TrainConfig) -> Gates | None:
    """The gates training starts from: ``None`` (every gate at ``init_logit``) unless
    ``init_from`` names a ranking. Then each gate starts between ``init_logit`` and
    :data:`OPEN_LOGIT` (or ``init_logit`` itself, if higher) in proportion to its unit's rank under
    attribution patching or integrated gradients (:func:`explainer.score.attribution`): units whose
    score ties with the lowest start at ``init_logit``, those with the highest open. A circuit of several
    units in series, which no single unit opens from a closed start, starts open where the ranking
    sees it, and the size penalty closes the rest. Attribution at the full model misses units whose
    effect has saturated (a gradient of zero there); integrated gradients sees them.
    """
    opt = config.optimiser
    if not starts_ranked(config):
        return None
    steps = IG_STEPS if opt.init_from == "integrated_gradients" else 1
    scorer = fit_scorer(scrubber, data, jax.random.key(opt.seed))
    scores = attribution(scorer, steps)
    distinct, rank = np.unique(scores, return_inverse=True)  # ties share a rank
    rank = rank.reshape(-1) / max(1, len(distinct) - 1)
    low, high = opt.init_logit, max(opt.init_logit, OPEN_LOGIT)
    return Gates({s: jnp.asarray(v, jnp.float32) for s, v in scorer.layout.split(low + (high - low) * rank).items()})


FIXED_LOGIT = 100.0  # a gate logit whose samples are exactly 1 (-FIXED_LOGIT: exactly 0)


def refit_bases(scrubber: Scrubber, data: Batch, keep: dict[str, np.ndarray], config: TrainConfig) -> Scrubber:
    """``scrubber`` with its learned rotations retrained for the fixed binary explanation ``keep``:
    the same training step, ``finishing.trim_refit_steps`` of them, with the gates held at ``keep``,
    no size penalty and no adversary, so that only the rotations learn (``basis_lr``).

    Trained with the gates, a rotation serves every mask the gates sampled; once the explanation is
    one set, the rotation can serve that set alone. :func:`explainer.finish.passes.fit` uses it when
    ``trim`` can go no further.
    """
    refit = config.replace(lam=0.0, steps=config.finishing.trim_refit_steps)
    fixed = Gates({site: jnp.where(jnp.asarray(keep[site]), FIXED_LOGIT, -FIXED_LOGIT) for site in scrubber.n_units})
    optimizer = optax.multi_transform(
        {"gates": optax.set_to_zero(), "basis": optax.adam(config.optimiser.basis_lr)}, _labels
    )
    state = init_state(scrubber, refit, optimizer, gates=fixed)
    step, _ = make_step(scrubber, data, refit, optimizer)
    operands, state = _bind(step, state)
    for _ in range(refit.optimiser.steps):
        state, _ = step(state, *operands)
    return eqx.combine(state.learned, scrubber.split_learned()[1])
