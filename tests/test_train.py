"""End to end: the real composed config, `src.train.train(cfg)` in-process, one epoch on tiny data."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import (
    CIFAR_CLASSES,
    FASHION_CLASSES,
    FAST,
    NO_FIGURES,
    UNEVEN_TEST_LABELS,
    offline_dataset,
    write_cifar_batches,
    write_idx,
    write_image_folder,
)
from PIL import Image

from src.train import train

IMAGE_FOLDER_TEST = (4, 8, 12)  # test images per class: cat, dog, fox


def make_data(dataset: str, root: Path) -> tuple[list[str], Counter]:
    """Write the dataset; return its class names and the test-set count per class index."""
    if dataset == "mnist":
        write_idx(root / "MNIST" / "raw", n_train=80)
        return [f"{d} - " for d in range(10)], Counter(UNEVEN_TEST_LABELS)
    if dataset == "fashion_mnist":
        write_idx(root, n_train=80, gz=True)  # Debian's flat gzipped layout
        return FASHION_CLASSES, Counter(UNEVEN_TEST_LABELS)
    if dataset == "cifar10":
        write_cifar_batches(root, per_batch=12)
        return CIFAR_CLASSES, Counter(UNEVEN_TEST_LABELS)
    write_image_folder(root, train_per_class=20, test_per_class=IMAGE_FOLDER_TEST, mode="RGB", size=(32, 32))
    return ["cat", "dog", "fox"], Counter(dict(enumerate(IMAGE_FOLDER_TEST)))


def check_run(run_dir: Path, result: float, optimized: str, class_names: list[str], test_counts: Counter) -> dict:
    """The artefacts every run must leave, and a consistent metrics.json."""
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in checkpoints
    assert any(name.startswith("epoch") for name in checkpoints), checkpoints
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard events file"

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in (
        "val/loss",
        "val/acc",
        "test/loss",
        "test/acc",
        "test/acc_per_class",
        "test/confusion_matrix",
    ):
        assert key in metrics, key
    assert isinstance(result, float) and result == pytest.approx(metrics[optimized])
    assert 0.0 <= metrics["test/acc"] <= 1.0 and 0.0 <= metrics["val/acc"] <= 1.0
    assert metrics["test/loss"] > 0 and metrics["val/loss"] > 0

    per_class = metrics["test/acc_per_class"]
    assert isinstance(per_class, dict) and len(per_class) == len(class_names)
    for actual, expected in zip(per_class, class_names, strict=True):
        assert actual.startswith(expected), (actual, expected)

    matrix = metrics["test/confusion_matrix"]
    k = len(class_names)
    assert isinstance(matrix, list) and len(matrix) == k and all(len(row) == k for row in matrix)
    assert sum(map(sum, matrix)) == sum(test_counts.values())
    assert [sum(row) for row in matrix] == [test_counts[c] for c in range(k)], "rows must be the true class"
    correct = sum(matrix[i][i] for i in range(k))
    assert metrics["test/acc"] == pytest.approx(correct / sum(test_counts.values()), abs=1e-6)
    with Image.open(run_dir / "confusion_matrix.png") as image:
        assert image.width > 100 and image.height > 100
    return metrics


# The fast recipes' ingredients, on a tiny network.
FAST_RECIPE = [
    "optimizer=sgd",
    "optimizer.nesterov=true",
    "scheduler=onecycle",
    "trainer.precision=bf16-mixed",
    "model.widths=[8,16,16]",
    "model.stem=8",
    "dataset.batch_size=8",  # enough steps for the one-cycle phases on tiny data
]


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    ("dataset", "model", "extra"),
    [
        pytest.param("mnist", "cnn2", [], id="mnist-cnn2"),
        pytest.param("fashion_mnist", "mlp", ["optimizer=adamw", "scheduler=step"], id="fashion_mnist-mlp", marks=SLOW),
        pytest.param(
            "cifar10",
            "cnn3",
            ["optimizer=sgd", "scheduler=cosine", "dataset.crop_padding=4", "label_smoothing=0.1"],
            id="cifar10-cnn3",
            marks=SLOW,
        ),
        pytest.param("image_folder", "lenet", [], id="image_folder-lenet", marks=SLOW),
        pytest.param(
            "fashion_mnist",
            "cnn2",
            ["dataset.in_memory=false", "dataset.hflip=true", "dataset.rotation=10"],
            id="fashion_mnist-cnn2-per_sample",
            marks=SLOW,
        ),
        pytest.param(
            "cifar10",
            "bn_convnet",
            [*FAST_RECIPE, "dataset.crop_padding=4", "dataset.hflip=true"],
            id="cifar10-bn_convnet-onecycle-bf16",
        ),
    ],
)
def test_one_epoch_writes_checkpoints_tensorboard_and_metrics(compose_cfg, tmp_path, dataset, model, extra):
    class_names, test_counts = make_data(dataset, tmp_path / "data")
    run_dir = tmp_path / "run"
    cfg = compose_cfg([*offline_dataset(dataset, tmp_path / "data"), f"model={model}", *FAST, *extra], run_dir)
    result = train(cfg)
    metrics = check_run(run_dir, result, cfg.optimized_metric, class_names, test_counts)
    assert metrics["epochs"] == 1


def test_one_cycle_schedule_is_stepped_every_batch_to_its_end(compose_cfg, tmp_path):
    write_idx(tmp_path / "data", n_train=100, gz=True)
    run_dir = tmp_path / "run"
    overrides = [*offline_dataset("fashion_mnist", tmp_path / "data"), "model=bn_convnet", *FAST, *NO_FIGURES]
    overrides += FAST_RECIPE
    train(compose_cfg([*overrides, "trainer.max_epochs=2"], run_dir))
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    steps = 2 * math.ceil(90 / 8)  # 2 epochs of 90 training images in batches of 8
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == steps
    assert checkpoint["lr_schedulers"][0]["total_steps"] == steps


@pytest.mark.slow
def test_image_folder_without_test_folder_reports_on_the_val_split(compose_cfg, tmp_path):
    write_image_folder(tmp_path / "data", train_per_class=20, test_per_class=None, mode="L", size=(28, 28))
    run_dir = tmp_path / "run"
    cfg = compose_cfg(
        [*offline_dataset("image_folder", tmp_path / "data"), "dataset.val_fraction=0.5", "model=cnn2", *FAST]
    )
    train(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sum(map(sum, metrics["test/confusion_matrix"])) == 30  # half of the 60 training images
    assert list(metrics["test/acc_per_class"]) == ["cat", "dog", "fox"]


def test_checkpoint_keeps_classes_input_shape_and_run_config(compose_cfg, tmp_path):
    write_idx(tmp_path / "data", n_train=40)
    cfg = compose_cfg([*offline_dataset("mnist", tmp_path / "data"), "model=mlp", "seed=0", *FAST, *NO_FIGURES])
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    hparams = ckpt["hyper_parameters"]
    assert list(hparams["input_shape"]) == [1, 28, 28]
    assert len(hparams["class_names"]) == 10
    assert hparams["config"]["model"]["_target_"] == "src.models.mlp.MLP"
    assert hparams["config"]["seed"] == 0


@pytest.mark.slow
def test_same_seed_gives_the_same_result(compose_cfg, tmp_path):
    write_idx(tmp_path / "data", n_train=48)
    results = []
    for run in ("a", "b"):
        cfg = compose_cfg(
            [*offline_dataset("mnist", tmp_path / "data"), "model=mlp", *FAST, "trainer.deterministic=true"],
            tmp_path / run,
        )
        train(cfg)
        results.append(json.loads((tmp_path / run / "metrics.json").read_text()))
    assert results[0]["test/confusion_matrix"] == results[1]["test/confusion_matrix"]
    assert results[0]["test/loss"] == pytest.approx(results[1]["test/loss"], rel=1e-5)


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_is_one_line_per_epoch_off_a_terminal_and_the_trainer_flag_turns_it_off(
    compose_cfg, tmp_path, capsys, enabled
):
    """Output that is not a terminal (here: pytest's capture) gets one line per epoch, no bar redraws;
    `trainer.enable_progress_bar=false` alone turns it off (conf/trainer: any Trainer argument may be
    overridden)."""
    write_idx(tmp_path / "data", n_train=40)
    fast = [o for o in [*FAST, *NO_FIGURES] if not o.startswith(("callbacks.progress_bar", "trainer.enable_"))]
    fast = [o if o != "trainer.max_epochs=1" else "trainer.max_epochs=2" for o in fast]
    cfg = compose_cfg(
        [*offline_dataset("mnist", tmp_path / "data"), "model=mlp", *fast, f"trainer.enable_progress_bar={enabled}"]
    )
    result = train(cfg)
    assert result == pytest.approx(json.loads((tmp_path / "run" / "metrics.json").read_text())["val/acc"])
    captured = capsys.readouterr()
    assert "it/s" not in captured.out + captured.err  # no bar redraws
    epoch_lines = [line for line in captured.out.splitlines() if line.startswith("epoch ")]
    if not enabled:
        assert epoch_lines == []
        return
    assert [line.split(":")[0] for line in epoch_lines] == ["epoch 1/2", "epoch 2/2"], captured.out
    assert "val/acc" in epoch_lines[0] and "train/loss_epoch" in epoch_lines[0]


def test_quiet_console_drops_lightnings_noise_and_keeps_what_matters(monkeypatch):
    """What each entry point's main() sets up before anything is built (tests/test_cli.py checks the result)."""
    import logging
    import warnings

    from src.utils.command import quiet_console

    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    monkeypatch.setattr(rank_zero, "filters", list(rank_zero.filters))  # quiet_console's filters go with the test
    monkeypatch.setattr(rank_zero, "handlers", [Keep()])
    with warnings.catch_warnings():
        quiet_console()
        rank_zero.info("GPU available: False, used: False")
        rank_zero.info("💡 Tip: For seamless cloud logging, try installing litlogger")
        rank_zero.info("`Trainer.fit` stopped: `max_epochs=1` reached.")
        rank_zero.warning("The number of training batches (3) is smaller than the logging interval")
    assert seen == [
        "`Trainer.fit` stopped: `max_epochs=1` reached.",
        "The number of training batches (3) is smaller than the logging interval",
    ]


def test_missing_data_is_a_data_error_before_training(compose_cfg, tmp_path):
    from src.data import DataError

    cfg = compose_cfg([*offline_dataset("fashion_mnist", tmp_path / "empty"), "model=mlp", *FAST])
    with pytest.raises(DataError, match="FashionMNIST not found"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_optimized_metric_is_a_config_error_listing_the_choices(compose_cfg, tmp_path):
    from src.utils.config import ConfigError

    write_idx(tmp_path / "data", n_train=40)
    overrides = [*offline_dataset("mnist", tmp_path / "data"), "model=mlp", *FAST, *NO_FIGURES, "trainer.max_epochs=0"]
    cfg = compose_cfg([*overrides, "optimized_metric=val/nope"])  # known only once the run has reported
    with pytest.raises(ConfigError, match=r"val/nope.*test/acc"):
        train(cfg)


def test_zero_epochs_tests_the_initial_weights(compose_cfg, tmp_path):
    write_idx(tmp_path / "data", n_train=40)
    overrides = [*offline_dataset("mnist", tmp_path / "data"), "model=mlp", *FAST, *NO_FIGURES, "trainer.max_epochs=0"]
    cfg = compose_cfg(overrides)
    result = train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result == pytest.approx(metrics[cfg.optimized_metric])
    assert sum(map(sum, metrics["test/confusion_matrix"])) == len(UNEVEN_TEST_LABELS)
    assert metrics["epochs"] == 0


def test_unreadable_image_in_a_loader_worker_is_one_line_naming_the_file(compose_cfg, tmp_path):
    from src.data import DataError
    from src.utils.errors import one_line

    write_image_folder(tmp_path / "data", train_per_class=6, test_per_class=None, mode="L", size=(28, 28))
    bad = tmp_path / "data" / "train" / "dog" / "x.png"
    bad.write_bytes(b"not a png at all" * 8)
    overrides = [*offline_dataset("image_folder", tmp_path / "data"), "model=mlp", *FAST, "dataset.num_workers=1"]
    with pytest.raises(DataError) as info:
        train(compose_cfg(overrides))
    message = one_line(info.value)
    assert str(bad) in message and "Traceback" not in message and "\n" not in message


def test_error_inside_instantiate_is_reported_as_one_line(compose_cfg, tmp_path):
    from hydra.errors import InstantiationException

    from src.utils.errors import one_line

    cfg = compose_cfg([*offline_dataset("mnist", tmp_path / "data"), *FAST, "dataset.val_fraction=1.5"])
    with pytest.raises(InstantiationException) as info:
        train(cfg)
    message = one_line(info.value)
    assert "val_fraction must be between 0 and 1" in message and "1.5" in message
    assert "Error in call" not in message and "\n" not in message


@pytest.mark.parametrize("debug", ["fdr", "overfit", "limit", "profiler"])
def test_each_debug_config_runs_to_the_end(compose_cfg, tmp_path, debug):
    """debug=overfit learns its 2 batches (the loader serving the same ones each epoch: tests/test_in_memory.py)."""
    write_idx(tmp_path / "data", n_train=80)
    overrides = [*offline_dataset("mnist", tmp_path / "data"), "model=mlp", *FAST, *NO_FIGURES, f"debug={debug}"]
    if debug == "overfit":
        overrides += ["trainer.overfit_batches=2", "trainer.max_epochs=40"]
    if debug == "limit":  # 1% and 5% of these tiny sets are under one batch
        overrides += [f"trainer.limit_{split}_batches=1" for split in ("train", "val", "test")]
    train(compose_cfg(overrides))
    run = tmp_path / "run"
    if debug == "overfit":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        assert events.Scalars("train/acc")[-1].value >= 0.9
    if debug == "profiler":
        assert (run / "fit-profile.txt").read_text().strip() and (run / "test-profile.txt").read_text().strip()
