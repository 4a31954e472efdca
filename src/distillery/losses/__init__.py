"""Loss terms. Each is a small module with its formula in the docstring.

A new term is one class deriving from ``distillery.contract.LossTerm`` plus a
YAML entry under ``distill.terms`` naming it with ``_target_``.
"""

from distillery.losses.crd import CRD
from distillery.losses.dkd import DKD
from distillery.losses.embedding import EmbeddingCosine, EmbeddingMSE, SimilarityMatch
from distillery.losses.feature import (
    AttentionMapKL,
    AttentionTransfer,
    CosineFeature,
    FeatureTerm,
    FitNet,
    HiddenStates,
    ValueRelationKL,
)
from distillery.losses.fused import FusedTokenLoss
from distillery.losses.kd import HintonKD
from distillery.losses.preference import DPO
from distillery.losses.relation import PKT, RKD, SimilarityPreserving
from distillery.losses.task import CrossEntropy
from distillery.losses.token import TokenCrossEntropy, TokenKD
from distillery.losses.uld import ULD

__all__ = [
    "CRD", "AttentionMapKL", "AttentionTransfer", "CosineFeature", "CrossEntropy", "DKD", "DPO", "EmbeddingCosine",
    "EmbeddingMSE", "FeatureTerm", "FitNet", "FusedTokenLoss",
    "HiddenStates", "HintonKD", "PKT", "RKD", "SimilarityMatch", "SimilarityPreserving", "TokenCrossEntropy", "TokenKD", "ULD", "ValueRelationKL",
]  # fmt: skip
