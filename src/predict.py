"""Entry point: classify images with a checkpoint or a model of src.export (NAME.pt is TorchScript, a program: only
trusted ones). predictions.csv is streamed a batch at a time, so a stopped or killed run keeps every row it wrote."""

import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image, ImageDraw, UnidentifiedImageError
from torchvision.transforms import functional as TF

from src.callbacks.figures import BLUE, ORANGE, draw_text, font
from src.data.common import DataError
from src.data.image_folder import EXTENSIONS, open_image
from src.runs.checkpoints import format_of, open_exported, open_run
from src.utils.command import entry_point
from src.utils.config import positive_int
from src.utils.errors import RunInterrupted, UserError, exit_code, sigterm_as_interrupt
from src.utils.io import write_atomically

MODES = {1: "L", 3: "RGB"}  # input_shape[0] -> the PIL mode the model was trained on
PRINT_EACH = 20  # up to this many images, one console line each; beyond, progress lines (the CSV has all)
PROGRESS_EVERY_S = 5.0
WHY = {UnidentifiedImageError: "not an image, or a format Pillow cannot read", PermissionError: "permission denied"}


class UnreadableImage(ValueError):
    """One image that cannot be used: reported by name, the other images are still predicted."""


def collect_images(images: str | Path | Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(path, label) of each image: a folder's image files to any depth (sorted; hidden ones skipped), labelled by
    their first folder below it (as ImageFolder); a listed file, by its folder (kept if missing: reported by name)."""
    paths: list[tuple[Path, str]] = []
    for item in (Path(str(i)).expanduser() for i in ([images] if isinstance(images, (str, Path)) else images)):
        if not item.is_dir():
            paths.append((item, item.parent.name))
            continue
        before = len(paths)
        for path in sorted(item.rglob("*")):
            parts = path.relative_to(item).parts
            if path.suffix.lower() in EXTENSIONS and not any(x.startswith(".") for x in parts) and path.is_file():
                paths.append((path, parts[0] if len(parts) > 1 else ""))
        if len(paths) == before:
            raise UserError(f"no images in folder {item} or below (looked for {', '.join(EXTENSIONS)} files)")
    if not paths:
        raise UserError("images is empty: give images=[a.png,b.jpg] or images=FOLDER")
    return paths


def load_image(path: Path, input_shape: Sequence[int]) -> Image.Image:
    """`path` in the model's mode and size: the image exactly as the model sees it (before normalization)."""
    channels, height, width = (int(v) for v in input_shape)
    if not path.is_file():
        raise UnreadableImage("not a file" if path.exists() else "file not found")
    try:
        image = open_image(path, MODES[channels])
    except DataError as e:
        why = f"corrupt or truncated image ({e.__cause__ or e})"
        raise UnreadableImage(WHY.get(type(e.__cause__), why)) from e
    except Exception as e:  # noqa: BLE001 - Pillow raises others too (SyntaxError, zlib.error)
        raise UnreadableImage(f"corrupt or unusable image ({type(e).__name__}: {e})") from e
    return image if image.size == (width, height) else TF.resize(image, [height, width])  # as for training


def to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The datamodules' eval transform."""
    return TF.normalize(TF.to_tensor(image), list(mean), list(std))


def save_figure(image: Image.Image, probs: Sequence[float], class_names: Sequence[str], title: str, path: Path) -> None:
    """The image as the model sees it (scaled up, pixels kept sharp) beside a bar per class probability, the most
    likely in orange; drawn with PIL: milliseconds an image, where matplotlib took a quarter of a second."""
    row, side = 22, 256
    label_width = max(font(12).getbbox(str(name))[2] for name in class_names) + 8
    title = title if len(title) <= 40 else title[:18] + "..." + title[-19:]  # a long file name stays above its image
    figure = Image.new("RGB", (side + 60 + label_width + 330, max(side + 48, 30 + row * len(class_names))), "white")
    draw, best = ImageDraw.Draw(figure), max(range(len(probs)), key=lambda i: probs[i])
    draw_text(draw, (10 + side // 2, 4), f"{title}\n{image.width}x{image.height} {image.mode}", anchor="ma")
    scale = side / max(image.width, image.height)
    shown = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
    figure.paste(shown, (10, 40))
    left = side + 40 + label_width  # the bars' zero
    draw_text(draw, (left + 150, 4), "Class probability", anchor="ma")
    for i, (name, p) in enumerate(zip(class_names, probs, strict=True)):
        y, width = 26 + row * i, round(280 * p) if math.isfinite(p) else 0  # a diverged model's NaN: no bar
        draw_text(draw, (left - 6, y + row // 2), str(name), anchor="rm")
        draw.rectangle((left, y + 3, left + width, y + row - 3), ORANGE if i == best else BLUE)
        draw_text(draw, (left + width + 4, y + row // 2), f"{p:.1%}", anchor="lm")
    figure.save(path)


Model = tuple[list[str], list[int], list[float], list[float], Callable[[torch.Tensor], torch.Tensor]]


def open_model(ckpt_path: str, device: torch.device) -> Model:
    """(class names, input shape, mean, std, images -> CPU probabilities) of a checkpoint or export (mean 0, std 1)."""
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        hint = max(path.glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime, default=None)  # the newest run
        example = f", e.g. ckpt_path={hint}" if hint else ""
        raise UserError(f"ckpt_path={path} is a folder; give a .ckpt file{example}")
    if (fmt := format_of(path)) is not None:
        if not path.is_file():
            raise UserError(f"exported model not found: {path}")
        if fmt == "torchscript":  # unlike a checkpoint or an ONNX graph, a TorchScript file is a program
            warning = f"warning: running the TorchScript program in {path}: use only your own or trusted files"
            print(warning, file=sys.stderr)
        model = open_exported(path.read_bytes(), fmt, str(path), device)
        zero, one = [0.0] * model.input_shape[0], [1.0] * model.input_shape[0]  # ToTensor's [0, 1] as they are
        return model.class_names, model.input_shape, zero, one, lambda x: model.logits(x).softmax(dim=-1)
    module = open_run(path, map_location=device)[0].to(device)

    def probabilities(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module.predict_step(images.to(device)).cpu()

    hp = module.hparams
    return [str(c) for c in hp.class_names], [int(v) for v in hp.input_shape], hp.mean, hp.std, probabilities


Prepared = tuple[Image.Image, torch.Tensor] | UnreadableImage


def prepared_batches(paths: Sequence[Path], batch_size: int, work: Callable[[Path], Prepared]) -> Iterator[list]:
    """`work(path)` (run in threads: it returns errors, not raises them) for every path, a batch at a time in order;
    the next batch is submitted before this one is yielded: decoding overlaps the model, two batches are held."""
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="predict-decode")
    ahead: list[Future[Prepared]] = []
    try:
        for start in range(0, len(paths), batch_size):
            submitted = [pool.submit(work, p) for p in paths[start : start + batch_size]]
            if ahead:
                yield [f.result() for f in ahead]
            ahead = submitted
        yield [f.result() for f in ahead]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def csv_columns(k: int) -> list[str]:
    """path, class, probability (top class), top2_class, top2_probability ... top`k`, figure (its file, empty with
    figures=false), error (an unreadable image's row has only path and error: every image reached has a row)."""
    ranks = [f"top{r}_{field}" for r in range(2, k + 1) for field in ("class", "probability")]
    return ["path", "class", "probability", *ranks, "figure", "error"]


def write_rows(file: io.RawIOBase, rows: Sequence[Sequence[object]]) -> None:
    """Whole rows with one unbuffered write, so a run stopped by Ctrl-C or killed leaves no torn row."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    data = memoryview(text.getvalue().encode())
    while data:
        data = data[file.write(data) :]


def figure_name(path: Path, used: set[str]) -> str:
    """`<stem>.png`, numbered when two images share a stem (a.png and a.jpg, or two folders)."""
    name, k = f"{path.stem}.png", 1
    while name in used:
        k += 1
        name = f"{path.stem}-{k}.png"
    used.add(name)
    return name


def predict(cfg: DictConfig, output_dir: Path) -> int:
    """Stream every prediction to predictions.csv (figures, accuracy.json); return 1 if any image was unreadable."""
    for key in ("ckpt_path", "images"):
        if OmegaConf.is_missing(cfg, key):
            raise UserError(f"{key} is required: python -m src.predict ckpt_path=CKPT images=[a.png,b.jpg]")
    top_k, batch_size = positive_int(cfg, "top_k"), positive_int(cfg, "batch_size")
    if not isinstance(cfg.figures, bool):
        raise UserError(f"figures must be true or false, got {cfg.figures!r}")
    found = collect_images(cfg.images if isinstance(cfg.images, (str, ListConfig)) else str(cfg.images))
    paths = [path for path, _ in found]
    try:
        device = torch.device(str(cfg.device))
    except (RuntimeError, TypeError) as e:
        raise UserError(f"device={cfg.device!r} is not a torch device; use device=cpu or device=cuda") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device} but no CUDA GPU is available; use device=cpu")
    class_names, input_shape, mean, std, probabilities = open_model(str(cfg.ckpt_path), device)
    if input_shape[0] not in MODES:
        raise UserError(f"the model expects {input_shape[0]}-channel images; only 1 or 3 are supported")
    k = min(top_k, len(class_names))

    def prepare(path: Path) -> Prepared:
        try:
            image = load_image(path, input_shape)
        except UnreadableImage as e:
            return e
        return image, to_tensor(image, mean, std)

    output_dir.mkdir(parents=True, exist_ok=True)
    each, done, failed, correct, used = len(paths) <= PRINT_EACH, 0, 0, 0, set()
    started = shown = time.monotonic()
    with open(output_dir / "predictions.csv", "wb", buffering=0) as out, sigterm_as_interrupt():
        write_rows(out, [csv_columns(k)])
        try:
            for batch in prepared_batches(paths, batch_size, prepare):
                good = [item[1] for item in batch if not isinstance(item, UnreadableImage)]
                probs = iter(probabilities(torch.stack(good)) if good else [])
                rows: list[list[object]] = []
                for (path, label), item in zip(found[done : done + len(batch)], batch, strict=True):
                    if isinstance(item, UnreadableImage):
                        print(f"error: {path}: {item}", file=sys.stderr, flush=True)
                        rows.append([path, *[""] * (2 * k + 1), item])
                        failed += 1
                        continue
                    p = next(probs)
                    values, indices = p.topk(k)
                    ranked = [(class_names[c], v) for v, c in zip(values.tolist(), indices.tolist(), strict=True)]
                    correct += ranked[0][0] == label
                    figure = figure_name(path, used) if cfg.figures else ""
                    if figure:  # before its row, so every figure a row names exists
                        save_figure(item[0], p.tolist(), class_names, path.name, output_dir / figure)
                    rows.append([path, *(x for name, v in ranked for x in (name, f"{v:.6f}")), figure, ""])
                    if each:
                        print(f"{path}: " + ", ".join(f"{name} {v:.1%}" for name, v in ranked), flush=True)
                write_rows(out, rows)
                done += len(batch)
                if not each and (time.monotonic() - shown >= PROGRESS_EVERY_S or done == len(paths)):
                    shown = time.monotonic()
                    print(f"{done} of {len(paths)} images ({shown - started:.1f} s)", flush=True)
        except KeyboardInterrupt as e:
            message = f"interrupted after {done} of {len(paths)} images; their rows are in {out.name}"
            raise RunInterrupted(message, exit_code(e)) from None
    figures = f", {len(used)} figure{'' if len(used) == 1 else 's'}" if cfg.figures else ""
    if all(label in class_names for _, label in found) and done > failed:
        accuracy = {"accuracy": correct / (done - failed), "correct": correct, "images": done - failed}
        write_atomically(output_dir / "accuracy.json", json.dumps(accuracy, indent=2) + "\n")
        print(f"accuracy {accuracy['accuracy']:.4f}: {correct} of {done - failed} images in their class's folder")
        figures += ", accuracy.json"
    print(f"run directory: {output_dir} (predictions.csv{figures})")
    if failed:
        print(f"{failed} of {len(paths)} images could not be read (see the errors above)", file=sys.stderr)
    return 1 if failed else 0


def predict_command(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    if status := predict(cfg, Path(HydraConfig.get().runtime.output_dir)):
        sys.exit(status)


main = entry_point("predict")(predict_command)

if __name__ == "__main__":
    main()
