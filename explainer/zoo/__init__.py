"""The zoo: the small models shipped inside the package, and the code that builds them.

The shipped model folders live in ``explainer/zoo/models/<name>/`` (native format, see
:mod:`explainer.models.native`, plus ``prompts.json``, ``card.json`` and, where known,
``truth.json``); :mod:`explainer.zoo.catalog` finds and lists them. They are built by
:mod:`explainer.zoo.planted` (hand-weighted), :mod:`explainer.zoo.tracr_import` (compiled by tracr,
through :mod:`~explainer.zoo.tracr_compile` and :mod:`~explainer.zoo.tracr_prompts`),
:mod:`explainer.zoo.training` and :mod:`explainer.zoo.lm_training` (trained from a seed);
:mod:`explainer.zoo.ground_truth` checks a ground truth and :mod:`explainer.zoo.rotated` disguises a
planted model. The zoo builds on :mod:`explainer.models` and :mod:`explainer.tasks`, never the
other way round.

>>> from explainer.models import load_model
>>> load_model(resolve_model("planted-joint")).config.n_layers
1
"""

from explainer.zoo.catalog import ZOO_DIR, ZooEntry, load_truth, resolve_model, zoo_entries, zoo_names

__all__ = ["ZOO_DIR", "ZooEntry", "load_truth", "resolve_model", "zoo_entries", "zoo_names"]
