"""Adversaries: they re-include units an explanation excluded, looking for a set that moves the
scrubbed model's predictions.

- :mod:`adversary.discrete`: discrete searches that grade a finished explanation (greedy with
  restarts, random search, gradient-guided, exhaustive when small).
"""

from adversary.discrete import METHODS, AttackResult, attack, attack_all

__all__ = ["METHODS", "AttackResult", "attack", "attack_all"]
