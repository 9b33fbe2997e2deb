"""Entry point: classify images with a checkpoint written by src.train.

python -m src.predict ckpt_path=outputs/DATE/TIME/checkpoints/last.ckpt images=[shoe.png,bag.jpg]
python -m src.predict ckpt_path=CKPT images=FOLDER top_k=5 device=cuda
python -m src.predict ckpt_path=CKPT images=BIG_FOLDER figures=false batch_size=512
python -m src.predict --help

The checkpoint alone says what the model expects (channels, size, normalization, class names), so any
image is converted to that: a photo can be fed to a Fashion-MNIST model. Images are decoded in a thread
pool (Pillow releases the GIL) one batch ahead of the model, which sees whole batches; each image goes
through the same load_image + to_tensor as it would alone, so a batch changes no prediction.

ckpt_path may also be a file written by src.export, told apart by its suffix: NAME.onnx (run by onnxruntime)
or NAME.pt (TorchScript). Class names and input shape then come from the file's metadata and the images
are prepared the same way, less the normalization, which is inside the exported model. An ONNX file is a
graph of standard operators; a TorchScript file is a program (torch.jit.load runs its TorchScript code):
use only your own or ones you trust, as for any program. Any other file is read as a checkpoint, never run.

Into the run directory: predictions.csv, streamed (one write per batch, so an interrupted or killed run
keeps every row it finished; columns: csv_columns), with figures=true one figure per image. The console has
the top_k classes per image up to PRINT_EACH images, beyond that a progress line every few seconds.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from matplotlib.figure import Figure
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

from src.checkpoints import load_checkpoint
from src.classifier import ClassifierModule
from src.data.common import DataError
from src.data.image_folder import EXTENSIONS, open_image
from src.errors import RunInterrupted, UserError, report_errors
from src.export import format_of, open_exported

MODES = {1: "L", 3: "RGB"}  # input_shape[0] -> the PIL mode the model was trained on
PRINT_EACH = 20  # up to this many images, one console line each; beyond, progress lines (the CSV has all)
PROGRESS_EVERY_S = 5.0


class PredictError(UserError):
    """A problem with the whole command (options, checkpoint, folder): one line on stderr, exit status 1."""


class UnreadableImage(ValueError):
    """One image that cannot be used: reported by name, the other images are still predicted."""


def collect_images(images: str | Path | Sequence[str | Path]) -> list[Path]:
    """A folder becomes its image files (sorted, not recursive, hidden files skipped); listed files are
    kept even when missing, so each one is reported by name instead of silently dropped."""
    items = [images] if isinstance(images, (str, Path)) else list(images)
    paths: list[Path] = []
    for item in (Path(str(i)).expanduser() for i in items):
        if item.is_dir():
            found = sorted(
                p
                for p in item.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(EXTENSIONS)
            )
            if not found:
                raise PredictError(f"no images in folder {item} (looked for {', '.join(EXTENSIONS)} files)")
            paths += found
        else:
            paths.append(item)
    if not paths:
        raise PredictError("images is empty: give images=[a.png,b.jpg] or images=FOLDER")
    return paths


def per_channel(values: Sequence[float], channels: int, name: str) -> list[float]:
    """Checkpoints store one value per channel, but a single value for all channels is accepted too."""
    values = [float(v) for v in values]
    if len(values) == 1:
        values *= channels
    if len(values) != channels:
        raise PredictError(f"the checkpoint's {name} has {len(values)} values for {channels} channels")
    return values


def load_image(path: Path, input_shape: Sequence[int]) -> Image.Image:
    """Decode `path` and convert it to the model's mode and size: the image exactly as the model sees it
    (before normalization), which is also what the figure shows."""
    channels, height, width = (int(v) for v in input_shape)
    if not path.exists():
        raise UnreadableImage("file not found")
    if not path.is_file():
        raise UnreadableImage("not a file")
    try:
        image = open_image(path, MODES[channels])
    except DataError as e:
        cause = e.__cause__
        if isinstance(cause, UnidentifiedImageError):
            raise UnreadableImage("not an image, or a format Pillow cannot read") from e
        if isinstance(cause, PermissionError):
            raise UnreadableImage("permission denied") from e
        raise UnreadableImage(f"corrupt or truncated image ({cause or e})") from e
    except Exception as e:  # noqa: BLE001 - Pillow raises others too (SyntaxError, zlib.error, bomb check)
        raise UnreadableImage(f"corrupt or unusable image ({type(e).__name__}: {e})") from e
    if image.size != (width, height):
        image = T.Resize((height, width))(image)  # as ImageFolderDataModule resizes for training
    return image


def to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The same ToTensor + Normalize as the datamodules' eval transform."""
    return T.Normalize(mean, std)(T.ToTensor()(image))


