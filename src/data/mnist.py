"""MNIST and Fashion-MNIST: the four IDX files, found locally before anything is downloaded.

`data_dir` may be torchvision's root (`DIR/MNIST/raw/...`) or a folder holding the four files, gzipped
or not (as Debian's `dataset-fashion-mnist` installs them). Gzipped or flat copies are staged once into
torchvision's layout under `data_dir`, so torchvision does the reading.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torchvision import datasets
from torchvision.datasets.mnist import read_image_file, read_label_file

from src.data.atomic import write_atomically
from src.data.common import DataError, ImageClassificationDataModule, writable_dir

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_idx(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _stage(source: Path, target: Path) -> None:
    """Copy (gunzipping if needed) atomically: an interrupted copy never looks like a complete file, and
    its temporary file is removed by the next staging (`atomic.py`)."""

    def copy(out: BinaryIO) -> None:
        with (gzip.open if source.suffix == ".gz" else open)(source, "rb") as src:
            shutil.copyfileobj(src, out)

    try:
        write_atomically(target, copy)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"cannot copy {source} to {target} ({e}); replace {source} if it is truncated or corrupt"
        ) from e


class MNISTDataModule(ImageClassificationDataModule):
    """MNIST digits; see `FashionMNISTDataModule` for the clothing set with the same file format."""

    dataset_class: type[datasets.MNIST] = datasets.MNIST
    install_hint = "download the four IDX files from http://yann.lecun.com/exdb/mnist/"

    def __init__(self, local_copies: Sequence[str] = (), download: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.local_copies = [Path(p).expanduser() for p in local_copies]
        self.download = download
        self.class_names = list(self.dataset_class.classes)

    @property
    def raw_dir(self) -> Path:
        """Where torchvision reads the uncompressed files: `data_dir/<ClassName>/raw`."""
        return self.data_dir / self.dataset_class.__name__ / "raw"

    def _staged(self) -> bool:
        return all((self.raw_dir / name).is_file() for name in IDX_FILES)

    def prepare_data(self) -> None:
        """Find the files: torchvision layout, then `data_dir` itself, then known local copies, then download."""
        if self._staged():
            return
        looked = [self.raw_dir, self.data_dir, *self.local_copies]
        for folder in looked:
            found = [_find_idx(folder, name) for name in IDX_FILES]
            if all(found):
                writable_dir(self.raw_dir)
                for name, source in zip(IDX_FILES, found, strict=True):
                    _stage(source, self.raw_dir / name)
                return
        failure = "download disabled (dataset.download=false)"
        if self.download:
            try:
                self.dataset_class(str(self.data_dir), train=True, download=True)
                self.dataset_class(str(self.data_dir), train=False, download=True)
                return
            except Exception as e:  # noqa: BLE001 - any failure here means "not downloadable"; report it below
                failure = f"download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        where = ", ".join(str(p) for p in looked)
        raise DataError(
            f"{self.dataset_class.__name__} not found: looked in {where}; {failure}. "
            f"Put the four IDX files ({', '.join(IDX_FILES)}, optionally .gz) in one of these folders "
            f"or set dataset.data_dir=DIR ({self.install_hint})"
        )

    def load(self, train: bool) -> datasets.MNIST:
        self.prepare_data()  # cheap once staged; DDP ranks other than 0 skip prepare_data otherwise
        try:
            dataset = self.dataset_class(str(self.data_dir), train=train, download=False)
        except Exception as e:  # name the file that torchvision could not parse
            raise DataError(f"{self._bad_file(train)} is truncated or corrupt ({type(e).__name__}); replace it") from e
        if len(dataset.data) != len(dataset.targets):
            raise DataError(
                f"{self.raw_dir}: {len(dataset.data)} images but {len(dataset.targets)} labels; the files do not match"
            )
        bad = dataset.targets[dataset.targets >= len(self.class_names)]  # IDX labels are unsigned bytes
        if len(bad):
            raise DataError(
                f"{self.where(train)}: label {int(bad[0])} is outside "
                f"0..{len(self.class_names) - 1}; the file is corrupt or not {self.dataset_class.__name__}; replace it"
            )
        self.input_shape = (1, *dataset.data.shape[1:])
        return dataset

    def source_files(self, train: bool) -> list[Path]:
        self.prepare_data()
        prefix = "train" if train else "t10k"
        return [self.raw_dir / f"{prefix}-images-idx3-ubyte", self.raw_dir / f"{prefix}-labels-idx1-ubyte"]

    def where(self, train: bool) -> str:
        """The labels file: what the label checks are about."""
        return str(self.raw_dir / f"{'train' if train else 't10k'}-labels-idx1-ubyte")

    def decode(self, dataset: datasets.MNIST) -> tuple[torch.Tensor, torch.Tensor]:
        return dataset.data.unsqueeze(1).contiguous(), dataset.targets.long()

    def _bad_file(self, train: bool) -> Path:
        prefix = "train" if train else "t10k"
        for name, read in (
            (f"{prefix}-images-idx3-ubyte", read_image_file),
            (f"{prefix}-labels-idx1-ubyte", read_label_file),
        ):
            try:
                read(str(self.raw_dir / name))
            except Exception:  # noqa: BLE001
                return self.raw_dir / name
        return self.raw_dir


class FashionMNISTDataModule(MNISTDataModule):
    """Zalando's Fashion-MNIST: 10 clothing classes, same IDX format and sizes as MNIST."""

    dataset_class = datasets.FashionMNIST
    install_hint = "on Debian/Ubuntu: apt-get install dataset-fashion-mnist"
