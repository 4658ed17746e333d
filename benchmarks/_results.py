"""Shared by the benchmark scripts: where results go and how they are written."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import jax

RESULTS_DIR = Path(__file__).parent / "results"


def write_record(path: Path, args: argparse.Namespace, **fields) -> None:
    """Write a benchmark's JSON atomically, with the command line that reproduces it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": shlex.join(sys.orig_argv),
        "settings": vars(args),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        **fields,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")  # paths as strings
    os.replace(tmp, path)


def cold_env() -> dict[str, str]:
    """The environment of a measured subprocess: no compiled programs kept on disk (the command
    line's cache, and JAX's), so that every run compiles as a first run does."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    return {**env, "EXPLAINER_COMPILE_CACHE": "off"}
