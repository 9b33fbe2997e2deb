"""A run's figures (PNG files and TensorBoard images), drawn with PIL: milliseconds, where matplotlib takes a tenth
of a second each (only the LR finder's curve is matplotlib's: Lightning draws it)."""

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image, ImageDraw, ImageFont

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's tab:blue and tab:orange


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans from matplotlib's files (found without importing it): it has accented, Cyrillic and Greek letters,
    which PIL's built-in font draws as boxes; the built-in one where matplotlib is missing."""
    spec = importlib.util.find_spec("matplotlib")
    path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf" if spec and spec.origin else None
    return ImageFont.truetype(str(path), size) if path and path.is_file() else ImageFont.load_default(size=size)


def draw_text(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    anchor: str = "mm",
    fill: Any = "black",
    size: int = 12,
) -> None:
    draw.multiline_text(xy, text, fill=fill, font=font(size), anchor=anchor, align="center")


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
    text_height = 14 * max(1, max(t.count("\n") + 1 for t in titles))
    rows = max(1, -(-len(pixels) // columns))
    grid = Image.new("RGB", (columns * (cell + 4), rows * (height + text_height + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (array, title) in enumerate(zip(pixels, titles, strict=True)):
        x, y = (i % columns) * (cell + 4) + 2, (i // columns) * (height + text_height + 4) + 2
        grid.paste(Image.fromarray(array).resize((cell, height), Image.NEAREST), (x, y))
        draw_text(draw, (x + cell // 2, y + height + 1), title, "ma", colors[i] if colors else "black", size=11)
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


def _turned(text: str, angle: float, size: int = 12) -> Image.Image:
    """`text` in black on a transparent image turned by `angle` degrees (rotated axis labels)."""
    left, top, right, bottom = font(size).getbbox(text)
    image = Image.new("LA", (right - left + 2, bottom - top + 2), (0, 0))
    ImageDraw.Draw(image).text((1 - left, 1 - top), text, fill=(0, 255), font=font(size))
    return image.rotate(angle, expand=True, resample=Image.BICUBIC)


def confusion_figure(matrix: Sequence[Sequence[int]], names: Sequence[str]) -> Image.Image:
    """Counts per (true row, predicted column), shaded white to blue by count; the names slanted below."""
    n, most = len(names), max(1, max(max(row) for row in matrix))
    cell = max(16, min(44, 560 // n))
    labels = [_turned(str(name), 45) for name in names]
    left = max(font(12).getbbox(str(name))[2] for name in names) + 40
    top, below = 36, max(label.height for label in labels) + 30
    figure = Image.new("RGB", (left + n * cell + 20, top + n * cell + below), "white")
    draw = ImageDraw.Draw(figure)
    draw_text(draw, (left + n * cell / 2, 16), "Confusion matrix", size=14)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            level = count / most  # matplotlib's "Blues" from white (0) to dark blue (most)
            color = tuple(round(a + (b - a) * level) for a, b in zip((247, 251, 255), (8, 48, 107), strict=True))
            x, y = left + j * cell, top + i * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=color)
            shade = "white" if level > 0.5 else "black"
            draw_text(draw, (x + cell / 2, y + cell / 2), str(count), fill=shade, size=min(10, cell // 3))
        draw_text(draw, (left - 6, top + i * cell + cell / 2), str(names[i]), anchor="rm")
    for j, label in enumerate(labels):  # each name's top right corner under its column's centre
        figure.paste(label, (left + j * cell + cell // 2 - label.width, top + n * cell + 4), label)
    draw_text(draw, (left + n * cell / 2, figure.height - 12), "predicted class")
    axis = _turned("true class", 90)
    figure.paste(axis, (4, top + (n * cell - axis.height) // 2), axis)
    return figure


def reliability_diagram(bins: Sequence[tuple[float, float, int]], ece: float | None) -> Image.Image:
    """Accuracy against confidence per bin (shade: how many images); a calibrated model's bars reach the diagonal."""
    side, left, top = 400, 60, 40
    figure = Image.new("RGB", (left + side + 20, top + side + 50), "white")
    draw = ImageDraw.Draw(figure)
    title = "Reliability diagram" + (f" (ECE {ece:.4f}, {len(bins)} bins)" if ece is not None else "")
    draw_text(draw, (left + side / 2, 18), title, size=13)
    total, width = max(1, sum(n for _, _, n in bins)), side / len(bins)
    for i, (_, accuracy, count) in enumerate(bins):
        shade = 0.3 + 0.7 * count / total  # tab:blue over white, more opaque with more images
        color = tuple(round(255 + (c - 255) * shade) for c in BLUE)
        x = left + i * width
        draw.rectangle((x, top + side * (1 - accuracy), x + width, top + side), fill=color, outline="black")
    for k in range(0, 20, 2):  # the diagonal, dashed: perfect calibration
        a, b = k / 20, (k + 1) / 20
        draw.line((left + side * a, top + side * (1 - a), left + side * b, top + side * (1 - b)), "gray", 2)
    draw.rectangle((left, top, left + side, top + side), outline="black")
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw_text(draw, (left + side * v, top + side + 12), f"{v:g}")
        draw_text(draw, (left - 6, top + side * (1 - v)), f"{v:g}", anchor="rm")
    draw_text(draw, (left + side / 2, top + side + 34), "confidence (top class probability)")
    axis = _turned("accuracy", 90)
    figure.paste(axis, (6, top + (side - axis.height) // 2), axis)
    draw.line((left + 10, top + 14, left + 34, top + 14), "gray", 2)
    draw_text(draw, (left + 40, top + 14), "perfect calibration (dashed)", anchor="lm")
    return figure
