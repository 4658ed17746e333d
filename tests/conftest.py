"""Shared test setup: strict dtype promotion, a ``getkey`` fixture, small shared objects."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

# Compiled programs persist on disk for the whole run (and for the CLI subprocesses tests start,
# which inherit the environment): many tests compile the same steps for the same small models, and
# each CLI call would otherwise compile from nothing. The size limit turns on JAX's file lock, so
# the test processes of ``pytest -n`` share the folder safely. A warm folder only skips XLA
# compilation; tracing (and the no-retrace checks) is unchanged.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).parent.parent / ".jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax  # noqa: E402  (after the cache settings, which JAX reads at import)
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

PLANTED = ("planted-distractor", "planted-cancel", "planted-joint")


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call (deterministic across runs)."""
    counter = itertools.count()
    return lambda: jax.random.key(next(counter))


@pytest.fixture(scope="session")
def planted_models():
    from explainer.models import load_model
    from explainer.zoo import resolve_model

    return {name: load_model(resolve_model(name)) for name in PLANTED}


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: every module compiles steps for its
    own models, and one process running the whole suite would otherwise keep all of them."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def cli_here():
    """``explainer ARGS`` run in this process as the console script runs it, for tests about what a
    command answers rather than about the process (a subprocess costs a fresh interpreter and a cold
    start of JAX per call). Returns the exit status, stdout and stderr like ``subprocess.run``; an
    exception that escapes is printed with its traceback and exits 1, as Python would."""
    import contextlib
    import io
    import subprocess
    import traceback

    from explainer.cli import main

    def run(*args, cwd=None):
        out, err, code = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd or os.getcwd()):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                if isinstance(e.code, str):  # sys.exit("message") prints it and exits 1
                    print(e.code, file=err)
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:  # noqa: BLE001  (shown as the interpreter would show it)
                traceback.print_exc()
                code = 1
        return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())

    return run


def _equations(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _equations(inner)
    return total


@pytest.fixture
def equations():
    """Equations of a jaxpr, those of the programs inside its loops and calls counted once each:
    how large a traced program is."""
    return _equations
