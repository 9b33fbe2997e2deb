"""The in-memory data path: each split decoded once to uint8, cached next to the data, kept on the training device
where it fits; a batch is one gather, normalized and augmented on that device as `PerSamplePath.view` per image."""

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from math import ceil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset, Sampler, SequentialSampler

from src.utils.io import write_atomically

if TYPE_CHECKING:
    from src.data.common import ImageClassificationDataModule

log = logging.getLogger(__name__)


class TensorImages(Dataset):
    """One split: `indices` into shared uint8 images (N, C, H, W) and labels; `__getitems__` gathers a batch.
    `mirrored` (one bool per image): airbench's alternating flip, those images mirrored in even epochs, the others
    in odd ones, so each image is seen both ways in any two consecutive epochs (`epoch`, set by TensorBatches)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: Sequence[int] | None = None,
        mirrored: torch.Tensor | None = None,
    ) -> None:
        self.images, self.labels, self.mirrored, self.epoch = images, labels, mirrored, 0
        self.indices = torch.arange(len(images)) if indices is None else torch.as_tensor(indices, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__(torch.tensor([i]))
        return images[0], int(labels[0])

    def __getitems__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.indices[positions]
        if self.mirrored is None:
            return self.images[j], self.labels[j]
        images, flip = self.images[j], (self.mirrored[j] ^ bool(self.epoch % 2)).view(-1, 1, 1, 1)
        return torch.where(flip, images.flip(3), images), self.labels[j]


class TensorBatches:
    """Batches of `dataset` in `sampler`'s order, so shuffling, DDP shards and resume match the per-sample path."""

    batch_sampler = None  # what Lightning looks for beside `sampler`, as on a DataLoader

    def __init__(self, dataset: TensorImages, sampler: Sampler, batch_size: int) -> None:
        # not `.dataset`: Lightning would take this for a DataLoader to rebuild (overfit_batches)
        self.source, self.sampler, self.batch_size = dataset, sampler, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Drawn at the first batch, after Lightning has set the sampler's epoch (a resumed run calls iter() before).
        order = torch.tensor(list(self.sampler), dtype=torch.long).to(self.source.images.device)
        # Unshuffled (overfit_batches): the same batches each epoch, mirrored the same way.
        self.source.epoch = self.sampler.epoch if getattr(self.sampler, "shuffle", False) else 0
        yield from map(self.source.__getitems__, order.split(self.batch_size))

    def __len__(self) -> int:
        return ceil(len(self.sampler) / self.batch_size)


def cached_tensors(cache_dir: Path, name: str, files: Sequence[Path], build: Callable, *extra: object) -> dict:
    """`build()` (a dict of tensors), cached as `cache_dir/name-KEY.pt` (older KEYs removed) while KEY, a hash of
    `name`, `extra` and the files' paths, sizes and mtimes, holds."""
    digest = hashlib.sha1(repr((name, *extra)).encode())
    for file in files:
        try:
            stat = file.stat()
        except FileNotFoundError:  # reading it will say so; a key without it matches no cache
            continue
        digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    path = cache_dir / f"{name}-{digest.hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            return torch.load(path, mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
            log.warning("rebuilding the unreadable cache %s (%s)", path, e)
    content = build()
    try:
        write_atomically(path, lambda f: torch.save(content, f), stem=name)
        for old in set(cache_dir.glob(f"{name}-*.pt")) - {path}:
            old.unlink(missing_ok=True)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        log.warning("cannot cache the decoded images in %s (%s); they will be decoded again next run", cache_dir, e)
    return content


