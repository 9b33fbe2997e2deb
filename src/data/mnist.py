"""MNIST and Fashion-MNIST from the four IDX files, found locally before any download: in torchvision's layout under
`data_dir`, or copies (gzipped or not, e.g. Debian's `dataset-fashion-mnist`) staged into it once."""

import gzip
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torchvision import datasets
from torchvision.datasets.mnist import read_image_file, read_label_file

from src.data.common import DataError, ImageClassificationDataModule, LocalOrDownload, writable_dir
from src.utils.io import write_atomically

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class MNISTDataModule(LocalOrDownload, ImageClassificationDataModule):  # digits; FashionMNIST has the same format
    dataset_class: type[datasets.MNIST] = datasets.MNIST
    title = "MNIST"
    expected = f"the four IDX files ({', '.join(IDX_FILES)}, optionally .gz)"
    how_to_get = "Put them in one of these folders or set dataset.data_dir=DIR (from http://yann.lecun.com/exdb/mnist/)"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.class_names = list(self.dataset_class.classes)
        self.raw_dir = self.data_dir / self.dataset_class.__name__ / "raw"  # where torchvision reads the files

    def looked_in(self) -> list[Path]:
        return [self.raw_dir, self.data_dir, *self.local_copies]

    def use_local(self, folder: Path) -> bool:
        """All four files, gzipped or not: copied atomically into torchvision's layout unless they are there already."""
        found = [next((p for p in (folder / n, folder / f"{n}.gz") if p.is_file()), None) for n in IDX_FILES]
        if not all(found):
            return False
        for name, source in zip(IDX_FILES, found, strict=True):
            if source != self.raw_dir / name:
                target = writable_dir(self.raw_dir) / name
                try:
                    with (gzip.open if source.suffix == ".gz" else open)(source, "rb") as src:
                        write_atomically(target, partial(shutil.copyfileobj, src))
                except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
                    raise DataError(
                        f"cannot copy {source} to {target} ({e}); replace {source} if it is truncated or corrupt"
                    ) from e
        return True

    def load(self, train: bool) -> datasets.MNIST:
        self.prepare_data()  # cheap once staged; DDP ranks other than 0 skip prepare_data otherwise
        try:
            dataset = self.dataset_class(str(self.data_dir), train=train, download=False)
        except Exception as e:  # name the file that torchvision could not parse
            raise DataError(f"{self._bad_file(train)} is truncated or corrupt ({type(e).__name__}); replace it") from e
        if (images := len(dataset.data)) != (labels := len(dataset.targets)):
            raise DataError(f"{self.raw_dir}: {images} images but {labels} labels; the files do not match")
        self.input_shape = (1, *dataset.data.shape[1:])
        return dataset

    def source_files(self, train: bool) -> list[Path]:
        self.prepare_data()
        return [self.raw_dir / name for name in (IDX_FILES[:2] if train else IDX_FILES[2:])]

    def where(self, train: bool) -> str:
        """The labels file: what the label checks are about."""
        return str(self.raw_dir / f"{'train' if train else 't10k'}-labels-idx1-ubyte")

    def decode(self, dataset: datasets.MNIST) -> tuple[torch.Tensor, torch.Tensor]:
        return dataset.data.unsqueeze(1).contiguous(), dataset.targets.long()

    def _bad_file(self, train: bool) -> Path:
        for path, read in zip(self.source_files(train), (read_image_file, read_label_file), strict=True):
            try:
                read(str(path))
            except Exception:  # noqa: BLE001
                return path
        return self.raw_dir


class FashionMNISTDataModule(MNISTDataModule):
    """Zalando's Fashion-MNIST: 10 clothing classes, same IDX format and sizes as MNIST."""

    dataset_class = datasets.FashionMNIST
    title = "FashionMNIST"
    how_to_get = (
        "Put them in one of these folders or set dataset.data_dir=DIR "
        "(on Debian/Ubuntu: apt-get install dataset-fashion-mnist)"
    )
