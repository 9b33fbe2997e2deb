"""Normalization and train augmentation of whole uint8 batches on their device, as `PerSamplePath.view` does them:
RandomCrop, RandomHorizontalFlip, RandomRotation (nearest, zero fill); `ReseedEachEpoch` seeds the device RNG."""

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Each image shifted by its own offset in [-padding, padding] per axis, zero-filled (RandomCrop's windows);
    returns channels-last memory."""
    (b, _, h, w), device = images.shape, images.device
    padded = F.pad(images, (padding,) * 4).permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C)
    top = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=device)
    left = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=device)
    rows = torch.arange(h, device=device).view(1, h, 1) + top
    cols = torch.arange(w, device=device).view(1, 1, w) + left
    return padded[torch.arange(b, device=device).view(b, 1, 1), rows, cols].permute(0, 3, 1, 2)


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(len(images), device=images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Image i rotated counter-clockwise by degrees[i] as torchvision's rotate does (nearest, zero fill)."""
    b, _, h, w = images.shape
    angle = torch.deg2rad(degrees)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    # The rotation in pixel units, written in affine_grid's [-1, 1] coordinates (they scale x and y apart).
    theta = torch.stack([cos, -sin * h / w, zero, sin * w / h, cos, zero], 1).view(b, 2, 3)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class BatchAugment:
    """uint8 (B, C, H, W) -> normalized float32, augmented when training."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        hflip: bool = False,
        rotation: float = 0.0,
    ) -> None:
        # (x / 255 - mean) / std as one multiply-add.
        self.scale = torch.tensor([1 / (255 * s) for s in std]).view(1, -1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(1, -1, 1, 1)
        self.crop_padding, self.hflip, self.rotation = crop_padding, hflip, rotation

    def __call__(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.crop_padding:
            images = random_crop(images, self.crop_padding)
        if train and self.hflip:
            images = random_hflip(images)
        images = images.float()
        if train and self.rotation:  # each image by its own angle in [-rotation, rotation]
            images = rotate(images, (torch.rand(len(images), device=images.device) * 2 - 1) * self.rotation)
        if self.scale.device != images.device:
            self.scale, self.shift = self.scale.to(images.device), self.shift.to(images.device)
        return torch.addcmul(self.shift, images, self.scale)
