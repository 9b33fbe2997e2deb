"""What train does around fitting when asked: `lr_find=true` (Lightning's finder picks optimizer.lr), `calibrate=true`
(temperature scaling, Guo et al. 2017: logits divided by one T fitted on the val split; classes unchanged)."""

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
    """Lightning's finder, run with `trainer` (no checkpointing); its suggestion becomes optimizer.lr (and max_lr)."""
    from lightning.pytorch.tuner import Tuner

    finder = Tuner(trainer).lr_find(module, datamodule=datamodule, update_attr=False)
    if finder is None or (suggestion := finder.suggestion()) is None:
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
    """(T minimizing the NLL of `labels`, NLL before, after); optimized as log T, so T stays positive."""
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
    """Fit the temperature on the validation split with `trainer` (which has a CollectLogits) and set it on `module`."""
    if trainer.world_size > 1:  # each process would see only its share of the validation split
        raise UserError("calibrate=true runs on one device: add trainer.devices=1 (or calibrate a checkpoint later)")
    collect = next(c for c in trainer.callbacks if isinstance(c, CollectLogits))
    module.temperature.fill_(1.0)
    val_tta, module.val_tta = module.val_tta, module.tta  # fitted on the logits it will divide: test's views
    try:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    finally:
        module.val_tta = val_tta
    temperature, before, after = fit_temperature(torch.cat(collect.logits), torch.cat(collect.labels))
    module.temperature.fill_(temperature)
    keys = ("calibration/temperature", "calibration/val_nll_before", "calibration/val_nll_after")
    return dict(zip(keys, (temperature, before, after), strict=True))


def store_temperature(checkpoint: str | Path, temperature: float) -> None:
    """Write `temperature` into the best checkpoint (it was fitted there), not last.ckpt: its weights differ, and a
    resumed run compares its val loss with the best one at temperature 1."""
    if checkpoint and Path(checkpoint).is_file():
        content = read_checkpoint(checkpoint)
        content["state_dict"]["temperature"] = torch.tensor(temperature)
        SafeCheckpointIO().save_checkpoint(content, checkpoint)
