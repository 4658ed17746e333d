"""Training an explanation: the typed settings, the step, the one step loop and the dual ascent.

- :mod:`explainer.train.config`: :class:`TrainConfig` and its groups of settings, their help and flags;
- :mod:`explainer.train.config_files`: settings from TOML files and saved run records;
- :mod:`explainer.train.step`: the jitted training step, :func:`train_gates` and the thresholding;
- :mod:`explainer.train.loop`: :func:`run_steps`, the loop every training run and ladder steps through;
- :mod:`explainer.train.dual`: the dual ascent on log λ.

The passes after training are :mod:`explainer.finish`; :func:`explainer.finish.passes.fit` is
"train, then finish". Modules of the package import each other, never this ``__init__``.
"""

from explainer.train.config import TrainConfig
from explainer.train.config_files import load_config
from explainer.train.dual import DualAscent, dual_ascent
from explainer.train.loop import run_steps
from explainer.train.step import (
    CACHE_LIMIT_BYTES,
    FIXED_LOGIT,
    OPEN_LOGIT,
    InLoopAdversary,
    Trained,
    TrainProgram,
    TrainState,
    TrainStep,
    constants_optimizer,
    dual_ascent_of,
    finish,
    init_state,
    make_optimizer,
    make_step,
    refit_bases,
    train_gates,
    train_program,
)

__all__ = [
    "CACHE_LIMIT_BYTES",
    "FIXED_LOGIT",
    "OPEN_LOGIT",
    "DualAscent",
    "InLoopAdversary",
    "TrainConfig",
    "TrainProgram",
    "TrainState",
    "TrainStep",
    "Trained",
    "constants_optimizer",
    "dual_ascent",
    "dual_ascent_of",
    "finish",
    "init_state",
    "load_config",
    "make_optimizer",
    "make_step",
    "refit_bases",
    "run_steps",
    "train_gates",
    "train_program",
]
