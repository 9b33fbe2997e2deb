"""A user's own images: `data_dir/train/<class>/*.png|jpg` and optionally `data_dir/test/<class>/*`.

Class names are the folder names; channels (grayscale stays 1) and size come from the first training
image unless `size` is set. An unreadable image is an error that names the file (never silently
skipped: a quietly shrinking dataset makes results incomparable).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torchvision import datasets
from torchvision import transforms as T

from src.data.common import DataError, ImageClassificationDataModule

log = logging.getLogger(__name__)
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def open_image(path: str | Path, mode: str | None = None) -> Image.Image:
    """Decode fully (so truncation is caught here) and convert to `mode` ("L" or "RGB")."""
    try:
        with Image.open(path) as image:
            image.load()
            if mode is None:
                mode = "L" if image.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
            return image.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"unreadable image {path} ({e}); remove or replace it") from e


def _is_image(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS)


class ImageFolderDataModule(ImageClassificationDataModule):
    """Class-per-folder images; without `test/`, the val split doubles as test (and the log says so)."""

    def __init__(self, size: Sequence[int] | int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
        self.mode: str | None = None
        self._scans: dict[bool, datasets.ImageFolder | None] = {}

    def _folder(self, split: str) -> Path:
        return self.data_dir / split

    def prepare_data(self) -> None:
        train = self._folder("train")
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
        folder = self._folder("train" if train else "test")
        if not train and not folder.is_dir():
            if self.has_test_split:
                log.warning("%s has no test/ folder: testing on the validation split", self.data_dir)
            self.has_test_split = False
            return None
        try:
            self._scans[train] = datasets.ImageFolder(str(folder), loader=open_image, is_valid_file=_is_image)
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"no images in {folder}: expected {folder}/<class>/*.png|jpg ({e})") from e
        return self._scans[train]

    def source_files(self, train: bool) -> list[Path] | None:
        dataset = self._scan(train)
        return None if dataset is None else [Path(path) for path, _ in dataset.samples]

    def decode_options(self) -> tuple:
        return (self.size,)

    def decoded_bytes(self) -> int:
        """Image count times the first training image's size (or `size`) in RGB."""
        files = [f for train in (True, False) for f in self.source_files(train) or []]
        first = open_image(files[0])
        height, width = self.size or (first.height, first.width)
        return len(files) * 3 * height * width

    def load(self, train: bool) -> datasets.ImageFolder | None:
        dataset = self._scan(train)
        if dataset is None:
            return None
        folder = self._folder("train" if train else "test")
        if train:
            self.class_names = list(dataset.classes)
            first = open_image(dataset.samples[0][0])
            self.mode = first.mode
            height, width = self.size or (first.height, first.width)
            self.input_shape = (1 if self.mode == "L" else 3, height, width)
        elif self.mode is None:  # train came from the in-memory cache: its channels decide
            self.mode = "L" if self.input_shape[0] == 1 else "RGB"
        if not train and dataset.classes != self.class_names:
            raise DataError(
                f"{folder} has classes {dataset.classes} but train/ has {self.class_names}; they must match"
            )
        dataset.loader = partial(open_image, mode=self.mode)  # every image gets the first one's channels
        return dataset

    def resize(self) -> list[Any]:
        return [T.Resize(self.input_shape[1:])]
