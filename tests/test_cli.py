"""`python -m src.train` as a user runs it. Every run starts a fresh interpreter (seconds of imports), so
all of them are started at once by one module fixture and each test checks its own run."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import FAST, offline_dataset, run_cli, write_idx
from omegaconf import OmegaConf

pytestmark = pytest.mark.slow  # every test reads a `python -m src.train` subprocess run

DATASETS = ("cifar10", "fashion_mnist", "image_folder", "mnist")
MODELS = ("cnn2", "cnn3", "lenet", "mlp")


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """name -> (CompletedProcess, run dir) for every CLI run below, started concurrently."""
    root = tmp_path_factory.mktemp("cli")
    empty = root / "empty"
    empty.mkdir()
    write_idx(root / "idx", n_train=40, gz=True)
    offline_empty = offline_dataset("mnist", empty)
    runs = {
        "help": ["--help"],
        "unknown_dataset": ["dataset=nope"],
        "unknown_model": ["model=nope"],
        "typo_key": [*offline_empty, "trainer.max_epocs=1"],
        "bad_type": [*offline_empty, "trainer.max_epochs=abc"],
        "missing_data": [*offline_empty, *FAST],
        "train": [*offline_dataset("fashion_mnist", root / "idx"), "model=cnn2", *FAST],
        "default_console": [*offline_dataset("fashion_mnist", root / "idx"), "trainer.max_epochs=2"],
    }
    return run_all({name: [*args, f"hydra.run.dir={root / 'runs' / name}"] for name, args in runs.items()}, root)


def run_all(runs: dict[str, list[str]], root) -> dict:
    """Run the CLI invocations, as many at a time as there are CPUs (more only thrash)."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, args in runs.items()}
        return {name: (future.result(), root / "runs" / name) for name, future in futures.items()}


def output(result) -> str:
    return result.stdout + result.stderr


def failed_cleanly(result) -> str:
    """A failure exit status (not a signal) with a message and no traceback; returns the output."""
    text = output(result)
    assert result.returncode > 0, f"exit status {result.returncode}:\n{text[-3000:]}"
    assert text.strip(), f"exit status {result.returncode} with no output"
    assert "Traceback" not in text, text[-3000:]
    return text


def test_cli_trains_and_writes_the_run_directory(cli):
    result, run_dir = cli["train"]
    assert result.returncode == 0, output(result)[-3000:]
    assert "Traceback" not in output(result)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sum(map(sum, metrics["test/confusion_matrix"])) == 30
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")  # the composed config, as the run used it
    assert saved.model._target_ == "src.models.cnn2.CNN2" and saved.dataset.data_dir.endswith("idx")
    assert "test/acc" in result.stdout and f"run directory: {run_dir}" in result.stdout


def test_default_run_console_is_quiet_and_prints_one_line_per_epoch_when_not_a_terminal(cli):
    result, _ = cli["default_console"]
    text = output(result)
    assert result.returncode == 0, text[-3000:]
    for noise in ("Tip:", "litlogger", "TPU available", "GPU available", "deprecated"):
        assert noise not in text, (noise, text)
    assert "Trainable params" in text and "Total FLOPs" in text  # the model summary stays, with real FLOPs
    assert "it/s" not in text  # no progress-bar redraws in a captured (non-terminal) output
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == ["epoch 1/2", "epoch 2/2"], text
    assert "val/acc" in epoch_lines[0] and "train/loss_epoch" in epoch_lines[0]


def test_help_lists_config_groups_and_choices(cli):
    result, _ = cli["help"]
    assert result.returncode == 0, output(result)
    groups = dict(re.findall(r"^(\w+): (.+)$", result.stdout, flags=re.M))
    assert {"dataset", "model", "optimizer"} <= groups.keys()
    assert all(d in groups["dataset"] for d in DATASETS)
    assert all(m in groups["model"] for m in MODELS)
    assert "adam" in groups["optimizer"] and "sgd" in groups["optimizer"]


@pytest.mark.parametrize(
    ("run", "group", "choices"),
    [("unknown_dataset", "dataset", DATASETS), ("unknown_model", "model", MODELS)],
)
def test_unknown_group_choice_fails_listing_the_choices(cli, run, group, choices):
    result, run_dir = cli[run]
    text = failed_cleanly(result)
    assert f"{group}/nope" in text
    assert all(choice in text for choice in choices), text
    assert not (run_dir / "checkpoints").exists()


def test_misspelt_key_fails_naming_the_key(cli):
    result, _ = cli["typo_key"]
    text = failed_cleanly(result)
    assert "trainer.max_epocs" in text


def test_wrong_value_type_fails_naming_the_key(cli):
    result, _ = cli["bad_type"]
    text = failed_cleanly(result)
    assert "trainer.max_epochs" in text and "abc" in text


def test_missing_data_fails_with_one_clear_error_line(cli):
    result, _ = cli["missing_data"]
    text = failed_cleanly(result)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert "MNIST not found" in errors[0] and "empty" in errors[0]
