"""The in-memory data path: a split decoded once into a uint8 tensor, cached next to the data, served as
batches by slicing with the epoch's shuffled index; normalization and augmentation run afterwards on whole
batches on the training device (`src/data/batch_augment.py`).

A small dataset decoded through PIL one image at a time, every epoch, spends most of its time outside the
model; here a batch costs one gather.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from math import ceil
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from src.data.atomic import write_atomically

log = logging.getLogger(__name__)


class TensorImages(Dataset):
    """The images of one split at `indices` of a shared uint8 tensor (N, C, H, W), with their labels.

    `__getitems__` serves a whole batch with one gather; DataLoader calls it with what `SlicedBatches`
    yields (a tensor of positions, on the device that holds the images).
    """

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

    def to(self, device: torch.device, moved: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> TensorImages:
        """This split on `device`; `moved` shares one copy of the tensors between splits that share them."""
        key = id(self.images)
        if key not in moved:
            moved[key] = (self.images.to(device), self.labels.to(device))
        view = TensorImages.__new__(TensorImages)
        view.images, view.labels = moved[key]
        view.indices = self.indices.to(device)
        return view


class SlicedBatches(Sampler):
    """Batches as slices of the epoch's order, which `sampler` decides (so shuffling, the DDP shard and
    resume behave exactly as on the per-sample path). The order is moved to `device` once per epoch, so
    serving a batch never waits for the device."""

    def __init__(self, sampler: Sampler, batch_size: int, device: torch.device | str = "cpu") -> None:
        self.sampler, self.batch_size, self.device = sampler, batch_size, torch.device(device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = torch.tensor(list(self.sampler), dtype=torch.long).to(self.device)
        yield from order.split(self.batch_size)

    def __len__(self) -> int:
        return ceil(len(self.sampler) / self.batch_size)


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataLoader's collate_fn: `__getitems__` already returns a batch."""
    return batch


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
    versions of `name`, and temporary files of interrupted writes, are removed (`atomic.py`). An unwritable
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
