"""`src.export`: every model family, trained one tiny epoch on data in a real on-disk format, exported to ONNX
and TorchScript; the exported files give PyTorch's classes on the run's test images, carry their metadata,
take any batch size, and fail with one line when they cannot be exported or disagree with PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import (
    CIFAR_CLASSES,
    FASHION_CLASSES,
    FAST,
    REPO_ROOT,
    CreatesFileWhenUnpickled,
    cli_env,
    offline_dataset,
    write_cifar_batches,
    write_idx,
    write_image_folder,
)
from omegaconf import DictConfig
from torch import nn
from torchvision.datasets import MNIST

from src.data import DataError
from src.export import Exportable, export
from src.runs.checkpoints import METADATA, ExportError, open_exported, open_run
from src.utils.errors import UserError, one_line

pytestmark = pytest.mark.slow  # the module's runs fixture trains five models; fast tier: tests/test_predict.py

NO_FIGURES = ["callbacks.prediction_figures=null", "callbacks.train_batch_figure=null"]

# One run per model family, each on another real format and data path.
FAMILIES = {
    "mlp": ("fashion_mnist", []),
    "cnn2": ("mnist", ["dataset.in_memory=false"]),  # the per-sample torchvision path
    "lenet": ("image_folder", []),  # grayscale PNG/JPEG class folders
    "cnn3": ("cifar10", []),
    "bn_convnet": ("image_folder_rgb", ["model.widths=[8,16,16]", "model.stem=8"]),
}


def compose(config: str, overrides: list[str], runtime: bool = True) -> DictConfig:
    """A config as `python -m src.<config>` composes it; `runtime`: with Hydra's runtime set up (train needs it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config, overrides=overrides, return_hydra_config=runtime)
    if runtime:
        HydraConfig.instance().set_config(cfg)
    return cfg


def write_data(kind: str, root: Path) -> tuple[str, list[str]]:
    """Tiny data of `kind` in its real format under `root`; returns (dataset config, class names)."""
    if kind in ("fashion_mnist", "mnist"):
        write_idx(root / "MNIST" / "raw" if kind == "mnist" else root, n_train=60, gz=kind == "fashion_mnist")
        return kind, FASHION_CLASSES if kind == "fashion_mnist" else MNIST.classes
    if kind == "cifar10":
        write_cifar_batches(root, per_batch=12)
        return kind, CIFAR_CLASSES
    mode, size = ("RGB", (32, 32)) if kind == "image_folder_rgb" else ("L", (28, 28))
    write_image_folder(root, train_per_class=12, test_per_class=(4, 8, 12), mode=mode, size=size)
    return "image_folder", ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, list[str]]]]:
    """model -> (last.ckpt of a one-epoch run, class names), trained once for the whole module."""
    from hydra.core.hydra_config import HydraConfig

    from src.train import train

    root = tmp_path_factory.mktemp("export")
    trained = {}
    for model, (kind, extra) in FAMILIES.items():
        dataset, class_names = write_data(kind, root / kind)
        run = root / "runs" / model
        overrides = [*offline_dataset(dataset, root / kind), f"model={model}", *FAST, *NO_FIGURES, *extra]
        train(compose("train", [*overrides, f"hydra.run.dir={run}", f"paths.output_dir={run}"]))
        trained[model] = (run / "checkpoints" / "last.ckpt", class_names)
    yield trained
    HydraConfig.instance().cfg = None  # as conftest's compose_cfg leaves it


def export_cfg(*overrides: str) -> DictConfig:
    return compose("export", list(overrides), runtime=False)


def split_images(ckpt: Path) -> torch.Tensor:
    """The run's test images in [0, 1], through the datamodule of its own config (as export reads them)."""
    from src.export import parity_batches

    return torch.cat(parity_batches(open_run(ckpt, {"mean": [0.0], "std": [1.0]})[1], 1000))


def pytorch_probabilities(ckpt: Path, images: torch.Tensor) -> torch.Tensor:
    """The checkpoint's own model on the normalized images, as src.predict runs it."""
    from torchvision import transforms as T

    module = open_run(ckpt)[0]
    with torch.no_grad():
        return module(T.Normalize(module.hparams.mean, module.hparams.std)(images)).softmax(-1)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("model", list(FAMILIES))
