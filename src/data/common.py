"""What every datamodule shares: the seeded train/val split, the two data paths, loaders and clear errors.

A subclass only says where its images come from (`source_files`, `load`, and a fast `decode` where it has
one); everything a model needs to build itself (`input_shape`, `class_names`) is read from the data, never
hard-coded. Two paths serve the same batches:
- in memory (the default where the data fits): each split decoded once into a cached uint8 tensor, batches
  sliced from it, normalized and augmented on the training device (`in_memory.py`, `batch_augment.py`);
- per sample (`dataset.in_memory=false`, for image folders too big for memory): torchvision transforms on
  every PIL image, in DataLoader workers if `num_workers` > 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler
from torchvision import transforms as T

from src.data.batch_augment import BatchAugment
from src.data.in_memory import SlicedBatches, TensorImages, available_memory, cached_tensors, fingerprint, keep_batch
from src.errors import UserError

log = logging.getLogger(__name__)


class DataError(UserError):
    """Missing, corrupt or unusable data: the message says which file and how to fix it."""


class _Transformed(Dataset):
    """A view of `base` (PIL image, label) pairs restricted to `indices`, with its own transform.

    Train and val share one decoded base dataset but need different transforms (augmentation).
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | None, transform: Any) -> None:
        self.base, self.transform = base, transform
        self.indices = list(range(len(base))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[i]]
        return self.transform(image), int(label)


