"""What a run shows a reader (figures, untrained accuracy, HPARAMS), the seed experiments on small
real-format data, `evaluate` reproducing a run, and resuming a killed run exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import (
    FAST,
    NO_FIGURES,
    REPO_ROOT,
    UNEVEN_TEST_LABELS,
    offline_dataset,
    one_line_error,
    run_cli,
    write_cifar_batches,
    write_idx,
    write_image_folder,
)
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict, read_write
from PIL import Image
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from src.evaluate import evaluate
from src.train import train
from src.utils.config import ConfigError

FIGURES = ("confusion_matrix", "test_predictions", "worst_misclassified", "train_batch")


def tensorboard_tags(log_dir: Path) -> tuple[dict, list]:
    events = EventMultiplexer()
    events.AddRunsFromDirectory(str(log_dir))
    events.Reload()
    tags = {"images": [], "scalars": []}
    for run in events.Runs():
        for kind in tags:
            tags[kind] += events.GetAccumulator(run).Tags()[kind]
    return tags, list(events.PluginRunToTagToContent("hparams"))


def test_every_run_writes_figures_untrained_accuracy_and_hparams(fashion_run):
    run_dir, metrics = fashion_run.run_dir, fashion_run.metrics
    for name in FIGURES:
        with Image.open(run_dir / f"{name}.png") as image:
            assert image.width > 100 and image.height > 100, name
    assert 0.0 <= metrics["val/acc_untrained"] <= 1.0
    assert metrics["num_parameters"] == 6930  # cnn2 on 28x28x1, 10 classes
    tags, hparams_runs = tensorboard_tags(run_dir / "tensorboard")
    assert set(FIGURES) <= set(tags["images"])
    for scalar in ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/acc_untrained", "test/acc"):
        assert scalar in tags["scalars"], scalar
    assert "hparams/test_acc" in tags["scalars"] and hparams_runs, "final metrics missing from the HPARAMS tab"


@pytest.mark.parametrize("experiment", ["mnist_lenet_adam", "cifar_cnn3_sgd"])
def test_mnist_and_cifar_experiments_run_on_small_real_format_data(compose_cfg, tmp_path, experiment):
    data = tmp_path / "data"
    if experiment.startswith("mnist"):
        write_idx(data / "MNIST" / "raw", n_train=60)
        dataset = "mnist"
    else:
        write_cifar_batches(data, per_batch=12)
        dataset = "cifar10"
    overrides = [f"experiment={experiment}", *offline_dataset(dataset, data), "trainer.max_epochs=1"]
    cfg = compose_cfg([*overrides, "trainer.enable_progress_bar=false", *NO_FIGURES], tmp_path / "run")
    assert cfg.dataset.batch_size == (10 if dataset == "mnist" else 20)  # the seed's settings, not defaults
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert sum(map(sum, metrics["test/confusion_matrix"])) == len(UNEVEN_TEST_LABELS)
    if dataset == "mnist":
        assert metrics["num_parameters"] == 60_074


def test_changing_an_experiments_dataset_keeps_its_other_settings():
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=cifar_cnn3_sgd", "dataset=image_folder", "dataset.data_dir=/x"])
    assert cfg.dataset._target_.endswith("ImageFolderDataModule")
    assert (cfg.dataset.batch_size, cfg.dataset.val_fraction, cfg.dataset.hflip, cfg.dataset.rotation) == (
        20,
        0.2,
        True,
        10.0,
    )
    assert (cfg.optimizer.lr, cfg.trainer.max_epochs, cfg.model._target_) == (0.01, 20, "src.models.cnn3.CNN3")


@pytest.fixture
def compose_evaluate():
    """Compose conf/evaluate.yaml with Hydra's runtime output dir `out`, as `python -m src.evaluate` does."""

    def _compose(overrides: list[str], out: Path):
        with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
            cfg = compose("evaluate", overrides=[*overrides, f"hydra.run.dir={out}"], return_hydra_config=True)
        with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = str(out)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    HydraConfig.instance().cfg = None


