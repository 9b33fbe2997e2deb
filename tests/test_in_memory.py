"""The in-memory data path: batch augmentation with the per-sample semantics, the uint8 cache, device
placement, and the same batches (order, DDP shards, pixels) as the per-sample path."""

from __future__ import annotations

import os
import socket
import stat
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import dead_pid, model_batch, write_idx, write_image, write_image_folder
from torch.nn import functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from src.data.image_folder import ImageFolderDataModule
from src.data.in_memory import BatchAugment, InMemoryPath, random_crop, random_hflip, rotate
from src.data.mnist import FashionMNISTDataModule
from src.data.per_sample import PerSamplePath


def fashion(data_dir, **kwargs) -> FashionMNISTDataModule:
    options = {"local_copies": [], "download": False, "batch_size": 16, "num_workers": 0, **kwargs}
    dm = FashionMNISTDataModule(data_dir=str(data_dir), **options)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.mark.parametrize(("mode", "size"), [("constant", None), ("reflect", None), ("reflect", 4)])
def test_random_crop_is_a_window_of_the_zero_or_mirror_padded_image_and_uses_every_offset(mode, size):
    torch.manual_seed(0)
    images = torch.randint(1, 256, (600, 3, 8, 6), dtype=torch.uint8)
    out = random_crop(images, padding=2, mode=mode, size=size)
    h, w = (8, 6) if size is None else (size, size)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode=mode)
    windows = [(top, left) for top in range(12 - h + 1) for left in range(10 - w + 1)]
    offsets = set()
    for i in range(len(images)):
        found = [(t, x) for t, x in windows if torch.equal(out[i], padded[i, :, t : t + h, x : x + w])]
        assert found, f"image {i} is not a crop of its padded image"
        offsets.add(found[0])
    assert len(offsets) == len(windows)  # every window is drawn: 25 of the whole image, 63 of a 4x4 crop


def test_early_crops_train_the_first_epochs_on_smaller_windows_then_whole_images(tmp_path):
    from src.data import DataError

    write_idx(tmp_path / "FashionMNIST" / "raw", n_train=80)
    dm = fashion(tmp_path, in_memory=True, crop_padding=2, early_crop=20, early_crop_epochs=2)
    batch = next(iter(dm.train_dataloader()))

    def side(epoch: int, training: bool = True) -> int:
        dm.trainer = SimpleNamespace(training=training, current_epoch=epoch)
        return dm.on_after_batch_transfer(list(batch), 0)[0].shape[-1]

    assert [side(0), side(1), side(2), side(5), side(0, training=False)] == [20, 20, 28, 28, 28]
    with pytest.raises(DataError, match="early_crop_epochs=2 needs dataset.early_crop, the crops' side"):
        fashion(tmp_path, early_crop_epochs=2)
    with pytest.raises(DataError, match="early_crop_epochs=-1 needs"):
        fashion(tmp_path, early_crop=20, early_crop_epochs=-1)
    with pytest.raises(DataError, match="early_crop_epochs needs the in-memory path.*or dataset.early_crop_epochs=0"):
        fashion(tmp_path, in_memory=False, early_crop=20, early_crop_epochs=2)
    with pytest.raises(DataError, match="early_crop=28 must be smaller than the 28x28 images"):
        fashion(tmp_path, crop_padding=2, early_crop=28, early_crop_epochs=2)


