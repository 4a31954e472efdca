import torch.nn.functional as F
from torch import Tensor

from distillery.config import require
from distillery.contract import LossTerm, Outputs


def kl_from_log_probs(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) over the last dim, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def kl_teacher_student(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float
) -> Tensor:
    """Per-sample KL(p_T || q_S) at a temperature, in float32: shape [B]."""
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    return kl_from_log_probs(F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1))


class HintonKD(LossTerm):
    """Hinton et al. (2015) soft-target distillation.

    loss_i = T^2 * KL(p_i || q_i) = T^2 * sum_c p_ic (log p_ic - log q_ic)

    with p = softmax(teacher_logits / T) (the target) and q = softmax(student_logits / T).
    The T^2 factor keeps the gradient scale independent of T. The objective averages
    loss_i over samples (``batchmean``), labeled or not. Computed in float32.

    Valid: ``temperature > 0``.
    """

    needs_teacher = True

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        require(temperature > 0, "temperature", "> 0", temperature)
        self.temperature = float(temperature)

    def forward(self, out: Outputs) -> Tensor:
        return self.temperature**2 * kl_teacher_student(out.teacher, out.student, self.temperature)
