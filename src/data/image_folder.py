"""A user's own images: `data_dir/train/<class>/*.png|jpg` and optionally `data_dir/test/<class>/*`.

Class names are the folder names (a class folder may be a symlink). Every real image file counts once:
below a class folder, symlinked folders are not followed (a link back up would repeat images, in train and
val alike; a warning names them), and a file reached twice through file symlinks is listed where it is
first met in sorted order.

Size comes from the first training image unless `size` is set; channels from all training images (colour
if any is colour; read from the file headers without decoding, and not at all when the split comes from
the in-memory cache). An unreadable image (corrupt, truncated, not an image, over Pillow's
decompression-bomb limit `PIL.Image.MAX_IMAGE_PIXELS`) is an error that names the file (never silently
skipped: a quietly shrinking dataset makes results incomparable).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from torchvision import datasets
from torchvision import transforms as T

from src.data.common import DataError, ImageClassificationDataModule

log = logging.getLogger(__name__)
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# What Pillow raises for a file it refuses; UnidentifiedImageError (unknown format) is an OSError.
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)


# The formats the extensions name: a file called x.png that is really, say, EPS is not handed to Ghostscript.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")


def _open(path: str | Path) -> Image.Image:
    """Open lazily (header only). Pillow only warns between its pixel limit and twice it: refuse it there too."""
    image = Image.open(path, formats=FORMATS)
    pixels, limit = image.width * image.height, Image.MAX_IMAGE_PIXELS
    if limit and pixels > limit:
        image.close()
        raise Image.DecompressionBombError(f"Image size ({pixels} pixels) exceeds limit of {limit} pixels")
    return image


def _unreadable(path: str | Path, e: Exception) -> DataError:
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        size = str(e).split(",")[0].removesuffix(".")  # Pillow's own message goes on about DOS attacks
        return DataError(f"{path} is too large to decode safely: {size} (PIL.Image.MAX_IMAGE_PIXELS); shrink it")
    return DataError(f"unreadable image {path} ({e}); remove or replace it")


def open_image(path: str | Path, mode: str | None = None) -> Image.Image:
    """Decode fully (so truncation is caught here) and convert to `mode` ("L" or "RGB"; default: the file's)."""
    try:
        with _open(path) as image:
            image.load()
            return image.convert(mode or ("L" if image.mode in GRAY_MODES else "RGB"))
    except UNREADABLE as e:
        raise _unreadable(path, e) from e


def read_header(path: str | Path) -> tuple[str, int, int]:
    """("L" or "RGB", height, width) from the file's header alone: Image.open decodes no pixels."""
    try:
        with _open(path) as image:
            return ("L" if image.mode in GRAY_MODES else "RGB"), image.height, image.width
    except UNREADABLE as e:
        raise _unreadable(path, e) from e


def _is_colour(path: str) -> bool:
    return read_header(path)[0] == "RGB"


def any_colour(paths: Sequence[str], chunk: int = 4096) -> bool:
    """Whether any image is colour, stopping at the first (threads: opening files waits on I/O)."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return any(any(pool.map(_is_colour, paths[i : i + chunk])) for i in range(0, len(paths), chunk))


def _is_image(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS)


def _walk(folder: str, links: list[str]) -> Iterator[os.DirEntry]:
    """Image files under `folder`, in torchvision's order; symlinked folders are not entered but added to `links`."""
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    yield from (e for e in entries if not e.is_dir() and _is_image(e.name))
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path, links)
        elif entry.is_dir():
            links.append(entry.path)


def list_images(root: str | Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) of every image under `root/<class>/`, each real file once (see the module docstring)."""
    samples: list[tuple[str, int]] = []
    seen: set[str] = set()
    links: list[str] = []
    for name, label in sorted(class_to_idx.items()):
        folder = os.path.join(root, name)
        real_folder = os.path.realpath(folder)  # only symlinks need resolving below it: no others are followed
        count = 0
        for entry in _walk(folder, links):
            real = os.path.realpath(entry.path) if entry.is_symlink() else real_folder + entry.path[len(folder) :]
            if real not in seen:
                seen.add(real)
                samples.append((entry.path, label))
                count += 1
        if not count:
            raise FileNotFoundError(f"class folder {folder} has no images ({', '.join(EXTENSIONS)}) of its own")
    if links:
        log.warning(
            "%s: not following %d symlinked folder(s) inside class folders, e.g. %s (each image is used once); "
            "link the class folder or the files instead",
            root,
            len(links),
            links[0],
        )
    return samples


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder, listing files with `list_images`."""

    @staticmethod
    def make_dataset(directory: Any, class_to_idx: dict[str, int], *args: Any, **kwargs: Any) -> list[tuple[str, int]]:
        return list_images(directory, class_to_idx)


class ImageFolderDataModule(ImageClassificationDataModule):
    """Class-per-folder images; without `test/`, the val split doubles as test (and the log says so)."""

    def __init__(self, size: Sequence[int] | int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
        self.mode: str | None = None
        self._scans: dict[bool, datasets.ImageFolder | None] = {}

    def prepare_data(self) -> None:
        train = self.data_dir / "train"
        if not train.is_dir():
            raise DataError(
                f"image folder not found: {train} does not exist; set dataset.data_dir=DIR where "
                "DIR/train/<class>/ holds the images (and optionally DIR/test/<class>/)"
            )

    def _scan(self, train: bool) -> datasets.ImageFolder | None:
        """The split's file list (None without a test/ folder: the val split is tested instead), listed once."""
        if train in self._scans:
            return self._scans[train]
        self.prepare_data()
        folder = self.data_dir / ("train" if train else "test")
        if not train and not folder.is_dir():
            log.warning("%s has no test/ folder: testing on the validation split", self.data_dir)
            self._scans[train] = None
            return None
        try:
            self._scans[train] = _ImageFolder(str(folder), loader=open_image, is_valid_file=_is_image)
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"no images in {folder}: expected {folder}/<class>/*.png|jpg ({e})") from e
        return self._scans[train]

    def source_files(self, train: bool) -> list[Path] | None:
        dataset = self._scan(train)
        return None if dataset is None else [Path(path) for path, _ in dataset.samples]

    def where(self, train: bool) -> str:
        return str(self.data_dir / ("train" if train else "test"))

    def decode_options(self) -> tuple:
        return (self.size,)

    def decoded_bytes(self) -> int:
        """Image count times the first training image's size (or `size`) in RGB."""
        files = [f for train in (True, False) for f in self.source_files(train) or []]
        _, height, width = read_header(files[0])
        height, width = self.size or (height, width)
        return len(files) * 3 * height * width

    def load(self, train: bool) -> datasets.ImageFolder | None:
        dataset = self._scan(train)
        if dataset is None:
            return None
        folder = self.data_dir / ("train" if train else "test")
        if train:
            self.class_names = list(dataset.classes)
            paths = [path for path, _ in dataset.samples]
            self.mode, height, width = read_header(paths[0])
            if self.mode == "L" and any_colour(paths[1:]):
                self.mode = "RGB"
            height, width = self.size or (height, width)
            self.input_shape = (1 if self.mode == "L" else 3, height, width)
        elif self.mode is None:  # train came from the in-memory cache: its channels decide
            self.mode = "L" if self.input_shape[0] == 1 else "RGB"
        if not train and dataset.classes != self.class_names:
            raise DataError(
                f"{folder} has classes {dataset.classes} but train/ has {self.class_names}; they must match"
            )
        dataset.loader = partial(open_image, mode=self.mode)  # every image gets the training split's channels
        return dataset

    def resize(self) -> list[Any]:
        return [T.Resize(self.input_shape[1:])]
