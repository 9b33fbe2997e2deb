"""What a run writes for people: `report_run` (called by the entry points after testing) writes metrics.json,
the confusion matrix and the hyper-parameters with final metrics (TensorBoard's HPARAMS tab); two Lightning
callbacks draw grids of test predictions, of the worst mistakes and of a training batch (PNG files in the
run directory and TensorBoard images). They use only what ClassifierModule states it hands out
(src/classifier.py): `TestStepOutput`, `TestResult` and its hparams."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib

matplotlib.use("Agg")  # figures are written to files and TensorBoard, never shown
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from lightning.pytorch.utilities.model_summary import ModelSummary  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torchmetrics.classification import MulticlassConfusionMatrix  # noqa: E402

from src.classifier import ClassifierModule, TestStepOutput  # noqa: E402
from src.data.atomic import write_atomically  # noqa: E402

SUMMARY_KEYS = (
    "lr_find/suggestion",
    "val/acc_untrained",
    "val/loss",
    "val/acc",
    "test/loss",
    "test/acc",
    "test/acc_top5",
    "test/ece_uncalibrated",
    "calibration/temperature",
    "test/ece",
)
# Config sections that describe a run's hyper-parameters (for TensorBoard's HPARAMS tab).
HPARAM_SECTIONS = ("dataset", "model", "optimizer", "scheduler", "seed", "label_smoothing", "trainer")


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename (src/data/atomic.py), so a killed run never leaves a half-written
    file, and files get the usual permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda f: f.write(text.encode()))


def strict_json(value: Any) -> Any:
    """`value` with NaN and infinities as None, so `json.dumps(allow_nan=False)` writes strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def chance_level(confusion_matrix: Sequence[Sequence[int]]) -> float:
    """The accuracy of always guessing the most common test class (1/num_classes when balanced)."""
    counts = [sum(row) for row in confusion_matrix]
    return max(counts) / max(1, sum(counts))


def format_table(metrics: dict[str, Any], keys: tuple[str, ...] = SUMMARY_KEYS) -> str:
    """A short console table of the headline figures and per-class test accuracy, and a warning when the
    model is no better than guessing."""
    rows = [(k, f"{metrics[k]:.4g}" if k.startswith(("lr_find", "calibration")) else f"{metrics[k]:.4f}")
            for k in keys if isinstance(metrics.get(k), float)]  # fmt: skip
    per_class = ("acc_per_class", "precision_per_class", "recall_per_class", "f1_per_class")
    if "test/acc_per_class" in metrics:
        rows.append(("test, per class:", "   acc   prec  recall   f1"))
        for name in metrics["test/acc_per_class"]:
            values = [metrics.get(f"test/{k}", {}).get(name) for k in per_class]
            rows.append((f"  {name}", " ".join("     -" if v is None else f"{v:6.4f}" for v in values)))
    width = max((len(k) for k, _ in rows), default=10) + 2
    line = "-" * (width + 28)
    table = [line, *(f"{k:<{width}}{v:>28}" for k, v in rows), line]
    if metrics.get("test/at_chance_level"):
        acc, chance = metrics["test/acc"], metrics["test/chance_level"]
        table.append(
            f"WARNING: test accuracy {acc:.4f} is at chance level ({chance:.4f}): the model learned nothing; "
            "check the data and labels, or try another optimizer.lr"
        )
    return "\n".join(table)