def test_early_resize_trains_the_first_epochs_on_the_whole_images_scaled_down(tmp_path):
    write_idx(tmp_path / "FashionMNIST" / "raw", n_train=80)
    early_resize = {"in_memory": True, "early_crop": 14, "early_crop_epochs": 1, "early_resize": True}
    dm = fashion(tmp_path, **early_resize)
    x, y = next(iter(dm.train_dataloader()))
    dm.trainer = SimpleNamespace(training=True, current_epoch=0)
    early = dm.on_after_batch_transfer([x, y], 0)[0]
    dm.trainer.current_epoch = 1
    later = dm.on_after_batch_transfer([x, y], 0)[0]
    # No translation here, so the early batch is exactly the later one scaled to 14x14 (normalizing is affine).
    scaled = F.interpolate(later, size=(14, 14), mode="bilinear", antialias=True)
    assert early.shape[-2:] == (14, 14) and later.shape[-2:] == (28, 28)
    torch.testing.assert_close(early, scaled, atol=1e-4, rtol=1e-4)
    dm.trainer = SimpleNamespace(training=False, current_epoch=0)
    assert dm.on_after_batch_transfer([x, y], 0)[0].shape[-2:] == (28, 28)  # val and test see whole images
    translated = fashion(tmp_path, crop_padding=2, **early_resize)
    translated.trainer = SimpleNamespace(training=True, current_epoch=0)
    assert translated.on_after_batch_transfer([x, y], 0)[0].shape[-2:] == (14, 14)


def test_horizontal_flip_mirrors_about_half_the_images_and_nothing_else():
    images = torch.randint(0, 256, (1000, 1, 5, 5), dtype=torch.uint8)
    out = random_hflip(images)
    pairs = list(zip(out, images, strict=True))
    flipped = torch.tensor([torch.equal(o, i.flip(2)) and not torch.equal(o, i) for o, i in pairs])
    kept = torch.tensor([torch.equal(o, i) for o, i in pairs])
    assert bool((flipped | kept).all())
    assert 400 < int(flipped.sum()) < 600


@pytest.mark.parametrize("angle", [-29.7, 7.5, 90.0])
def test_rotation_matches_torchvision_rotate_with_nearest_interpolation(angle):
    images = torch.randint(1, 256, (2, 3, 32, 24)).float()
    expected = TF.rotate(images, angle, interpolation=InterpolationMode.NEAREST)
    torch.testing.assert_close(rotate(images, torch.full((2,), angle)), expected)


def test_alternating_flip_mirrors_each_training_image_every_other_epoch_and_never_a_val_image(tmp_path):
    write_idx(tmp_path / "FashionMNIST" / "raw", n_train=200)
    dm = fashion(tmp_path, in_memory=True, hflip="alternate", val_fraction=0.2)
    train, source = dm.train_dataloader(), dm.train_set

    def mirrored(epoch: int) -> dict[int, bool]:
        train.sampler.set_epoch(epoch)
        images = torch.cat([x for x, _ in train])
        originals = source.images[source.indices[torch.tensor(list(train.sampler))]]
        assert all(torch.equal(x, o) or torch.equal(x, o.flip(2)) for x, o in zip(images, originals, strict=True))
        j = source.indices[torch.tensor(list(train.sampler))].tolist()
        return {i: not torch.equal(x, o) for i, x, o in zip(j, images, originals, strict=True)}

    first, second, third = mirrored(0), mirrored(1), mirrored(2)
    assert len(first) == 160 and all(second[i] != first[i] and third[i] == first[i] for i in first)
    assert 50 < sum(first.values()) < 110  # a random half, the same for every run of this seed:
    again = fashion(tmp_path, in_memory=True, hflip="alternate", val_fraction=0.2)
    assert torch.equal(again.train_set.mirrored, source.mirrored)
    assert first == {i: bool(m) for i, m in enumerate(source.mirrored.tolist()) if i in first}
    val = torch.cat([x for x, _ in dm.val_dataloader()])
    assert torch.equal(val, dm.val_set.images[dm.val_set.indices])


def test_alternating_flip_is_refused_on_the_per_sample_path_and_unknown_flips_or_paddings_are_one_line(tmp_path):
    from src.data import DataError

    write_idx(tmp_path / "FashionMNIST" / "raw", n_train=80)
    with pytest.raises(DataError, match="hflip=alternate needs the in-memory path"):
        fashion(tmp_path, in_memory=False, hflip="alternate")
    options = {"local_copies": [], "download": False, "in_memory": False, "hflip": "alternate"}
    FashionMNISTDataModule(data_dir=str(tmp_path), **options).setup("test")  # evaluate and export never flip
    with pytest.raises(DataError, match="hflip must be true, false or alternate, got 1"):
        fashion(tmp_path, hflip=1)
    with pytest.raises(DataError, match="hflip must be true, false or alternate, got 'sometimes'"):
        fashion(tmp_path, hflip="sometimes")
    with pytest.raises(DataError, match="crop_padding_mode must be constant or reflect, got 'edge'"):
        fashion(tmp_path, crop_padding_mode="edge")


