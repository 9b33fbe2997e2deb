"""ClassifierModule: cross-entropy training of any src/models network. It knows no dataset: class names, input shape
and normalization are arguments saved in the checkpoint, so a checkpoint is usable alone. `validation_step` and
`test_step` return `{"logits": ...}` (callbacks' `outputs`); `predict_step(images)` gives probabilities."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _zeropower_via_newtonschulz
from torchmetrics import MetricCollection
from torchmetrics import classification as tmc
from torchmetrics.utilities import dim_zero_cat

from src.callbacks.speed import WhitenStem
from src.utils.config import per_channel
from src.utils.errors import UserError

TTA_CHOICES = ("none", "mirror", "mirror_translate")
ECE_BINS = 15  # expected calibration error and the reliability diagram: 15 equal-width confidence bins


def tta_logits(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: str) -> torch.Tensor:
    """Logits of `x` (N, C, H, W) averaged over the views of `tta`, as airbench: "none"; "mirror" (x and hflip(x));
    "mirror_translate" (1/2 "mirror", 1/4 each of x shifted one pixel down-right and up-left, reflect-padded)."""
    if tta == "none":
        return forward(x)

    def mirror(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * forward(v) + 0.5 * forward(v.flip(-1))

    logits = mirror(x)
    if tta == "mirror":
        return logits
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return 0.5 * logits + 0.25 * mirror(padded[..., :h, :w]) + 0.25 * mirror(padded[..., 2:, 2:])


def warmup_then_decay(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: float, start_factor: float, end_factor: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """airbench's schedule, per optimizer step: each group's rate rises linearly from `start_factor` x over the first
    `warmup` of the steps (BN settles first), then falls linearly to `end_factor` x; multiplying keeps norm_lr_scale."""
    from torch.optim.lr_scheduler import LinearLR, SequentialLR

    warm = int(total_steps * warmup)
    decay = LinearLR(optimizer, 1.0, end_factor, total_iters=max(1, total_steps - warm))
    if not warm:
        return decay
    rise = LinearLR(optimizer, start_factor, 1.0, total_iters=warm)
    return SequentialLR(optimizer, [rise, decay], milestones=[warm])


class MuonSGD(torch.optim.SGD):
    """SGD, except that conv filters (4-D parameters) take Muon's step, as airbench94_muon trains them: their
    momentum, orthogonalized by torch.optim.Muon's Newton-Schulz iteration, at `muon_lr`, onto weights first rescaled
    to norm sqrt(out channels). That rescaling assumes a BatchNorm after each conv (only a filter's direction counts).
    One optimizer, because Lightning's automatic optimization steps one; torch.optim.Muon takes only 2-D weights."""

    def __init__(self, params: Any, muon_lr: float, muon_momentum: float, ns_steps: int = 3, **sgd: Any) -> None:
        super().__init__(params, **sgd)  # torch's own reading of params (tensors, groups), then each group split
        groups, self.param_groups = self.param_groups, []
        muon = {"lr": muon_lr, "momentum": muon_momentum, "weight_decay": 0.0, "muon": True, "ns_steps": ns_steps}
        for group in groups:
            for filters in (False, True):
                if params := [p for p in group["params"] if (p.ndim == 4) == filters]:
                    self.add_param_group({**group, "params": params, **(muon if filters else {})})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in (group for group in self.param_groups if group.get("muon")):
            momentum = group["momentum"]
            for p in (p for p in group["params"] if p.grad is not None):
                buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)).mul_(momentum).add_(p.grad)
                grad = p.grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
                p.mul_(len(p) ** 0.5 / p.norm())
                ns = (DEFAULT_A, DEFAULT_B, DEFAULT_C), group["ns_steps"], 1e-7
                p.add_(_zeropower_via_newtonschulz(grad.flatten(1), *ns).view_as(p), alpha=-group["lr"])
                p.grad = None  # SGD's step below leaves it alone
        super().step()
        return loss