def save_figure(fig: plt.Figure, trainer: L.Trainer, output_dir: Path, name: str) -> None:
    """PNG in the run directory and an image in TensorBoard (tag = name)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_dir / f"{name}.png", bbox_inches="tight", dpi=100)
    experiment = getattr(trainer.logger, "experiment", None)
    if hasattr(experiment, "add_figure"):
        experiment.add_figure(name, fig, global_step=trainer.global_step)
    plt.close(fig)


def image_grid(
    images: torch.Tensor,
    titles: Sequence[str],
    colors: Sequence[str] | None = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    columns: int = 10,
) -> plt.Figure:
    """Normalized (N, C, H, W) images back to pixels, one titled cell each."""
    images = images.detach().float().cpu()
    pixels = images * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    pixels = pixels.clamp(0, 1).permute(0, 2, 3, 1)
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(pixels[i].squeeze(-1) if pixels.shape[-1] == 1 else pixels[i], cmap="gray", vmin=0, vmax=1)
            ax.set_title(titles[i], fontsize=8, color=colors[i] if colors else "black")
    fig.tight_layout()
    return fig


def _norm(pl_module: L.LightningModule) -> dict[str, Sequence[float]]:
    return {"mean": pl_module.hparams.mean, "std": pl_module.hparams.std}


def report_run(
    trainer: L.Trainer,
    module: ClassifierModule,
    output_dir: str | Path,
    test: dict[str, float],
    val: dict[str, float] | None = None,
    untrained_acc: float | None = None,
    overrides: Sequence[str] = (),
    extra: dict[str, float] | None = None,
) -> dict[str, Any]:
    """What a tested run reports, from what the entry point measured (the dicts `trainer.validate/test`
    return, the module's `test_result`, the accuracy before training): the metrics on every rank (train()
    returns one on each); from rank 0, `metrics.json`, the confusion matrix figure, and the run's
    hyper-parameters with its final metrics in TensorBoard's HPARAMS tab."""
    result = module.test_result
    assert result is not None, "report_run() comes after trainer.test()"
    untrained = {} if untrained_acc is None else {"val/acc_untrained": untrained_acc}
    checkpoint = trainer.checkpoint_callback
    chance = chance_level(result.confusion_matrix)
    metrics = {
        **untrained,
        **{k: float(v) for k, v in (val or {}).items() if k.startswith("val/")},
        **{k: float(test[k]) for k in ("test/loss", "test/acc", "test/acc_top5", "test/ece") if k in test},
        **(extra or {}),
        "test/acc_per_class": result.acc_per_class,
        "test/precision_per_class": result.precision,
        "test/recall_per_class": result.recall,
        "test/f1_per_class": result.f1,
        "test/reliability": [{"confidence": c, "accuracy": a, "images": n} for c, a, n in result.reliability],
        "test/confusion_matrix": result.confusion_matrix,
        "test/chance_level": chance,
        "test/at_chance_level": bool(test.get("test/acc", 0.0) <= chance),
        "class_names": list(module.hparams.class_names),
        "num_parameters": ModelSummary(module).total_parameters,
        "epochs": trainer.current_epoch,
        "best_checkpoint": getattr(checkpoint, "best_model_path", None) or trainer.ckpt_path,
    }
    if not trainer.is_global_zero:
        return metrics
    output_dir = Path(output_dir)
    write_atomic(output_dir / "metrics.json", json.dumps(strict_json(metrics), indent=2, allow_nan=False) + "\n")
    names = metrics["class_names"]
    fig, _ = MulticlassConfusionMatrix(len(names)).plot(torch.tensor(result.confusion_matrix), labels=names)
    fig.set_size_inches(max(6, 0.6 * len(names)), max(6, 0.6 * len(names)))
    save_figure(fig, trainer, output_dir, "confusion_matrix")
    save_figure(
        reliability_diagram(result.reliability, metrics.get("test/ece")), trainer, output_dir, "reliability_diagram"
    )
    if trainer.logger is not None:
        if untrained_acc is not None:
            trainer.logger.log_metrics({"val/acc_untrained": untrained_acc}, step=0)
        _log_hparams(trainer, module, metrics, overrides)
    return metrics


def reliability_diagram(bins: Sequence[tuple[float, float, int]], ece: float | None) -> plt.Figure:
    """Accuracy against confidence per bin (bar width: the bin; shade: how many test images fell in it);
    a calibrated model's bars reach the diagonal."""
    fig, ax = plt.subplots(figsize=(5, 5))
    total = max(1, sum(n for _, _, n in bins))
    width = 1 / len(bins)
    for i, (_, accuracy, count) in enumerate(bins):
        ax.bar(
            (i + 0.5) * width, accuracy, width=width, color="tab:blue", alpha=0.3 + 0.7 * count / total, edgecolor="k"
        )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top class probability)", ylabel="accuracy")
    ax.set_title("Reliability diagram" + (f" (ECE {ece:.4f}, {len(bins)} bins)" if ece is not None else ""))
    ax.legend(loc="upper left")
    return fig