def test_evaluate_reproduces_the_training_runs_test_metrics(fashion_run, compose_evaluate, tmp_path):
    run_dir, trained = fashion_run.run_dir, fashion_run.metrics
    out = tmp_path / "evaluate"
    cfg = compose_evaluate([f"ckpt_path={trained['best_checkpoint']}", "trainer.enable_progress_bar=false"], out)
    metrics = evaluate(cfg)
    assert metrics["test/acc"] == trained["test/acc"]
    assert metrics["test/loss"] == pytest.approx(trained["test/loss"], rel=1e-6)
    assert metrics["test/confusion_matrix"] == trained["test/confusion_matrix"]
    assert json.loads((out / "metrics.json").read_text())["test/acc"] == trained["test/acc"]
    for name in ("confusion_matrix", "test_predictions", "worst_misclassified"):
        with Image.open(out / f"{name}.png") as image:
            assert image.width > 100 and image.height > 100, name
    assert json.loads((run_dir / "metrics.json").read_text()) == trained  # the run's own folder is left alone


def test_a_users_own_callback_never_stops_evaluate_predict_or_export_even_once_its_module_is_gone(
    compose_cfg, tmp_path, monkeypatch, capsys
):
    """The run's config names `mycallbacks.Noop`; opening the run builds only its network and datamodule, so
    evaluate, predict (with the run's test images, in their class folders) and export work after the module is
    deleted, and predict's accuracy on the test folder (some images one folder deeper) is evaluate's test/acc."""
    from src.export import export
    from src.predict import predict

    data = write_image_folder(tmp_path / "images", train_per_class=12, test_per_class=(6, 8, 10))
    (nested := data / "test" / "dog" / "more").mkdir()  # a class folder's subfolders belong to it, as in ImageFolder
    for image in sorted((data / "test" / "dog").glob("*.png"))[:4]:
        image.rename(nested / image.name)
    (tmp_path / "pkg" / "mycallbacks.py").parent.mkdir()
    (tmp_path / "pkg" / "mycallbacks.py").write_text("import lightning\nclass Noop(lightning.Callback):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    overrides = ["dataset=image_folder", f"dataset.data_dir={data}", "model=cnn2", *FAST, *NO_FIGURES]
    train(compose_cfg([*overrides, "+callbacks.mine._target_=mycallbacks.Noop"], tmp_path / "run"))
    (tmp_path / "pkg" / "mycallbacks.py").unlink()
    monkeypatch.delitem(sys.modules, "mycallbacks")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    tested = evaluate(compose_cfg([f"ckpt_path={last}"], tmp_path / "e", name="evaluate"))
    out = tmp_path / "p"
    assert (
        predict(compose_cfg([f"ckpt_path={last}", f"images={data / 'test'}", "figures=false"], out, "predict"), out)
        == 0
    )
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert accuracy["images"] == 24 and accuracy["accuracy"] == pytest.approx(tested["test/acc"])
    assert f"accuracy {accuracy['accuracy']:.4f}" in capsys.readouterr().out
    # TorchScript: the run is opened as for ONNX, without torch.export's seconds (ONNX: test_predict, test_export)
    assert export(
        compose_cfg(
            [f"ckpt_path={last}", "format=torchscript", f"out={tmp_path / 'model.pt'}"], tmp_path / "x", "export"
        )
    ).is_file()


def test_evaluate_errors_are_one_line(fashion_run, compose_cfg, tmp_path, capsys):
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello")
    other_data = write_image_folder(tmp_path / "other", classes=("a", "b"), train_per_class=4, test_per_class=2)
    cases = [
        ([f"ckpt_path={tmp_path / 'missing.ckpt'}"], f"checkpoint not found: {tmp_path / 'missing.ckpt'}"),
        ([f"ckpt_path={not_a_checkpoint}"], f"{not_a_checkpoint} is not a readable checkpoint"),
        ([f"ckpt_path={fashion_run.last}", f"dataset.data_dir={other_data}"], "FashionMNIST not found"),
    ]
    for args, expected in cases:
        cfg = compose_cfg(args, tmp_path / "e", name="evaluate")
        assert expected in one_line_error(lambda cfg=cfg: evaluate(cfg), capsys)


@pytest.mark.slow
def test_run_killed_during_epoch_3_resumes_to_the_uninterrupted_result(compose_cfg, tmp_path):
    """SIGKILL mid-epoch, resume from last.ckpt: same test metrics as never stopping (CPU, same seed)."""
    write_idx(tmp_path / "data", n_train=120, gz=True)
    common = [
        *offline_dataset("fashion_mnist", tmp_path / "data"),
        "model=cnn2",
        "model.hidden=[16]",
        "model.dropout=0.3",
        "dataset.hflip=true",
        "dataset.rotation=10",
        "dataset.crop_padding=2",
        *[o for o in FAST if not o.startswith("trainer.max_epochs")],
        "trainer.max_epochs=4",
    ]
    train(compose_cfg(common, tmp_path / "full"))
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())

    killed = tmp_path / "killed"
    env = {"PYTHONPATH": str(REPO_ROOT / "tests")}
    crash = ["+callbacks.kill._target_=crash.KillDuringEpoch", "+callbacks.kill.epoch=2"]
    result = run_cli(*common, *crash, f"hydra.run.dir={killed}", env=env)
    assert result.returncode == -9, result.stdout + result.stderr
    assert not (killed / "metrics.json").exists()
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")], "half-written file left"

    last = f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"
    resumed = run_cli(*common, *crash, last, f"hydra.run.dir={tmp_path / 'r'}", env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = json.loads((killed / "metrics.json").read_text())  # the resumed run continues in its own directory
    assert after["epochs"] == full["epochs"] == 4
    assert after["test/acc"] == full["test/acc"]
    assert after["test/loss"] == full["test/loss"]


def test_resume_true_finds_the_last_checkpoint_of_the_matching_run(compose_cfg, tmp_path, caplog):
    write_idx(tmp_path / "data", n_train=60, gz=True)
    common = [*offline_dataset("fashion_mnist", tmp_path / "data"), "model=mlp", *FAST, *NO_FIGURES]
    common.append(f"paths.runs_root={tmp_path}")
    first = tmp_path / "runs" / "first"
    train(compose_cfg(common, first))
    (first / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(common), first / ".hydra" / "overrides.yaml")  # what Hydra's run keeps
    assert json.loads((first / "metrics.json").read_text())["epochs"] == 1
    with pytest.raises(ConfigError, match="no run under"):  # other overrides: not the same run
        train(compose_cfg([*common, "resume=true", "model.hidden=[8]"], tmp_path / "runs" / "other"))
    with caplog.at_level("INFO"):
        train(compose_cfg([*common, "resume=true"], tmp_path / "runs" / "again"))
    assert f"resuming from {first / 'checkpoints' / 'last.ckpt'}" in caplog.text


@pytest.mark.parametrize("n", [2, 100])
def test_figures_draw_any_class_count_accented_names_empty_counts_and_nan_probabilities(tmp_path, n):
    """The PIL figures for 2 or 100 classes, names PIL's built-in font draws as boxes (DejaVu Sans has them), an
    all-zero confusion matrix, no ECE, empty bins and a diverged model's NaN probabilities: a picture each, tall
    enough for a row per class."""
    from src.callbacks.figures import confusion_figure, font, reliability_diagram
    from src.predict import save_figure

    assert Path(font(12).path).name == "DejaVuSans.ttf"
    names = ["café", "Жук", *(f"class {i}" for i in range(n - 2))]
    matrix = confusion_figure([[0] * n for _ in range(n)], names)
    assert matrix.width >= 16 * n and matrix.height >= 16 * n
    bins = [((i + 0.5) / 15, 1.0 if i == 14 else 0.0, 30 if i == 14 else 0) for i in range(15)]
    assert reliability_diagram(bins, None).size == reliability_diagram(bins, 0.01).size
    title = "a-very-long-file-name-" * 4 + ".png"
    save_figure(Image.new("L", (1, 300)), [float("nan")] * n, names, title, tmp_path / "f.png")
    with Image.open(tmp_path / "f.png") as figure:
        assert figure.height >= 22 * n
