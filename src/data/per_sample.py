"""The per-sample data path: torchvision transforms on each PIL image as read, for data too big to keep in memory."""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

if TYPE_CHECKING:
    from src.data.common import ImageClassificationDataModule


class _Transformed(Dataset):
    """`base` at `indices`, transformed: train and val share one loaded dataset but not its augmentation."""

    def __init__(self, base: Dataset, indices: Sequence[int] | None, transform: Any) -> None:
        self.base, self.transform = base, transform
        self.indices = list(range(len(base))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[i]]
        return self.transform(image), int(label)


class PerSamplePath:  # the `DataPath` decoding and transforming image by image
    def __init__(self, dm: "ImageClassificationDataModule") -> None:
        self.dm = dm

    def read(self, train: bool) -> tuple[Dataset, torch.Tensor, list[str]] | None:
        if (dataset := self.dm.load(train)) is None:
            return None
        return dataset, torch.as_tensor(dataset.targets, dtype=torch.long), list(dataset.classes)

    def view(self, source: Dataset, indices: Sequence[int] | None, train: bool) -> Dataset:
        dm = self.dm
        crop = T.RandomCrop(dm.input_shape[1:], padding=dm.crop_padding, padding_mode=dm.crop_padding_mode)
        augment = [crop] if train and dm.crop_padding else []
        augment += [T.RandomHorizontalFlip()] if train and dm.hflip else []
        augment += [T.RandomRotation(dm.rotation)] if train and dm.rotation else []
        transform = T.Compose([*dm.resize(), *augment, T.ToTensor(), T.Normalize(*dm.normalization())])
        return _Transformed(source, indices, transform)

    def loader(self, dataset: Dataset, sampler: Sampler | None, generator: torch.Generator) -> DataLoader:
        n = self.dm.num_workers
        return DataLoader(
            dataset, self.dm.batch_size, sampler=sampler, generator=generator, num_workers=n, persistent_workers=n > 0
        )

    def after_transfer(self, batch: Any, train: bool) -> Any:
        return batch
