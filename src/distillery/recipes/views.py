"""Views: what teacher and student see in a training step.

``consistent=True`` (the default, Beyer et al. 2022): the batch is augmented once and
mixed once, and the same tensor goes to teacher and student. ``consistent=False`` is
the "independent views" variant kept for comparison: teacher and student get two
independent augmentation draws of the same samples (mixed with the same partners and
weights).

Mixing partners are drawn within the labeled samples and within the unlabeled ones
(:func:`grouped_permutation`), so a labeled sample stays labeled, with soft target
``lam * onehot(y_i) + (1 - lam) * onehot(y_perm(i))``, and the number of labeled samples
per batch stays the data's fixed mix: per-batch means of label terms remain exact under
gradient accumulation. (``mix_labels`` still marks a sample mixed with an unlabeled
partner as unlabeled, for mixers given other partners.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.core.objective import UNLABELED


class ViewBatch(NamedTuple):
    student: Tensor  # student inputs
    teacher: Tensor  # teacher inputs (the same tensor object when consistent)
    labels: Tensor  # hard labels (dominant source), UNLABELED where unknown
    targets: Tensor | None  # soft targets [B, C] after mixing, else None


class Views(nn.Module):
    def __init__(
        self,
        augment: nn.Module | None = None,
        mix: nn.Module | None = None,
        consistent: bool = True,
    ):
        super().__init__()
        self.augment, self.mix, self.consistent = augment, mix, consistent

    def forward(self, x: Tensor, labels: Tensor, num_classes: int) -> ViewBatch:
        aug = self.augment or nn.Identity()
        xs = aug(x)
        xt = xs if self.consistent else aug(x)
        if self.mix is None:
            return ViewBatch(xs, xt, labels, None)
        xs_mixed, perm, lam = self.mix(xs, grouped_permutation(labels))
        if self.consistent:
            xt_mixed = xs_mixed
        else:  # same partners and weights, other augmentation draw
            w = lam.view(-1, *([1] * (xt.ndim - 1))).to(xt.dtype)
            xt_mixed = w * xt + (1 - w) * xt[perm]
        return ViewBatch(xs_mixed, xt_mixed, *mix_labels(labels, perm, lam, num_classes))


def grouped_permutation(labels: Tensor) -> Tensor:
    """A random permutation that maps labeled samples to labeled partners and unlabeled
    samples to unlabeled ones."""
    perm = torch.empty_like(labels)
    for group in (labels != UNLABELED, labels == UNLABELED):
        idx = group.nonzero().squeeze(1)
        perm[idx] = idx[torch.randperm(len(idx), device=labels.device)]
    return perm


def mix_labels(
    labels: Tensor, perm: Tensor, lam: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Hard labels of the dominant source and soft targets; UNLABELED if either source is."""
    partner = labels[perm]
    known = (labels != UNLABELED) & (partner != UNLABELED)
    safe_a, safe_b = labels.clamp_min(0), partner.clamp_min(0)
    lam = lam.float().view(-1, 1)
    targets = (
        lam * F.one_hot(safe_a, num_classes).float()
        + (1 - lam) * F.one_hot(safe_b, num_classes).float()
    )
    hard = torch.where(lam.view(-1) >= 0.5, safe_a, safe_b)
    hard = torch.where(known, hard, torch.full_like(hard, UNLABELED))
    return hard, targets
