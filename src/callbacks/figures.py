"""A run's figures (PNG files and TensorBoard images), grids drawn with PIL (milliseconds, not matplotlib's seconds)."""

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def save_figure(figure: Any, trainer: L.Trainer, output_dir: Path, name: str) -> None:
    """`figure` (a PIL image or a matplotlib Figure, rendered once) as NAME.png and TensorBoard image NAME."""
    if not isinstance(figure, Image.Image):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        figure.tight_layout()
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        figure = Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")
    output_dir.mkdir(parents=True, exist_ok=True)
    figure.save(output_dir / f"{name}.png")
    for logger in trainer.loggers:
        if hasattr(getattr(logger, "experiment", None), "add_image"):
            logger.experiment.add_image(name, np.asarray(figure), trainer.global_step, dataformats="HWC")


def image_grid(
    images: torch.Tensor,
    titles: Sequence[str],
    colors: Sequence[str] | None = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    columns: int = 10,
    cell: int = 96,
) -> Image.Image:
    """Normalized (N, C, H, W) images back to pixels, each scaled to `cell` pixels wide, titled below."""
    pixels = images.detach().float().cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    pixels = (pixels.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    pixels = pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels  # gray: (N, H, W), as PIL takes it
    height = cell * pixels.shape[1] // pixels.shape[2]
    font = ImageFont.load_default(size=11)
    text_height = 14 * max(1, max(t.count("\n") + 1 for t in titles))
    rows = max(1, -(-len(pixels) // columns))
    grid = Image.new("RGB", (columns * (cell + 4), rows * (height + text_height + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (array, title) in enumerate(zip(pixels, titles, strict=True)):
        x, y = (i % columns) * (cell + 4) + 2, (i // columns) * (height + text_height + 4) + 2
        grid.paste(Image.fromarray(array).resize((cell, height), Image.NEAREST), (x, y))
        draw.multiline_text((x + cell // 2, y + height + 1), title, fill=colors[i] if colors else "black", font=font,
                            anchor="ma", align="center")  # fmt: skip
    return grid


def _norm(pl_module: L.LightningModule) -> dict[str, Sequence[float]]:
    return {"mean": pl_module.hparams.mean, "std": pl_module.hparams.std}


class PredictionFigures(L.Callback):
    """The first `num_images` test predictions, "predicted (true)" in green or red, the most confident mistakes, and
    ClassifierModule's `test_result` as a confusion matrix and a reliability diagram."""

    def __init__(self, output_dir: str, num_images: int = 20) -> None:
        self.output_dir = Path(output_dir)
        self.num_images = num_images

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first: list[tuple[torch.Tensor, ...]] = []
        no_labels = torch.empty(0, dtype=torch.long)
        self.worst = (torch.empty(0), torch.empty(0), no_labels, no_labels)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: dict[str, torch.Tensor],
        batch: Any,
        batch_idx: int,
        *_: Any,
    ) -> None:
        x, y = batch[0].cpu(), batch[1].cpu()
        confidence, predicted = outputs["logits"].float().softmax(-1).max(-1)  # ClassifierModule's test_step output
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
        if (result := getattr(pl_module, "test_result", None)) is not None:
            save_figure(confusion_figure(result.confusion_matrix, names), trainer, self.output_dir, "confusion_matrix")
            ece = trainer.callback_metrics.get("test/ece")
            fig = reliability_diagram(result.reliability, None if ece is None else float(ece))
            save_figure(fig, trainer, self.output_dir, "reliability_diagram")


class TrainBatchFigure(L.Callback):
    """The first training batch as the model sees it (augmented), drawn when training ends or stops (not during)."""

    def __init__(self, output_dir: str, num_images: int = 20) -> None:
        self.output_dir = Path(output_dir)
        self.num_images = num_images
        self.first_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == 0 and batch_idx == 0 and trainer.is_global_zero:
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


def confusion_figure(matrix: Sequence[Sequence[int]], names: Sequence[str]) -> "Figure":
    from matplotlib.figure import Figure

    n, most = len(names), max(max(row) for row in matrix)
    fig = Figure(figsize=(max(6, 0.6 * n), max(6, 0.6 * n)))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, most))
    for (i, j), count in np.ndenumerate(np.asarray(matrix)):
        ax.text(j, i, count, ha="center", va="center", color="white" if count > most / 2 else "black", fontsize=8)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted class", ylabel="true class", title="Confusion matrix")
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    return fig


def reliability_diagram(bins: Sequence[tuple[float, float, int]], ece: float | None) -> "Figure":
    """Accuracy against confidence per bin (shade: how many images); a calibrated model's bars reach the diagonal."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    total, width = max(1, sum(n for _, _, n in bins)), 1 / len(bins)
    for i, (_, accuracy, count) in enumerate(bins):
        shade = 0.3 + 0.7 * count / total
        ax.bar((i + 0.5) * width, accuracy, width=width, color="tab:blue", alpha=shade, edgecolor="k")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top class probability)", ylabel="accuracy")
    ax.set_title("Reliability diagram" + (f" (ECE {ece:.4f}, {len(bins)} bins)" if ece is not None else ""))
    ax.legend(loc="upper left")
    return fig
