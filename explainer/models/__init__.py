"""Models: the equinox transformer, its native format and the importers.

The shipped models are in the zoo (:mod:`explainer.zoo`), which builds on this package.
"""

from explainer.models.config import ModelConfig
from explainer.models.native import cast_model, init_random, load_model, save_model, weights_sha256
from explainer.models.transformer import Transformer

__all__ = [
    "ModelConfig",
    "Transformer",
    "cast_model",
    "init_random",
    "load_model",
    "save_model",
    "weights_sha256",
]
