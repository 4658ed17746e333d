"""The step loop every run steps through, and the dual ascent on log λ that training and ladders share."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from explainer.errors import ExplainerError
from explainer.faults import checked_step
from explainer.progress import Timings
from explainer.runs import list_checkpoints
from explainer.train.dual import DUAL_BACKOFF, LOG_LAMBDA_RANGE, dual_ascent
from explainer.train.loop import run_steps


def _counting(bad_from: int | None = None):
    """A checked step that adds its shared operand to ``x`` and reports the old ``x`` as its KL."""

    def step(state, _, shift):
        kl = state["x"] if bad_from is None else jnp.where(state["x"] + 1 >= bad_from, jnp.nan, state["x"])
        return {"x": state["x"] + shift}, {"kl": kl}

    return checked_step(step)


def test_the_loop_checkpoints_resumes_and_times_the_compile(tmp_path):
    timings = Timings()
    seen = []
    start = {"x": jnp.zeros(())}
    state, history = run_steps(
        _counting(), start, None, jnp.ones(()), 30, checkpoints=tmp_path, every=20,
        advance=lambda done, text: seen.append((done, text)), timings=timings,
    )  # fmt: skip
    assert float(state["x"]) == 30 and history["kl"] == list(range(30))
    assert list(timings) == ["compile", "train"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 20]
    # announced before the first step (which compiles), reported after it, then every 50 steps,
    # at each checkpoint and at the end
    assert seen == [(0, "compiling the step"), (1, " kl 0.0000"), (20, " kl 19.0000"), (30, " kl 29.0000")]
    # from the checkpoint at step 20 alone, the loop runs the last 10 steps and ends where it did
    (tmp_path / "step-00000030.safetensors").unlink()
    again, resumed = run_steps(_counting(), start, None, jnp.ones(()), 30, checkpoints=tmp_path, every=20)
    assert float(again["x"]) == 30 and resumed == history


def test_a_fault_in_the_loop_names_its_step_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(ExplainerError, match=r"step 27: the kl term is nan\. The last good checkpoint \(step 20\)"):
        run_steps(_counting(bad_from=27), {"x": jnp.zeros(())}, None, jnp.ones(()), 40, checkpoints=tmp_path, every=20)


def test_dual_ascent_raises_lambda_within_the_kl_budget_and_lowers_it_over_it():
    dual = dual_ascent(0.01, "kl_budget", target=0.1)
    start = dual.init(0.1)
    assert start.dtype == np.float32 and start == np.float32(math.log(0.1))
    within, over = dual.update(start, 0.05), dual.update(start, 0.15)  # KL 0.5 budgets under, 0.5 over
    assert within > start > over
    # the step is bounded by tanh, and backs off DUAL_BACKOFF times faster than it pushes
    assert float(within) == float(jnp.clip(start + 0.01 * jnp.tanh((0.1 - 0.05) / 0.1), *LOG_LAMBDA_RANGE))
    np.testing.assert_allclose(float(start - over), DUAL_BACKOFF * float(within - start), rtol=1e-3)
    assert float(dual.update(start, 100.0)) >= start - DUAL_BACKOFF * 0.01


def test_dual_ascent_towards_a_target_size_per_state_of_a_batch():
    dual = dual_ascent(0.01, "target_size", target=3)
    start = dual.init([0.1, 0.1, 0.0])
    assert start.shape == (3,) and start[2] == -np.inf  # λ = 0: no penalty
    assert dual.update(start[0], 5.0) > start[0] > dual.update(start[0], 1.0)
    # a batch: each state towards its own target, rising ``rise`` times as fast
    sizes, targets, rise = jnp.asarray([5.0, 5.0]), jnp.asarray([3.0, 3.0]), jnp.asarray([1.0, DUAL_BACKOFF])
    both = dual.update(start[:2], sizes, targets, rise)
    np.testing.assert_allclose(float(both[1] - start[1]), DUAL_BACKOFF * float(both[0] - start[0]), rtol=1e-5)
    top = dual.init(1e4)
    assert dual.update(top, 50.0) == np.float32(LOG_LAMBDA_RANGE[1])  # λ stays within its range


def test_a_fixed_penalty_does_not_move():
    dual = dual_ascent(0.01, "lambda")
    start = dual.init(0.3)
    assert dual.update(start, 5.0) is start
