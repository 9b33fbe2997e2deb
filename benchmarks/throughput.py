"""Training throughput, in one process on the same model, batch size and data:

  (a)  the seeds' plain PyTorch loop: DataLoader over the torchvision dataset with ToTensor, num_workers=0
  (b)  a plain PyTorch loop over in-memory tensors: normalized float images sliced with a shuffled index
  (b') the same loop with the model and images in channels-last memory, as our path runs them
  (l)  the bare Lightning module of benchmarks/bare_lightning.py on (b')'s batches and memory format, in a
       Trainer with that script's callbacks and logger (ModelCheckpoint, CSVLogger): what Lightning itself costs
  (c)  this project's training path as `python -m src.train` builds it from conf/train.yaml (datamodule with
       its default in-memory path, ClassifierModule, Trainer with the run's callbacks, logger and progress bar)

    python -m benchmarks.throughput [--steps 200] [--data-dir data]

Prints images/second and the ratios c/a, c/b, c/b' and c/l, then `worst c/l = X.XX` and
`worst c/b' at batch >= 256 = Y.YY` (the smallest, for scripts):
cnn2 on Fashion-MNIST at batch 64 and 256, cnn3 on
CIFAR-10-shaped data at batch 128 (random pixels written as CIFAR-10 pickle batches: the cost of a step does
not depend on the content). All use Adam (lr 1e-3), fp32 and no augmentation. Steps are timed after a warm-up;
the paths run in turn, `--rounds` times; images/s are the median of the rounds, and a ratio is the median of the
rounds' own ratios: a CPU step's speed drifts by 10-30% with what ran before it in the process, and the paths of
one round, measured side by side, drift together. The process starts with `keep_freed_memory()`, as
`python -m src.train` does, so all paths get the same allocator.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from benchmarks.bare_lightning import BareModule
from src.data.mnist import FashionMNISTDataModule
from src.runs.record import build_trainer, skip_missing_nvml
from src.train import build_module
from src.utils.command import keep_freed_memory

CONF = Path(__file__).resolve().parent.parent / "conf"


class UncheckedCIFAR10(datasets.CIFAR10):
    """torchvision's reader for the random CIFAR-shaped batches below (they cannot match the official MD5s)."""

    def _check_integrity(self) -> bool:
        return True

    def _load_meta(self) -> None:
        self.classes = [str(i) for i in range(10)]


def model(name: str, input_shape: tuple[int, int, int]) -> nn.Module:
    """The network exactly as conf/model/NAME.yaml configures it (the models have no Python defaults)."""
    return instantiate(OmegaConf.load(CONF / "model" / f"{name}.yaml"), input_shape=input_shape, num_classes=10)


WARMUP = 10


def plain_loop(model: nn.Module, batches: Iterable, steps: int) -> float:
    """Images/s of a textbook loop (forward, cross-entropy, backward, Adam step) after a warm-up."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    seen, start, step = 0, 0.0, 0
    while step < steps + WARMUP:
        for x, y in batches:
            if step == WARMUP:
                seen, start = 0, time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            seen += len(x)
            step += 1
            if step == steps + WARMUP:
                break
    return seen / (time.perf_counter() - start)


class InMemoryBatches:
    """The practical limit of loading: one shuffled gather per batch from a normalized float tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, channels_last: bool) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        if channels_last:
            self.images = images.contiguous(memory_format=torch.channels_last)

    def __iter__(self):
        for index in torch.randperm(len(self.labels)).split(self.batch_size):
            yield self.images[index], self.labels[index]


def in_memory(
    make_model, images: torch.Tensor, labels: torch.Tensor, batch: int, steps: int, nhwc: bool, bare: bool = False
) -> float:
    """(b), or (b') with `nhwc`, or (l) with `bare`: images are uint8 (N, C, H, W), normalized once up front."""
    pixels = images.float().div(255)
    pixels = (pixels - pixels.mean()) / pixels.std()
    model = make_model().to(memory_format=torch.channels_last) if nhwc else make_model()
    batches = InMemoryBatches(pixels, labels, batch, channels_last=nhwc)
    return bare_lightning(model, batches, steps) if bare else plain_loop(model, batches, steps)


def bare_lightning(model: nn.Module, batches: InMemoryBatches, steps: int) -> float:
    """(l): BareModule in a Trainer as benchmarks/bare_lightning.py builds it, no validation."""
    clock = _Clock()
    with tempfile.TemporaryDirectory() as out:
        trainer = L.Trainer(
            max_steps=steps + WARMUP, limit_val_batches=0, accelerator="cpu", devices=1, enable_model_summary=False,
            callbacks=[ModelCheckpoint(), clock], logger=CSVLogger(out), default_root_dir=out,
        )  # fmt: skip
        trainer.fit(BareModule(model), batches)
    return clock.seen / (clock.end - clock.start)


class _Clock(L.Callback):
    """Times training steps after the warm-up, as plain_loop does."""

    def __init__(self) -> None:
        self.seen, self.start, self.end = 0, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == WARMUP:
            self.start = time.perf_counter()
        if trainer.global_step >= WARMUP:
            self.seen += len(batch[1])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self.end = time.perf_counter()


def our_path(overrides: list[str], steps: int) -> float:
    """(c): the run `python -m src.train OVERRIDES` would do, for `steps` training steps (no validation)."""
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(str(CONF), version_base="1.3"):
        run = [
            f"paths.output_dir={out}",
            f"trainer.max_steps={steps + WARMUP}",
            "trainer.max_epochs=-1",
            "trainer.limit_val_batches=0",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.enable_model_summary=false",
        ]
        cfg = compose("train", overrides=[*overrides, *run])
        L.seed_everything(cfg.seed, verbose=False)
        datamodule = instantiate(cfg.dataset)
        datamodule.prepare_data()
        datamodule.setup("fit")
        module = build_module(cfg, datamodule)
        trainer = build_trainer(cfg)
        clock = _Clock()
        trainer.callbacks.append(clock)
        trainer.fit(module, datamodule=datamodule)
    return clock.seen / (clock.end - clock.start)