def _log_hparams(
    trainer: L.Trainer, module: ClassifierModule, metrics: dict[str, Any], overrides: Sequence[str]
) -> None:
    """The run's command-line overrides first (in a sweep, what varies), then the config sections."""
    config = module.hparams.get("config")
    if not config:
        return
    config = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    given = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    params: dict[str, Any] = {"overrides": given} if given else {}
    params.update({k: config.get(k) for k in HPARAM_SECTIONS if k in config})
    if isinstance(params.get("trainer"), dict):
        params["trainer"] = {"max_epochs": params["trainer"].get("max_epochs")}
    final = {f"hparams/{k.replace('/', '_')}": v for k, v in metrics.items() if isinstance(v, float)}
    trainer.logger.log_hyperparams(params, metrics=final)


class PredictionFigures(L.Callback):
    """Test-set grids: the first `num_images` predictions titled "predicted (true)", green when right and
    red when wrong, and the `num_images` most confident mistakes."""

    def __init__(self, output_dir: str, num_images: int = 20) -> None:
        self.output_dir = Path(output_dir)
        self.num_images = num_images

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first: list[tuple[torch.Tensor, ...]] = []
        self.worst = (
            torch.empty(0),
            torch.empty(0),
            torch.empty(0, dtype=torch.long),
            torch.empty(0, dtype=torch.long),
        )

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: TestStepOutput,
        batch: Any,
        batch_idx: int,
        *_: Any,
    ) -> None:
        x, y = batch[0].cpu(), batch[1].cpu()
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs  # ClassifierModule's TestStepOutput
        confidence, predicted = logits.float().softmax(-1).max(-1)
        confidence, predicted = confidence.cpu(), predicted.cpu()
        if sum(len(b[0]) for b in self.first) < self.num_images:
            self.first.append((x, predicted, y))
        wrong = predicted != y
        images, conf, pred, true = (
            torch.cat([old, new]) if len(old) else new
            for old, new in zip(self.worst, (x[wrong], confidence[wrong], predicted[wrong], y[wrong]), strict=True)
        )
        keep = conf.argsort(descending=True)[: self.num_images]
        self.worst = (images[keep], conf[keep], pred[keep], true[keep])

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = pl_module.hparams.class_names
        if self.first:
            x, pred, true = (torch.cat(t)[: self.num_images] for t in zip(*self.first, strict=True))
            titles = [f"{names[p]} ({names[t]})" for p, t in zip(pred, true, strict=True)]
            colors = ["green" if p == t else "red" for p, t in zip(pred, true, strict=True)]
            save_figure(image_grid(x, titles, colors, **_norm(pl_module)), trainer, self.output_dir, "test_predictions")
        images, conf, pred, true = self.worst
        if len(images):
            titles = [f"{names[p]} {c:.0%}\n({names[t]})" for p, c, t in zip(pred, conf, true, strict=True)]
            fig = image_grid(images, titles, ["red"] * len(images), **_norm(pl_module))
            save_figure(fig, trainer, self.output_dir, "worst_misclassified")


class TrainBatchFigure(L.Callback):
    """The first training batch as the model sees it (after augmentation), titled with its labels. The images
    are kept at the first step and drawn when training ends (or stops on an error), so drawing (about a
    second of matplotlib) neither delays the start of training nor interrupts it."""

    def __init__(self, output_dir: str, num_images: int = 20) -> None:
        self.output_dir = Path(output_dir)
        self.num_images = num_images
        self.first_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    @rank_zero_only
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            self.first_batch = (batch[0][: self.num_images].detach().clone(), batch[1][: self.num_images].clone())

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer, pl_module)

    @rank_zero_only
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.draw(trainer, pl_module)  # a stopped run still shows what it trained on

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.first_batch is None:
            return
        x, y = self.first_batch
        self.first_batch = None
        titles = [pl_module.hparams.class_names[int(label)] for label in y]
        save_figure(image_grid(x, titles, **_norm(pl_module)), trainer, self.output_dir, "train_batch")
