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
    from explainer.models import load_model, resolve_model

    return {name: load_model(resolve_model(name)) for name in PLANTED}