def test_augmentation_runs_only_in_training_and_normalizes_like_normalize():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    augment = BatchAugment(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.2), crop_padding=2, hflip=True, rotation=10)
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.25, 0.2]).view(1, 3, 1, 1)
    torch.testing.assert_close(augment(images, train=False), (images / 255 - mean) / std)
    assert not torch.allclose(augment(images, train=True), (images / 255 - mean) / std)


def test_both_paths_serve_the_same_order_and_pixels(tmp_path):
    """Same sampler, same seed: the in-memory path changes where pixels are prepared, not which."""
    write_idx(tmp_path / "FashionMNIST" / "raw", n_train=80)
    memory, per_sample = fashion(tmp_path, in_memory=True), fashion(tmp_path, in_memory=False)
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loaders = getattr(memory, name)(), getattr(per_sample, name)()
        assert len(loaders[0]) == len(loaders[1])
        if name == "train_dataloader":
            for loader in loaders:
                loader.sampler.set_epoch(3)
        labels = [torch.cat([y for _, y in loader]) for loader in loaders]
        assert torch.equal(labels[0], labels[1]), name
    for name in ("val_dataloader", "test_dataloader"):  # no augmentation: identical pixels
        x_memory, _ = model_batch(memory, getattr(memory, name)())
        x_sample, _ = model_batch(per_sample, getattr(per_sample, name)())
        torch.testing.assert_close(x_memory, x_sample)


def test_each_ddp_process_gets_its_own_shard_of_every_epoch(tmp_path):
    write_idx(tmp_path / "FashionMNIST" / "raw", n_train=80)
    dm = fashion(tmp_path, in_memory=True)
    shards = []
    for rank in (0, 1):
        cpu = SimpleNamespace(root_device=torch.device("cpu"))
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, strategy=cpu, overfit_batches=0)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)  # what Lightning does at every epoch's start
        shards.append(dm.train_set.indices[list(loader.sampler)])
        shards.append(dm.val_set.indices[list(dm.val_dataloader().sampler)])
    train0, val0, train1, val1 = shards
    assert len(train0) == len(train1) == 36 and not set(train0.tolist()) & set(train1.tolist())
    assert sorted(torch.cat([val0, val1]).tolist()) == sorted(dm.val_set.indices.tolist())  # each once


@pytest.mark.parametrize("in_memory", [True, False])
def test_with_overfit_batches_every_epoch_serves_the_same_batches(tmp_path, in_memory):
    write_idx(tmp_path / "FashionMNIST" / "raw", n_train=80)
    dm = fashion(tmp_path, in_memory=in_memory, hflip="alternate" if in_memory else True)
    epochs = {}
    for overfit in (0, 2):
        dm.trainer = SimpleNamespace(
            world_size=1,
            global_rank=0,
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
            overfit_batches=overfit,
        )
        loader = dm.train_dataloader()
        for epoch in (0, 1):
            getattr(loader.sampler, "set_epoch", lambda _: None)(epoch)
            images, labels = zip(*loader, strict=True)
            epochs[overfit, epoch] = torch.cat(labels).tolist(), torch.cat(images)
    assert epochs[2, 0][0] == epochs[2, 1][0] and epochs[0, 0][0] != epochs[0, 1][0]
    if in_memory:  # mirrored the same way too (the per-sample path flips at random: hflip=true)
        assert torch.equal(epochs[2, 0][1], epochs[2, 1][1])


