"""Universal Logit Distillation: token distillation between different tokenizers.

Student and teacher read the same text in their own tokens, so neither the vocabularies
nor the positions correspond. ULD (Boizard et al. 2024, "Towards Cross-Tokenizer
Distillation: the Universal Logit Distillation Loss for LLMs", TMLR; reference code
github.com/Nicolas-BZRD/llm-recipes) pairs the k-th response token of the student with
the k-th response token of the teacher (k < the shorter response) and compares the two
next-token distributions up to a permutation of the vocabulary: with p_S and p_T
sorted in decreasing order and the smaller vocabulary padded with zeros,

    ULD_k = sum_i | p_S,(i) - p_T,(i) |

the closed form of the Wasserstein-1 distance between the sorted distributions under
the 0/1 cost the paper uses. Student response positions: ``labels != -100``; teacher's:
``extras["teacher_labels"] != -100`` (the same responses in the teacher's tokens).
Per token ``[B, T]`` at the student's positions (0 beyond the shorter response); add
``TokenCrossEntropy`` for the paper's CE + lambda * ULD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.config import require
from distillery.contract import IGNORE, LossTerm, Outputs


def uld_per_row(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """ULD between rows of ``[N, V_s]`` and ``[N, V_t]`` logits: shape [N], float32."""
    ps = F.softmax(student.float() / temperature, -1).sort(-1, descending=True).values
    pt = F.softmax(teacher.float() / temperature, -1).sort(-1, descending=True).values
    v = max(ps.shape[-1], pt.shape[-1])
    ps, pt = F.pad(ps, (0, v - ps.shape[-1])), F.pad(pt, (0, v - pt.shape[-1]))
    return (ps - pt).abs().sum(-1)


class ULD(LossTerm):
    """See the module docstring; ``temperature`` softens both distributions.

    Valid: ``temperature > 0``."""

    needs_teacher = True
    per = "token"
    cross_tokenizer = True  # the task may pair a student and teacher of other tokenizers

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        require(temperature > 0, "temperature", "> 0", temperature)
        self.temperature = temperature

    def forward(self, out: Outputs) -> Tensor:
        teacher_labels = out.extras.get("teacher_labels")
        if teacher_labels is None:  # one tokenizer: the same positions
            teacher_labels = out.labels
        s_mask, t_mask = out.labels != IGNORE, teacher_labels != IGNORE
        # the k-th response token of each side, k < the shorter response: row-major order
        # pairs them, as both sides keep the same number of positions per row
        n = torch.minimum(s_mask.sum(1), t_mask.sum(1)).unsqueeze(1)
        rows, s_pos = (s_mask & (s_mask.cumsum(1) <= n)).nonzero(as_tuple=True)
        t_rows, t_pos = (t_mask & (t_mask.cumsum(1) <= n)).nonzero(as_tuple=True)
        values = torch.zeros(out.labels.shape, dtype=torch.float32, device=out.student.device)
        if len(rows):
            d = uld_per_row(
                out.student[rows, s_pos], out.teacher[t_rows, t_pos].detach(), self.temperature
            )
            values = values.index_put((rows, s_pos), d)
        return values