def rounds(paths: dict[str, Callable[[], float]], n: int) -> list[list[float]]:
    """Images/s of each path in each of `n` rounds, the paths run in turn within a round."""
    results: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(n):
        for name, measure in paths.items():
            gc.collect()
            gc.freeze()  # what src.train does before fitting: the collector skips what setup left behind
            results[name].append(measure())
    return list(results.values())


def ratio(ours: list[float], other: list[float]) -> float:
    """The median over rounds of ours/other, each taken within one round."""
    return statistics.median(c / x for c, x in zip(ours, other, strict=True))


def fashion_case(seed_data: datasets.FashionMNIST, data_dir: str, batch: int, steps: int, n: int) -> list[list[float]]:
    images, labels = seed_data.data.unsqueeze(1), seed_data.targets
    dataset = ["dataset=fashion_mnist", f"dataset.data_dir={data_dir}", f"dataset.batch_size={batch}"]
    return rounds(
        {
            "a": lambda: plain_loop(model("cnn2", (1, 28, 28)), DataLoader(seed_data, batch, shuffle=True), steps),
            "b": lambda: in_memory(lambda: model("cnn2", (1, 28, 28)), images, labels, batch, steps, False),
            "b'": lambda: in_memory(lambda: model("cnn2", (1, 28, 28)), images, labels, batch, steps, True),
            "l": lambda: in_memory(lambda: model("cnn2", (1, 28, 28)), images, labels, batch, steps, True, True),
            "c": lambda: our_path(["model=cnn2", *dataset], steps),
        },
        n,
    )


def fashion_cases(data_dir: str, steps: int, n: int) -> list[tuple[str, list[list[float]]]]:
    FashionMNISTDataModule(data_dir=data_dir, local_copies=["/usr/share/datasets/fashion-mnist"]).prepare_data()
    seed_data = datasets.FashionMNIST(data_dir, train=True, transform=T.ToTensor())
    return [(f"cnn2 Fashion-MNIST batch {b}", fashion_case(seed_data, data_dir, b, steps, n)) for b in (64, 256)]


def write_cifar_shaped(folder: Path, n_per_batch: int) -> None:
    """Random pixels in CIFAR-10's on-disk format (five train batches, a test batch, batches.meta)."""
    import pickle

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        content = {
            "data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, n_per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(content))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))


def cifar_case(steps: int, n: int) -> tuple[str, list[list[float]]]:
    batch = 128
    with tempfile.TemporaryDirectory() as root:
        write_cifar_shaped(Path(root) / "cifar-10-batches-py", n_per_batch=1000)
        seed_data = UncheckedCIFAR10(root, train=True, transform=T.ToTensor())
        images, labels = torch.from_numpy(seed_data.data).permute(0, 3, 1, 2), torch.tensor(seed_data.targets)
        dataset = ["dataset=cifar10", f"dataset.data_dir={root}", f"dataset.batch_size={batch}"]
        no_augmentation = ["dataset.hflip=false", "dataset.rotation=0"]
        paths = {
            "a": lambda: plain_loop(model("cnn3", (3, 32, 32)), DataLoader(seed_data, batch, shuffle=True), steps),
            "b": lambda: in_memory(lambda: model("cnn3", (3, 32, 32)), images, labels, batch, steps, False),
            "b'": lambda: in_memory(lambda: model("cnn3", (3, 32, 32)), images, labels, batch, steps, True),
            "l": lambda: in_memory(lambda: model("cnn3", (3, 32, 32)), images, labels, batch, steps, True, True),
            "c": lambda: our_path(["model=cnn3", *dataset, *no_augmentation], steps),
        }
        return ("cnn3 CIFAR-10-shaped batch 128", rounds(paths, n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed training steps per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="measurements per path (the median is shown)")
    parser.add_argument("--data-dir", default="data", help="where Fashion-MNIST is (or is staged)")
    args = parser.parse_args()
    keep_freed_memory()
    skip_missing_nvml()  # for every path: importing Lightning set it for the whole process
    torch.manual_seed(0)
    rows = [*fashion_cases(args.data_dir, args.steps, args.rounds), cifar_case(args.steps, args.rounds)]
    header = ["(a) seed loop", "(b) in-memory", "(b') +NHWC", "(l) Lightning", "(c) ours", "c/a", "c/b", "c/b'", "c/l"]
    print(f"\n{'case':32}" + "".join(f"{h:>15}" for h in header[:5]) + "".join(f"{h:>7}" for h in header[5:]))
    for name, paths in rows:
        print(f"{name:32}" + "".join(f"{statistics.median(p):15.0f}" for p in paths) + "".join(
            f"{ratio(paths[-1], p):7.2f}" for p in paths[:-1]))  # fmt: skip
    print(
        f"images/second, median of {args.rounds} rounds of {args.steps} timed steps; ratios: median of the rounds' "
        f"own, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"worst c/l = {min(ratio(paths[4], paths[3]) for _, paths in rows):.2f}")
    big = [ratio(paths[4], paths[2]) for name, paths in rows if int(name.rsplit(" ", 1)[1]) >= 256]
    print(f"worst c/b' at batch >= 256 = {min(big):.2f}")


if __name__ == "__main__":
    main()
