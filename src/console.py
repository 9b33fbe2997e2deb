"""A quiet, useful console: what a run prints is about the run. Lightning's advertisements, its "GPU/TPU
available: False" lines on machines without one, and library deprecation chatter are dropped; errors and
the warnings that matter stay. On a terminal a progress bar; where output goes to a file (a log, a SLURM
job) one line per epoch instead of thousands of bar redraws."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, TQDMProgressBar

# Lightning INFO lines that say nothing about this run.
NOISE = (
    "💡 Tip:",
    "GPU available: False",
    "TPU available: False",
    "HPU available: False",
    "Trainer already configured with model summary callbacks",  # ours (ParameterSummary), on purpose
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISE)


def quiet_console() -> None:
    """Called once by each entry point before anything is built."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropNoise())
    logging.getLogger("lightning.pytorch.callbacks.model_summary").addFilter(_DropFlopsTotal())
    # Lightning's own use of a torch API that torch 2.14 deprecates: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # In-process loading (num_workers=0) is the measured fastest on small CPU machines.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


class ParameterSummary(ModelSummary):
    """Lightning's model summary without its FLOPs column and total: they read 0 unless the module declares
    an example input, which the datamodules' batch hooks do not take."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], *args: Any, **kwargs: Any) -> None:
        ModelSummary.summarize([column for column in summary_data if column[0] != "FLOPs"], *args, **kwargs)


class _DropFlopsTotal(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.rstrip().endswith("Total Flops"):
            record.msg = record.msg.rstrip().rsplit("\n", 1)[0]
        return True


def model_summary(enabled: bool = True, max_depth: int = 1) -> ModelSummary | None:
    """The summary at the start of fitting; `trainer.enable_model_summary` is its switch."""
    return ParameterSummary(max_depth=max_depth) if enabled else None


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
