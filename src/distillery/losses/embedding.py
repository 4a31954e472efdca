"""Embedding distillation terms: the student's output embedding matches the teacher's.

``Outputs.student`` and ``Outputs.teacher`` are embeddings ``[B, D]`` (same D: a
narrower student maps to the teacher's width with its own output layer, see
``distillery.models.hf.HFSentenceEncoder(output_dim=...)``). No labels needed, so
these terms train on unlabeled text. Per-sample losses, float32.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distillery.contract import LossTerm, Outputs


def _pair(out: Outputs) -> tuple[Tensor, Tensor]:
    s, t = out.student.float(), out.teacher.detach().float()
    if s.shape != t.shape:
        raise ValueError(
            f"student embeddings {tuple(s.shape)} and teacher embeddings {tuple(t.shape)} "
            f"differ; set student.output_dim to the teacher's width"
        )
    return s, t


class EmbeddingCosine(LossTerm):
    """loss_i = 1 - cos(e_S,i, e_T,i)."""

    needs_teacher = True

    def forward(self, out: Outputs) -> Tensor:
        s, t = _pair(out)
        return 1 - F.cosine_similarity(s, t, dim=-1)


class EmbeddingMSE(LossTerm):
    """loss_i = mean_j (e_S,ij - e_T,ij)^2."""

    needs_teacher = True

    def forward(self, out: Outputs) -> Tensor:
        s, t = _pair(out)
        return (s - t).pow(2).mean(-1)


class SimilarityMatch(LossTerm):
    """In-batch similarity structure (what nearest-neighbour search sees): with
    S_ij = cos(e_S,i, e_S,j) and T_ij = cos(e_T,i, e_T,j) over the batch,
    loss_i = mean_{j != i} (S_ij - T_ij)^2. A batch of one gives 0."""

    needs_teacher = True

    def forward(self, out: Outputs) -> Tensor:
        s, t = _pair(out)
        b = s.shape[0]
        if b < 2:
            return s.sum(-1) * 0.0
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        diff = (s @ s.T - t @ t.T).pow(2)
        return (diff.sum(1) - diff.diagonal()) / (b - 1)
