"""Relational feature distillation: the student matches relations between the samples
of a batch, so feature widths need not agree (no projector). Features are flattened to
``[B, D]``. Each term returns per-anchor values whose batch mean is the paper's loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.config import require
from distillery.contract import Outputs
from distillery.losses.feature import FeatureTerm


class RelationTerm(FeatureTerm):
    uses_projector = False

    def __init__(self, student: str, teacher: str):
        super().__init__(student, teacher, projector=None)

    def setup(self, student_shape, teacher_shape, key: str) -> None:
        if student_shape[0] != teacher_shape[0]:
            raise ValueError(
                f"{key}: batch sizes differ ({student_shape[0]} vs {teacher_shape[0]})"
            )

    def pair(self, out: Outputs) -> tuple[Tensor, Tensor]:
        s = out.extras["student_features"][self.student_tap].float().flatten(1)
        t = out.extras["teacher_features"][self.teacher_tap].detach().float().flatten(1)
        return s, t


class SimilarityPreserving(RelationTerm):
    """SP (Tung & Mori, ICCV 2019): G = row-normalise(F F^T);
    loss = ||G_T - G_S||_F^2 / B^2, i.e. loss_i = sum_j (G_S - G_T)_ij^2 / B, whose batch
    mean is the reference's value (RepDistiller ``distiller_zoo/SP.py``,
    ``Similarity.similarity_loss``, verified there by the paper's author)."""

    def forward(self, out: Outputs) -> Tensor:
        s, t = self.pair(out)
        g_s, g_t = F.normalize(s @ s.T, dim=1), F.normalize(t @ t.T, dim=1)
        return (g_s - g_t).pow(2).sum(1) / s.shape[0]


class PKT(RelationTerm):
    """PKT (Passalis & Tefas, ECCV 2018): features scaled to unit norm as the reference
    does, f / (||f|| + eps); cosine kernel K_ij = (cos(f_i, f_j) + 1) / 2, rows normalised
    to probabilities P_ij = K_ij / sum_j K_ij;
    loss_i = (1/B) sum_j P_T,ij log((P_T,ij + eps) / (P_S,ij + eps)),
    so the batch mean is the mean over all B^2 entries, the reference's value (the
    authors' ``cosine_similarity_loss`` in github passalis/probabilistic_kt ``nn/pkt.py``,
    copied as RepDistiller's ``PKT.cosine_similarity_loss``; eps = 1e-7). Valid:
    ``eps > 0`` (log(0) and 0/0 for opposite or zero features otherwise)."""

    def __init__(self, student: str, teacher: str, eps: float = 1e-7):
        super().__init__(student, teacher)
        require(eps > 0, "eps", "> 0", eps)
        self.eps = eps

    def forward(self, out: Outputs) -> Tensor:
        s, t = self.pair(out)

        def probs(f):
            f = f / (f.norm(dim=1, keepdim=True) + self.eps)
            k = (f @ f.T + 1) / 2
            return k / k.sum(1, keepdim=True)

        p_s, p_t = probs(s), probs(t)
        kl = p_t * ((p_t + self.eps).log() - (p_s + self.eps).log())
        return kl.sum(1) / s.shape[0]


def _pdist(f: Tensor) -> Tensor:
    """Euclidean distances with the reference's clamp: sqrt(max(||f_i - f_j||^2, 1e-12)),
    diagonal set to 0."""
    d = (f.unsqueeze(1) - f.unsqueeze(0)).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    return d * (1 - torch.eye(len(f), device=f.device))


class RKD(RelationTerm):
    """Relational KD (Park et al., CVPR 2019), as in the authors' code (github
    lenscloth/RKD ``metric/loss.py``: ``RkdDistance``, ``RKdAngle``; RepDistiller
    ``RKDLoss``). huber = smooth L1 with beta 1.

    distance: psi_D(i, j) = d_ij / mu, d = pdist (``_pdist``: the squared distance clamped
        at 1e-12, then sqrt, zero diagonal), mu = mean of the positive d_ij;
        D_i = (1/B) sum_j huber(psi_D^S(i, j), psi_D^T(i, j)) (over all j, the diagonal
        zeros included, so mean_i D_i is the reference's mean over the B^2 entries)
    angle: psi_A(j; i, k) = <e_ji, e_jk>, e_ji = normalize(f_i - f_j) (0 for i = j);
        A_j = (1/B^2) sum_{i, k} huber(psi_A^S(j; i, k), psi_A^T(j; i, k)) (mean_j A_j is
        the reference's mean over the B^3 entries)
    loss_i = distance_weight * D_i + angle_weight * A_i (defaults 25 and 50, RepDistiller's
    ``RKDLoss(w_d=25, w_a=50)``). Valid: ``distance_weight >= 0`` and ``angle_weight >= 0``,
    not both 0 (a negative weight would push the relations apart).
    """

    def __init__(
        self, student: str, teacher: str, distance_weight: float = 25.0, angle_weight: float = 50.0
    ):
        super().__init__(student, teacher)
        require(distance_weight >= 0, "distance_weight", ">= 0", distance_weight)
        require(angle_weight >= 0, "angle_weight", ">= 0", angle_weight)
        require(
            distance_weight > 0 or angle_weight > 0,
            "angle_weight",
            "> 0 when distance_weight is 0 (the term would be 0)",
            angle_weight,
        )
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    @staticmethod
    def distances(f: Tensor) -> Tensor:
        d = _pdist(f)
        return d / d[d > 0].mean()

    @staticmethod
    def angles(f: Tensor) -> Tensor:
        e = F.normalize(f.unsqueeze(0) - f.unsqueeze(1), p=2, dim=2)  # e[j, i] = (f_i - f_j)/||.||
        return torch.bmm(e, e.transpose(1, 2))  # [j, i, k]

    def forward(self, out: Outputs) -> Tensor:
        s, t = self.pair(out)
        with torch.no_grad():
            d_t, a_t = self.distances(t), self.angles(t)
        dist = F.smooth_l1_loss(self.distances(s), d_t, reduction="none").mean(1)
        ang = F.smooth_l1_loss(self.angles(s), a_t, reduction="none").mean((1, 2))
        return self.distance_weight * dist + self.angle_weight * ang
