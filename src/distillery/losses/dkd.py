import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.config import require
from distillery.contract import UNLABELED, LossTerm, Outputs


class DKD(LossTerm):
    """Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

    With target class t, p = softmax(z_T / T), q = softmax(z_S / T):

        b = [p_t, 1 - p_t]  (binary target / non-target split), likewise b_S from q
        p_hat = softmax over non-target classes of z_T / T, likewise q_hat
        TCKD_i = KL(b_T || b_S)
        NCKD_i = KL(p_hat || q_hat)
        loss_i = warm(epoch) * (alpha * TCKD_i + beta * NCKD_i) * T^2

    ``warm(epoch) = min(epoch / warmup_epochs, 1)`` (1 when warmup_epochs == 0), as in
    the reference implementation. Unlabeled samples use the teacher's top-1 class as t.
    Computed in float32.

    Valid: ``temperature > 0``; ``alpha >= 0`` and ``beta >= 0``, not both 0 (weights of
    the two parts: a negative one would reward diverging from the teacher);
    ``warmup_epochs >= 0``.
    """

    needs_teacher = True

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_epochs: float = 0.0,
    ):
        super().__init__()
        require(temperature > 0, "temperature", "> 0", temperature)
        require(alpha >= 0, "alpha", ">= 0", alpha)
        require(beta >= 0, "beta", ">= 0", beta)
        require(alpha > 0 or beta > 0, "beta", "> 0 when alpha is 0 (the term would be 0)", beta)
        require(warmup_epochs >= 0, "warmup_epochs", ">= 0 (0: no warmup)", warmup_epochs)
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature = float(temperature)
        self.warmup_epochs = float(warmup_epochs)

    def forward(self, out: Outputs) -> Tensor:
        T = self.temperature
        zt, zs = out.teacher.float() / T, out.student.float() / T
        target = torch.where(out.labels == UNLABELED, zt.argmax(-1), out.labels)
        gt = F.one_hot(target, zs.shape[-1]).bool()

        p, q = zt.softmax(-1), zs.softmax(-1)
        p_t, q_t = p[gt], q[gt]
        b_t = torch.stack([p_t, 1 - p_t], -1).clamp_min(1e-12)
        b_s = torch.stack([q_t, 1 - q_t], -1).clamp_min(1e-12)
        tckd = (b_t * (b_t.log() - b_s.log())).sum(-1)

        # Non-target distributions: mask the target logit out with a large negative value.
        log_p_hat = F.log_softmax(zt.masked_fill(gt, -1e9), -1)
        log_q_hat = F.log_softmax(zs.masked_fill(gt, -1e9), -1)
        nckd = (log_p_hat.exp() * (log_p_hat - log_q_hat)).masked_fill(gt, 0.0).sum(-1)

        warm = 1.0 if self.warmup_epochs <= 0 else min(out.epoch / self.warmup_epochs, 1.0)
        return warm * (self.alpha * tckd + self.beta * nckd) * T**2
