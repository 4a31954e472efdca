"""Views: what teacher and student see in a training step.

``consistent=True`` (the default, Beyer et al. 2022): the batch is augmented once and
mixed once, and the same tensor goes to teacher and student. ``consistent=False`` is
the "independent views" variant kept for comparison: teacher and student get two
independent augmentation draws of the same samples (mixed with the same partners and
weights).

``pool: N`` (a view pool): each sample has N views, its v-th augmented with the seed
``sample_id * N + v`` (``recipes.augment.Draws``: the same view whatever the batch or
run), and every step shows each sample one of them, drawn at random. Training still
sees N different views of each sample, and a teacher-output cache (``python -m
distillery.cache``) can hold the teacher's outputs for all of them (with ``mix: null``:
a mixed input depends on its batch partner). Consistent views only.

Mixing partners are drawn within the labeled samples and within the unlabeled ones
(:func:`grouped_permutation`), so a labeled sample stays labeled, with soft target
``lam * onehot(y_i) + (1 - lam) * onehot(y_perm(i))``, and the number of labeled samples
per batch stays the data's fixed mix: per-batch means of label terms remain exact under
gradient accumulation. (``mix_labels`` still marks a sample mixed with an unlabeled
partner as unlabeled, for mixers given other partners.)
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.contract import UNLABELED


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
        pool: int | None = None,
    ):
        super().__init__()
        if pool is not None:
            if not isinstance(pool, int) or pool < 1:
                raise ValueError(f"views.pool: {pool!r} is not a positive integer (null: no pool)")
            if augment is None:
                raise ValueError("views.pool: a pool of views needs views.augment")
            if not consistent:
                raise ValueError("views.pool: pooled views are shared by teacher and student "
                                 "(views.consistent: true)")  # fmt: skip
            if "seeds" not in inspect.signature(augment.forward).parameters:
                raise ValueError(f"views.augment: {type(augment).__name__}.forward takes no "
                                 f"seeds; a view pool needs forward(x, seeds)")  # fmt: skip
        self.augment, self.mix, self.consistent, self.pool = augment, mix, consistent, pool

    def pooled(self, x: Tensor, sample_ids: Tensor, view: Tensor | int) -> Tensor:
        """View ``view`` (per sample, or one for all) of the pool of each sample."""
        seeds = sample_ids.long().to(x.device) * self.pool + torch.as_tensor(view, device=x.device)
        return self.augment(x, seeds=seeds.expand(len(x)))

    def forward(
        self, x: Tensor, labels: Tensor, num_classes: int, sample_ids: Tensor | None = None
    ) -> ViewBatch:
        aug = self.augment or nn.Identity()
        if self.pool is not None:
            if sample_ids is None:
                raise ValueError("views.pool: the batches carry no sample_id")
            xs = xt = self.pooled(x, sample_ids, torch.randint(self.pool, (len(x),)))
        else:
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
