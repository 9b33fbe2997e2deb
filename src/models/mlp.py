from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Fully connected net on flattened pixels (the Fashion-MNIST MLP seed: 784-256-128-64-10)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = int(torch.tensor(input_shape).prod())
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
