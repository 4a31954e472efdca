"""Projectors map a student feature onto the teacher feature's shape.

Built automatically from the shapes of one dry-run forward (or given in config):

* vectors ``[B, C]``: ``Linear(C_s, C_t)``;
* tokens ``[B, N, C]``: ``Linear(C_s, C_t)`` on the channel dim (N must match);
* maps ``[B, C, *spatial]`` (1-D or 2-D): 1x1 conv ``C_s -> C_t``, then interpolation
  to the teacher's spatial size when it differs;
* identical shapes: identity.

Projectors live in the objective's loss terms: trainable, in the optimizer and in the
run's checkpoint (``objective.*``), never in an exported student.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MapProjector(nn.Module):
    def __init__(self, c_in: int, c_out: int, size: tuple[int, ...]):
        super().__init__()
        conv = nn.Conv1d if len(size) == 1 else nn.Conv2d
        self.conv = conv(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.size = tuple(size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if tuple(x.shape[2:]) != self.size:
            mode = "linear" if len(self.size) == 1 else "bilinear"
            x = F.interpolate(x, size=self.size, mode=mode, align_corners=False)
        return x


class TokenProjector(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.linear = nn.Linear(c_in, c_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def build_projector(
    student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], key: str, layout: str = "auto"
) -> nn.Module:
    """A projector from per-batch shapes (batch dim included). ``layout``: ``auto``
    (3-D tensors are tokens ``[B, N, C]``, 4-D are maps), ``tokens`` or ``maps``."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s == t:
        return nn.Identity()
    if len(s) != len(t):
        raise ValueError(f"{key}: student feature {s} and teacher feature {t} have different ranks")
    if len(s) == 2:
        return TokenProjector(s[1], t[1])
    tokens = layout == "tokens" or (layout == "auto" and len(s) == 3)
    if tokens:
        if s[1] != t[1]:
            raise ValueError(
                f"{key}: token counts differ ({s[1]} vs {t[1]}); pool or pick tokens first"
            )
        return TokenProjector(s[-1], t[-1])
    return MapProjector(s[1], t[1], t[2:])
