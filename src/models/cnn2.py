from collections.abc import Sequence

import torch
from torch import nn

from src.models.mlp import MLP
from src.utils.errors import UserError


def conv_pool_blocks(in_channels: int, channels: Sequence[int], padding: int) -> list[nn.Module]:
    """A 3x3 conv + ReLU + 2x2 max-pool block per width: the seeds' CNNs (unpadded here, padded in CNN3)."""
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=padding), nn.ReLU(), nn.MaxPool2d(2)]
        in_channels = out_channels
    return layers


class CNN2(nn.Module):
    """Unpadded 3x3 conv + ReLU + 2x2 max-pool blocks, then fully connected layers: the Fashion-MNIST seeds' CNNs
    (`hidden=[]`; `hidden=[50]` with `dropout=0.4`), and with channels 6, 16, hidden 120-84 the MNIST seed's LeNet."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int],
        hidden: Sequence[int],
        dropout: float,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(*conv_pool_blocks(input_shape[0], channels, padding=0))
        try:
            with torch.no_grad():
                feature_shape = self.features(torch.zeros(1, *input_shape)).shape[1:]
        except RuntimeError as e:
            raise UserError(
                f"images of shape {tuple(input_shape)} are too small for {len(channels)} unpadded "
                "conv+pool blocks; resize them (dataset.size=[28,28]) or pick another model"
            ) from e
        self.classifier = MLP(feature_shape, num_classes, hidden=hidden, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
