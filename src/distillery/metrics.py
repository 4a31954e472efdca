"""Metric functions of the report card (plain tensors, no Lightning).

All take logits ``[N, C]`` (any float dtype; computed in float32) and labels ``[N]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.losses.kd import kl_teacher_student


def expected_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)| over equal-width confidence bins
    (top-1 confidence; bins (k/n, (k+1)/n], as in Guo et al. 2017 and torchmetrics)."""
    probs = logits.float().softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    bins = torch.clamp(torch.ceil(conf * n_bins) - 1, 0, n_bins - 1).long()
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.double().mean() * (correct[m].double().mean() - conf[m].double().mean()).abs()
    return float(ece)


def classification_metrics(
    logits: Tensor, labels: Tensor, teacher_logits: Tensor | None
) -> dict[str, float]:
    """accuracy, nll, ece and (against a teacher) agreement and kl_to_teacher."""
    logits = logits.float()
    out = {
        "accuracy": float((logits.argmax(-1) == labels).float().mean()),
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": expected_calibration_error(logits, labels),
    }
    if teacher_logits is not None:
        out["agreement"] = float((logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean())
        out["kl_to_teacher"] = float(kl_teacher_student(teacher_logits, logits, 1.0).mean())
    return out
