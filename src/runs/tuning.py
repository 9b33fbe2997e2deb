"""What train does before and after fitting, when asked:

    python -m src.train lr_find=true     # Lightning's learning-rate finder picks optimizer.lr (lr_find.png)
    python -m src.train calibrate=true   # temperature scaling: test ECE before and after, T in the best checkpoint

Temperature scaling (Guo et al., 2017): one scalar T, fitted on the validation split, divides the logits so
the predicted probabilities match how often the model is right. The predicted classes do not change.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.nn.functional import cross_entropy

from src.callbacks.figures import save_figure
from src.models.classifier import ClassifierModule
from src.runs.checkpoints import SafeCheckpointIO, read_checkpoint
from src.utils.errors import UserError


def find_lr(trainer: L.Trainer, module: ClassifierModule, datamodule: L.LightningDataModule, output_dir: str) -> float:
    """Run Lightning's finder with `trainer` (one without the run's checkpointing callbacks: the finder fits for
    a few steps and restores the weights afterwards), and bind its suggestion as the optimizer's lr (and as
    the one-cycle schedule's max_lr, which follows optimizer.lr in conf/scheduler/onecycle.yaml)."""
    from lightning.pytorch.tuner import Tuner

    finder = Tuner(trainer).lr_find(module, datamodule=datamodule, update_attr=False)
    suggestion = finder.suggestion() if finder is not None else None
    if suggestion is None:
        raise UserError("lr_find=true: the learning-rate finder found no suggestion (too few training steps?)")
    import matplotlib.pyplot as plt  # Lightning draws the curve with pyplot

    figure = finder.plot(suggest=True)
    save_figure(figure, trainer, Path(output_dir), "lr_find")
    plt.close(figure)
    module.optimizer = functools.partial(module.optimizer, lr=suggestion)
    if module.scheduler is not None and "max_lr" in getattr(module.scheduler, "keywords", {}):
        module.scheduler = functools.partial(module.scheduler, max_lr=suggestion)
    return float(suggestion)


class CollectLogits(L.Callback):
    """Keeps the logits and labels of a validation run (ClassifierModule's steps return their logits)."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        self.logits.append(outputs["logits"].float().cpu())
        self.labels.append(batch[1].cpu())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """The temperature minimizing the negative log-likelihood of `labels`; returns (T, NLL before, after).
    Optimized as log T, so T stays positive."""
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(nll)
    temperature = float(log_t.detach().exp())
    with torch.no_grad():
        before, after = cross_entropy(logits, labels), cross_entropy(logits / temperature, labels)
    return temperature, float(before), float(after)


def calibrate(trainer: L.Trainer, module: ClassifierModule, datamodule: L.LightningDataModule) -> dict[str, float]:
    """Fit the temperature on the validation split with `trainer` (built with a CollectLogits callback) and
    set it on `module`; returns what calibration.json-style reports need."""
    if trainer.world_size > 1:  # each process would see only its share of the validation split
        raise UserError("calibrate=true runs on one device: add trainer.devices=1 (or calibrate a checkpoint later)")
    collect = next(c for c in trainer.callbacks if isinstance(c, CollectLogits))
    module.temperature.fill_(1.0)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    temperature, before, after = fit_temperature(torch.cat(collect.logits), torch.cat(collect.labels))
    module.temperature.fill_(temperature)
    return {
        "calibration/temperature": temperature,
        "calibration/val_nll_before": before,
        "calibration/val_nll_after": after,
    }


def store_temperature(checkpoint: str | Path, temperature: float) -> None:
    """Write the temperature into the checkpoint whose weights it was fitted on (the run's best), so evaluate,
    predict and export use it. Not into last.ckpt: its weights differ, and a resumed run compares its val
    loss with the best one measured at temperature 1."""
    if checkpoint and Path(checkpoint).is_file():
        content = read_checkpoint(checkpoint)
        content["state_dict"]["temperature"] = torch.tensor(temperature)
        SafeCheckpointIO().save_checkpoint(content, checkpoint)
