"""ClassifierModule: cross-entropy training of any architecture, with torchmetrics accuracy (val and test;
per class and a confusion matrix for test). It knows nothing about datasets: class names
and input shape arrive as arguments and are saved in the checkpoint, so a checkpoint is usable alone.

What it hands to the rest of the project (its whole interface besides Lightning's hooks):
- `test_step` returns a `TestStepOutput` (the batch's logits), which Lightning passes to callbacks'
  `on_test_batch_end` as `outputs` (the prediction figures in src/reports.py);
- after `trainer.test(...)`, `module.test_result` is the `TestResult` of that test epoch (per-class accuracy
  and confusion matrix), which the entry points hand to `src.reports.report_run`; scalar metrics come back
  from `trainer.validate/test` as Lightning returns them;
- after `trainer.fit(...)`, `module.sanity_check_acc` is the val accuracy of fit's sanity check (None if it
  had none).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.utilities import dim_zero_cat

from src.errors import UserError
from src.speed import check_tta, tta_logits


class TestStepOutput(TypedDict):
    logits: torch.Tensor  # (batch, num_classes), detached


ECE_BINS = 15  # expected calibration error and the reliability diagram: 15 equal-width confidence bins


@dataclass(frozen=True)
class TestResult:
    """What one test epoch measured beyond the logged scalars (synchronized across DDP processes)."""

    acc_per_class: dict[str, float]  # by class name, as the three below
    confusion_matrix: list[list[int]]  # rows = true class, columns = predicted class
    precision: dict[str, float]
    recall: dict[str, float]
    f1: dict[str, float]
    reliability: list[tuple[float, float, int]]  # per confidence bin: (mean confidence, accuracy, images)


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
        lr_scheduler: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = True,
        config: dict | None = None,
        tta: str | None = None,
        norm_lr_scale: float = 1.0,
        compile: bool = False,
    ) -> None:
        """`optimizer`/`scheduler` are partials (Hydra `_partial_: true`) completed with our parameters.
        `lr_scheduler` holds Lightning's scheduler settings (`interval`: "epoch" or "step", `frequency`) and
        `total_steps_key`: the scheduler argument that gets the run's number of optimizer steps (OneCycleLR's
        `total_steps`); conf/scheduler/*.yaml set both. `channels_last` stores images and conv weights as
        NHWC, which oneDNN and cuDNN convolve faster (3x for cnn2 on a 2-core CPU). `config` is the composed
        run config, kept in the checkpoint so evaluate/predict can rebuild the run. `tta` is the test-time
        augmentation of the val and test steps (src/speed.py: none, mirror, mirror_translate); by default the
        run config's top-level `tta` (none if it has none). `norm_lr_scale`: the normalization layers'
        parameters train with the learning rate times it and the weight decay divided by it (the same decay
        per step); airbench gives BN biases 64x. `compile`: `torch.compile` the network's forward in place
        (parameter names, so checkpoints, stay those of the plain network)."""
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.channels_last = channels_last
        self.tta = check_tta((config or {}).get("tta", "none") if tta is None else tta)
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        if compile:
            self.net.compile()
        self.optimizer, self.scheduler = optimizer, scheduler
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        n = len(class_names)
        # validate_args=False: the checks read values back from the device, a host sync on every step. (On
        # CUDA, the test step's per-class accuracy and confusion matrix still sync: torch.bincount.)
        self.train_acc = MulticlassAccuracy(n, average="micro", validate_args=False)
        self.train_loss = MeanMetric(nan_strategy="disable")  # its NaN check would read the loss back every step
        # Val needs only the accuracy that checkpoints and sweeps watch; test also reports per class and the
        # confusion matrix (one MetricCollection: a single update call, shared states where they match).
        # Test adds per-class precision/recall/F1, calibration (ECE) and top-5 accuracy where it means something.
        test = {
            "acc": MulticlassAccuracy(n, average="micro", validate_args=False),
            "acc_per_class": MulticlassAccuracy(n, average="none", validate_args=False),
            "precision": MulticlassPrecision(n, average="none", validate_args=False),
            "recall": MulticlassRecall(n, average="none", validate_args=False),
            "f1": MulticlassF1Score(n, average="none", validate_args=False),
            "confusion_matrix": MulticlassConfusionMatrix(n, validate_args=False),
            "ece": MulticlassCalibrationError(n, n_bins=ECE_BINS, norm="l1", validate_args=False),
        }
        if n > 5:
            test["acc_top5"] = MulticlassAccuracy(n, top_k=5, average="micro", validate_args=False)
        self.eval_metrics = nn.ModuleDict(
            {
                "val": MetricCollection({"acc": MulticlassAccuracy(n, average="micro", validate_args=False)}),
                "test": MetricCollection(test),
            }
        )
        # Temperature scaling (src/calibration.py): logits are divided by it; 1 until a run is calibrated.
        self.register_buffer("temperature", torch.ones(()))
        self.test_result: TestResult | None = None
        self.sanity_check_acc: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.net(x)
        return logits if self.training else logits / self.temperature

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"].setdefault("temperature", torch.ones(()))  # written before calibration existed

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

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> TestStepOutput:
        x, y = batch
        logits = tta_logits(self, x, self.tta)
        self.eval_metrics[stage].update(logits, y)
        self.log(f"{stage}/loss", self.loss(logits, y), on_epoch=True, prog_bar=True, sync_dist=True)
        return {"logits": logits.detach()}

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> TestStepOutput:
        return self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> TestStepOutput:
        return self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        """compute() syncs across DDP processes, so every image is counted exactly once. The accuracy of
        fit's sanity check (its first `num_sanity_val_steps` val batches, before any step) is kept as
        `sanity_check_acc`: for a fresh fit, the untrained accuracy."""
        acc = self.eval_metrics["val"].compute()["acc"]
        if self._trainer is not None and self.trainer.sanity_checking:
            self.sanity_check_acc = float(acc)
        self.log("val/acc", acc, prog_bar=True)
        self.eval_metrics["val"].reset()

    def on_test_epoch_end(self) -> None:
        metrics = self.eval_metrics["test"]
        values = metrics.compute()
        for key in ("acc", "ece", "acc_top5"):
            if key in values:
                self.log(f"test/{key}", values[key], prog_bar=key == "acc")
        by_class = {
            key: dict(zip(self.hparams.class_names, values[key].tolist(), strict=True))
            for key in ("acc_per_class", "precision", "recall", "f1")
        }
        for name, acc in by_class["acc_per_class"].items():
            self.log(f"test/acc_{name}", acc)
        ece = metrics["ece"]
        with ece.sync_context():  # every process's images, as compute() counted them
            reliability = reliability_bins(dim_zero_cat(ece.confidences), dim_zero_cat(ece.accuracies))
        self.test_result = TestResult(
            confusion_matrix=values["confusion_matrix"].tolist(), reliability=reliability, **by_class
        )
        metrics.reset()

    def configure_optimizers(self) -> Any:
        if self.optimizer is None:
            raise UserError("ClassifierModule needs an optimizer to train (config group optimizer=...)")
        scale = self.hparams.get("norm_lr_scale", 1.0)
        optimizer = self.optimizer(params=self.parameter_groups() if scale != 1.0 else self.parameters())
        if scale != 1.0:
            for group in optimizer.param_groups[1:]:  # the normalization layers' parameters
                group["lr"] *= scale
                group["weight_decay"] = group.get("weight_decay", 0.0) / scale
        if self.scheduler is None:
            return optimizer
        settings = dict(self.hparams.lr_scheduler or {})
        steps_key = settings.pop("total_steps_key", None)
        steps = {steps_key: self.trainer.estimated_stepping_batches} if steps_key else {}
        before = [group["lr"] for group in optimizer.param_groups]
        try:
            scheduler = self.scheduler(optimizer=optimizer, **steps)
        except ZeroDivisionError as e:  # OneCycleLR's phases need a few steps each
            raise UserError(f"the scheduler needs more training steps than {steps} ({e})") from e
        now = [group["lr"] for group in optimizer.param_groups]
        if len(now) > 1 and not math.isclose(now[1] * before[0], now[0] * before[1], rel_tol=1e-6):
            raise UserError(
                f"norm_lr_scale={scale} needs a scheduler that multiplies every group's learning rate "
                "(warmup_decay, cosine, step); this one sets the same rate for all (onecycle's max_lr)"
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, **settings}}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """[everything else, the normalization layers' parameters] (empty groups left out)."""
        norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
        norm = {id(p) for m in self.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
        groups = [[p for p in self.parameters() if id(p) not in norm], [p for p in self.parameters() if id(p) in norm]]
        return [{"params": params} for params in groups if params]


def reliability_bins(confidences: torch.Tensor, correct: torch.Tensor) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, images) per equal-width confidence bin: the reliability diagram's bars,
    from the same per-image confidences torchmetrics' calibration error keeps."""
    index = torch.clamp((confidences * ECE_BINS).long(), max=ECE_BINS - 1)
    bins = []
    for b in range(ECE_BINS):
        inside = index == b
        count = int(inside.sum())
        bins.append((float(confidences[inside].mean()), float(correct[inside].float().mean()), count) if count else
                    ((b + 0.5) / ECE_BINS, 0.0, 0))  # fmt: skip
    return bins
