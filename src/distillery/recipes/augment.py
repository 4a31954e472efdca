"""Batch augmentations on tensors, applied inside the training step.

Applying them to the batch (rather than per sample in the dataset) is what lets
:class:`distillery.recipes.views.Views` hand the very same augmented tensor to teacher and
student, or draw two independent views on purpose. Randomness comes from torch's
global generator, seeded by ``seed_everything``, or, given ``seeds`` (one per sample:
a view pool, ``views.pool``), from a counter-based generator of each sample's seed
(:class:`Draws`): the same seed gives the same view, whatever the batch, device or run,
so a teacher-output cache can hold every view of the pool.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _signed(c: int) -> int:
    return c - 2**64 if c >= 2**63 else c


_GOLDEN, _MIX1, _MIX2 = (
    _signed(0x9E3779B97F4A7C15),
    _signed(0xBF58476D1CE4E5B9),
    _signed(0x94D049BB133111EB),
)


def _shift_right(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def counter_uniform(seeds: Tensor, start: int, n: int) -> Tensor:
    """``[B, n]`` uniforms in [0, 1): the splitmix64 finaliser (Steele et al. 2014) of
    ``seed * golden + counter`` for counters ``start .. start + n - 1``, in int64
    arithmetic (wrapping), 24 bits per float32. A fixed function of (seed, counter)."""
    counters = torch.arange(start, start + n, device=seeds.device)
    z = seeds.long().unsqueeze(1) * _GOLDEN + counters
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 40).float() / float(1 << 24)


class Draws:
    """Where an augmentation's random numbers come from, per sample: torch's global
    generator (``seeds`` None: the calls below draw exactly what ``torch.rand``,
    ``torch.randn`` and ``torch.randint`` would), or :func:`counter_uniform` of each
    sample's seed, successive calls taking successive counters."""

    def __init__(self, batch: int, device, seeds: Tensor | None = None):
        self.batch, self.device, self.seeds, self.used = batch, device, seeds, 0
        if seeds is not None and len(seeds) != batch:
            raise ValueError(f"augment: {len(seeds)} seeds for a batch of {batch}")

    def _uniform(self, shape: tuple[int, ...]) -> Tensor:
        n = math.prod(shape)
        u = counter_uniform(self.seeds.to(self.device), self.used, n)
        self.used += n
        return u.view(self.batch, *shape)

    def uniform(self, *shape: int) -> Tensor:
        if self.seeds is None:
            return torch.rand(self.batch, *shape, device=self.device)
        return self._uniform(shape)

    def normal(self, *shape: int) -> Tensor:
        if self.seeds is None:
            return torch.randn(self.batch, *shape, device=self.device)
        u1, u2 = 1.0 - self._uniform(shape), self._uniform(shape)  # Box-Muller, u1 in (0, 1]
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)

    def integers(self, low: int, high: int, *shape: int) -> Tensor:
        if self.seeds is None:
            return torch.randint(low, high, (self.batch, *shape), device=self.device)
        return low + (self._uniform(shape) * (high - low)).long().clamp(max=high - low - 1)


class SignalAugment(nn.Module):
    """1-D signals ``[B, L]`` or ``[B, C, L]``: per sample, a random shift of up to
    ``max_shift`` positions (edge values repeated), amplitude scaling by a factor in
    ``[1 - scale, 1 + scale]`` and Gaussian noise of std ``noise_std``."""

    def __init__(self, max_shift: int = 4, scale: float = 0.1, noise_std: float = 0.05):
        super().__init__()
        self.max_shift, self.scale, self.noise_std = max_shift, scale, noise_std

    def forward(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        squeeze = x.ndim == 2
        if squeeze:
            x = x.unsqueeze(1)
        b, _, length = x.shape
        draws = Draws(b, x.device, seeds)
        if self.max_shift:
            shift = draws.integers(-self.max_shift, self.max_shift + 1, 1, 1)
            idx = (torch.arange(length, device=x.device).view(1, 1, -1) - shift).clamp(
                0, length - 1
            )
            x = x.gather(2, idx.expand_as(x))
        if self.scale:
            x = x * (1 + self.scale * (2 * draws.uniform(1, 1) - 1))
        if self.noise_std:
            x = x + self.noise_std * draws.normal(*x.shape[1:]).to(x.dtype)
        return x.squeeze(1) if squeeze else x


class ImageAugment(nn.Module):
    """Images ``[B, C, H, W]``: per sample, a random crop after zero padding by
    ``padding`` pixels (a random translation) and a horizontal flip with prob 0.5."""

    def __init__(self, padding: int = 4, flip: bool = True):
        super().__init__()
        self.padding, self.flip = padding, flip

    def forward(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        b, _, h, w = x.shape
        draws = Draws(b, x.device, seeds)
        if self.padding:
            p = self.padding
            padded = nn.functional.pad(x, (p, p, p, p))
            dy = draws.integers(0, 2 * p + 1)
            dx = draws.integers(0, 2 * p + 1)
            rows = (dy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
            cols = (dx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
            x = padded[
                torch.arange(b, device=x.device).view(b, 1, 1, 1),
                torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1),
                rows,
                cols,
            ]
        if self.flip:
            flip = draws.uniform() < 0.5
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
        return x
