"""Shared test setup: strict dtype promotion, a ``getkey`` fixture, small shared objects."""

from __future__ import annotations

import itertools

import jax
import pytest

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
