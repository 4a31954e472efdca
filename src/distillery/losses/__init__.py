"""Loss terms. Each is a small module with its formula in the docstring.

A new term is one class deriving from ``distillery.objective.LossTerm`` plus a
YAML entry under ``distill.terms`` naming it with ``_target_``.
"""

from distillery.losses.dkd import DKD
from distillery.losses.kd import HintonKD
from distillery.losses.task import CrossEntropy

__all__ = ["CrossEntropy", "DKD", "HintonKD"]
