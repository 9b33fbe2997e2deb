"""Training callbacks that keep a run honest and resumable, and its console display (a progress bar or epoch lines)."""

import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar

from src.utils.errors import UserError


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss(L.Callback):
    """Stops the run at a NaN or infinite training loss, checked every `check_every` batches (a read-back each step
    would stall an accelerator) and at the epoch's end; all processes stop together (one would hang the others)."""

    def __init__(self, lr: float | None = None, check_every: int = 50) -> None:
        self.lr, self.check_every = lr, max(1, check_every)
        self.losses: list[tuple[int, torch.Tensor]] = []  # (batch index in the epoch, loss)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append((batch_idx, loss.detach()))
            if len(self.losses) >= self.check_every:
                self._check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        first = NONE_BAD = 2**62
        if self.losses:
            indices, losses = zip(*self.losses, strict=True)
            if len(bad := (~torch.isfinite(torch.stack(losses))).nonzero()):
                first = indices[int(bad[0])]
        self.losses.clear()
        # The earliest bad batch of any process, read by all: every process stops, or none.
        first = int(trainer.strategy.reduce(torch.tensor(first, device=trainer.strategy.root_device), reduce_op="min"))
        if first != NONE_BAD:
            lower = f" (now {self.lr:g})" if self.lr is not None else ""
            tips = f"a lower optimizer.lr{lower}, gradient clipping (trainer.gradient_clip_val=1.0) or a warm-up"
            where = f"epoch {trainer.current_epoch}, batch {first}"
            raise TrainingDiverged(f"training diverged: the loss became NaN or infinite in {where}; try {tips}")


class CheckpointAtStart(L.Callback):
    """Writes `last.ckpt` before a new run's first step, so a run stopped in its first epoch can be continued too."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        if trainer.ckpt_path is not None or not isinstance(checkpoint, ModelCheckpoint) or not checkpoint.dirpath:
            return
        last = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        if not last.exists():
            trainer.save_checkpoint(last, weights_only=False)  # the full state: resumable
            checkpoint.last_model_path = str(last)  # so ModelCheckpoint overwrites it rather than add last-v1


class ReseedEachEpoch(L.Callback):
    """Seeds the global RNGs from (seed, epoch) at every epoch start, so a run resumed from an epoch-end checkpoint
    repeats exactly what the uninterrupted run did (with num_workers=0; worker processes draw their own seeds)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from numpy.random import SeedSequence

        # A hash of (seed, epoch, rank): seed 1 in epoch 0 must not replay seed 0 in epoch 1.
        entropy = SeedSequence([self.seed, trainer.current_epoch, trainer.global_rank])
        L.seed_everything(int(entropy.generate_state(1)[0]), workers=True, verbose=False)


class EpochLines(ProgressBar):
    """One line per epoch (metrics, time), printed when the next starts or training ends: only then are they logged."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._started: float | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print_last_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        if self._started is None or not self._enabled or not trainer.is_global_zero:
            return
        metrics = self.get_metrics(trainer, pl_module)
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        of = f"/{trainer.max_epochs}" if (trainer.max_epochs or 0) > 0 else ""  # none when the budget is in steps
        print(f"epoch {epoch}{of}: {shown} ({time.monotonic() - self._started:.1f} s)", flush=True)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_last_epoch(trainer, pl_module, trainer.current_epoch)
        self._started = time.monotonic()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_last_epoch(trainer, pl_module, trainer.current_epoch)
        self._started = None


def progress_bar(enabled: bool = True, refresh_rate: int = 1, **_: Any) -> ProgressBar | None:
    """The run's progress display; `trainer.enable_progress_bar` is its one switch (conf/trainer/default.yaml)."""
    if not enabled:
        return None
    return TQDMProgressBar(refresh_rate=refresh_rate) if sys.stderr.isatty() else EpochLines()
