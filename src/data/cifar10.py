"""CIFAR-10 from torchvision's python pickle batches.

Official batch files are verified by MD5. A file that fails the check is still accepted when it is a
well-formed batch of another size (small CIFAR-format sets, e.g. in tests); a full-size batch that fails
it, or a file that does not unpickle, is reported as corrupt by name.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from src.data.common import DataError, ImageClassificationDataModule

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


class CIFAR10DataModule(ImageClassificationDataModule):
    """CIFAR-10: 32x32 colour images of 10 classes; `data_dir` may hold `cifar-10-batches-py/` or be it."""

    def __init__(self, local_copies: Sequence[str] = (), download: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.local_copies = [Path(p).expanduser() for p in local_copies]
        self.download = download
        self._verified: set[Path] = set()

    def _candidates(self) -> list[Path]:
        folders = [self.data_dir]
        for root in (self.data_dir, *self.local_copies):
            folders += [root / datasets.CIFAR10.base_folder, root]
        return list(dict.fromkeys(folders))

    def batches_dir(self) -> Path | None:
        for folder in self._candidates():
            if (folder / "data_batch_1").is_file() and (folder / "batches.meta").is_file():
                return folder
        return None

    def prepare_data(self) -> None:
        if self.batches_dir() is not None:
            return
        failure = "download disabled (dataset.download=false)"
        if self.download:
            try:
                datasets.CIFAR10(str(self.data_dir), train=True, download=True)
                return
            except Exception as e:  # noqa: BLE001 - reported below
                failure = f"download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        where = ", ".join(str(p) for p in self._candidates())
        raise DataError(
            f"CIFAR-10 not found: looked for data_batch_1..5, test_batch and batches.meta in {where}; {failure}. "
            "Extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into dataset.data_dir"
        )

    def verify(self, folder: Path, names: list[str]) -> None:
        """MD5 for official files; a mismatch is fine only for a well-formed batch of another size."""
        official = dict(datasets.CIFAR10.train_list + datasets.CIFAR10.test_list)
        official[datasets.CIFAR10.meta["filename"]] = datasets.CIFAR10.meta["md5"]
        for name in names:
            path = folder / name
            if path in self._verified:
                continue
            if not path.is_file():
                raise DataError(f"CIFAR-10 file missing: {path}; extract the complete cifar-10-batches-py there")
            if not check_integrity(str(path), official[name]):
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
        self.prepare_data()
        folder = self.batches_dir()
        assert folder is not None
        files = [n for n, _ in (datasets.CIFAR10.train_list if train else datasets.CIFAR10.test_list)]
        return [folder / name for name in [*files, datasets.CIFAR10.meta["filename"]]]

    def decode(self, dataset: datasets.CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(dataset.targets)

    def load(self, train: bool) -> datasets.CIFAR10:
        self.prepare_data()
        folder = self.batches_dir()
        assert folder is not None
        files = [n for n, _ in (datasets.CIFAR10.train_list if train else datasets.CIFAR10.test_list)]
        self.verify(folder, [*files, datasets.CIFAR10.meta["filename"]])
        try:
            dataset = _CIFAR10(folder.parent, folder.name, train=train)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read CIFAR-10 batches in {folder} ({type(e).__name__}: {e})") from e
        targets = torch.tensor(dataset.targets)
        bad = targets[(targets < 0) | (targets >= len(dataset.classes))]
        if len(bad):
            label = int(bad[0])
            raise DataError(
                f"{self._holding(folder, files, label)}: label {label} is outside 0..{len(dataset.classes) - 1} "
                f"({folder / datasets.CIFAR10.meta['filename']} names {len(dataset.classes)} classes); "
                "the file is corrupt or not CIFAR-10; replace it"
            )
        self.class_names = list(dataset.classes)
        self.input_shape = (dataset.data.shape[3], *dataset.data.shape[1:3])
        return dataset

    @staticmethod
    def _holding(folder: Path, files: list[str], label: int) -> Path:
        """The batch file with `label` (read again only on this error path: torchvision merges the batches)."""
        for name in files:
            with open(folder / name, "rb") as f:
                if label in pickle.load(f, encoding="latin1").get("labels", ()):
                    return folder / name
        return folder