def test_export_gives_pytorchs_classes_and_carries_class_names(
    runs: dict, model: str, fmt: str, capsys: pytest.CaptureFixture
) -> None:
    ckpt, class_names = runs[model]
    out = export(export_cfg(f"ckpt_path={ckpt}", f"format={fmt}"))
    suffix = {"onnx": ".onnx", "torchscript": ".pt"}[fmt]
    assert out == ckpt.with_suffix(suffix) and out.is_file()  # default: beside the checkpoint
    printed = capsys.readouterr().out
    assert "with PyTorch's class, largest probability difference" in printed and f"exported {out}" in printed

    images = split_images(ckpt)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    exported = open_exported(out.read_bytes(), fmt, str(out))
    assert exported.class_names == class_names
    assert exported.input_shape == list(open_run(ckpt)[0].hparams.input_shape)
    expected = pytorch_probabilities(ckpt, images)
    for batch in (images, images[:1], images[:7]):  # any batch size, also one other than the export's example
        got = exported.logits(batch).softmax(-1)
        assert got.shape == (len(batch), len(class_names))
        assert torch.equal(got.argmax(-1), expected[: len(batch)].argmax(-1))
        assert float((got - expected[: len(batch)]).abs().max()) <= 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_run_with_test_time_augmentation_exports_it(runs: dict, tmp_path: Path, fmt: str) -> None:
    """The exported model averages the same views as src.predict does with the checkpoint (tta=mirror_translate)."""
    from torchvision import transforms as T

    content = torch.load(runs["bn_convnet"][0], weights_only=True)
    content["hyper_parameters"]["config"]["tta"] = "mirror_translate"
    torch.save(content, ckpt := tmp_path / "tta.ckpt")
    exported = open_exported(export(export_cfg(f"ckpt_path={ckpt}", f"format={fmt}")).read_bytes(), fmt, "x")
    images, module = split_images(ckpt), open_run(ckpt)[0]
    with torch.no_grad():
        expected = module.predict_step(T.Normalize(module.hparams.mean, module.hparams.std)(images))
    got = exported.logits(images).softmax(-1)
    assert float((got - expected).abs().max()) <= 1e-4
    assert float((got - pytorch_probabilities(ckpt, images)).abs().max()) > 1e-4  # not the plain model's


def test_onnx_file_runs_with_onnxruntime_alone_and_holds_its_metadata(runs: dict) -> None:
    """What a user of the .onnx file sees: input "images" with a free batch axis, output "logits", and the
    metadata properties as JSON."""
    ckpt, class_names = runs["cnn3"]
    out = export(export_cfg(f"ckpt_path={ckpt}", f"out={ckpt.parent / 'shipped' / 'model.onnx'}"))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(float)", [3, 32, 32])
    assert isinstance(inp.shape[0], str)  # a named, dynamic batch axis
    assert outp.name == "logits" and outp.shape[1:] == [len(class_names)]
    meta = session.get_modelmeta().custom_metadata_map
    assert set(METADATA) <= set(meta)
    assert json.loads(meta["class_names"]) == class_names and json.loads(meta["input_shape"]) == [3, 32, 32]
    module = open_run(ckpt)[0]
    assert json.loads(meta["mean"]) == pytest.approx(list(module.hparams.mean))
    assert json.loads(meta["std"]) == pytest.approx(list(module.hparams.std))
    images = split_images(ckpt)
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    probs = torch.from_numpy(logits).softmax(-1)
    assert np.array_equal(probs.argmax(-1).numpy(), pytorch_probabilities(ckpt, images).argmax(-1).numpy())


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_file_holds_its_metadata_as_extra_files(runs: dict) -> None:
    ckpt, class_names = runs["lenet"]
    out = export(export_cfg(f"ckpt_path={ckpt}", "format=torchscript"))
    files = {f"{key}.json": "" for key in METADATA}
    script = torch.jit.load(str(out), _extra_files=files)
    assert json.loads(files["class_names.json"]) == class_names
    assert json.loads(files["input_shape.json"]) == [1, 28, 28]
    assert script(torch.rand(5, 1, 28, 28)).shape == (5, 3)