def writable_dir(path: Path) -> Path:
    """Create `path` or say clearly why it cannot be used."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"cannot create data folder {path} ({e.strerror}); set dataset.data_dir to a writable folder"
        raise DataError(msg) from e
    if not os.access(path, os.W_OK):
        raise DataError(f"data folder {path} is not writable; set dataset.data_dir to a writable folder")
    return path


class ImageClassificationDataModule(L.LightningDataModule):
    """Seeded train/val split of a training set, the official test split, and per-dataset transforms.

    Subclasses implement `load(train)` returning a dataset of (PIL image, label) pairs, and set
    `class_names` and `input_shape` (C, H, W) from the files they read.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 2,
        val_fraction: float = 0.1,
        seed: int = 42,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        hflip: bool = False,
        rotation: float = 0.0,
        crop_padding: int = 0,
        in_memory: bool | str = "auto",
    ) -> None:
        """`in_memory`: true, false, or "auto" (in memory when the decoded images take under half the
        available RAM)."""
        super().__init__()
        if in_memory not in (True, False, "auto"):
            raise DataError(f"dataset.in_memory must be true, false or auto, got {in_memory!r}")
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"dataset.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        if batch_size < 1:
            raise DataError(f"dataset.batch_size must be at least 1, got {batch_size}")
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.seed = val_fraction, seed
        self.mean, self.std = tuple(mean), tuple(std)
        self.hflip, self.rotation, self.crop_padding = hflip, rotation, crop_padding
        self.in_memory = in_memory
        self._memory_path: bool | None = None  # decided once, by memory_path()
        self.augment: BatchAugment | None = None  # set by setup() on the in-memory path
        self._on_device: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.class_names: list[str] = []
        self.input_shape: tuple[int, int, int] = (0, 0, 0)
        self.has_test_split = True
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # --- what subclasses provide -------------------------------------------------------------------
    def load(self, train: bool) -> Dataset | None:
        """The split as (PIL image, label) pairs; None when the data has no such split (no test set)."""
        raise NotImplementedError

    def source_files(self, train: bool) -> list[Path] | None:
        """The files a split is read from (after prepare_data); the cache is rebuilt when any changes."""
        raise NotImplementedError

    def decode(self, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images (N, C, H, W), int64 labels) of a `load()`ed split. This default decodes every
        image through PIL (threads: decoding releases the GIL); datasets stored as arrays override it."""
        resize = T.Compose(self.resize())
        first = np.asarray(resize(dataset[0][0]), dtype=np.uint8)
        height, width = first.shape[:2]
        channels = 1 if first.ndim == 2 else first.shape[2]
        # Filled in place: holding a list of arrays and its stack would need three times the memory.
        images = torch.empty((len(dataset), channels, height, width), dtype=torch.uint8)
        labels = torch.empty(len(dataset), dtype=torch.long)

        def fill(i: int) -> None:
            image, label = dataset[i]
            array = np.asarray(resize(image), dtype=np.uint8).reshape(height, width, channels)
            images[i] = torch.from_numpy(array).permute(2, 0, 1)
            labels[i] = int(label)

        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for _ in pool.map(fill, range(len(dataset)), chunksize=256):
                pass
        return images, labels

    def decode_options(self) -> tuple:
        """Settings that change the decoded tensors (part of the cache key besides the files)."""
        return ()

    def decoded_bytes(self) -> int:
        """What the decoded training and test images take in memory, estimated before decoding them."""
        files = [f for train in (True, False) for f in self.source_files(train) or []]
        return sum(f.stat().st_size for f in files if f.is_file())  # a missing one is reported when read

    # --- shared ------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def resize(self) -> list[Any]:
        """Transforms that bring every image to `input_shape` (only image folders need one)."""
        return []

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std; a single value applies to every channel."""
        channels = self.input_shape[0]
        mean = self.mean * channels if len(self.mean) == 1 else self.mean
        std = self.std * channels if len(self.std) == 1 else self.std
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"dataset.mean/std have {len(self.mean)} values but the images have {channels} channels")
        return mean, std

    def eval_transform(self) -> T.Compose:
        return T.Compose([*self.resize(), T.ToTensor(), T.Normalize(*self.normalization())])

    def train_transform(self) -> T.Compose:
        """Augmentation (train only) happens on the PIL image, before tensor conversion."""
        augment: list[Any] = []
        if self.crop_padding:
            augment.append(T.RandomCrop(self.input_shape[1:], padding=self.crop_padding))
        if self.hflip:
            augment.append(T.RandomHorizontalFlip())
        if self.rotation:
            augment.append(T.RandomRotation(self.rotation))
        return T.Compose([*self.resize(), *augment, T.ToTensor(), T.Normalize(*self.normalization())])

    def where(self, train: bool) -> str:
        """The folder or file a split is read from, for error messages."""
        files = self.source_files(train) or []
        return os.path.commonpath(files) if files else str(self.data_dir)

    @staticmethod
    def targets(dataset: Dataset) -> torch.Tensor:
        """The labels of a `load()`ed split; torchvision's datasets list them without reading an image."""
        labels = getattr(dataset, "targets", None)
        if labels is None:
            labels = [dataset[i][1] for i in range(len(dataset))]  # type: ignore[arg-type]
        return torch.as_tensor(labels, dtype=torch.long)

    def check_labels(self, labels: torch.Tensor, train: bool) -> None:
        """Labels must index `class_names` (else training fails deep inside the loss), and a training split
        needs two classes (with one, training "succeeds" at 100% accuracy and means nothing)."""
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
        """The same `seed` always gives the same split, independent of the global RNG."""
        n_val = max(1, round(n * self.val_fraction))
        if n_val >= n:
            raise DataError(f"only {n} training images: too few to hold out val_fraction={self.val_fraction}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return order[n_val:], order[:n_val]

    def memory_path(self) -> bool:
        """Whether to use the in-memory path (decided once, by `in_memory` and the available RAM)."""
        if self._memory_path is None:
            self._memory_path = self.in_memory is True
            if self.in_memory == "auto":
                need, free = self.decoded_bytes(), available_memory(torch.device("cpu"))
                self._memory_path = need < free / 2
                if not self._memory_path:
                    log.warning("decoded images (%.1f GB) exceed half the free RAM: per-sample loading", need / 1e9)
        return self._memory_path

    def cache_dir(self) -> Path:
        return self.data_dir / ".cache"

    def tensors(self, train: bool) -> dict[str, Any] | None:
        """A split decoded to uint8 tensors: from the cache while its source files are unchanged."""
        files = self.source_files(train)
        if files is None:
            return None
        split = "train" if train else "test"
        name = f"{type(self).__name__}-{split}"

        def build() -> dict[str, Any]:
            log.info("decoding %s images to a uint8 cache in %s", name, self.cache_dir())
            dataset = self.load(train)
            images, labels = self.decode(dataset)
            class_names = list(getattr(dataset, "classes", self.class_names))
            return {"images": images, "labels": labels, "class_names": class_names}

        # The test split takes train's image shape (image folders resize to it): part of its key.
        key = fingerprint(files, name, self.decode_options(), None if train else self.input_shape)
        return cached_tensors(self.cache_dir(), name, key, build)

    def setup(self, stage: str | None = None) -> None:
        if self.memory_path():
            self._setup_in_memory(stage)
            return
        if self.train_set is None:
            base = self.load(train=True)
            self.check_labels(self.targets(base), train=True)
            train_idx, val_idx = self.split_indices(len(base))
            self.train_set = _Transformed(base, train_idx, self.train_transform())
            self.val_set = _Transformed(base, val_idx, self.eval_transform())
        if self.test_set is None and stage in (None, "test", "predict"):
            test = self.load(train=False) if self.has_test_split else None
            if test is not None:
                self.check_labels(self.targets(test), train=False)
            self.test_set = self.val_set if test is None else _Transformed(test, None, self.eval_transform())

    def _setup_in_memory(self, stage: str | None) -> None:
        if self.train_set is None:
            train = self.tensors(train=True)
            images, labels = train["images"], train["labels"]
            self.class_names, self.input_shape = list(train["class_names"]), tuple(images.shape[1:])
            self.check_labels(labels, train=True)
            train_idx, val_idx = self.split_indices(len(labels))
            self.train_set = TensorImages(images, labels, train_idx)
            self.val_set = TensorImages(images, labels, val_idx)
            self.augment = BatchAugment(*self.normalization(), self.crop_padding, self.hflip, self.rotation)
        if self.test_set is None and stage in (None, "test", "predict"):
            test = self.tensors(train=False)
            if test is None:
                self.test_set = self.val_set
            elif list(test["class_names"]) != self.class_names:
                raise DataError(f"the test split has classes {test['class_names']} but train has {self.class_names}")
            else:
                self.check_labels(test["labels"], train=False)
                self.test_set = TensorImages(test["images"], test["labels"])

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """In-memory batches arrive as uint8: normalize (and augment, in training) them on their device."""
        images, labels = batch
        if images.dtype != torch.uint8 or self.augment is None:
            return batch
        return self.augment(images, train=self.trainer is not None and self.trainer.training), labels

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        """Samplers of our own (the trainer runs with use_distributed_sampler=false): the training order of
        every epoch is a function of (seed, epoch) alone, so a resumed run sees the same batches; under DDP
        each process gets its shard, and val/test images are each seen exactly once (no padding)."""
        assert dataset is not None, "call setup() first"
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        if shuffle:
            sampler: Sampler | None = DistributedSampler(dataset, world, rank, shuffle=True, seed=self.seed)
        else:
            sampler = UnrepeatedDistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
        # Its own generator: creating an iterator draws a seed from it, which would otherwise shift the
        # global RNG (and so the augmentation) differently in a resumed run.
        generator = torch.Generator().manual_seed(self.seed)
        if isinstance(dataset, TensorImages):
            device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
            shared = id(dataset.images) in self._on_device  # val shares train's copy, already there
            if device.type != "cpu" and (shared or dataset.images.nbytes < available_memory(device) / 2):
                dataset = dataset.to(device, self._on_device)  # else batches are sliced on the host
            batches = SlicedBatches(sampler or SequentialSampler(dataset), self.batch_size, dataset.images.device)
            return DataLoader(
                dataset,
                batch_sampler=batches,
                collate_fn=keep_batch,
                generator=generator,
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class ReseedEachEpoch(L.Callback):
    """Seeds the global RNGs from (seed, epoch) at every epoch start, so augmentation and dropout of an
    epoch do not depend on what ran before it: a run resumed from an epoch-end checkpoint repeats exactly
    what the uninterrupted run did (with num_workers=0; worker processes draw their own seeds)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A hash of (seed, epoch, rank): seed 1 in epoch 0 must not replay seed 0 in epoch 1.
        entropy = np.random.SeedSequence([self.seed, trainer.current_epoch, trainer.global_rank])
        L.seed_everything(int(entropy.generate_state(1)[0]), workers=True, verbose=False)
