"""The training choices that make the CIFAR-10 speed runs (airbench) fast, as options for any run:

- test-time augmentation (`tta=none|mirror|mirror_translate`): ClassifierModule's val and test steps
  average the logits of several views of each image (`tta_logits`); training is untouched;
- an exponential moving average of the weights (`ema_decay=0.99`, callback `EMA`): Lightning's
  `WeightAveraging` with torch's `get_ema_multi_avg_fn`; validation, test and checkpoints see the average;
- first-layer whitening (`model.whiten=true`, BNConvNet and AirbenchNet; callback `WhitenStem`): the stem
  conv's filters are set once, at the start of a fresh fit, from the eigen-decomposition of the second
  moment of the stem-sized patches of the first training images as the datamodule delivers them (normalized);
- airbench's learning-rate shape (`scheduler=warmup_decay`, `LinearWarmupDecay`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from src.errors import UserError

log = logging.getLogger(__name__)

# --- test-time augmentation ---------------------------------------------------------------------------
TTA_CHOICES = ("none", "mirror", "mirror_translate")


def check_tta(tta: Any) -> str:
    if tta not in TTA_CHOICES:
        raise UserError(f"tta={tta!r} is not a test-time augmentation; choose one of {', '.join(TTA_CHOICES)}")
    return tta


def tta_logits(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: str) -> torch.Tensor:
    """The logits of `x` (N, C, H, W) averaged over the views of `tta`, exactly as airbench's inference:

    - "none": forward(x);
    - "mirror": 1/2 x + 1/2 hflip(x);
    - "mirror_translate": 1/2 of "mirror", plus 1/4 of "mirror" of x moved one pixel down and right, plus
      1/4 of "mirror" of x moved one pixel up and left (each shift reflect-pads the opposite border); that is
      6 views: x and hflip(x) at weight 1/4 each, the four shifted (mirrored or not) at 1/8 each.

    Logits, not probabilities, are averaged; eval-mode BN makes each view's logits independent of the
    others in the batch."""
    if tta == "none":
        return forward(x)

    def mirror(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * forward(v) + 0.5 * forward(v.flip(-1))

    logits = mirror(x)
    if tta == "mirror":
        return logits
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    down_right, up_left = padded[..., :h, :w], padded[..., 2:, 2:]
    return 0.5 * logits + 0.25 * mirror(down_right) + 0.25 * mirror(up_left)


# --- learning-rate shape --------------------------------------------------------------------------------
class LinearWarmupDecay(torch.optim.lr_scheduler.LambdaLR):
    """airbench's schedule, stepped per optimizer step: every group's learning rate rises linearly from
    `start_factor` x its own to 1 x over the first `warmup` fraction of `total_steps` (BN statistics and the
    momentum buffer settle before the large steps), then falls linearly to `end_factor` x at the end (the
    final low-rate steps are where a short run gains most). It multiplies each group's rate, so the groups'
    ratios (`norm_lr_scale`) stay; momentum is not cycled."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup: float = 0.23,
        start_factor: float = 0.2,
        end_factor: float = 0.07,
        last_epoch: int = -1,
    ) -> None:
        self.total_steps, self.warmup_steps = total_steps, int(total_steps * warmup)
        self.start_factor, self.end_factor = start_factor, end_factor
        super().__init__(optimizer, self.factor, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            frac = step / self.warmup_steps
            return self.start_factor + (1.0 - self.start_factor) * frac
        frac = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 1.0 + (self.end_factor - 1.0) * frac


# --- exponential moving average of the weights -----------------------------------------------------------
class EMA(WeightAveraging):
    """Lightning's `WeightAveraging` keeping an exponential moving average of the weights and buffers (BN
    statistics too), updated after every optimizer step: avg = decay * avg + (1 - decay) * weights (the
    first update copies the weights). Lightning swaps the average in for every validation epoch, copies it
    into the model when training ends, and writes it as the checkpoint's `state_dict` (the training weights
    go to `current_model_state`, from which a resumed fit continues), so best-checkpoint selection,
    evaluate, predict and export all use the average.

    One change to Lightning's callback: the average is dropped when `fit` ends. Otherwise the later
    `trainer.validate/test(ckpt_path="best")` of src/train.py would load the checkpoint's training weights
    (`current_model_state`) and validation would swap in the final average rather than the best one."""

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
    """The EMA callback for `ema_decay` (conf/train.yaml), or none when it is null."""
    return None if decay is None else EMA(decay, device)


# --- first-layer whitening -------------------------------------------------------------------------------
def patch_moment(images: torch.Tensor, kernel_size: int) -> tuple[torch.Tensor, int]:
    """sum(p p^T) over all `kernel_size` x `kernel_size` patches p (flattened channel-major, as a conv
    weight) lying fully inside the images, and their count."""
    patches = F.unfold(images.float(), kernel_size)  # (N, C*k*k, L)
    flat = patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
    return flat.T @ flat, flat.shape[0]


def whitening_filters(moment: torch.Tensor, n_filters: int, eps: float = 5e-4) -> torch.Tensor:
    """airbench's whitening filters from the patches' second moment S (d x d): eigenvectors v_i of S,
    largest eigenvalue first, scaled by 1/sqrt(lambda_i + eps), so filter i's output over the patches has
    second moment lambda_i / (lambda_i + eps) (about 1) and the outputs are uncorrelated. As in airbench
    each direction comes as a +v/-v pair (the BN and GELU after the conv are not symmetric in sign): the
    result holds the pairs of the top k = min(d, n_filters // 2) directions, [v_1..v_k, -v_1..-v_k], shape
    (2k, d). With fewer than 2d filters the weakest directions are left out; airbench's CIFAR-10 net has
    exactly 2d (24 for its 2x2 stem)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(moment.double())  # ascending
    k = min(moment.shape[0], n_filters // 2)
    top_values, top_vectors = eigenvalues.flip(0)[:k], eigenvectors.flip(1)[:, :k]
    scaled = (top_vectors / torch.sqrt(top_values.clamp(min=0) + eps)).T  # (k, d)
    return torch.cat([scaled, -scaled])


class WhitenStem(L.Callback):
    """At the start of a fresh fit (not a resumed one), for a network with `whiten = True` (BNConvNet with
    `model.whiten=true`): sets the first 2k filters of its stem conv (`net.stem_conv`) to
    `whitening_filters` of the 3x3 patches of the first `images` training images, read from the
    datamodule's training loader and moved to the device through the datamodule's transfer hooks, so they
    are normalized as the model sees them but, as in airbench, not augmented (the trainer is out of its
    training stage while they are read; the per-sample path's own transforms do apply). Filters beyond 2k
    keep their random initialization; the whitened filters go on training with the rest. Under DDP the
    second moment is averaged over processes, so every process sets the same weights."""

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
