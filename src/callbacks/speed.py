"""airbench's EMA of the weights (`ema_decay=0.99`) and whitened first layer (`model.whiten=true`), for any run."""

import logging
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from src.utils.errors import UserError

log = logging.getLogger(__name__)


class EMA(WeightAveraging):
    """Lightning's `WeightAveraging` with an EMA of weights and buffers, which validation, checkpoints (the training
    weights go to `current_model_state`), evaluate, predict and export see. Dropped when `fit` ends, or src/train.py's
    `validate/test(ckpt_path="best")` would swap in the final average, not the best one."""

    def __init__(self, decay: float = 0.99, device: str | None = None) -> None:
        if not 0.0 < decay < 1.0:
            raise UserError(f"ema_decay={decay!r} must be between 0 and 1 (e.g. 0.99)")
        self.decay = decay
        super().__init__(device=device, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(decay))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # on_train_end has copied the average into the model
            self._average_model = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average_model is not None:  # fitting: restore both; otherwise `state_dict` is the average
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None:
            super().on_train_end(trainer, pl_module)


def ema(decay: float | None = None, device: str | None = None) -> EMA | None:
    return None if decay is None else EMA(decay, device)


def patch_moment(images: torch.Tensor, kernel_size: int) -> tuple[torch.Tensor, int]:
    """(sum(p p^T) over all `kernel_size`-square patches p inside the images, flat as a conv weight; their count)."""
    patches = F.unfold(images.float(), kernel_size)  # (N, C*k*k, L)
    flat = patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
    return flat.T @ flat, flat.shape[0]


def whitening_filters(moment: torch.Tensor, n_filters: int, eps: float = 5e-4) -> torch.Tensor:
    """airbench's (2k, d) whitening filters from the patches' second moment (d x d): the eigenvectors of the top k =
    min(d, n_filters // 2) eigenvalues over sqrt(lambda + eps), as +v/-v pairs (BN, GELU are not sign-symmetric)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(moment.double())  # ascending
    k = min(moment.shape[0], n_filters // 2)
    top_values, top_vectors = eigenvalues.flip(0)[:k], eigenvectors.flip(1)[:, :k]
    scaled = (top_vectors / torch.sqrt(top_values.clamp(min=0) + eps)).T  # (k, d)
    return torch.cat([scaled, -scaled])


class WhitenStem(L.Callback):
    """For a fresh fit of a network with `whiten = True`: the first 2k filters of `net.stem_conv` become
    `whitening_filters` of the first `images` training images, not augmented (airbench; with `hflip=alternate`, a half
    of them mirrored, as each epoch shows them), averaged over DDP processes."""

    def __init__(self, images: int = 5000, eps: float = 5e-4) -> None:
        self.images, self.eps = images, eps

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = getattr(pl_module, "net", None)
        if not getattr(net, "whiten", False) or trainer.ckpt_path is not None:
            return
        conv: nn.Conv2d = net.stem_conv
        if trainer.datamodule is None:
            raise UserError("model.whiten=true needs a datamodule to read training images from")
        moment, count, seen = None, 0, 0
        training, trainer.training = trainer.training, False  # normalized, not augmented (as airbench)
        try:
            for batch in trainer.datamodule.train_dataloader():
                x = trainer.strategy.batch_to_device(batch)[0][: self.images - seen]
                m, n = patch_moment(x, conv.kernel_size[0])
                moment, count, seen = (m if moment is None else moment + m), count + n, seen + len(x)
                if seen >= self.images:
                    break
        finally:
            trainer.training = training
        if moment is None or count == 0:
            raise UserError("model.whiten=true: the training loader gave no images to whiten with")
        moment = trainer.strategy.reduce(moment / count, reduce_op="mean")
        filters = whitening_filters(moment, conv.out_channels, self.eps)
        with torch.no_grad():
            conv.weight[: len(filters)] = filters.reshape(-1, *conv.weight.shape[1:]).to(conv.weight)
        log.info("stem whitened: %d filters from %d patches of %d training images", len(filters), count, seen)
