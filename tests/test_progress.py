"""Progress on stderr: announced phases, and the heartbeat that keeps a quiet phase from going silent."""

import threading
import time

import jax
import jax.numpy as jnp

from explainer import progress
from explainer.progress import Timings, compiled, heartbeat, progress_bar, say


def _beats(err: str, name: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{name} ... [")]


def test_a_quiet_phase_says_it_is_still_running_and_stops_when_it_ends(capsys):
    timings = Timings()
    with timings.phase("quiet", say=True, every=0.05):
        time.sleep(0.4)
    during = capsys.readouterr().err
    assert during.splitlines()[0] == "quiet ..." and during.splitlines()[-1].startswith("quiet done [")
    assert _beats(during, "quiet"), during
    time.sleep(0.2)  # the heartbeat ended with the phase
    assert capsys.readouterr().err == ""
    assert not any(t.name.startswith("heartbeat-") for t in threading.enumerate())


def test_no_heartbeat_while_the_phase_talks_or_when_it_is_not_announced(capsys):
    with heartbeat("talking", every=2.0):
        for i in range(20):
            say(f"step {i}")
            time.sleep(0.02)
    assert not _beats(capsys.readouterr().err, "talking")
    with Timings().phase("unsaid", every=0.05):
        time.sleep(0.2)
    assert capsys.readouterr().err == ""


def test_a_bar_off_a_terminal_repeats_its_last_line_while_nothing_advances(capsys):
    """stderr is not a terminal under capsys: plain lines, and while no step ends (a step that
    compiles) the last line again every ``interval`` seconds of silence, until the bar closes."""
    progress._last_said[0] -= 100.0  # silent work before the bar opened does not make it beat at once
    with progress_bar(True, 10, label="steps", interval=0.5) as advance:
        advance(0, "compiling the step")
        time.sleep(0.1)
        assert capsys.readouterr().err == ""
        time.sleep(1.3)
        during = capsys.readouterr().err.splitlines()
        assert len(during) >= 2 and all(line.startswith("steps 0/10 compiling the step [") for line in during)
        advance(10, "kl 0.1")
    assert capsys.readouterr().err.splitlines()[-1].startswith("steps 10/10 kl 0.1 [")
    time.sleep(0.2)  # the heartbeat ended with the bar
    assert capsys.readouterr().err == ""
    assert not any(t.name.startswith("heartbeat-") for t in threading.enumerate())


def test_timings_count_the_seconds_xla_spends_compiling_and_a_saved_record_keeps_its_own():
    timings = Timings()
    before = compiled()
    cached = jax.config.jax_enable_compilation_cache  # a command run in this process may have turned it on
    jax.config.update("jax_enable_compilation_cache", False)  # so that XLA compiles, not loads, the program
    try:
        with timings.phase("work"):
            # a program of a shape nothing else compiles: XLA compiles it here
            jax.jit(lambda x: jnp.tanh(x) * 3.0 + x.sum())(jnp.ones((3, 17, 29))).block_until_ready()
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)
    seconds, programs = compiled()
    assert programs > before[1] and seconds > before[0]
    rounded = timings.rounded()
    assert list(rounded) == ["work", "xla_compile"] and 0 < rounded["xla_compile"] <= rounded["work"] + 1e-3
    saved = Timings.of_record(rounded)  # as a saved run reads back: its count, not a new one
    assert saved.rounded() == rounded
