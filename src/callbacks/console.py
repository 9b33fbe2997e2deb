"""What a run shows on the console while training: a progress bar on a terminal, one line per epoch where output
goes to a file (a log, a SLURM job) instead of thousands of bar redraws."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


class EpochLines(ProgressBar):
    """One line per training epoch with its metrics and time, for output that is not a terminal. Printed when
    the next epoch starts (or training ends): only then are the epoch's train metrics logged."""

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
        print(f"epoch {epoch}/{trainer.max_epochs}: {shown} ({time.monotonic() - self._started:.1f} s)", flush=True)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_last_epoch(trainer, pl_module, trainer.current_epoch)
        self._started = time.monotonic()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_last_epoch(trainer, pl_module, trainer.current_epoch)
        self._started = None


def progress_bar(enabled: bool = True, refresh_rate: int = 1, **_: Any) -> ProgressBar | None:
    """The run's progress display; `trainer.enable_progress_bar` is its one switch (conf/train.yaml)."""
    if not enabled:
        return None
    return TQDMProgressBar(refresh_rate=refresh_rate) if sys.stderr.isatty() else EpochLines()
