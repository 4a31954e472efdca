"""Batch augmentations on tensors, applied inside the training step.

Applying them to the batch (rather than per sample in the dataset) is what lets
:class:`distillery.recipes.views.Views` hand the very same augmented tensor to teacher and
student, or draw two independent views on purpose. Randomness comes from torch's
global generator, seeded by ``seed_everything``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SignalAugment(nn.Module):
    """1-D signals ``[B, L]`` or ``[B, C, L]``: per sample, a random shift of up to
    ``max_shift`` positions (edge values repeated), amplitude scaling by a factor in
    ``[1 - scale, 1 + scale]`` and Gaussian noise of std ``noise_std``."""

    def __init__(self, max_shift: int = 4, scale: float = 0.1, noise_std: float = 0.05):
        super().__init__()
        self.max_shift, self.scale, self.noise_std = max_shift, scale, noise_std

    def forward(self, x: Tensor) -> Tensor:
        squeeze = x.ndim == 2
        if squeeze:
            x = x.unsqueeze(1)
        b, _, length = x.shape
        if self.max_shift:
            shift = torch.randint(-self.max_shift, self.max_shift + 1, (b, 1, 1), device=x.device)
            idx = (torch.arange(length, device=x.device).view(1, 1, -1) - shift).clamp(
                0, length - 1
            )
            x = x.gather(2, idx.expand_as(x))
        if self.scale:
            x = x * (1 + self.scale * (2 * torch.rand(b, 1, 1, device=x.device) - 1))
        if self.noise_std:
            x = x + self.noise_std * torch.randn_like(x)
        return x.squeeze(1) if squeeze else x


class ImageAugment(nn.Module):
    """Images ``[B, C, H, W]``: per sample, a random crop after zero padding by
    ``padding`` pixels (a random translation) and a horizontal flip with prob 0.5."""

    def __init__(self, padding: int = 4, flip: bool = True):
        super().__init__()
        self.padding, self.flip = padding, flip

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        if self.padding:
            p = self.padding
            padded = nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b,), device=x.device)
            dx = torch.randint(0, 2 * p + 1, (b,), device=x.device)
            rows = (dy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
            cols = (dx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
            x = padded[
                torch.arange(b, device=x.device).view(b, 1, 1, 1),
                torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1),
                rows,
                cols,
            ]
        if self.flip:
            flip = torch.rand(b, device=x.device) < 0.5
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
        return x
