"""MNIST / Fashion-MNIST datamodules on tiny IDX files (both layouts, local copies), and the seeded split
(val_fraction or k-fold)."""

from __future__ import annotations

import gzip
import os
import socket
import stat

import numpy as np
import pytest
import torch
from conftest import (
    FASHION_CLASSES,
    IDX_NAMES,
    UNEVEN_TEST_LABELS,
    class_images,
    dead_pid,
    idx_images_bytes,
    idx_labels_bytes,
    model_batch,
    offline_dataset,
    write_idx,
)
from hydra.utils import instantiate
from torchvision import datasets

from src.data import DataError
from src.data.mnist import FashionMNISTDataModule, MNISTDataModule
from src.utils.config import validate

OFFLINE = {"local_copies": [], "download": False}
COMMON = {"batch_size": 16, "num_workers": 0}


def fashion(data_dir, **kwargs) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(data_dir=str(data_dir), **{**OFFLINE, **COMMON, **kwargs})


def mnist(data_dir, **kwargs) -> MNISTDataModule:
    return MNISTDataModule(data_dir=str(data_dir), **{**OFFLINE, **COMMON, **kwargs})


def ready(dm, stage: str | None = None):
    dm.prepare_data()
    dm.setup(stage)
    return dm


# --- MNIST / Fashion-MNIST -------------------------------------------------------------------------------
@pytest.mark.parametrize("in_memory", [True, False])
def test_fashion_mnist_batch_shapes_dtypes_and_split_sizes(tmp_path, in_memory):
    write_idx(tmp_path / "FashionMNIST" / "raw", n_train=80)
    dm = ready(fashion(tmp_path, val_fraction=0.25, in_memory=in_memory))
    assert dm.input_shape == (1, 28, 28)
    assert dm.num_classes == 10
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (60, 20, len(UNEVEN_TEST_LABELS))
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = model_batch(dm, loader)
        assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (16,) and y.dtype == torch.int64
        assert 0 <= int(y.min()) and int(y.max()) < 10


def test_fashion_mnist_class_names_come_from_torchvision(tmp_path):
    write_idx(tmp_path / "FashionMNIST" / "raw")
    dm = ready(fashion(tmp_path))
    assert dm.class_names == FASHION_CLASSES


def test_mnist_reads_torchvision_root_layout(tmp_path):
    write_idx(tmp_path / "MNIST" / "raw", n_train=50)
    dm = ready(mnist(tmp_path))
    assert dm.input_shape == (1, 28, 28)
    assert len(dm.class_names) == 10 and dm.class_names[0].startswith("0")
    assert len(dm.train_set) + len(dm.val_set) == 50
    assert dm.test_set[0][0].shape == (1, 28, 28)


def test_labels_survive_loading(tmp_path):
    write_idx(tmp_path / "FashionMNIST" / "raw", n_train=40)
    dm = ready(fashion(tmp_path))
    assert sorted(dm.test_set[i][1] for i in range(len(dm.test_set))) == sorted(UNEVEN_TEST_LABELS)


@pytest.mark.parametrize("in_memory", [True, False])
def test_pixels_are_scaled_and_normalized_with_mean_and_std(tmp_path, in_memory):
    write_idx(tmp_path / "FashionMNIST" / "raw", n_train=40)
    dm = ready(fashion(tmp_path, mean=[0.2], std=[0.4], in_memory=in_memory))
    expected = (torch.from_numpy(class_images(UNEVEN_TEST_LABELS, (28, 28), seed=2)[5]) / 255.0 - 0.2) / 0.4
    images, labels = model_batch(dm, dm.test_dataloader())
    assert int(labels[5]) == UNEVEN_TEST_LABELS[5]
    torch.testing.assert_close(images[5, 0], expected.float())


def test_flat_gzipped_idx_folder_is_found_and_staged(tmp_path):
    data_dir = tmp_path / "data"
    sources = write_idx(data_dir, n_train=40, gz=True)
    dm = ready(fashion(data_dir))
    raw = data_dir / "FashionMNIST" / "raw"
    for name in IDX_NAMES:
        assert (raw / name).read_bytes() == gzip.decompress(sources[name].read_bytes())
    assert len(dm.train_set) + len(dm.val_set) == 40
    assert not [p for p in raw.iterdir() if p.name.startswith(".")], "temporary staging files left behind"


