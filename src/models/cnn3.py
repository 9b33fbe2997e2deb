from collections.abc import Sequence

import torch
from torch import nn

from src.models.cnn2 import conv_pool_blocks


class CNN3(nn.Module):
    """The CIFAR-10 seed's CNN: padded 3x3 conv + 2x2 max-pool blocks, then dropout and hidden layers (`hidden`)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int],
        hidden: int | Sequence[int],
        dropout: float,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(*conv_pool_blocks(input_shape[0], channels, padding=1), nn.Flatten())
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        layers = [nn.Dropout(dropout)]
        for width in [hidden] if isinstance(hidden, int) else hidden:  # an int or a list, as for the other models
            layers += [nn.Linear(flat, width), nn.ReLU(), nn.Dropout(dropout)]
            flat = width
        self.classifier = nn.Sequential(*layers, nn.Linear(flat, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
