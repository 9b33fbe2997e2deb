"""What a run writes for people, as Lightning callbacks: metrics.json and the confusion matrix figure."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib

matplotlib.use("Agg")  # figures are written to files and TensorBoard, never shown
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from lightning.pytorch.utilities.model_summary import ModelSummary  # noqa: E402

SUMMARY_KEYS = ("val/loss", "val/acc", "test/loss", "test/acc")


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a killed run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def format_table(metrics: dict[str, Any], keys: tuple[str, ...] = SUMMARY_KEYS) -> str:
    """A short console table of the headline figures and per-class test accuracy."""
    rows = [(k, f"{metrics[k]:.4f}") for k in keys if k in metrics]
    rows += [(f"  {name}", f"{acc:.4f}") for name, acc in metrics.get("test/acc_per_class", {}).items()]
    width = max(len(k) for k, _ in rows) + 2
    line = "-" * (width + 10)
    return "\n".join([line, *(f"{k:<{width}}{v:>10}" for k, v in rows), line])


class MetricsReport(L.Callback):
    """After testing, writes `metrics.json` (headline figures, per-class accuracy by class name, the
    confusion matrix with rows = true class) and the confusion matrix figure (PNG and TensorBoard)."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)
        self.val: dict[str, float] = {}
        self.metrics: dict[str, Any] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The last validation is trainer.validate(ckpt_path="best"), so these describe the tested weights.
        self.val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = pl_module.test_results
        test = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("test/loss", "test/acc")}
        checkpoint = trainer.checkpoint_callback
        self.metrics = {
            **self.val,
            **test,
            "test/acc_per_class": results["acc_per_class"],
            "test/confusion_matrix": results["confusion_matrix"],
            "class_names": list(pl_module.hparams.class_names),
            "num_parameters": ModelSummary(pl_module).total_parameters,
            "epochs": trainer.current_epoch,
            "best_checkpoint": getattr(checkpoint, "best_model_path", None) or None,
        }
        write_atomic(self.output_dir / "metrics.json", json.dumps(self.metrics, indent=2) + "\n")
        names = self.metrics["class_names"]
        fig, _ = pl_module.confmats["test"].plot(torch.tensor(results["confusion_matrix"]), labels=names)
        fig.set_size_inches(max(6, 0.6 * len(names)), max(6, 0.6 * len(names)))
        fig.savefig(self.output_dir / "confusion_matrix.png", bbox_inches="tight", dpi=100)
        if trainer.logger is not None and hasattr(trainer.logger.experiment, "add_figure"):
            trainer.logger.experiment.add_figure("test/confusion_matrix", fig, global_step=trainer.global_step)
        plt.close(fig)