def available_memory(device: torch.device) -> int:
    """Bytes that can be used on `device`: free GPU memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: assume it fits, as a user choosing this path would
        return 1 << 62


def random_crop(images: torch.Tensor, padding: int, mode: str = "constant", size: int | None = None) -> torch.Tensor:
    """Each image shifted by its own offset in [-padding, padding] per axis, the border zero-filled or mirrored
    (RandomCrop's padding_mode "constant" or "reflect"); channels-last. `size`: a random size x size window of the
    padded image instead."""
    (b, _, height, width), device = images.shape, images.device
    h, w = (height, width) if size is None else (size, size)
    padded = F.pad(images, (padding,) * 4, mode=mode).permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C)
    top = torch.randint(0, height - h + 2 * padding + 1, (b, 1, 1), device=device)
    left = torch.randint(0, width - w + 2 * padding + 1, (b, 1, 1), device=device)
    rows = torch.arange(h, device=device).view(1, h, 1) + top
    cols = torch.arange(w, device=device).view(1, 1, w) + left
    return padded[torch.arange(b, device=device).view(b, 1, 1), rows, cols].permute(0, 3, 1, 2)


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(len(images), device=images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Image i rotated counter-clockwise by degrees[i] as torchvision's rotate does (nearest, zero fill)."""
    b, _, h, w = images.shape
    angle = torch.deg2rad(degrees)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    # The rotation in pixel units, written in affine_grid's [-1, 1] coordinates (they scale x and y apart).
    theta = torch.stack([cos, -sin * h / w, zero, sin * w / h, cos, zero], 1).view(b, 2, 3)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class BatchAugment:
    """uint8 (B, C, H, W) -> normalized float32, augmented when training."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        hflip: bool = False,
        rotation: float = 0.0,
        crop_padding_mode: str = "constant",
        early_resize: bool = False,
    ) -> None:
        self.scale = torch.tensor([1 / (255 * s) for s in std]).view(1, -1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(1, -1, 1, 1)
        self.crop_padding, self.padding_mode = crop_padding, crop_padding_mode
        self.hflip, self.rotation, self.early_resize = hflip, rotation, early_resize

    def __call__(self, images: torch.Tensor, train: bool, crop_size: int | None = None) -> torch.Tensor:
        """`crop_size`: train on smaller images of that side: random windows (`random_crop`'s `size`), or with
        `early_resize` the whole (translated) images scaled down, as progressive resizing does."""
        window = None if self.early_resize else crop_size
        if train and (self.crop_padding or window):
            images = random_crop(images, self.crop_padding, self.padding_mode, window)
        if train and self.hflip:
            images = random_hflip(images)
        images = images.float()
        if train and crop_size and self.early_resize:
            images = F.interpolate(images, size=(crop_size, crop_size), mode="bilinear", antialias=True)
        if train and self.rotation:  # each image by its own angle in [-rotation, rotation]
            images = rotate(images, (torch.rand(len(images), device=images.device) * 2 - 1) * self.rotation)
        if self.scale.device != images.device:
            self.scale, self.shift = self.scale.to(images.device), self.shift.to(images.device)
        return torch.addcmul(self.shift, images, self.scale)  # (x / 255 - mean) / std as one multiply-add


class InMemoryPath:  # the `DataPath` serving the splits from decoded uint8 tensors
    def __init__(self, dm: "ImageClassificationDataModule") -> None:
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
        dm, files = self.dm, self.dm.source_files(train)
        if files is None:
            return None
        name, cache = f"{type(dm).__name__}-{'train' if train else 'test'}", dm.data_dir / ".cache"

        def build() -> dict[str, Any]:
            log.info("decoding %s images to a uint8 cache in %s", name, cache)
            dataset = dm.load(train)
            images, labels = dm.decode(dataset)
            return {"images": images, "labels": labels, "class_names": list(dataset.classes)}

        # The test split takes train's image shape (image folders resize to it): part of its key.
        split = cached_tensors(cache, name, files, build, dm.decode_options(), None if train else dm.input_shape)
        if train:
            dm.input_shape = tuple(split["images"].shape[1:])
        return (split["images"], split["labels"]), split["labels"], list(split["class_names"])

    def view(self, source: tuple[torch.Tensor, torch.Tensor], indices: Sequence[int] | None, train: bool) -> Dataset:
        if not train:
            return TensorImages(*source, indices)
        dm, mirrored = self.dm, None
        flip = dm.hflip is True  # "alternate" flips in TensorImages, by epoch
        self.augment = BatchAugment(
            *dm.normalization(), dm.crop_padding, flip, dm.rotation, dm.crop_padding_mode, early_resize=dm.early_resize
        )
        if dm.hflip == "alternate":  # the same images each run of this seed, resumed or not
            mirrored = torch.rand(len(source[0]), generator=torch.Generator().manual_seed(dm.seed)) < 0.5
        return TensorImages(*source, indices, mirrored)

    def loader(self, dataset: TensorImages, sampler: Sampler | None, generator: torch.Generator) -> TensorBatches:
        """Batches sliced on the training device if the split takes under half its free memory (val shares train's)."""
        device = self.dm.trainer.strategy.root_device if self.dm.trainer else torch.device("cpu")
        key = id(dataset.images)
        if device.type != "cpu" and (key in self.on_device or dataset.images.nbytes < available_memory(device) / 2):
            if key not in self.on_device:
                self.on_device[key] = (dataset.images.to(device), dataset.labels.to(device))
            mirrored = None if dataset.mirrored is None else dataset.mirrored.to(device)
            dataset = TensorImages(*self.on_device[key], dataset.indices.to(device), mirrored)
        return TensorBatches(dataset, sampler or SequentialSampler(dataset), self.dm.batch_size)

    def after_transfer(self, batch: list[torch.Tensor], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.augment is not None, "call setup() first"
        dm = self.dm
        early = (dm.trainer.current_epoch if dm.trainer else 0) < dm.early_crop_epochs  # dataset.early_crop
        return self.augment(batch[0], train=train, crop_size=dm.early_crop if early else None), batch[1]
