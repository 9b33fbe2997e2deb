"""What every datamodule shares: the seeded split (or k-fold), label checks, samplers, local copies before download."""

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision import transforms as T

from src.data.in_memory import InMemoryPath
from src.data.per_sample import PerSamplePath
from src.utils.config import per_channel
from src.utils.errors import UserError


class DataError(UserError):
    """Missing, corrupt or unusable data: the message says which file and how to fix it."""


# What serves the splits: `read` one, `view` it at some indices, batch it (`loader`), `after_transfer` each batch.
DataPath = InMemoryPath | PerSamplePath


def writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"cannot create data folder {path} ({e.strerror}); set dataset.data_dir to a writable folder"
        raise DataError(msg) from e
    if not os.access(path, os.W_OK):
        raise DataError(f"data folder {path} is not writable; set dataset.data_dir to a writable folder")
    return path


class ImageClassificationDataModule(L.LightningDataModule):
    """Seeded train/val split of a training set, and the test split. `in_memory`: true, false, or "auto" (when the
    decoded images take under half the free RAM). `folds`=K, `fold`=I: validate on fold I of K, not `val_fraction`."""

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 2,
        val_fraction: float = 0.1,
        folds: int | None = None,
        fold: int | None = None,
        seed: int = 42,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        hflip: bool | str = False,
        rotation: float = 0.0,
        crop_padding: int = 0,
        crop_padding_mode: str = "constant",
        early_crop: int | None = None,
        early_crop_epochs: int = 0,
        early_resize: bool = False,
        in_memory: bool | str = "auto",
    ) -> None:
        super().__init__()
        if in_memory not in (True, False, "auto"):
            raise DataError(f"dataset.in_memory must be true, false or auto, got {in_memory!r}")
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"dataset.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        if not (isinstance(hflip, bool) or hflip == "alternate"):
            raise DataError(f"dataset.hflip must be true, false or alternate, got {hflip!r}")
        if crop_padding_mode not in ("constant", "reflect"):
            raise DataError(f"dataset.crop_padding_mode must be constant or reflect, got {crop_padding_mode!r}")
        if early_crop_epochs < 0 or (early_crop_epochs and not (early_crop and early_crop > 0)):
            raise DataError(f"dataset.early_crop_epochs={early_crop_epochs} needs dataset.early_crop, the crops' side")
        if batch_size < 1:
            raise DataError(f"dataset.batch_size must be at least 1, got {batch_size}")
        if (folds, fold) != (None, None) and (folds is None or folds < 2):
            raise DataError(f"dataset.folds must be at least 2 when dataset.fold is set, got {folds}")
        if folds is not None and (fold is None or not 0 <= fold < folds):
            raise DataError(f"dataset.fold must be one of 0..{folds - 1} with dataset.folds={folds}, got {fold}")
        self.data_dir, self.batch_size, self.num_workers = Path(data_dir).expanduser(), batch_size, num_workers
        self.val_fraction, self.folds, self.fold, self.seed = val_fraction, folds, fold, seed
        self.mean, self.std, self.in_memory = tuple(mean), tuple(std), in_memory
        self.hflip, self.rotation = hflip, rotation
        self.crop_padding, self.crop_padding_mode = crop_padding, crop_padding_mode
        self.early_crop, self.early_crop_epochs, self.early_resize = early_crop, early_crop_epochs, early_resize
        self.path: DataPath | None = None  # chosen once, by setup()
        self.class_names: list[str] = []
        self.input_shape: tuple[int, int, int] = (0, 0, 0)
        self.train_set = self.val_set = self.test_set = None

    def load(self, train: bool) -> Dataset | None:
        """(PIL image, label) pairs with `targets` and `classes`, None if absent; sets `class_names`, `input_shape`."""
        raise NotImplementedError

    def source_files(self, train: bool) -> list[Path] | None:
        """The files a split is read from (the in-memory cache's key)."""
        raise NotImplementedError

    def decode(self, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images (N, C, H, W), int64 labels) of a `load()`ed split, decoded in threads (PIL frees the GIL)."""
        to_tensor = T.Compose([*self.resize(), T.PILToTensor()])
        images = torch.empty((len(dataset), *to_tensor(dataset[0][0]).shape), dtype=torch.uint8)
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            # Filled in place: holding a list of tensors and their stack would need three times the memory.
            for i, image in enumerate(pool.map(lambda k: to_tensor(dataset[k][0]), range(len(dataset)))):
                images[i] = image
        return images, torch.as_tensor(dataset.targets, dtype=torch.long)

    def decode_options(self) -> tuple:
        """Settings that change the decoded tensors (part of the cache key besides the files)."""
        return ()

    def decoded_bytes(self) -> int:
        """The decoded images' size, estimated before decoding them."""
        return sum(f.stat().st_size for t in (True, False) for f in self.source_files(t) or [] if f.is_file())

    def resize(self) -> list[Any]:
        """Transforms that bring every image to `input_shape` (only image folders need one)."""
        return []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def normalization(self) -> tuple[list[float], list[float]]:
        channels = self.input_shape[0]
        return per_channel(self.mean, channels, "dataset.mean"), per_channel(self.std, channels, "dataset.std")

    def where(self, train: bool) -> str:
        """The folder or file a split is read from, for error messages."""
        files = self.source_files(train) or []
        return os.path.commonpath(files) if files else str(self.data_dir)

    def check_labels(self, labels: torch.Tensor, train: bool) -> None:
        """Labels must index `class_names` (else the loss fails deep inside), and a training split needs two classes
        (with one, training "succeeds" at 100% accuracy and means nothing)."""
        n = self.num_classes
        bad = labels[(labels < 0) | (labels >= n)]
        if len(bad):
            raise DataError(f"{self.where(train)}: label {int(bad[0])} is outside 0..{n - 1}; replace the corrupt data")
        present = labels.unique().tolist()
        if train and len(present) < 2:
            names = ", ".join(self.class_names[i] for i in present)
            raise DataError(
                f"{self.where(train)} has only {len(present)} class{'' if len(present) == 1 else 'es'} ({names}): "
                "a classifier needs at least two; add training images of another class"
            )

    def split_indices(self, n: int) -> tuple[list[int], list[int]]:
        """(train, val) of one permutation seeded by `seed` alone: val is its first `val_fraction`, or fold `fold`."""
        if self.folds is None:
            start, end = 0, max(1, round(n * self.val_fraction))
            if end >= n:
                raise DataError(f"only {n} training images: too few to hold out val_fraction={self.val_fraction}")
        elif n < self.folds:
            raise DataError(f"only {n} training images: too few for dataset.folds={self.folds}")
        else:
            start, end = self.fold * n // self.folds, (self.fold + 1) * n // self.folds
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return order[:start] + order[end:], order[start:end]

    def setup(self, stage: str | None = None) -> None:
        if self.path is None:
            memory = self.in_memory is True or (self.in_memory == "auto" and InMemoryPath.fits(self.decoded_bytes()))
            batch_only = "hflip=alternate" if self.hflip == "alternate" else ""
            batch_only = batch_only or ("early_crop_epochs" if self.early_crop_epochs else "")
            if batch_only and not memory and stage in (None, "fit"):
                off = "hflip=true" if batch_only == "hflip=alternate" else "early_crop_epochs=0"
                raise DataError(
                    f"dataset.{batch_only} needs the in-memory path, which dataset.in_memory={self.in_memory} did "
                    f"not pick: set dataset.in_memory=true, or dataset.{off}"
                )
            self.path = InMemoryPath(self) if memory else PerSamplePath(self)
        if self.train_set is None:
            source, labels, self.class_names = self.path.read(train=True)
            if self.early_crop_epochs and self.early_crop >= min(self.input_shape[1:]):
                h, w = self.input_shape[1:]
                raise DataError(f"dataset.early_crop={self.early_crop} must be smaller than the {h}x{w} images")
            self.check_labels(labels, train=True)
            train_idx, val_idx = self.split_indices(len(labels))
            self.train_set = self.path.view(source, train_idx, train=True)
            self.val_set = self.path.view(source, val_idx, train=False)
        if self.test_set is None and stage in (None, "test", "predict"):
            if (test := self.path.read(train=False)) is None:
                self.test_set = self.val_set
                return
            source, labels, names = test
            if names != self.class_names:
                raise DataError(f"the test split has classes {names} but train has {self.class_names}")
            self.check_labels(labels, train=False)
            self.test_set = self.path.view(source, None, train=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, torch.Tensor):  # the model summary's example input, not a batch of ours
            return batch
        assert self.path is not None, "call setup() first"
        return self.path.after_transfer(batch, train=self.trainer is not None and self.trainer.training)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> Iterable:
        """Our own samplers: each epoch's order depends on (seed, epoch) alone; under DDP val/test images count once."""
        assert dataset is not None and self.path is not None, "call setup() first"
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        if shuffle and not (self.trainer and self.trainer.overfit_batches):  # overfit: the same batches each epoch
            sampler: Sampler | None = DistributedSampler(dataset, world, rank, shuffle=True, seed=self.seed)
        else:
            sampler = UnrepeatedDistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
        # Its own generator: an iterator draws a seed, which would shift the global RNG (augmentation) on resume.
        return self.path.loader(dataset, sampler, torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> Iterable:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> Iterable:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> Iterable:
        return self._loader(self.test_set, shuffle=False)


class LocalOrDownload:
    """Mixin for datasets torchvision downloads: the folders of `looked_in()` come first (`use_local`: the folder holds
    the files, made ready for `load`), so an offline machine finds its copy; the error names each folder tried."""

    dataset_class: Any
    title, expected, how_to_get = "", "", ""

    def __init__(self, local_copies: Sequence[str] = (), download: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.local_copies, self.download = [Path(p).expanduser() for p in local_copies], download

    def prepare_data(self) -> None:
        looked = self.looked_in()  # type: ignore[attr-defined]
        if any(self.use_local(folder) for folder in looked):  # type: ignore[attr-defined]
            return
        failure = "download disabled (dataset.download=false)"
        if self.download:
            try:
                for train in (True, False):
                    self.dataset_class(str(self.data_dir), train=train, download=True)  # type: ignore[attr-defined]
                return
            except Exception as e:  # noqa: BLE001 - any failure here means "not downloadable"; report it below
                failure = f"download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        where = ", ".join(str(p) for p in looked)
        raise DataError(f"{self.title} not found: looked for {self.expected} in {where}; {failure}. {self.how_to_get}")
