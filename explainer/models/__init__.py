"""Models: the equinox transformer, its native format, and the zoo of shipped models."""

from explainer.models.config import ModelConfig
from explainer.models.native import init_random, load_model, save_model, weights_sha256
from explainer.models.transformer import Transformer
from explainer.models.zoo import load_truth, resolve_model, zoo_entries, zoo_names

__all__ = [
    "ModelConfig",
    "Transformer",
    "init_random",
    "load_model",
    "load_truth",
    "resolve_model",
    "save_model",
    "weights_sha256",
    "zoo_entries",
    "zoo_names",
]