def test_flat_uncompressed_idx_folder_is_found(tmp_path):
    write_idx(tmp_path, n_train=40)
    dm = ready(mnist(tmp_path))
    assert (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert len(dm.train_set) + len(dm.val_set) == 40


def test_local_copy_is_found_and_staged_into_data_dir(tmp_path):
    copy, data_dir = tmp_path / "shared" / "fashion-mnist", tmp_path / "empty"
    sources = write_idx(copy, n_train=40, gz=True)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    dm = ready(fashion(data_dir, local_copies=[str(copy)]))
    raw = data_dir / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(IDX_NAMES)
    assert (raw / "t10k-labels-idx1-ubyte").read_bytes() == gzip.decompress(
        sources["t10k-labels-idx1-ubyte"].read_bytes()
    )
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before, "the local copy must not change"
    assert len(dm.test_set) == len(UNEVEN_TEST_LABELS)


def test_missing_idx_data_names_dataset_and_where_it_looked(tmp_path):
    copy = tmp_path / "nowhere"
    dm = fashion(tmp_path / "data", local_copies=[str(copy)])
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "FashionMNIST" in message and "not found" in message
    assert str(tmp_path / "data") in message and str(copy) in message
    assert "download" in message


def test_failed_download_is_reported_after_the_local_folders(tmp_path, monkeypatch):
    def unreachable(self):
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets.FashionMNIST, "download", unreachable)
    copy = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        fashion(tmp_path / "data", local_copies=[str(copy)], download=True).prepare_data()
    message = str(info.value)
    assert "download failed: OSError: network is unreachable" in message and str(copy) in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_incomplete_idx_folder_counts_as_missing(tmp_path):
    write_idx(tmp_path, n_train=40)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="MNIST not found"):
        mnist(tmp_path).prepare_data()


@pytest.mark.parametrize(("name", "stage"), [("train-images-idx3-ubyte", "fit"), ("t10k-labels-idx1-ubyte", "test")])
def test_truncated_idx_file_is_a_data_error_naming_the_file(tmp_path, name, stage):
    raw = tmp_path / "FashionMNIST" / "raw"
    paths = write_idx(raw, n_train=40)
    data = paths[name].read_bytes()
    paths[name].write_bytes(data[: len(data) - 100 if "images" in name else len(data) - 5])
    dm = fashion(tmp_path)
    dm.prepare_data()
    with pytest.raises(DataError) as info:
        dm.setup(None if stage == "test" else stage)
    assert str(raw / name) in str(info.value)


def test_idx_image_and_label_counts_must_match(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw, n_train=40)
    (raw / "train-labels-idx1-ubyte").write_bytes(idx_labels_bytes([0] * 30))
    with pytest.raises(DataError, match="40 images but 30 labels"):
        ready(fashion(tmp_path), "fit")


def test_truncated_gzip_is_a_data_error_naming_the_file_and_stages_nothing(tmp_path):
    data_dir = tmp_path / "data"
    sources = write_idx(data_dir, n_train=40, gz=True)
    bad = sources["train-images-idx3-ubyte"]
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError) as info:
        fashion(data_dir).prepare_data()
    assert str(bad) in str(info.value)
    raw = data_dir / "FashionMNIST" / "raw"
    assert not (raw / "train-images-idx3-ubyte").exists(), "a half-staged file must never look complete"
    assert not [p for p in raw.iterdir() if p.name.startswith(".")], "temporary staging files left behind"


def test_garbage_idx_header_is_a_data_error(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw, n_train=40)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"this is not an idx file at all")
    with pytest.raises(DataError) as info:
        ready(fashion(tmp_path), "fit")
    assert str(raw / "train-labels-idx1-ubyte") in str(info.value)


@pytest.mark.parametrize("in_memory", [True, False])
def test_idx_label_outside_the_classes_is_a_data_error_naming_the_file(tmp_path, in_memory):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw, n_train=40)
    (raw / "train-labels-idx1-ubyte").write_bytes(idx_labels_bytes([i % 10 for i in range(39)] + [12]))
    with pytest.raises(DataError, match="label 12 is outside 0..9") as info:
        ready(fashion(tmp_path, in_memory=in_memory), "fit")
    assert str(raw / "train-labels-idx1-ubyte") in str(info.value)


@pytest.mark.parametrize("in_memory", [True, False])
def test_training_labels_of_one_class_are_a_data_error(tmp_path, in_memory):
    write_idx(tmp_path / "MNIST" / "raw", n_train=40, num_classes=1)
    with pytest.raises(DataError, match="only 1 class"):
        ready(mnist(tmp_path, in_memory=in_memory), "fit")


def test_staging_removes_a_dead_writers_temp_file_and_writes_readable_files(tmp_path):
    data_dir = tmp_path / "data"
    write_idx(data_dir, n_train=40, gz=True)
    raw = data_dir / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    stale = raw / f".train-images-idx3-ubyte.{socket.gethostname()}.{dead_pid()}.0a1b2c3d.tmp"
    stale.write_bytes(b"half a file")
    umask = os.umask(0o022)
    try:
        fashion(data_dir).prepare_data()
    finally:
        os.umask(umask)
    assert sorted(p.name for p in raw.iterdir()) == sorted(IDX_NAMES)
    assert {stat.S_IMODE(p.stat().st_mode) for p in raw.iterdir()} == {0o644}


def test_idx_of_other_image_size_sets_input_shape(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw, n_train=30, size=20)
    dm = ready(mnist(tmp_path))
    assert dm.input_shape == (1, 20, 20)
    assert next(iter(dm.train_dataloader()))[0].shape[1:] == (1, 20, 20)


