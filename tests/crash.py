"""A callback the resume test injects into a subprocess run (PYTHONPATH=tests) to die like a killed job."""

import os
import signal
import time

import lightning as L


class KillDuringEpoch(L.Callback):
    """SIGKILL this process at the given batch of the given epoch: no cleanup, no final checkpoint. Only in a
    fresh run, so the resumed run (which must name the same callbacks) gets past it."""

    def __init__(self, epoch: int, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, idx: int) -> None:
        if trainer.ckpt_path is None and trainer.current_epoch == self.epoch and idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class RaiseDuringEpoch(KillDuringEpoch):
    """Raise (a crash Python sees) at the given batch of the given epoch."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, idx: int) -> None:
        if trainer.current_epoch == self.epoch and idx == self.batch:
            raise RuntimeError(f"simulated crash in epoch {self.epoch}")


class SleepEachBatch(L.Callback):
    """Slow training down, so a test can signal the process while it is in the middle of an epoch."""

    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(self.seconds)
