"""Shared builders for tiny datasets in their real on-disk formats, and the composed Hydra config.

Nothing here touches the network, ../shared or /usr/share/datasets: every dataset is written into a
pytest tmp dir and every config override points the datamodules there.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, open_dict, read_write
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
if str(REPO_ROOT) not in sys.path:  # `import src...` also when pytest is started from elsewhere
    sys.path.insert(0, str(REPO_ROOT))

# The tests' models and batches are tiny: with torch's default of one thread per core, every op waits for its
# other threads, and on a small CPU shared with other jobs those waits dominate (a 1-epoch run measured 3x
# slower). One thread, for this process and (inherited) every command it starts, unless set already. Set before
# torch is imported (by the test modules, not here: xdist's controller process never needs torch), which reads it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Started in the background by a script (`make test &`), pytest inherits SIGINT ignored, and so would every command
# it starts: Ctrl-C is delivered as in a terminal (a handler, unlike "ignored", is reset to the default by exec).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """An xdist worker ends here with every result already sent: it skips the interpreter's teardown, which with
    torch and Lightning loaded takes about a second of CPU that the controller waits for."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Test labels with a different count per class (1..5, twice), so confusion-matrix row sums (true class)
# are distinguishable from column sums (predicted class).
UNEVEN_TEST_LABELS = [c for c in range(10) for _ in range(c % 5 + 1)]  # 30 labels


# --- IDX (MNIST / Fashion-MNIST) ------------------------------------------------------------------
def idx_images_bytes(images: np.ndarray) -> bytes:
    """IDX3: magic 0x00000803, big-endian int32 dims (N, rows, cols), then uint8 pixels."""
    assert images.dtype == np.uint8 and images.ndim == 3
    return struct.pack(">iiii", 0x00000803, *images.shape) + images.tobytes()


def idx_labels_bytes(labels: Sequence[int]) -> bytes:
    """IDX1: magic 0x00000801, big-endian int32 N, then uint8 labels."""
    return struct.pack(">ii", 0x00000801, len(labels)) + bytes(int(v) for v in labels)