def save_figure(image: Image.Image, probs: Sequence[float], class_names: Sequence[str], title: str, path: Path) -> None:
    """The image as the model sees it beside every class probability, top class highlighted (like the
    tutorials' view_classify). A bare Figure: no pyplot state to leak over many images, no display needed."""
    n = len(class_names)
    fig = Figure(figsize=(9, max(3.0, 0.3 * n + 1)))
    ax_image, ax_bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    pixels = np.asarray(image)
    if image.mode == "L":
        ax_image.imshow(pixels, cmap="gray", vmin=0, vmax=255)
    else:
        ax_image.imshow(pixels)
    ax_image.set_title(f"{title}\n{image.width}x{image.height} {image.mode}", fontsize=9)
    ax_image.axis("off")
    best = int(np.argmax(probs))
    ax_bars.barh(range(n), probs, color=["tab:orange" if i == best else "tab:blue" for i in range(n)])
    ax_bars.set_yticks(range(n), labels=list(class_names))
    ax_bars.invert_yaxis()  # first class on top
    ax_bars.set_xlim(0, 1.1)
    ax_bars.set_title("Class probability")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise PredictError(f"device={name!r} is not a torch device; use device=cpu or device=cuda") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"device={name} but no CUDA GPU is available; use device=cpu")
    return device


@dataclass(frozen=True)
class Model:
    """What predict needs of a checkpoint or an exported file."""

    class_names: list[str]
    input_shape: list[int]
    mean: list[float]  # the normalization predict applies (none for an exported file: it is inside)
    std: list[float]
    probabilities: Callable[[Sequence[torch.Tensor]], torch.Tensor]  # prepared tensors -> (N, classes) on the CPU


def _load(ckpt_path: str, device: torch.device) -> Model:
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        hint = max(path.glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime, default=None)  # the newest run
        raise PredictError(
            f"ckpt_path={path} is a folder; give a .ckpt file" + (f", e.g. ckpt_path={hint}" if hint else "")
        )
    fmt = format_of(path)
    if fmt is not None:
        if not path.is_file():
            raise PredictError(f"exported model not found: {path}")
        if fmt == "torchscript":  # unlike a checkpoint or an ONNX graph, a TorchScript file is a program
            print(
                f"warning: running the TorchScript program in {path}: use only your own or trusted files",
                file=sys.stderr,
            )
        exported = open_exported(path.read_bytes(), fmt, str(path), device)
        channels = exported.input_shape[0]
        return Model(
            exported.class_names,
            exported.input_shape,
            [0.0] * channels,  # (x - 0) / 1: the images exactly as ToTensor gives them
            [1.0] * channels,
            lambda tensors: exported.logits(torch.stack(list(tensors))).softmax(dim=-1),
        )
    module = load_checkpoint(path, map_location=device).to(device).eval()
    hp = module.hparams
    channels = int(hp.input_shape[0])
    return Model(
        [str(c) for c in hp.class_names],
        [int(v) for v in hp.input_shape],
        per_channel(hp.mean, channels, "mean"),
        per_channel(hp.std, channels, "std"),
        partial(classify, module, device=device),
    )


def _figure_name(path: Path, used: set[str]) -> str:
    """`<stem>.png`, numbered when two images share a stem (a.png and a.jpg, or two folders)."""
    name, k = f"{path.stem}.png", 1
    while name in used:
        k += 1
        name = f"{path.stem}-{k}.png"
    used.add(name)
    return name


Prepared = tuple[Image.Image, torch.Tensor] | UnreadableImage


