"""ClassifierModule: cross-entropy training of any architecture, with torchmetrics accuracy (val and test;
per class and a confusion matrix for test). It knows nothing about datasets: class names
and input shape arrive as arguments and are saved in the checkpoint, so a checkpoint is usable alone."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix


class ClassifierModule(L.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = True,
        config: dict | None = None,
    ) -> None:
        """`optimizer`/`scheduler` are partials (Hydra `_partial_: true`) completed with our parameters; a
        scheduler that takes `total_steps` (OneCycleLR) gets the run's and is stepped every batch, others
        every epoch. `channels_last` stores images and conv weights as NHWC, which oneDNN and cuDNN convolve
        faster (3x for cnn2 on a 2-core CPU). `config` is the composed run config, kept in the checkpoint so
        evaluate/predict can rebuild the run."""
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.channels_last = channels_last
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.optimizer, self.scheduler = optimizer, scheduler
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        n = len(class_names)
        # validate_args=False: the checks read values back from the device, a host sync on every step. (On
        # CUDA, the test step's per-class accuracy and confusion matrix still sync: torch.bincount.)
        self.train_acc = MulticlassAccuracy(n, average="micro", validate_args=False)
        self.train_loss = MeanMetric(nan_strategy="disable")  # its NaN check would read the loss back every step
        # Val needs only the accuracy that checkpoints and sweeps watch; test also reports per class and the
        # confusion matrix (one MetricCollection: a single update call, shared states where they match).
        self.eval_metrics = nn.ModuleDict(
            {
                "val": MetricCollection({"acc": MulticlassAccuracy(n, average="micro", validate_args=False)}),
                "test": MetricCollection(
                    {
                        "acc": MulticlassAccuracy(n, average="micro", validate_args=False),
                        "acc_per_class": MulticlassAccuracy(n, average="none", validate_args=False),
                        "confusion_matrix": MulticlassConfusionMatrix(n, validate_args=False),
                    }
                ),
            }
        )
        self.test_results: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Kept lean: metrics only accumulate on the device here (no host sync); `self.log` (about 0.2 ms a
        call on CPU) runs only on the trainer's logging steps, and the epoch values once per epoch."""
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        self.train_acc.update(logits.detach(), y)
        self.train_loss.update(loss.detach().expand(len(y)))  # one value per image: the epoch mean is per image
        every = self.trainer.log_every_n_steps  # 0: no per-step logging, as in Lightning
        if every and (self.global_step + 1) % every == 0:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/loss_epoch", self.train_loss.compute(), prog_bar=True)
        self.log("train/acc", self.train_acc.compute(), prog_bar=True)
        self.train_loss.reset()
        self.train_acc.reset()

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        self.eval_metrics[stage].update(logits, y)
        self.log(f"{stage}/loss", self.loss(logits, y), on_epoch=True, prog_bar=True, sync_dist=True)
        return {"logits": logits.detach()}  # for the prediction figures (src/reports.py)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> dict[str, torch.Tensor]:
        """compute() syncs across DDP processes, so every image is counted exactly once."""
        values = self.eval_metrics[stage].compute()
        self.log(f"{stage}/acc", values["acc"], prog_bar=True)
        self.eval_metrics[stage].reset()
        return values

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        values = self._eval_epoch_end("test")
        per_class = dict(zip(self.hparams.class_names, values["acc_per_class"].tolist(), strict=True))
        self.test_results = {"acc_per_class": per_class, "confusion_matrix": values["confusion_matrix"].tolist()}
        for name, acc in per_class.items():
            self.log(f"test/acc_{name}", acc)

    def configure_optimizers(self) -> Any:
        if self.optimizer is None:
            raise ValueError("ClassifierModule needs an optimizer to train (config group optimizer=...)")
        optimizer = self.optimizer(params=self.parameters())
        if self.scheduler is None:
            return optimizer
        if "total_steps" in inspect.signature(self.scheduler).parameters:
            given = getattr(self.scheduler, "keywords", {})
            total = {} if "total_steps" in given else {"total_steps": self.trainer.estimated_stepping_batches}
            try:
                scheduler = self.scheduler(optimizer=optimizer, **total)
            except ZeroDivisionError as e:  # OneCycleLR's phases need a few steps each
                raise ValueError(f"the scheduler needs more training steps than {total or given} ({e})") from e
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer=optimizer)}
