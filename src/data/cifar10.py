"""CIFAR-10 from its pickle batches, read file by file so an error names the file; unofficial sizes skip the MD5."""

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from src.data.common import DataError, ImageClassificationDataModule, LocalOrDownload

OFFICIAL_BATCH_SIZE = 10_000
NUMPY_MODULES = ("numpy", *(f"numpy.{c}.{m}" for c in ("core", "_core") for m in ("multiarray", "numeric")))
MD5 = {**dict(datasets.CIFAR10.train_list + datasets.CIFAR10.test_list), "batches.meta": datasets.CIFAR10.meta["md5"]}


class ArrayImages(Dataset):
    """(PIL image, label) pairs of uint8 HWC `data`, with torchvision's `targets` and `classes`."""

    def __init__(self, data: np.ndarray, targets: list[int], classes: list[str]) -> None:
        self.data, self.targets, self.classes = data, targets, classes

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[i]), self.targets[i]


class _ArraysOnly(pickle.Unpickler):
    """A pickle naming any function but numpy's array builders is refused: a data folder must not run code."""

    def find_class(self, module: str, name: str) -> Any:
        if module in NUMPY_MODULES and name in ("_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which loading would call")


def _unpickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"CIFAR-10 file missing: {path}; extract the complete cifar-10-batches-py there")
    try:
        return _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path} refused: {e}; CIFAR-10 batches hold only arrays") from e
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise DataError(f"{path} is truncated or corrupt ({type(e).__name__}); replace it") from e


class CIFAR10DataModule(LocalOrDownload, ImageClassificationDataModule):
    """CIFAR-10: 32x32 colour images of 10 classes; `data_dir` may hold `cifar-10-batches-py/` or be it."""

    dataset_class = datasets.CIFAR10
    title = "CIFAR-10"
    expected = "data_batch_1..5, test_batch and batches.meta"
    how_to_get = "Extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into dataset.data_dir"

    def looked_in(self) -> list[Path]:
        roots = (self.data_dir, *self.local_copies)
        return list(dict.fromkeys([self.data_dir, *(f for r in roots for f in (r / "cifar-10-batches-py", r))]))

    def use_local(self, folder: Path) -> bool:
        return (folder / "data_batch_1").is_file() and (folder / "batches.meta").is_file()

    def source_files(self, train: bool) -> list[Path]:
        self.prepare_data()
        folder = next(folder for folder in self.looked_in() if self.use_local(folder))
        names = [n for n, _ in (datasets.CIFAR10.train_list if train else datasets.CIFAR10.test_list)]
        return [folder / name for name in [*names, "batches.meta"]]

    def load(self, train: bool) -> ArrayImages:
        *paths, meta = self.source_files(train)
        classes, data, targets = list(_unpickle(meta)["label_names"]), [], []
        for path in paths:
            batch = _unpickle(path)
            if len(batch.get("data", ())) == OFFICIAL_BATCH_SIZE and not check_integrity(str(path), MD5[path.name]):
                raise DataError(f"{path} fails its MD5 check (corrupt official batch); replace it")
            if bad := [label for label in batch["labels"] if not 0 <= label < len(classes)]:
                raise DataError(
                    f"{path}: label {bad[0]} is outside 0..{len(classes) - 1} ({meta} names {len(classes)} classes); "
                    "the file is corrupt or not CIFAR-10; replace it"
                )
            data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            targets += batch["labels"]
        self.class_names, self.input_shape = classes, (3, 32, 32)
        return ArrayImages(np.concatenate(data), targets, classes)

    def decode(self, dataset: ArrayImages) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(dataset.targets)
