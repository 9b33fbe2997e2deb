from collections.abc import Sequence

import torch
from torch import nn

from src.utils.errors import UserError


class _Conv(nn.Conv2d):
    """3x3 'same' conv without bias whose first `in_channels` filters start as the identity (dirac): a deep
    net of such convs starts close to passing its input through, which lets the short schedule train it at
    once (airbench)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[: self.in_channels])


def _batch_norm(channels: int, momentum: float, scale: bool) -> nn.BatchNorm2d:
    """BN whose scale (weight) stays 1 unless `scale`: with ReLU-like activations and weight decay on the
    convs the scale is redundant, and leaving it out lets the high learning rate go to the biases
    (airbench). eps as small as airbench's, so normalization is exact at these batch sizes."""
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=momentum)
    norm.weight.requires_grad_(scale)
    return norm


class _Block(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU: pooling before the norm halves the pixels the
    norm and activation touch."""

    def __init__(self, in_channels: int, out_channels: int, momentum: float, scale: bool) -> None:
        super().__init__()
        self.conv1, self.pool = _Conv(in_channels, out_channels), nn.MaxPool2d(2)
        self.norm1 = _batch_norm(out_channels, momentum, scale)
        self.conv2, self.norm2 = _Conv(out_channels, out_channels), _batch_norm(out_channels, momentum, scale)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.norm1(self.pool(self.conv1(x))))
        return self.activation(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """The network of the CIFAR-10 speed record airbench94 (Keller Jordan), written for any image size and
    channel count: a 2x2 stem conv with 2 * C * 4 filters and a bias (no padding, no norm) -> GELU, then one
    `_Block` per width (airbench: 64, 256, 256), global max-pooling, a linear layer without bias and a
    fixed logit scale (airbench: 1/9, which keeps the first steps' softmax soft).

    `whiten=True`: the stem's filters are set from the whitened 2x2 patches of the training images at the
    start of a fresh fit (`src.callbacks.speed.WhitenStem`, attached by ClassifierModule) and then stay fixed
    (only the stem's bias trains), as in airbench; `whiten=False` trains them from a random start.
    `bn_scale=False` keeps every BN scale at 1 (airbench); `bn_momentum` is PyTorch's (airbench's 0.6 is 0.4 here).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int],
        bn_momentum: float,
        bn_scale: bool,
        logit_scale: float,
        whiten: bool,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        if min(height, width) - 1 < 2 ** len(widths):
            raise UserError(f"images of shape {tuple(input_shape)} are too small for {len(widths)} pooling blocks")
        stem_width = 2 * channels * 2 * 2  # one +v/-v pair per direction of the 2x2 patches: all of them whitened
        self.stem = nn.Conv2d(channels, stem_width, 2, padding=0, bias=True)
        nn.init.zeros_(self.stem.bias)
        self.stem.weight.requires_grad_(not whiten)
        self.whiten = whiten
        blocks, in_channels = [], stem_width
        for out_channels in widths:
            blocks.append(_Block(in_channels, out_channels, bn_momentum, bn_scale))
            in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(in_channels, num_classes, bias=False)
        self.logit_scale = logit_scale

    @property
    def stem_conv(self) -> nn.Conv2d:
        return self.stem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(nn.functional.gelu(self.stem(x)))
        return self.head(torch.amax(x, dim=(2, 3))) * self.logit_scale