def test_idx_bytes_are_big_endian():
    header = idx_images_bytes(np.zeros((2, 28, 28), dtype=np.uint8))[:16]
    assert header == bytes.fromhex("00000803000000020000001c0000001c")
    assert idx_labels_bytes([1, 2, 3])[:8] == bytes.fromhex("0000080100000003")


# --- split --------------------------------------------------------------------------------------------
def test_same_seed_gives_same_split_and_different_seed_a_different_one(tmp_path):
    write_idx(tmp_path / "FashionMNIST" / "raw", n_train=80)

    def val_indices(seed: int) -> list[int]:
        torch.manual_seed(seed + 1000)  # the global RNG must not matter
        return [int(i) for i in ready(fashion(tmp_path, seed=seed), "fit").val_set.indices]

    first = val_indices(7)
    assert val_indices(7) == first
    assert val_indices(8) != first


def test_split_is_a_disjoint_cover_of_the_training_set():
    dm = FashionMNISTDataModule(val_fraction=0.2, seed=3, **OFFLINE)
    train, val = dm.split_indices(100)
    assert len(val) == 20 and len(train) == 80
    assert sorted(train + val) == list(range(100))


def test_seed_zero_is_a_seed_like_any_other(tmp_path):
    write_idx(tmp_path / "FashionMNIST" / "raw", n_train=80)
    zero = ready(fashion(tmp_path, seed=0), "fit")
    assert len(zero.val_set) == 8 and len(zero.train_set) == 72
    assert zero.split_indices(80) == fashion(tmp_path, seed=0).split_indices(80)
    assert zero.split_indices(80) != fashion(tmp_path, seed=1).split_indices(80)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_out_of_range_is_a_data_error(fraction):
    with pytest.raises(DataError, match="val_fraction"):
        FashionMNISTDataModule(val_fraction=fraction, **OFFLINE)


def test_too_few_images_for_a_val_split_is_a_data_error():
    dm = FashionMNISTDataModule(val_fraction=0.5, **OFFLINE)
    with pytest.raises(DataError, match="too few"):
        dm.split_indices(1)


def test_default_split_is_the_one_earlier_versions_gave():
    """Without folds, the split must not move: results of earlier runs stay comparable."""
    dm = FashionMNISTDataModule(val_fraction=0.25, seed=7, **OFFLINE)
    assert dm.split_indices(12) == ([5, 7, 9, 11, 6, 8, 1, 10, 2], [3, 4, 0])


@pytest.mark.parametrize("in_memory", [True, False])
def test_k_folds_validate_on_disjoint_parts_that_cover_the_training_set(tmp_path, in_memory):
    write_idx(tmp_path / "FashionMNIST" / "raw", n_train=80)
    vals = []
    for fold in range(3):
        dm = ready(fashion(tmp_path, folds=3, fold=fold, seed=4, in_memory=in_memory))
        train, val = [int(i) for i in dm.train_set.indices], [int(i) for i in dm.val_set.indices]
        assert sorted(train) == sorted(set(range(80)) - set(val))  # train is the complement of its fold
        assert len(val) in (26, 27)
        vals.append(val)
    assert sorted(i for val in vals for i in val) == list(range(80))  # disjoint, and together the whole set
    assert len(dm.test_set) == len(UNEVEN_TEST_LABELS)  # the test split is not touched


def test_fold_i_of_k_is_the_i_th_part_of_the_permutation_seeded_by_dataset_seed():
    torch.manual_seed(0)  # the global RNG must not matter
    train, val = FashionMNISTDataModule(folds=4, fold=1, seed=3, **OFFLINE).split_indices(40)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3)).tolist()
    assert (train, val) == (order[:10] + order[20:], order[10:20])
    assert FashionMNISTDataModule(folds=4, fold=1, seed=4, **OFFLINE).split_indices(40)[1] != val


@pytest.mark.parametrize(
    ("folds", "fold", "key"),
    [
        (1, 0, "dataset.folds"),
        (None, 2, "dataset.folds"),
        (5, 5, "dataset.fold"),
        (5, -1, "dataset.fold"),
        (5, None, "dataset.fold"),
    ],
)
def test_fold_settings_out_of_range_are_a_data_error_naming_the_key(folds, fold, key):
    with pytest.raises(DataError, match=rf"^{key} must"):
        FashionMNISTDataModule(folds=folds, fold=fold, **OFFLINE)


@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist", "cifar10", "image_folder"])
def test_every_dataset_config_takes_folds_from_the_command_line(compose_cfg, tmp_path, dataset):
    cfg = compose_cfg([*offline_dataset(dataset, tmp_path), "dataset.folds=5", "dataset.fold=4"])
    validate(cfg)
    dm = instantiate(cfg.dataset)
    assert (dm.folds, dm.fold) == (5, 4)
    assert compose_cfg(offline_dataset(dataset, tmp_path)).dataset.folds is None  # val_fraction by default


def test_fewer_images_than_folds_is_a_data_error():
    with pytest.raises(DataError, match="too few for dataset.folds=5"):
        FashionMNISTDataModule(folds=5, fold=0, **OFFLINE).split_indices(4)
