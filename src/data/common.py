"""What every datamodule shares: the seeded train/val split, transforms, loaders and clear data errors.

A subclass only says where its images come from (`load`); everything a model needs to build itself
(`input_shape`, `class_names`) is read from the data, never hard-coded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms as T


class DataError(RuntimeError):
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
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"dataset.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        if batch_size < 1:
            raise DataError(f"dataset.batch_size must be at least 1, got {batch_size}")
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.seed = val_fraction, seed
        self.mean, self.std = tuple(mean), tuple(std)
        self.hflip, self.rotation, self.crop_padding = hflip, rotation, crop_padding
        self.class_names: list[str] = []
        self.input_shape: tuple[int, int, int] = (0, 0, 0)
        self.has_test_split = True
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # --- what subclasses provide -------------------------------------------------------------------
    def load(self, train: bool) -> Dataset:
        raise NotImplementedError

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

    def split_indices(self, n: int) -> tuple[list[int], list[int]]:
        """The same `seed` always gives the same split, independent of the global RNG."""
        n_val = max(1, round(n * self.val_fraction))
        if n_val >= n:
            raise DataError(f"only {n} training images: too few to hold out val_fraction={self.val_fraction}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return order[n_val:], order[:n_val]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            base = self.load(train=True)
            train_idx, val_idx = self.split_indices(len(base))
            self.train_set = _Transformed(base, train_idx, self.train_transform())
            self.val_set = _Transformed(base, val_idx, self.eval_transform())
        if self.test_set is None and stage in (None, "test", "predict"):
            test = self.load(train=False) if self.has_test_split else None
            self.test_set = self.val_set if test is None else _Transformed(test, None, self.eval_transform())

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
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # Its own generator: creating an iterator draws a seed from it, which would otherwise shift the
            # global RNG (and so the augmentation) differently in a resumed run.
            generator=torch.Generator().manual_seed(self.seed),
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