def class_images(labels: Sequence[int], shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """uint8 noise images whose brightness depends on the class, so the classes are learnable."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    noise = rng.integers(0, 60, size=(len(labels), *shape))
    level = (labels * 19).reshape(-1, *([1] * len(shape)))
    return np.clip(noise + level, 0, 255).astype(np.uint8)


def write_idx(
    folder: Path,
    n_train: int = 80,
    test_labels: Sequence[int] | None = None,
    *,
    gz: bool = False,
    num_classes: int = 10,
    size: int = 28,
) -> dict[str, Path]:
    """Write the four IDX files into `folder` (gzipped as `NAME.gz` when `gz`). Returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = [i % num_classes for i in range(n_train)]
    test_labels = list(UNEVEN_TEST_LABELS if test_labels is None else test_labels)
    content = {
        "train-images-idx3-ubyte": idx_images_bytes(class_images(train_labels, (size, size), seed=1)),
        "train-labels-idx1-ubyte": idx_labels_bytes(train_labels),
        "t10k-images-idx3-ubyte": idx_images_bytes(class_images(test_labels, (size, size), seed=2)),
        "t10k-labels-idx1-ubyte": idx_labels_bytes(test_labels),
    }
    paths = {}
    for name, data in content.items():
        path = folder / (f"{name}.gz" if gz else name)
        path.write_bytes(gzip.compress(data) if gz else data)
        paths[name] = path
    return paths


# --- CIFAR-10 python batches -----------------------------------------------------------------------
def write_cifar_batches(
    root: Path,
    per_batch: int = 12,
    test_labels: Sequence[int] | None = None,
    label_names: Sequence[str] = CIFAR_CLASSES,
) -> Path:
    """Write `root/cifar-10-batches-py/` as torchvision reads it: data_batch_1..5 and test_batch, each a
    pickled dict with "data" (uint8, n x 3072, channel-major) and "labels"; batches.meta with
    "label_names". Returns the batches folder."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    k = len(label_names)

    def dump(name: str, labels: Sequence[int], seed: int) -> None:
        data = class_images(labels, (3072,), seed=seed)
        batch = {
            "batch_label": name,
            "labels": list(labels),
            "data": data,
            "filenames": [f"{i}.png" for i in labels],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)

    for b in range(1, 6):
        dump(f"data_batch_{b}", [(i + b) % k for i in range(per_batch)], seed=b)
    dump("test_batch", [c % k for c in (UNEVEN_TEST_LABELS if test_labels is None else test_labels)], seed=9)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(label_names), "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return folder


# --- image folders ----------------------------------------------------------------------------------
def write_image(path: Path, mode: str, size: tuple[int, int], value: int) -> Path:
    """A noise image of `size` (height, width) whose brightness and noise follow `value`, converted from RGB
    to the PIL `mode` ("L", "RGB", "RGBA", "P", ...); the format follows the suffix. Returns `path`."""
    height, width = size
    rng = np.random.default_rng(value)
    pixels = np.clip(rng.integers(0, 40, size=(height, width, 3)) + value, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB").convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_image_folder(
    root: Path,
    classes: Sequence[str] = ("cat", "dog", "fox"),
    train_per_class: int = 20,
    test_per_class: Sequence[int] | int | None = (4, 8, 12),
    *,
    mode: str = "L",
    size: tuple[int, int] = (28, 28),
    exts: Sequence[str] = (".png", ".jpg"),
) -> Path:
    """`root/train/<class>/*` and (unless `test_per_class` is None) `root/test/<class>/*`, alternating the
    file extensions in `exts`. `test_per_class` may differ per class. Returns `root`."""
    if isinstance(test_per_class, int):
        test_per_class = [test_per_class] * len(classes)
    for c, name in enumerate(classes):
        for i in range(train_per_class):
            write_image(root / "train" / name / f"img{i:03d}{exts[i % len(exts)]}", mode, size, 60 * c + i)
        if test_per_class is not None:
            for i in range(test_per_class[c]):
                write_image(root / "test" / name / f"img{i:03d}{exts[i % len(exts)]}", mode, size, 60 * c + i + 1)
    return root


# --- processes ----------------------------------------------------------------------------------------
def dead_pid() -> int:
    """The pid of a process that has exited (as a writer killed mid-write leaves in its temporary file)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


# --- Hydra config -------------------------------------------------------------------------------------
FAST = [
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "dataset.batch_size=16",
    "dataset.num_workers=0",
]

# For runs whose figures no test looks at: the image grids (test predictions, worst misclassified, a training
# batch) take most of a tiny run's time. The shared fashion_run and test_train's runs keep them.
NO_FIGURES = ["callbacks.prediction_figures=null", "callbacks.train_batch_figure=null"]


def model_batch(datamodule, loader) -> tuple:
    """The first batch of `loader` as the model receives it: the in-memory path normalizes (and, in
    training, augments) uint8 batches after the device transfer, in `on_after_batch_transfer`."""
    return datamodule.on_after_batch_transfer(next(iter(loader)), 0)


def offline_dataset(dataset: str, data_dir: Path) -> list[str]:
    """Overrides that keep a dataset away from the network and any shared copy."""
    overrides = [f"dataset={dataset}", f"dataset.data_dir={data_dir}"]
    if dataset != "image_folder":
        overrides += ["dataset.local_copies=[]", "dataset.download=false"]
    return overrides


def compose_train(overrides: Sequence[str], run_dir: Path, name: str = "train") -> DictConfig:
    """Compose conf/NAME.yaml as `python -m src.NAME` would and prepare Hydra's runtime like run_job does
    (output dir `run_dir`); returns the task config (no `hydra` key), as the task function receives it.
    Whoever calls this resets `HydraConfig.instance().cfg = None` afterwards (compose_cfg does)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    overrides = [*overrides, f"hydra.run.dir={run_dir}"]
    if name in ("train", "evaluate"):
        overrides.append(f"paths.output_dir={run_dir}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    task_cfg = copy.deepcopy(cfg)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    return task_cfg


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """compose_train for one test; the run directory defaults to `tmp_path / "run"`."""
    from hydra.core.hydra_config import HydraConfig

    def _compose(overrides: Sequence[str], run_dir: Path | None = None, name: str = "train") -> DictConfig:
        return compose_train(overrides, run_dir or tmp_path / "run", name)

    yield _compose
    HydraConfig.instance().cfg = None


def one_line_error(command: Callable[[], object], capsys: pytest.CaptureFixture) -> str:
    """What an entry point's main() does with `command`'s error (src/utils/errors.py): exit 1 and one line on
    stderr, no traceback; returns that line. In-process: the commands' own runs are in the slow tier."""
    from src.utils.errors import report_errors

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        report_errors(command)
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


@dataclass(frozen=True)
class Run:
    """A finished training run: its directory, the data and overrides it was trained with, its metrics.json."""

    run_dir: Path
    data_dir: Path
    overrides: list[str]
    metrics: dict

    @property
    def last(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def fashion_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One cnn2 run (`train(cfg)` in-process, one epoch on 80 gzipped Fashion-MNIST-format images), trained once
    per session and shared: tests only read it. evaluate, export, predict and resumed runs write to folders of
    their own (an in-process run has no .hydra folder, so ckpt_path= never continues in it)."""
    from hydra.core.hydra_config import HydraConfig

    from src.train import train

    root = tmp_path_factory.mktemp("fashion_run")
    write_idx(root / "data", n_train=80, gz=True)
    overrides = [*offline_dataset("fashion_mnist", root / "data"), "model=cnn2", *FAST]
    try:
        train(compose_train(overrides, root / "run"))
    finally:
        HydraConfig.instance().cfg = None
    return Run(root / "run", root / "data", overrides, json.loads((root / "run" / "metrics.json").read_text()))


# --- the CLI -----------------------------------------------------------------------------------------
def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m src.train ARGS` from the repository root, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "src.train", *args],
        cwd=REPO_ROOT,
        env={**cli_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class CreatesFileWhenUnpickled:
    """What a hostile checkpoint or data file holds: unpickling it calls Path.touch(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))