@dataclass(frozen=True)
class TestResult:
    """What one test epoch measured beyond the logged scalars (over all DDP processes); per class by name."""

    acc_per_class: dict[str, float]
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
        channels_last: bool = True,  # NHWC, faster to convolve
        config: dict | None = None,  # kept in the checkpoint
        tta: str | None = None,
        norm_lr_scale: float = 1.0,
        compile: bool = False,  # in place: checkpoints unchanged
    ) -> None:
        """`optimizer`/`scheduler`: Hydra partials; `lr_scheduler`: Lightning's settings, `total_steps_key` the argument
        given the run's step count. `norm_lr_scale`: norm parameters train at lr x it, weight decay / it (airbench)."""
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.hparams.mean, self.hparams.std = (per_channel(v, int(input_shape[0])) for v in (mean, std))
        self.channels_last = channels_last
        self.tta = (config or {}).get("tta", "none") if tta is None else tta
        self.val_tta = (config or {}).get("val_tta") or self.tta  # null: as tta
        for key, value in (("tta", self.tta), ("val_tta", self.val_tta)):
            if value not in TTA_CHOICES:
                raise UserError(
                    f"{key}={value!r} is not a test-time augmentation; choose one of {', '.join(TTA_CHOICES)}"
                )
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.example_input_array = torch.zeros(1, *input_shape)  # the model summary's sizes and FLOPs
        if compile:
            self.net.compile()
        self.optimizer, self.scheduler = optimizer, scheduler
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        n = len(class_names)
        # Each step's loss and hits stay on the device, summed once an epoch (metric objects cost more per step).
        self.train_steps: list[tuple[torch.Tensor, torch.Tensor]] = []
        # validate_args=False: its checks sync with the host every step. Val needs only the accuracy checkpoints and
        # sweeps watch; test: per class, the confusion matrix, ECE and top-5 where it means something.
        test = {
            "acc": tmc.MulticlassAccuracy(n, average="micro", validate_args=False),
            "acc_per_class": tmc.MulticlassAccuracy(n, average="none", validate_args=False),
            "precision": tmc.MulticlassPrecision(n, average="none", validate_args=False),
            "recall": tmc.MulticlassRecall(n, average="none", validate_args=False),
            "f1": tmc.MulticlassF1Score(n, average="none", validate_args=False),
            "confusion_matrix": tmc.MulticlassConfusionMatrix(n, validate_args=False),
            "ece": tmc.MulticlassCalibrationError(n, n_bins=ECE_BINS, norm="l1", validate_args=False),
        }
        if n > 5:
            test["acc_top5"] = tmc.MulticlassAccuracy(n, top_k=5, average="micro", validate_args=False)
        val = MetricCollection({"acc": tmc.MulticlassAccuracy(n, average="micro", validate_args=False)})
        self.eval_metrics = nn.ModuleDict({"val": val, "test": MetricCollection(test)})
        # Temperature scaling (src/runs/tuning.py): logits are divided by it; 1 until a run is calibrated.
        self.register_buffer("temperature", torch.ones(()))
        self.test_result: TestResult | None = None  # set by trainer.test
        self.sanity_check_acc: float | None = None  # by trainer.fit: its sanity check's (a fresh fit's: untrained)

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets this before and after each hook it calls (about 40 times a step): a plain attribute, without
        # nn.Module's checks for parameters, modules and buffers (0.09 ms a step on this project's CPU machines).
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.net(x)
        return logits if self.training else logits / self.temperature

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"].setdefault("temperature", torch.ones(()))  # written before calibration existed

    def configure_callbacks(self) -> list[L.Callback]:
        """A network with `whiten = True` gets a WhitenStem, unless the Trainer has one (e.g. with other settings)."""
        given = any(isinstance(c, WhitenStem) for c in self.trainer.callbacks)
        return [WhitenStem()] if getattr(self.net, "whiten", False) and not given else []

    def predict_step(self, images: torch.Tensor, batch_idx: int = 0) -> torch.Tensor:
        """Class probabilities of normalized images, with the run's test-time augmentation (src.predict)."""
        return tta_logits(self, images, self.tta).float().softmax(dim=-1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Kept lean: no host sync; `self.log` (about 0.2 ms a call on CPU) only on the trainer's logging steps."""
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        self.train_steps.append((loss.detach(), logits.detach().argmax(dim=1) == y))
        every = self.trainer.log_every_n_steps  # 0: no per-step logging, as in Lightning
        if every and (self.global_step + 1) % every == 0:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        if self.train_steps:
            losses, correct = zip(*self.train_steps, strict=True)
            sizes = torch.tensor([len(c) for c in correct], device=losses[0].device)
            # float32: exact for counts below 2**24 and available on every device (MPS has no float64)
            parts = [(torch.stack(losses).float() * sizes).sum(), torch.cat(correct).sum(), sizes.sum()]
            sums = torch.stack([p.float() for p in parts])
            loss_sum, right, seen = self.trainer.strategy.reduce(sums, reduce_op="sum").tolist()
            self.log("train/loss_epoch", loss_sum / seen, prog_bar=True)
            self.log("train/acc", right / seen, prog_bar=True)
        self.train_steps.clear()

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = tta_logits(self, x, self.val_tta if stage == "val" else self.tta)
        self.eval_metrics[stage].update(logits, y)
        self.log(f"{stage}/loss", self.loss(logits, y), on_epoch=True, prog_bar=True, sync_dist=True)
        return {"logits": logits.detach()}

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        acc = self.eval_metrics["val"].compute()["acc"]  # synced across DDP processes: every image once
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
        for group in optimizer.param_groups:
            if group.get("norm"):  # the normalization layers' parameters
                group["lr"] *= scale
                group["weight_decay"] = group.get("weight_decay", 0.0) / scale
        if self.scheduler is None:
            return optimizer
        settings = dict(self.hparams.lr_scheduler or {})
        steps_key = settings.pop("total_steps_key", None)
        steps = {steps_key: self.trainer.estimated_stepping_batches} if steps_key else {}
        before = {(group["lr"], group.get("momentum")) for group in optimizer.param_groups}
        try:
            scheduler = self.scheduler(optimizer=optimizer, **steps)
        except ZeroDivisionError as e:  # OneCycleLR's phases need a few steps each
            raise UserError(f"the scheduler needs more training steps than {steps} ({e})") from e
        if len(before) > 1 and len({(g["lr"], g.get("momentum")) for g in optimizer.param_groups}) == 1:  # onecycle
            own = [f"norm_lr_scale={scale}"] if scale != 1.0 else []
            own += ["muon_lr"] if any(group.get("muon") for group in optimizer.param_groups) else []
            needs = "need a scheduler that multiplies every group's rate and keeps its momentum (warmup_decay, cosine)"
            raise UserError(f"parameter groups with rates of their own ({', '.join(own)}) {needs}, not onecycle")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, **settings}}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """[everything else, the normalization layers' parameters (marked "norm")] (empty groups left out)."""
        norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
        norm = {id(p) for m in self.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
        groups = [
            {"params": [p for p in self.parameters() if id(p) not in norm]},
            {"params": [p for p in self.parameters() if id(p) in norm], "norm": True},
        ]
        return [group for group in groups if group["params"]]


def reliability_bins(confidences: torch.Tensor, correct: torch.Tensor) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, images) per equal-width confidence bin (empty: its centre, 0, 0): diagram bars."""
    confidences, correct = confidences.cpu(), correct.cpu()
    index = torch.clamp((confidences * ECE_BINS).long(), max=ECE_BINS - 1)
    count = torch.bincount(index, minlength=ECE_BINS)
    sums = torch.zeros(2, ECE_BINS, dtype=torch.float64).index_add_(
        1, index, torch.stack([confidences.double(), correct.double()])
    )
    empty = torch.stack([(torch.arange(ECE_BINS) + 0.5) / ECE_BINS, torch.zeros(ECE_BINS)]).double()
    mean = torch.where(count > 0, sums / count.clamp(min=1), empty)
    return list(zip(mean[0].tolist(), mean[1].tolist(), count.tolist(), strict=True))
