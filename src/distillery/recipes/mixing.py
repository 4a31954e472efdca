"""Input mixing for distillation: mixup and cutmix.

A mixer returns the mixed inputs, the partner permutation and the per-sample weight
``lam`` of the original sample: ``x_mix_i ~ lam_i * x_i + (1 - lam_i) * x_perm(i)``.
The partners are a random permutation, or ``perm`` when given (``distillery.recipes.views``
passes one that keeps labeled and unlabeled samples apart).
:class:`distillery.recipes.views.Views` turns (labels, perm, lam) into soft targets, and the
teacher labels the mixed input itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Mixup(nn.Module):
    """Zhang et al. 2018. ``lam_i ~ Beta(alpha, alpha)`` per sample; any input shape."""

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"mixup alpha must be > 0, got {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor, perm: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        b = x.shape[0]
        perm = torch.randperm(b, device=x.device) if perm is None else perm
        beta = torch.distributions.Beta(torch.tensor(self.alpha), torch.tensor(self.alpha))
        lam = beta.sample((b,)).to(x.device, torch.float32)
        w = lam.view(b, *([1] * (x.ndim - 1))).to(x.dtype)
        return w * x + (1 - w) * x[perm], perm, lam


class CutMix(nn.Module):
    """Yun et al. 2019, for images ``[B, C, H, W]``: one box per batch pasted from the
    permuted batch; ``lam`` = 1 - (box area / image area) after clipping to the image."""

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"cutmix alpha must be > 0, got {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor, perm: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        if x.ndim != 4:
            raise ValueError(
                f"CutMix needs images [B, C, H, W], got shape {tuple(x.shape)}; use Mixup"
            )
        b, _, h, w = x.shape
        perm = torch.randperm(b, device=x.device) if perm is None else perm
        lam0 = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        cut_h, cut_w = int(h * (1 - lam0) ** 0.5), int(w * (1 - lam0) ** 0.5)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        mixed = x.clone()
        mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        return mixed, perm, torch.full((b,), lam, device=x.device)


class MixupOrCutMix(nn.Module):
    """Per batch, cutmix with probability ``cutmix_prob``, else mixup."""

    def __init__(
        self, mixup_alpha: float = 1.0, cutmix_alpha: float = 1.0, cutmix_prob: float = 0.5
    ):
        super().__init__()
        self.mixup, self.cutmix, self.cutmix_prob = (
            Mixup(mixup_alpha),
            CutMix(cutmix_alpha),
            cutmix_prob,
        )

    def forward(self, x: Tensor, perm: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        use_cutmix = x.ndim == 4 and float(torch.rand(())) < self.cutmix_prob
        return self.cutmix(x, perm) if use_cutmix else self.mixup(x, perm)