def test_decoded_images_are_cached_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    write_image_folder(tmp_path, mode="RGB", size=(8, 8), train_per_class=4, test_per_class=2)

    def setup() -> ImageFolderDataModule:
        dm = ImageFolderDataModule(data_dir=str(tmp_path), batch_size=4, in_memory=True)
        dm.prepare_data()
        dm.setup()
        return dm

    first = setup()
    caches = sorted(p.name for p in (tmp_path / ".cache").iterdir())
    assert [c.split("-")[1] for c in caches] == ["test", "train"]

    decoded = []
    original = ImageFolderDataModule.decode
    monkeypatch.setattr(ImageFolderDataModule, "decode", lambda self, d: decoded.append(1) or original(self, d))
    again = setup()
    assert decoded == []  # read from the cache
    assert torch.equal(again.train_set.images, first.train_set.images)

    changed = tmp_path / "train" / "cat" / "img000.png"
    write_image(changed, "RGB", (8, 8), value=7)
    rebuilt = setup()
    assert decoded == [1]  # only the train split changed
    assert not torch.equal(rebuilt.train_set.images, first.train_set.images)
    assert len(list((tmp_path / ".cache").iterdir())) == 2  # the stale train cache is gone


def test_cache_write_removes_dead_writers_temp_files_and_keeps_live_ones(tmp_path):
    """A killed run leaves its temp file; a parallel run (sweep job, DDP rank) may be writing its own."""
    write_image_folder(tmp_path, mode="RGB", size=(8, 8), train_per_class=4, test_per_class=None)
    cache = tmp_path / ".cache"
    cache.mkdir()
    host, stem = socket.gethostname(), "ImageFolderDataModule-train"
    dead = cache / f".{stem}.{host}.{dead_pid()}.00000000.tmp"
    live = cache / f".{stem}.{host}.{os.getpid()}.11111111.tmp"
    old_elsewhere = cache / f".{stem}.other-host.123.22222222.tmp"
    new_elsewhere = cache / f".{stem}.other-host.456.33333333.tmp"
    for path in (dead, live, old_elsewhere, new_elsewhere):
        path.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old_elsewhere, (two_days_ago, two_days_ago))
    umask = os.umask(0o022)
    try:
        ImageFolderDataModule(data_dir=str(tmp_path), batch_size=4, in_memory=True).setup("fit")
    finally:
        os.umask(umask)
    assert not dead.exists() and not old_elsewhere.exists()
    assert live.exists() and new_elsewhere.exists()
    (written,) = cache.glob(f"{stem}-*.pt")
    assert stat.S_IMODE(written.stat().st_mode) == 0o644


def test_on_an_accelerator_the_splits_move_once_and_val_shares_trains_copy(tmp_path):
    """The meta device stands in for a GPU: what is moved where, without a GPU."""
    write_idx(tmp_path / "FashionMNIST" / "raw", n_train=80)
    dm = fashion(tmp_path, in_memory=True, hflip="alternate")
    meta = SimpleNamespace(root_device=torch.device("meta"))
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, strategy=meta, overfit_batches=0)
    train, val, test = dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()
    assert {loader.source.images.device.type for loader in (train, val, test)} == {"meta"}
    assert train.source.mirrored.device.type == "meta" and val.source.mirrored is test.source.mirrored is None
    assert val.source.images is train.source.images and test.source.images is not train.source.images
    assert dm.train_dataloader().source.images is train.source.images  # moved once, not every epoch
    assert dm.train_set.images.device.type == "cpu"  # the host copy stays as it was


@pytest.mark.parametrize(("in_memory", "path"), [(True, InMemoryPath), (False, PerSamplePath), ("auto", InMemoryPath)])
def test_in_memory_setting_picks_the_data_path_once(tmp_path, in_memory, path):
    write_idx(tmp_path / "FashionMNIST" / "raw", n_train=40)
    dm = fashion(tmp_path, in_memory=in_memory)
    chosen = dm.path
    assert type(chosen) is path
    dm.setup("test")
    assert dm.path is chosen
