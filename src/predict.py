"""Entry point: classify images with a checkpoint written by src.train.

python -m src.predict ckpt_path=outputs/DATE/TIME/checkpoints/last.ckpt images=[shoe.png,bag.jpg]
python -m src.predict ckpt_path=CKPT images=FOLDER top_k=5 device=cuda
python -m src.predict --help

The checkpoint alone says what the model expects (channels, size, normalization, class names), so any
image is converted to that: a photo can be fed to a Fashion-MNIST model. Prints the top_k classes per
image and writes, into the run directory, one figure per image and predictions.json.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from matplotlib.figure import Figure
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

from src.classifier import ClassifierModule, load_checkpoint
from src.data.common import DataError
from src.data.image_folder import EXTENSIONS, open_image
from src.errors import one_line
from src.reports import write_atomic

MODES = {1: "L", 3: "RGB"}  # input_shape[0] -> the PIL mode the model was trained on


class PredictError(ValueError):
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


def _load(ckpt_path: str, device: torch.device) -> ClassifierModule:
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        hint = max(path.glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime, default=None)  # the newest run
        raise PredictError(
            f"ckpt_path={path} is a folder; give a .ckpt file" + (f", e.g. ckpt_path={hint}" if hint else "")
        )
    try:
        module = load_checkpoint(path, map_location=device)
    except (FileNotFoundError, ValueError) as e:
        raise PredictError(one_line(e)) from e
    except Exception as e:  # noqa: BLE001 - a checkpoint of another project/version: say so in one line
        raise PredictError(f"cannot load checkpoint {path}: {type(e).__name__}: {one_line(e)}") from e
    return module.to(device).eval()


def _figure_name(path: Path, used: set[str]) -> str:
    """`<stem>.png`, numbered when two images share a stem (a.png and a.jpg, or two folders)."""
    name, k = f"{path.stem}.png", 1
    while name in used:
        k += 1
        name = f"{path.stem}-{k}.png"
    used.add(name)
    return name


def predict(cfg: DictConfig, output_dir: Path) -> int:
    """Print and save the predictions; return the exit status (1 if any image failed, else 0)."""
    for key in ("ckpt_path", "images"):
        if OmegaConf.is_missing(cfg, key):
            raise PredictError(f"{key} is required: python -m src.predict ckpt_path=CKPT images=[a.png,b.jpg]")
    top_k = cfg.top_k
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise PredictError(f"top_k must be a positive integer, got {top_k!r}")
    images = cfg.images
    if not isinstance(images, (str, ListConfig)):
        images = str(images)  # e.g. images=123 (a folder named 123) arrives as an int
    paths = collect_images(images)
    device = _device(str(cfg.device))
    module = _load(str(cfg.ckpt_path), device)

    hp = module.hparams
    class_names = [str(c) for c in hp.class_names]
    input_shape = [int(v) for v in hp.input_shape]
    if input_shape[0] not in MODES:
        raise PredictError(f"the checkpoint expects {input_shape[0]}-channel images; only 1 or 3 are supported")
    mean = per_channel(hp.mean, input_shape[0], "mean")
    std = per_channel(hp.std, input_shape[0], "std")
    k = min(top_k, len(class_names))

    output_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    failed = 0
    used: set[str] = set()
    for path in paths:
        try:
            image = load_image(path, input_shape)
        except UnreadableImage as e:
            print(f"error: {path}: {e}", file=sys.stderr, flush=True)
            failed += 1
            continue
        with torch.no_grad():
            logits = module(to_tensor(image, mean, std).unsqueeze(0).to(device))
        probs = logits.softmax(dim=-1)[0].float().cpu()
        top = probs.topk(k)
        ranked = [(class_names[i], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
        print(f"{path}: " + ", ".join(f"{name} {p:.1%}" for name, p in ranked), flush=True)
        figure = _figure_name(path, used)
        save_figure(image, probs.tolist(), class_names, path.name, output_dir / figure)
        results.append({"image": str(path), "top_k": [[n, round(p, 6)] for n, p in ranked], "figure": figure})
    write_atomic(output_dir / "predictions.json", json.dumps(results, indent=2) + "\n")
    figures = f"{len(results)} figure{'' if len(results) == 1 else 's'}"
    print(f"run directory: {output_dir} ({figures}, predictions.json)")
    if failed:
        print(f"{failed} of {len(paths)} images could not be read (see the errors above)", file=sys.stderr)
    return 1 if failed else 0


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        status = predict(cfg, Path(HydraConfig.get().runtime.output_dir))
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
