"""CIFAR-10 datamodule on tiny python pickle batches in torchvision's cifar-10-batches-py layout."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest import CIFAR_CLASSES, UNEVEN_TEST_LABELS, CreatesFileWhenUnpickled, model_batch, write_cifar_batches
from torchvision import datasets

from src.data import DataError
from src.data.cifar10 import CIFAR10DataModule


def cifar(data_dir, **kwargs) -> CIFAR10DataModule:
    return CIFAR10DataModule(
        data_dir=str(data_dir),
        **{"local_copies": [], "download": False, "batch_size": 16, "num_workers": 0, **kwargs},
    )


def ready(dm, stage: str | None = None):
    dm.prepare_data()
    dm.setup(stage)
    return dm


# --- CIFAR-10 -------------------------------------------------------------------------------------
def test_cifar10_small_batches_load_with_shapes_and_class_names(tmp_path):
    write_cifar_batches(tmp_path, per_batch=12)
    dm = ready(cifar(tmp_path, val_fraction=0.2))
    assert dm.input_shape == (3, 32, 32)
    assert dm.class_names == CIFAR_CLASSES
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (48, 12, len(UNEVEN_TEST_LABELS))
    x, y = model_batch(dm, dm.train_dataloader())
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64


def test_cifar10_class_names_come_from_batches_meta(tmp_path):
    names = ["apple", "pear", "plum"]
    write_cifar_batches(tmp_path, per_batch=6, test_labels=[0, 1, 2, 0, 1, 2], label_names=names)
    dm = ready(cifar(tmp_path))
    assert dm.class_names == names and dm.num_classes == 3


def test_cifar10_data_dir_may_be_the_batches_folder_itself(tmp_path):
    batches = write_cifar_batches(tmp_path, per_batch=6)
    dm = ready(cifar(batches))
    assert len(dm.train_set) + len(dm.val_set) == 30


def test_cifar10_local_copy_is_found(tmp_path):
    copy = tmp_path / "copy"
    write_cifar_batches(copy, per_batch=6)
    dm = ready(cifar(tmp_path / "empty", local_copies=[str(copy)]))
    assert len(dm.train_set) + len(dm.val_set) == 30


def test_missing_cifar10_names_dataset_and_where_it_looked(tmp_path):
    with pytest.raises(DataError) as info:
        cifar(tmp_path / "data").prepare_data()
    message = str(info.value)
    assert "CIFAR-10 not found" in message and str(tmp_path / "data") in message


def test_failed_cifar10_download_is_reported_after_the_local_folders(tmp_path, monkeypatch):
    def unreachable(self):
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets.CIFAR10, "download", unreachable)
    copy = tmp_path / "copy"
    with pytest.raises(DataError) as info:
        cifar(tmp_path / "data", local_copies=[str(copy)], download=True).prepare_data()
    message = str(info.value)
    assert "CIFAR-10 not found" in message and "download failed: OSError: network is unreachable" in message
    assert str(copy / "cifar-10-batches-py") in message and "data_batch_1..5" in message


def test_missing_cifar10_test_batch_is_a_data_error_naming_it(tmp_path):
    batches = write_cifar_batches(tmp_path, per_batch=6)
    (batches / "test_batch").unlink()
    dm = ready(cifar(tmp_path), "fit")
    with pytest.raises(DataError) as info:
        dm.setup("test")
    assert str(batches / "test_batch") in str(info.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_cifar10_batch_is_a_data_error_naming_the_file(tmp_path, damage):
    batches = write_cifar_batches(tmp_path, per_batch=12)
    bad = batches / "data_batch_3"
    bad.write_bytes(b"\x00garbage, not a pickle" * 10 if damage == "garbage" else bad.read_bytes()[:500])
    with pytest.raises(DataError) as info:
        ready(cifar(tmp_path), "fit")
    assert str(bad) in str(info.value)


def test_a_cifar10_batch_that_would_run_code_is_refused_without_running_it(tmp_path):
    batches = write_cifar_batches(tmp_path, per_batch=6)
    with open(batches / "data_batch_2", "wb") as f:
        pickle.dump({"data": CreatesFileWhenUnpickled(marker := tmp_path / "pwned"), "labels": [0]}, f)
    with pytest.raises(DataError, match=r"data_batch_2 refused: it names pathlib.*Path.touch"):
        ready(cifar(tmp_path), "fit")
    assert not marker.exists()


def test_cifar10_full_size_batch_failing_md5_is_corrupt(tmp_path):
    batches = write_cifar_batches(tmp_path, per_batch=6)
    with open(batches / "data_batch_1", "wb") as f:
        pickle.dump({"data": np.zeros((10_000, 3072), dtype=np.uint8), "labels": [0] * 10_000}, f)
    with pytest.raises(DataError, match="MD5"):
        ready(cifar(tmp_path), "fit")


@pytest.mark.parametrize("in_memory", [True, False])
def test_cifar10_label_outside_the_classes_is_a_data_error_naming_the_batch(tmp_path, in_memory):
    batches = write_cifar_batches(tmp_path, per_batch=6)
    bad = batches / "data_batch_4"
    with open(bad, "rb") as f:
        content = pickle.load(f)
    content["labels"][2] = 10
    with open(bad, "wb") as f:
        pickle.dump(content, f)
    with pytest.raises(DataError, match="label 10 is outside 0..9") as info:
        ready(cifar(tmp_path, in_memory=in_memory), "fit")
    assert str(bad) in str(info.value)
