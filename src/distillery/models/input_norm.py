"""Input normalisation: the one place where inputs are normalised.

Datamodules yield raw inputs (images in [0, 1], signals as generated). The student
normalises with the data's statistics (``data.input_norm``) and every teacher
normalises with its own (a run-checkpoint teacher with the statistics of the run
that trained it, a timm/state-dict teacher with its ``input_norm`` config), so a
teacher trained on other statistics still sees what it expects.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class InputNorm(nn.Module):
    """x -> (x - mean) / std, with mean/std broadcast over dim 1 (channels).

    ``mean=None`` and ``std=None`` make it the identity. A single value applies to
    every channel.
    """

    def __init__(
        self,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
    ):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("input_norm: give both mean and std, or neither")
        self.enabled = mean is not None
        mean_t = torch.as_tensor(0.0 if mean is None else mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(1.0 if std is None else std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel():
            raise ValueError(
                f"input_norm: mean has {mean_t.numel()} values but std has {std_t.numel()}"
            )
        if (std_t <= 0).any():
            raise ValueError(f"input_norm: std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.mean.numel() == 1 or x.ndim < 2:
            return (x - self.mean) / self.std
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def extra_repr(self) -> str:
        if not self.enabled:
            return "identity"
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"

    @classmethod
    def from_config(cls, cfg) -> InputNorm:
        if cfg is None:
            return cls()
        return cls(mean=cfg.get("mean"), std=cfg.get("std"))
