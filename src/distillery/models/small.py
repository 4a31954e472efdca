"""Small models for MNIST-1D and digits."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] x len(hidden) -> Linear."""

    def __init__(
        self,
        input_dim: int = 40,
        hidden: Sequence[int] = (100, 100),
        num_classes: int = 10,
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = input_dim
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            prev = width
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN1D(nn.Module):
    """1-D CNN for signals ``[B, L]`` or ``[B, C, L]``: conv blocks (Conv1d, BatchNorm,
    ReLU, stride 2 after the first) then global average pooling and a linear head."""

    def __init__(
        self,
        length: int = 40,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 64),
        kernel_size: int = 5,
        num_classes: int = 10,
    ):
        super().__init__()
        del length  # kept for config readability; the network is length-agnostic
        blocks: list[nn.Module] = []
        prev = in_channels
        for i, c in enumerate(channels):
            blocks += [
                nn.Conv1d(
                    prev,
                    c,
                    kernel_size,
                    stride=1 if i == 0 else 2,
                    padding=kernel_size // 2,
                    bias=False,
                ),
                nn.BatchNorm1d(c),
                nn.ReLU(),
            ]
            prev = c
        self.in_channels = in_channels
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            x = x.unsqueeze(1)
        return self.head(self.features(x).mean(-1))