class BatchOfTwoIsSpecial(nn.Module):
    """Branches on the batch size: torch.export cannot keep the batch axis free, and torch.jit.trace bakes in
    the branch of its example batch (two images), so the TorchScript file disagrees with PyTorch."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return logits if x.shape[0] == 2 else -logits


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # what the doctored model is about
@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("onnx", "BatchOfTwoIsSpecial cannot be exported to ONNX: "),
        ("torchscript", "the torchscript export disagrees with PyTorch ("),
    ],
)
def test_unexportable_or_disagreeing_model_is_one_line_and_writes_nothing(
    runs: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fmt: str, expected: str
) -> None:
    import src.export

    def doctored(path: Path, dataset: dict | None = None) -> tuple[nn.Module, object]:
        module, datamodule = open_run(path, dataset)
        module.net = BatchOfTwoIsSpecial(module.net)
        return module, datamodule

    monkeypatch.setattr(src.export, "open_run", doctored)
    ckpt, _ = runs["cnn2"]
    out = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt")
    with pytest.raises(ExportError) as error:
        export(export_cfg(f"ckpt_path={ckpt}", f"format={fmt}", f"out={out}"))
    message = str(error.value)
    assert message.startswith(expected) and "\n" not in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_exported_model_normalizes_inside(runs: dict) -> None:
    """The exported network sees what the checkpoint's network sees: (images - mean) / std."""
    ckpt, _ = runs["mlp"]
    module = open_run(ckpt)[0]
    images = torch.rand(4, 1, 28, 28)
    mean, std = module.hparams.mean[0], module.hparams.std[0]
    with torch.no_grad():
        assert torch.allclose(Exportable(module)(images), module.net((images - mean) / std), atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["format=tflite"], "format='tflite' is not one of onnx, torchscript"),
        (["out=model.onnx", "format=torchscript"], "a torchscript file must end in .pt"),
        (["parity_images=0"], "parity_images must be a positive integer"),
    ],
)
def test_bad_options_are_one_line(runs: dict, overrides: list[str], expected: str) -> None:
    ckpt, _ = runs["mlp"]
    with pytest.raises(UserError, match=expected):
        export(export_cfg(f"ckpt_path={ckpt}", *overrides))


def test_data_elsewhere_is_read_with_dataset_data_dir(runs: dict, tmp_path: Path) -> None:
    """As with evaluate: `dataset.data_dir=` points the run's datamodule at another copy of the data."""
    ckpt, _ = runs["mlp"]
    write_idx(tmp_path / "copy", n_train=60, gz=True)
    out = export(export_cfg(f"ckpt_path={ckpt}", f"dataset.data_dir={tmp_path / 'copy'}", f"out={tmp_path / 'm.onnx'}"))
    assert out.is_file()
    with pytest.raises(DataError, match="not found"):
        export(export_cfg(f"ckpt_path={ckpt}", f"dataset.data_dir={tmp_path / 'empty'}"))


def test_hostile_checkpoint_is_one_line_exit_1_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "shared.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": CreatesFileWhenUnpickled(marker)}, ckpt)
    result = subprocess.run(
        [sys.executable, "-m", "src.export", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=REPO_ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {ckpt} refused: loading it would run code (it names ")
    assert not marker.exists() and not ckpt.with_suffix(".onnx").exists()


def test_unreadable_checkpoint_is_one_line(tmp_path: Path) -> None:
    """The same error story as the hostile one (report_errors: one line, exit 1), in-process."""
    ckpt = tmp_path / "cut.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(UserError) as error:
        export(export_cfg(f"ckpt_path={ckpt}"))
    assert one_line(error.value).startswith(f"{ckpt} is not a readable checkpoint (")
    assert "\n" not in one_line(error.value) and not ckpt.with_suffix(".onnx").exists()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_calibrated_checkpoints_temperature_is_inside_the_exported_model(
    runs: dict, tmp_path: Path, fmt: str
) -> None:
    import shutil

    from src.runs.tuning import store_temperature

    ckpt = tmp_path / "calibrated.ckpt"
    shutil.copy(runs["mlp"][0], ckpt)
    store_temperature(ckpt, 3.0)
    out = export(export_cfg(f"ckpt_path={ckpt}", f"format={fmt}"))
    images = split_images(ckpt)
    got = open_exported(out.read_bytes(), fmt, str(out)).logits(images).softmax(-1)
    calibrated = pytorch_probabilities(ckpt, images)  # ClassifierModule divides by its temperature
    assert float((got - calibrated).abs().max()) <= 1e-4
    assert float((calibrated - pytorch_probabilities(runs["mlp"][0], images)).abs().max()) > 1e-3  # T mattered
