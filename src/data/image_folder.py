"""A user's own images: `data_dir/train/<class>/*` and optionally `data_dir/test/<class>/*`. An unreadable image is an
error, never skipped: a quietly shrinking dataset makes results incomparable."""

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
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")  # what the extensions name: x.png that is EPS is refused
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)
UNREADABLE = (OSError, ValueError, SyntaxError, *BOMB)  # what Pillow raises for a file it refuses


def open_image(path: str | Path, mode: str | None = None, header_only: bool = False) -> Image.Image | tuple:
    """Decoded fully (truncation is caught here) in `mode` ("L" or "RGB"; default: the file's), or with `header_only`
    (mode, height, width) from the header. Pillow only warns up to twice its pixel limit: refused there too."""
    try:
        with Image.open(path, formats=FORMATS) as image:
            if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"Image size ({image.width * image.height} pixels) exceeds limit")
            own = "L" if image.mode in GRAY_MODES else "RGB"
            return (own, image.height, image.width) if header_only else image.convert(mode or own)
    except BOMB as e:  # Pillow's own message goes on about DOS attacks
        size = str(e).split(",")[0].removesuffix(".")
        raise DataError(f"{path} is too large to decode safely: {size} (PIL.Image.MAX_IMAGE_PIXELS); shrink it") from e
    except UNREADABLE as e:
        raise DataError(f"unreadable image {path} ({e}); remove or replace it") from e


def _walk(folder: str, links: list[str]) -> Iterator[os.DirEntry]:
    """Image files under `folder`, in torchvision's order; symlinked folders are added to `links`, not entered."""
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    yield from (e for e in entries if not e.is_dir() and e.name.lower().endswith(EXTENSIONS))
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path, links)
        elif entry.is_dir():
            links.append(entry.path)


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder listing every real image file once, where first met (a class folder may be a link).
    Symlinked folders inside a class are not followed: a link back up would repeat images, in train and val alike."""

    @staticmethod
    def make_dataset(root: Any, class_to_idx: dict[str, int], *args: Any, **kwargs: Any) -> list[tuple[str, int]]:
        samples, seen, links = [], set(), []
        for name, label in sorted(class_to_idx.items()):
            folder = os.path.join(root, name)
            real_folder, before = os.path.realpath(folder), len(samples)  # only file symlinks need resolving below it
            for entry in _walk(folder, links):
                real = os.path.realpath(entry.path) if entry.is_symlink() else real_folder + entry.path[len(folder) :]
                if real not in seen:
                    seen.add(real)
                    samples.append((entry.path, label))
            if len(samples) == before:
                raise FileNotFoundError(f"class folder {folder} has no images ({', '.join(EXTENSIONS)}) of its own")
        if links:
            msg = "%s: not following %d symlinked folder(s) inside class folders, e.g. %s (each image is used once); "
            log.warning(msg + "link the class folder or the files instead", root, len(links), links[0])
        return samples


class ImageFolderDataModule(ImageClassificationDataModule):
    """Class-per-folder images; without `test/`, the val split doubles as test (and the log says so)."""

    def __init__(self, size: Sequence[int] | int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
        self.mode: str | None = None
        self._scans: dict[bool, datasets.ImageFolder | None] = {}

    def prepare_data(self) -> None:
        if not (self.data_dir / "train").is_dir():
            raise DataError(
                f"image folder not found: {self.data_dir / 'train'} does not exist; set dataset.data_dir=DIR where "
                "DIR/train/<class>/ holds the images (and optionally DIR/test/<class>/)"
            )

    def where(self, train: bool) -> str:
        return str(self.data_dir / ("train" if train else "test"))

    def _scan(self, train: bool) -> datasets.ImageFolder | None:
        """The split's file list (None without a test/ folder: the val split is tested instead), listed once."""
        if train not in self._scans:
            self.prepare_data()
            folder = Path(self.where(train))
            if not train and not folder.is_dir():
                log.warning("%s has no test/ folder: testing on the validation split", self.data_dir)
                self._scans[train] = None
                return None
            try:
                self._scans[train] = _ImageFolder(str(folder), loader=open_image)
            except OSError as e:
                raise DataError(f"no images in {folder}: expected {folder}/<class>/*.png|jpg ({e})") from e
        return self._scans[train]

    def source_files(self, train: bool) -> list[Path] | None:
        return None if (dataset := self._scan(train)) is None else [Path(path) for path, _ in dataset.samples]

    def decode_options(self) -> tuple:
        return (self.size,)

    def decoded_bytes(self) -> int:
        """As RGB of the first training image's size (or `size`)."""
        files = [f for train in (True, False) for f in self.source_files(train) or []]
        height, width = self.size or open_image(files[0], header_only=True)[1:]
        return len(files) * 3 * height * width

    def load(self, train: bool) -> datasets.ImageFolder | None:
        if (dataset := self._scan(train)) is None:
            return None
        if train:
            self.class_names = list(dataset.classes)
            self.mode, height, width = open_image(dataset.samples[0][0], header_only=True)
            if self.mode == "L":  # colour if any image is: the other headers, read in threads (they wait on I/O)
                with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                    modes = pool.map(lambda sample: open_image(sample[0], header_only=True)[0], dataset.samples[1:])
                    self.mode = "RGB" if "RGB" in modes else "L"
            self.input_shape = (3 if self.mode == "RGB" else 1, *(self.size or (height, width)))
        elif self.mode is None:  # train came from the in-memory cache: its channels decide
            self.mode = "L" if self.input_shape[0] == 1 else "RGB"
        if dataset.classes != self.class_names:
            raise DataError(
                f"{self.where(train)} has classes {dataset.classes} but train/ has {self.class_names}; they must match"
            )
        dataset.loader = partial(open_image, mode=self.mode)  # every image gets the training split's channels
        return dataset

    def resize(self) -> list[Any]:
        return [T.Resize(self.input_shape[1:])]
