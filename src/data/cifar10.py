"""CIFAR-10 from torchvision's python pickle batches.

Official batch files are verified by MD5. A file that fails the check is still accepted when it is a
well-formed batch of another size (small CIFAR-format sets, e.g. in tests); a full-size batch that fails
it, or a file that does not unpickle, is reported as corrupt by name.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from src.data.common import DataError, ImageClassificationDataModule, LocalOrDownload

OFFICIAL_BATCH_SIZE = 10_000


class _CIFAR10(datasets.CIFAR10):
    """torchvision's reader, with integrity checked file by file by `CIFAR10DataModule.verify`."""

    def __init__(self, root: Path, base_folder: str, train: bool) -> None:
        self.base_folder = base_folder
        super().__init__(str(root), train=train, download=False)

    def _check_integrity(self) -> bool:
        return True

    def _load_meta(self) -> None:
        with open(Path(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class CIFAR10DataModule(LocalOrDownload, ImageClassificationDataModule):
    """CIFAR-10: 32x32 colour images of 10 classes; `data_dir` may hold `cifar-10-batches-py/` or be it."""

    dataset_class = datasets.CIFAR10
    title = "CIFAR-10"
    expected = "data_batch_1..5, test_batch and batches.meta"
    how_to_get = "Extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into dataset.data_dir"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._verified: set[Path] = set()

    def looked_in(self) -> list[Path]:
        folders = [self.data_dir]
        for root in (self.data_dir, *self.local_copies):
            folders += [root / datasets.CIFAR10.base_folder, root]
        return list(dict.fromkeys(folders))

    def use_local(self, folder: Path) -> bool:
        return (folder / "data_batch_1").is_file() and (folder / "batches.meta").is_file()

    def batches_dir(self) -> Path:
        self.prepare_data()
        return next(folder for folder in self.looked_in() if self.use_local(folder))

    def verify(self, paths: list[Path]) -> None:
        """MD5 for official files; a mismatch is fine only for a well-formed batch of another size."""
        official = dict(datasets.CIFAR10.train_list + datasets.CIFAR10.test_list)
        official[datasets.CIFAR10.meta["filename"]] = datasets.CIFAR10.meta["md5"]
        for path in paths:
            if path in self._verified:
                continue
            if not path.is_file():
                raise DataError(f"CIFAR-10 file missing: {path}; extract the complete cifar-10-batches-py there")
            if not check_integrity(str(path), official[path.name]):
                try:
                    with open(path, "rb") as f:
                        content = pickle.load(f, encoding="latin1")
                    rows = len(content["data"]) if "data" in content else None
                except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
                    raise DataError(f"{path} is truncated or corrupt ({type(e).__name__}); replace it") from e
                if rows == OFFICIAL_BATCH_SIZE:
                    raise DataError(f"{path} fails its MD5 check (corrupt official batch); replace it")
            self._verified.add(path)

    def source_files(self, train: bool) -> list[Path]:
        folder = self.batches_dir()
        files = [n for n, _ in (datasets.CIFAR10.train_list if train else datasets.CIFAR10.test_list)]
        return [folder / name for name in [*files, datasets.CIFAR10.meta["filename"]]]

    def decode(self, dataset: datasets.CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(dataset.targets)

    def load(self, train: bool) -> datasets.CIFAR10:
        paths = self.source_files(train)
        self.verify(paths)
        folder = paths[0].parent
        try:
            dataset = _CIFAR10(folder.parent, folder.name, train=train)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read CIFAR-10 batches in {folder} ({type(e).__name__}: {e})") from e
        targets = torch.tensor(dataset.targets)
        bad = targets[(targets < 0) | (targets >= len(dataset.classes))]
        if len(bad):
            label = int(bad[0])
            raise DataError(
                f"{self._holding(paths[:-1], label)}: label {label} is outside 0..{len(dataset.classes) - 1} "
                f"({folder / datasets.CIFAR10.meta['filename']} names {len(dataset.classes)} classes); "
                "the file is corrupt or not CIFAR-10; replace it"
            )
        self.class_names = list(dataset.classes)
        self.input_shape = (dataset.data.shape[3], *dataset.data.shape[1:3])
        return dataset

    @staticmethod
    def _holding(paths: list[Path], label: int) -> Path:
        """The batch file with `label` (read again only on this error path: torchvision merges the batches)."""
        for path in paths:
            with open(path, "rb") as f:
                if label in pickle.load(f, encoding="latin1").get("labels", ()):
                    return path
        return paths[0].parent
