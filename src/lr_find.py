"""`lr_find=true`: Lightning's learning-rate finder before fitting; the run then trains with its suggestion.

    python -m src.train lr_find=true       # lr_find/suggestion in metrics.json, the curve in lr_find.png
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
from lightning.pytorch.tuner import Tuner

from src.classifier import ClassifierModule
from src.errors import UserError
from src.reports import save_figure


def find_lr(trainer: L.Trainer, module: ClassifierModule, datamodule: L.LightningDataModule, output_dir: str) -> float:
    """Run the finder with `trainer` (one without the run's checkpointing callbacks: the finder fits for a
    few steps and restores the weights afterwards), and bind its suggestion as the optimizer's lr (and as
    the one-cycle schedule's max_lr, which follows optimizer.lr in conf/scheduler/onecycle.yaml)."""
    finder = Tuner(trainer).lr_find(module, datamodule=datamodule, update_attr=False)
    suggestion = finder.suggestion() if finder is not None else None
    if suggestion is None:
        raise UserError("lr_find=true: the learning-rate finder found no suggestion (too few training steps?)")
    figure = finder.plot(suggest=True)
    save_figure(figure, trainer, Path(output_dir), "lr_find")
    module.optimizer = functools.partial(module.optimizer, lr=suggestion)
    if module.scheduler is not None and "max_lr" in getattr(module.scheduler, "keywords", {}):
        module.scheduler = functools.partial(module.scheduler, max_lr=suggestion)
    return float(suggestion)
