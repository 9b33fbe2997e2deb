from collections.abc import Sequence

import torch
from torch import nn

from src.utils.errors import UserError


def _conv_bn(in_channels: int, out_channels: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)]
    if pool:  # pool before normalizing: BN and GELU then work on a quarter of the pixels
        layers.append(nn.MaxPool2d(2))
    return [*layers, nn.BatchNorm2d(out_channels), nn.GELU()]


class BNConvNet(nn.Module):
    """A small fast-training CNN in airbench's style: a 3x3 stem, per width a conv -> 2x2 max-pool -> BN -> GELU and
    `convs_per_block - 1` residual conv -> BN -> GELU, global max-pooling, one linear layer; `whiten`: `WhitenStem`."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int],
        stem: int,
        convs_per_block: int,
        logit_scale: float,
        whiten: bool,
    ) -> None:
        super().__init__()
        if min(input_shape[1:]) < 2 ** len(widths):
            raise UserError(f"images of shape {tuple(input_shape)} are too small for {len(widths)} pooling blocks")
        self.stem = nn.Sequential(*_conv_bn(input_shape[0], stem, pool=False))
        self.blocks = nn.ModuleList()
        in_channels = stem
        for width in widths:
            extra = [nn.Sequential(*_conv_bn(width, width, pool=False)) for _ in range(convs_per_block - 1)]
            self.blocks.append(nn.ModuleList([nn.Sequential(*_conv_bn(in_channels, width, pool=True)), *extra]))
            in_channels = width
        self.head = nn.Linear(in_channels, num_classes, bias=False)
        self.logit_scale = logit_scale  # < 1 softens the initial logits (airbench uses 1/9)
        self.whiten = whiten

    @property
    def stem_conv(self) -> nn.Conv2d:
        return self.stem[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for first, *rest in self.blocks:
            x = first(x)
            for conv in rest:
                x = x + conv(x)
        return self.head(torch.amax(x, dim=(2, 3))) * self.logit_scale