def prepare(path: Path, input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> Prepared:
    """One image as the model sees it (the figure shows the image, the model gets the tensor), or why it
    cannot be used: this runs in a pool thread, so the error is returned, not raised."""
    try:
        image = load_image(path, input_shape)
    except UnreadableImage as e:
        return e
    return image, to_tensor(image, mean, std)


def prepared_batches(
    paths: Sequence[Path], batch_size: int, work: Callable[[Path], Prepared], pool: ThreadPoolExecutor
) -> Iterator[list[Prepared]]:
    """`work(path)` for every path, in input order, a batch at a time; the next batch is submitted before
    this one is yielded, so decoding overlaps the model and at most two batches are held."""
    ahead: list[Future[Prepared]] = []
    for start in range(0, len(paths), batch_size):
        submitted = [pool.submit(work, p) for p in paths[start : start + batch_size]]
        if ahead:
            yield [f.result() for f in ahead]
        ahead = submitted
    yield [f.result() for f in ahead]


def classify(module: ClassifierModule, tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Class probabilities (rows in input order, on the CPU) of prepared tensors, as one batch."""
    with torch.inference_mode():
        return module(torch.stack(list(tensors)).to(device)).softmax(dim=-1).float().cpu()


def rank(probs: torch.Tensor, class_names: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The `k` most probable (class, probability), most probable first."""
    top = probs.topk(k)
    return [(class_names[c], v) for v, c in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def csv_columns(k: int) -> list[str]:
    """path, class and probability of the top class, top2_class, top2_probability ... up to top`k`, then
    figure (its file name; empty with figures=false) and error (why the image could not be read: such a
    row has only path and error, so the CSV accounts for every image it reached, in input order)."""
    ranks = [f"top{r}_{field}" for r in range(2, k + 1) for field in ("class", "probability")]
    return ["path", "class", "probability", *ranks, "figure", "error"]


class CsvStream:
    """predictions.csv, appended a batch at a time with one unbuffered write, so a run stopped by Ctrl-C
    or killed leaves the header and whole rows. open()'s usual permissions (0644 under umask 022)."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.file = open(path, "wb", buffering=0)  # noqa: SIM115 - written across batches, closed by close()
        self.write([columns])

    def write(self, rows: Sequence[Sequence[object]]) -> None:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        data = memoryview(text.getvalue().encode())
        while data:
            data = data[self.file.write(data) :]

    def close(self) -> None:
        self.file.close()


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`), raised where Ctrl-C would be, so both end the same way."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
        yield
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PredictError(f"{key} must be a positive integer, got {value!r}")
    return value


def predict(cfg: DictConfig, output_dir: Path) -> int:
    """Stream every image's prediction to predictions.csv (and figures); return the exit status, 1 if any
    image could not be read. Ctrl-C or SIGTERM ends in a RunInterrupted that says what was kept."""
    for key in ("ckpt_path", "images"):
        if OmegaConf.is_missing(cfg, key):
            raise PredictError(f"{key} is required: python -m src.predict ckpt_path=CKPT images=[a.png,b.jpg]")
    top_k, batch_size = _positive_int(cfg, "top_k"), _positive_int(cfg, "batch_size")
    if not isinstance(cfg.figures, bool):
        raise PredictError(f"figures must be true or false, got {cfg.figures!r}")
    images = cfg.images
    if not isinstance(images, (str, ListConfig)):
        images = str(images)  # e.g. images=123 (a folder named 123) arrives as an int
    paths = collect_images(images)
    device = _device(str(cfg.device))
    model = _load(str(cfg.ckpt_path), device)
    class_names, input_shape = model.class_names, model.input_shape
    if input_shape[0] not in MODES:
        raise PredictError(f"the model expects {input_shape[0]}-channel images; only 1 or 3 are supported")
    k = min(top_k, len(class_names))

    output_dir.mkdir(parents=True, exist_ok=True)
    out = CsvStream(output_dir / "predictions.csv", csv_columns(k))
    each = len(paths) <= PRINT_EACH
    done = failed = 0
    used: set[str] = set()
    started = shown = time.monotonic()
    work = partial(prepare, input_shape=input_shape, mean=model.mean, std=model.std)
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="predict-decode")
    try:
        with sigterm_as_interrupt():
            for batch in prepared_batches(paths, batch_size, work, pool):
                good = [item for item in batch if not isinstance(item, UnreadableImage)]
                probs = iter(model.probabilities([tensor for _, tensor in good]) if good else [])
                rows: list[list[object]] = []
                for path, item in zip(paths[done : done + len(batch)], batch, strict=True):
                    if isinstance(item, UnreadableImage):
                        print(f"error: {path}: {item}", file=sys.stderr, flush=True)
                        rows.append([path, *[""] * (2 * k + 1), item])
                        failed += 1
                        continue
                    p = next(probs)
                    ranked = rank(p, class_names, k)
                    figure = _figure_name(path, used) if cfg.figures else ""
                    if figure:  # before its row, so every figure a row names exists
                        save_figure(item[0], p.tolist(), class_names, path.name, output_dir / figure)
                    rows.append([path, *(x for name, v in ranked for x in (name, f"{v:.6f}")), figure, ""])
                    if each:
                        print(f"{path}: " + ", ".join(f"{name} {v:.1%}" for name, v in ranked), flush=True)
                out.write(rows)
                done += len(batch)
                if not each and (time.monotonic() - shown >= PROGRESS_EVERY_S or done == len(paths)):
                    shown = time.monotonic()
                    print(f"{done} of {len(paths)} images ({shown - started:.1f} s)", flush=True)
    except KeyboardInterrupt as e:
        code = 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
        message = f"interrupted after {done} of {len(paths)} images; their rows are in {out.path}"
        raise RunInterrupted(message, code) from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        out.close()
    figures = f", {len(used)} figure{'' if len(used) == 1 else 's'}" if cfg.figures else ""
    print(f"run directory: {output_dir} (predictions.csv{figures})")
    if failed:
        print(f"{failed} of {len(paths)} images could not be read (see the errors above)", file=sys.stderr)
    return 1 if failed else 0


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    status = report_errors(lambda: predict(cfg, Path(HydraConfig.get().runtime.output_dir)))
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
