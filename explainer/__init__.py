"""explainer: learned, adversarially robust explanations of transformer behaviours.

>>> import explainer
>>> e = explainer.explain("planted-distractor", steps=300, progress=False)
>>> e.size
2
"""

__version__ = "0.1.0"

from explainer.api import attack_run, evaluate, explain, load_model, open_run  # noqa: E402
from explainer.errors import ExplainerError  # noqa: E402
from explainer.explanation import Explanation, load  # noqa: E402
from explainer.frontier.sweep import sweep  # noqa: E402
from explainer.train.config import TrainConfig  # noqa: E402
from explainer.train.config_files import load_config  # noqa: E402

__all__ = [
    "attack_run",
    "Explanation",
    "ExplainerError",
    "TrainConfig",
    "evaluate",
    "explain",
    "load",
    "load_config",
    "load_model",
    "open_run",
    "sweep",
]
