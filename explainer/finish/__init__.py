"""The passes after training, each with a cost bound that does not grow with the number of units.

- :mod:`explainer.finish.passes`: the passes (repair, open restart, trim with a refit of a learned
  basis, closing a rotated adversary's attacks) and :func:`fit`, "train, then run the passes";
- :mod:`explainer.finish.search`: the exact searches they run (repair, trim, prune, every set of one
  size), on a number of masks bounded whatever the number of units;
- :mod:`explainer.finish.oracle`: the :class:`KLOracle` those searches score masks with, and the
  screens that pick a round's candidates.

Modules of the package import each other, never this ``__init__``.
"""

from explainer.finish.oracle import KLOracle
from explainer.finish.passes import Candidate, fit, passes_for
from explainer.finish.search import best_of_size, prune, repair, trim

__all__ = ["Candidate", "KLOracle", "best_of_size", "fit", "passes_for", "prune", "repair", "trim"]
