from collections.abc import Sequence

import torch
from torch import nn

from src.utils.errors import UserError


class _Conv(nn.Conv2d):
    """3x3 'same' conv, no bias, first filters the identity (dirac): a deep net of them trains at once (airbench)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[: self.in_channels])


def _batch_norm(channels: int, momentum: float, scale: bool) -> nn.BatchNorm2d:
    """BN with airbench's tiny eps, its scale fixed at 1 unless `scale` (redundant: the high lr goes to the biases)."""
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=momentum)
    norm.weight.requires_grad_(scale)
    return norm


class _Block(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU (pooling first: BN and GELU see fewer pixels)."""

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
    """airbench94's network (Keller Jordan) for any image shape: a 2x2 stem conv -> GELU, one `_Block` per width,
    global max-pooling, a bias-free linear layer and a fixed logit scale. `whiten=True`: `WhitenStem` sets the stem's
    filters, then fixed. `bn_scale=False` keeps BN scales at 1; `bn_momentum` is PyTorch's (airbench's 0.6 is 0.4)."""

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
        ins = [stem_width, *widths[:-1]]  # each block's input channels
        self.blocks = nn.Sequential(*(_Block(i, o, bn_momentum, bn_scale) for i, o in zip(ins, widths, strict=True)))
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale

    @property
    def stem_conv(self) -> nn.Conv2d:
        return self.stem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(nn.functional.gelu(self.stem(x)))
        return self.head(torch.amax(x, dim=(2, 3))) * self.logit_scale
