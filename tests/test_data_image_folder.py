"""ImageFolderDataModule on tiny PNG/JPEG folders written with PIL: channels, sizes, splits, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import model_batch, write_image, write_image_folder
from PIL import Image

from src.data import DataError
from src.data.image_folder import ImageFolderDataModule
from src.utils.errors import UserError


def folder(data_dir, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(data_dir=str(data_dir), **{"batch_size": 16, "num_workers": 0, **kwargs})


def ready(dm, stage: str | None = None):
    dm.prepare_data()
    dm.setup(stage)
    return dm


def every_item(dm) -> None:
    """ImageFolderDataModule decodes lazily: touch every item of every split."""
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        for i in range(len(dataset)):
            dataset[i]


# --- image folders --------------------------------------------------------------------------------------
def test_grayscale_image_folder_stays_one_channel(tmp_path):
    write_image_folder(tmp_path, mode="L", size=(28, 28))
    dm = ready(folder(tmp_path, val_fraction=0.2))
    assert dm.class_names == ["cat", "dog", "fox"]
    assert dm.input_shape == (1, 28, 28)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (48, 12, 24)
    x, y = model_batch(dm, dm.train_dataloader())
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y.max()) < 3


def test_rgb_image_folder_has_three_channels(tmp_path):
    write_image_folder(tmp_path, mode="RGB", size=(30, 26), exts=(".jpg", ".png"))
    dm = ready(folder(tmp_path))
    assert dm.input_shape == (3, 30, 26)
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (16, 3, 30, 26)


def test_image_folder_size_option_resizes(tmp_path):
    write_image_folder(tmp_path, mode="RGB", size=(40, 50))
    dm = ready(folder(tmp_path, size=[24, 20]))
    assert dm.input_shape == (3, 24, 20)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        assert next(iter(loader))[0].shape[1:] == (3, 24, 20)


def test_image_folder_images_of_mixed_sizes_are_brought_to_the_first_size(tmp_path):
    write_image_folder(tmp_path, train_per_class=6, test_per_class=None, mode="L", size=(28, 28))
    write_image(tmp_path / "train" / "dog" / "zz_big.png", "L", (40, 33), 7)
    dm = ready(folder(tmp_path))
    every_item(dm)
    assert {tuple(dm.train_set[i][0].shape) for i in range(len(dm.train_set))} == {(1, 28, 28)}


@pytest.mark.parametrize("in_memory", [True, False])
def test_one_colour_training_image_makes_the_folder_colour(tmp_path, in_memory):
    write_image_folder(tmp_path, train_per_class=6, test_per_class=2, mode="L", size=(28, 28))
    write_image(tmp_path / "train" / "dog" / "zz_colour.png", "RGB", (28, 28), 5)  # not first in sort order
    dm = ready(folder(tmp_path, in_memory=in_memory))
    assert dm.input_shape[0] == 3
    shapes = {tuple(ds[i][0].shape) for ds in (dm.train_set, dm.val_set, dm.test_set) for i in range(len(ds))}
    assert shapes == {(3, 28, 28)}


def test_test_images_get_the_training_splits_channels(tmp_path):
    write_image_folder(tmp_path, train_per_class=6, test_per_class=2, mode="L", size=(28, 28))
    write_image(tmp_path / "test" / "fox" / "zz_colour.jpg", "RGB", (28, 28), 6)
    dm = ready(folder(tmp_path))
    shapes = {tuple(ds[i][0].shape) for ds in (dm.train_set, dm.val_set, dm.test_set) for i in range(len(ds))}
    assert shapes == {(1, 28, 28)}


@pytest.mark.parametrize("in_memory", [True, False])
def test_symlinked_folders_do_not_repeat_images(tmp_path, in_memory):
    write_image_folder(tmp_path, train_per_class=6, test_per_class=2)
    train, test = tmp_path / "train", tmp_path / "test"
    (train / "cat" / "loop").symlink_to(train / "cat", target_is_directory=True)
    (train / "dog" / "up").symlink_to(train, target_is_directory=True)
    (train / "fox" / "again.png").symlink_to(train / "fox" / "img000.png")  # the same file under two names
    (test / "cat" / "up").symlink_to(tmp_path, target_is_directory=True)
    dm = ready(folder(tmp_path, in_memory=in_memory))
    assert len(dm.train_set) + len(dm.val_set) == 3 * 6
    assert len(dm.test_set) == 3 * 2


def test_a_symlinked_class_folder_is_a_class(tmp_path):
    write_image_folder(tmp_path, classes=("cat", "dog"), train_per_class=6, test_per_class=None)
    write_image_folder(tmp_path / "elsewhere", classes=("owl",), train_per_class=4, test_per_class=None)
    (tmp_path / "train" / "owl").symlink_to(tmp_path / "elsewhere" / "train" / "owl", target_is_directory=True)
    dm = ready(folder(tmp_path))
    assert dm.class_names == ["cat", "dog", "owl"]
    assert len(dm.train_set) + len(dm.val_set) == 16


@pytest.mark.parametrize("in_memory", [True, False])
def test_image_folder_with_one_class_is_a_data_error(tmp_path, in_memory):
    write_image_folder(tmp_path, classes=("cats",), train_per_class=8, test_per_class=None)
    with pytest.raises(DataError, match=r"only 1 class \(cats\)") as info:
        ready(folder(tmp_path, in_memory=in_memory), "fit")
    assert str(tmp_path / "train") in str(info.value)


def test_image_folder_without_test_folder_tests_on_the_val_split(tmp_path):
    write_image_folder(tmp_path, test_per_class=None)
    dm = ready(folder(tmp_path, val_fraction=0.25))
    assert not (tmp_path / "test").exists()
    assert dm.test_set is dm.val_set
    assert len(dm.test_set) == 15


def test_image_folder_test_classes_must_match_train(tmp_path):
    write_image_folder(tmp_path, test_per_class=None)
    write_image_folder(tmp_path / "other", classes=("cat", "owl"), train_per_class=2, test_per_class=None)
    (tmp_path / "other" / "train").rename(tmp_path / "test")
    dm = ready(folder(tmp_path), "fit")
    with pytest.raises(DataError, match="owl"):
        dm.setup("test")


def test_missing_image_folder_is_a_data_error_naming_it(tmp_path):
    dm = folder(tmp_path / "photos")
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    assert str(tmp_path / "photos" / "train") in str(info.value)


def test_image_folder_with_no_images_is_a_data_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images"):
        ready(folder(tmp_path), "fit")


def load_everything(data_dir, in_memory: bool) -> None:
    """The in-memory path decodes every image in setup; the per-sample path when each item is read."""
    dm = ready(folder(data_dir, in_memory=in_memory))
    every_item(dm)


@pytest.mark.parametrize("in_memory", [True, False])
def test_unreadable_image_is_a_data_error_naming_the_file(tmp_path, in_memory):
    write_image_folder(tmp_path, train_per_class=8, test_per_class=2)
    bad = tmp_path / "train" / "dog" / "x.png"
    bad.write_bytes(b"\x89PNG garbage bytes, not an image" * 4)
    with pytest.raises(DataError) as info:
        load_everything(tmp_path, in_memory)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("in_memory", [True, False])
def test_truncated_image_is_a_data_error_naming_the_file(tmp_path, in_memory):
    write_image_folder(tmp_path, train_per_class=8, test_per_class=2, mode="RGB")
    bad = tmp_path / "test" / "cat" / "img000.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(DataError) as info:
        load_everything(tmp_path, in_memory)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("problem", ["pixels_over_the_limit", "pixels_over_twice_the_limit", "text_named_png"])
def test_image_pillow_refuses_is_a_data_error_naming_the_file(tmp_path, monkeypatch, in_memory, problem):
    """Pillow only warns between MAX_IMAGE_PIXELS and twice it, and raises DecompressionBombError above."""
    write_image_folder(tmp_path, train_per_class=4, test_per_class=2, size=(8, 8))
    bad = tmp_path / "train" / "dog" / "zz_bad.png"
    if problem == "text_named_png":
        bad.write_text("just some notes, not an image")
    else:
        write_image(bad, "L", (40, 40), 3)  # 1600 pixels; the others have 64
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000 if problem == "pixels_over_the_limit" else 500)
    with pytest.raises(DataError) as info:
        load_everything(tmp_path, in_memory)
    assert str(bad) in str(info.value)


def test_mean_std_must_fit_the_channels(tmp_path):
    write_image_folder(tmp_path, mode="RGB", train_per_class=4, test_per_class=None)
    dm = folder(tmp_path, mean=[0.5, 0.5], std=[0.5, 0.5])
    with pytest.raises(UserError, match="dataset.mean has 2 values but the images have 3 channels"):
        ready(dm, "fit")
