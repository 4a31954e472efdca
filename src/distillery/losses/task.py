import torch.nn.functional as F
from torch import Tensor

from distillery.config import require
from distillery.contract import LossTerm, Outputs


class CrossEntropy(LossTerm):
    """Supervised task loss on labeled samples.

    loss_i = -sum_c q_ic * log softmax(z_i)_c,  q_i = (1 - eps) * onehot(y_i) + eps / C

    with ``eps = label_smoothing``. For mixed inputs ``onehot(y_i)`` is replaced by the
    soft target ``lam * onehot(y_a) + (1 - lam) * onehot(y_b)`` (``Outputs.targets``).
    Unlabeled samples never reach this term. Computed in float32 whatever the logits' dtype.

    Valid: ``0 <= label_smoothing < 1``.
    """

    needs_labels = True

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        require(0.0 <= label_smoothing < 1.0, "label_smoothing", "in [0, 1)", label_smoothing)
        self.label_smoothing = label_smoothing

    def forward(self, out: Outputs) -> Tensor:
        if out.targets is not None:
            eps = self.label_smoothing
            q = out.targets.float() * (1 - eps) + eps / out.targets.shape[-1]
            return -(q * F.log_softmax(out.student.float(), -1)).sum(-1)
        return F.cross_entropy(
            out.student.float(),
            out.labels,
            reduction="none",
            label_smoothing=self.label_smoothing,
        )
