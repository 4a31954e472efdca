"""Relational feature distillation: the student matches relations between the samples
of a batch, so feature widths need not agree (no projector). Features are flattened to
``[B, D]``. Each term returns per-anchor values whose batch mean is the paper's loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.core.objective import Outputs
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
    """SP (Tung & Mori 2019): G = row-normalise(F F^T);
    loss = ||G_S - G_T||_F^2 / B^2, i.e. loss_i = sum_j (G_S - G_T)_ij^2 / B."""

    def forward(self, out: Outputs) -> Tensor:
        s, t = self.pair(out)
        g_s, g_t = F.normalize(s @ s.T, dim=1), F.normalize(t @ t.T, dim=1)
        return (g_s - g_t).pow(2).sum(1) / s.shape[0]


class PKT(RelationTerm):
    """PKT (Passalis & Tefas 2018): cosine kernel K_ij = (cos(f_i, f_j) + 1) / 2, rows
    normalised to probabilities P_ij = K_ij / sum_j K_ij;
    loss_i = KL(P_T[i] || P_S[i]) = sum_j P_T,ij log(P_T,ij / P_S,ij)."""

    def __init__(self, student: str, teacher: str, eps: float = 1e-7):
        super().__init__(student, teacher)
        self.eps = eps

    def forward(self, out: Outputs) -> Tensor:
        s, t = self.pair(out)

        def probs(f):
            f = F.normalize(f, dim=1)
            k = (f @ f.T + 1) / 2
            return k / k.sum(1, keepdim=True)

        p_s, p_t = probs(s), probs(t)
        return (p_t * ((p_t + self.eps).log() - (p_s + self.eps).log())).sum(1)


def _pdist(f: Tensor) -> Tensor:
    d = (f.unsqueeze(1) - f.unsqueeze(0)).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    return d * (1 - torch.eye(len(f), device=f.device))


class RKD(RelationTerm):
    """Relational KD (Park et al. 2019).

    distance: psi_D(i, j) = ||f_i - f_j|| / mu, mu = mean of the non-zero distances;
        D_i = mean_{j != i} huber(psi_D^S(i, j), psi_D^T(i, j))
    angle: psi_A(i, j, k) = <e_ij, e_kj>, e_ij = (f_i - f_j) / ||f_i - f_j||;
        A_j = mean_{i, k} huber(psi_A^S(i, j, k), psi_A^T(i, j, k))
    loss_i = distance_weight * D_i + angle_weight * A_i (huber = smooth L1, beta 1).
    """

    def __init__(
        self, student: str, teacher: str, distance_weight: float = 25.0, angle_weight: float = 50.0
    ):
        super().__init__(student, teacher)
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
        b = s.shape[0]
        off = 1 - torch.eye(b, device=s.device)
        d = F.smooth_l1_loss(self.distances(s), self.distances(t), reduction="none")
        dist = (d * off).sum(1) / max(b - 1, 1)
        with torch.no_grad():
            a_t = self.angles(t)
        ang = F.smooth_l1_loss(self.angles(s), a_t, reduction="none").mean((1, 2))
        return self.distance_weight * dist + self.angle_weight * ang
