"""The in-memory data path (`InMemoryPath`): a split decoded once into a uint8 tensor, cached next to the data,
kept on the training device where it fits, served as batches by slicing with the epoch's shuffled index;
normalization and augmentation run afterwards on whole batches on that device (`augment.py`). A small dataset
decoded through PIL one image at a time, every epoch, spends most of its time outside the model; here a batch
costs one gather.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from math import ceil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset, Sampler, SequentialSampler

from src.data.augment import BatchAugment
from src.utils.io import write_atomically

if TYPE_CHECKING:
    from src.data.common import ImageClassificationDataModule

log = logging.getLogger(__name__)


class TensorImages(Dataset):
    """The images of one split at `indices` of a shared uint8 tensor (N, C, H, W), with their labels;
    `__getitems__` serves a whole batch with one gather."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: Sequence[int] | None = None) -> None:
        self.images, self.labels = images, labels
        self.indices = torch.arange(len(images)) if indices is None else torch.as_tensor(indices, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        return self.images[j], int(self.labels[j])

    def __getitems__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.indices[positions]
        return self.images[j], self.labels[j]


class TensorBatches:
    """The batches of `dataset` as slices of the epoch's order, which `sampler` decides (so shuffling, the DDP
    shard and resume behave exactly as on the per-sample path; Lightning calls its `set_epoch`). The order moves
    to the images' device once an epoch; a batch is one gather, without a DataLoader's per-batch machinery."""

    batch_sampler = None  # what Lightning looks for beside `sampler`, as on a DataLoader

    def __init__(self, dataset: TensorImages, sampler: Sampler, batch_size: int) -> None:
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.long).to(self.dataset.images.device)
        return map(self.dataset.__getitems__, order.split(self.batch_size))

    def __len__(self) -> int:
        return ceil(len(self.sampler) / self.batch_size)


def fingerprint(files: Sequence[Path], *extra: object) -> str:
    """Changes when any file is added, removed, resized or rewritten (path, size, mtime), or `extra` does."""
    digest = hashlib.sha1(repr(extra).encode())
    for path in files:
        try:
            stat = path.stat()
        except FileNotFoundError:  # reading it will say so; a key without it matches no cache
            continue
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cached_tensors(cache_dir: Path, name: str, key: str, build: Callable[[], dict[str, object]]) -> dict[str, object]:
    """`build()` (a dict of tensors and metadata), saved as `cache_dir/name-key.pt` and read from there
    while `key` holds. Written atomically, so an interrupted write never looks like a cache; older
    versions of `name`, and temporary files of interrupted writes, are removed (src/utils/io.py). An unwritable
    folder only costs the decode next time."""
    path = cache_dir / f"{name}-{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
            log.warning("rebuilding the unreadable cache %s (%s)", path, e)
    content = build()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: torch.save(content, f), stem=name)
        for old in cache_dir.glob(f"{name}-*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        log.warning("cannot cache the decoded images in %s (%s); they will be decoded again next run", cache_dir, e)
    return content


def available_memory(device: torch.device) -> int:
    """Bytes that can be used on `device`: free GPU memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: assume it fits, as a user choosing this path would
        return 1 << 62


class InMemoryPath:
    """The `DataPath` of `dm` that serves its splits from decoded uint8 tensors (see the module docstring)."""

    def __init__(self, dm: ImageClassificationDataModule) -> None:
        self.dm = dm
        self.augment: BatchAugment | None = None  # built with the training split
        self.on_device: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one device copy per tensor

    @staticmethod
    def fits(need: int) -> bool:
        """Whether `need` bytes of decoded images take under half the free RAM (`in_memory=auto`)."""
        fits = need < available_memory(torch.device("cpu")) / 2
        if not fits:
            log.warning("decoded images (%.1f GB) exceed half the free RAM: per-sample loading", need / 1e9)
        return fits

    def read(self, train: bool) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, list[str]] | None:
        """A split decoded to uint8 tensors: from the cache while its source files are unchanged."""
        dm = self.dm
        files = dm.source_files(train)
        if files is None:
            return None
        name, cache = f"{type(dm).__name__}-{'train' if train else 'test'}", dm.data_dir / ".cache"

        def build() -> dict[str, Any]:
            log.info("decoding %s images to a uint8 cache in %s", name, cache)
            dataset = dm.load(train)
            images, labels = dm.decode(dataset)
            names = list(getattr(dataset, "classes", dm.class_names))
            return {"images": images, "labels": labels, "class_names": names}

        # The test split takes train's image shape (image folders resize to it): part of its key.
        key = fingerprint(files, name, dm.decode_options(), None if train else dm.input_shape)
        split = cached_tensors(cache, name, key, build)
        if train:
            dm.input_shape = tuple(split["images"].shape[1:])
        return (split["images"], split["labels"]), split["labels"], list(split["class_names"])

    def view(self, source: tuple[torch.Tensor, torch.Tensor], indices: Sequence[int] | None, train: bool) -> Dataset:
        if train:
            self.augment = BatchAugment(*self.dm.normalization(), self.dm.crop_padding, self.dm.hflip, self.dm.rotation)
        return TensorImages(*source, indices)

    def loader(self, dataset: TensorImages, sampler: Sampler | None, generator: torch.Generator) -> TensorBatches:
        """Batches sliced on the training device where the split takes under half its free memory (else on the
        host; val shares train's copy there)."""
        device = self.dm.trainer.strategy.root_device if self.dm.trainer else torch.device("cpu")
        key = id(dataset.images)
        if device.type != "cpu" and (key in self.on_device or dataset.images.nbytes < available_memory(device) / 2):
            if key not in self.on_device:
                self.on_device[key] = (dataset.images.to(device), dataset.labels.to(device))
            dataset = TensorImages(*self.on_device[key], dataset.indices.to(device))
        return TensorBatches(dataset, sampler or SequentialSampler(dataset), self.dm.batch_size)

    def after_transfer(self, batch: list[torch.Tensor], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 batches normalized (and augmented, in training) on their device."""
        assert self.augment is not None, "call setup() first"
        return self.augment(batch[0], train=train), batch[1]
