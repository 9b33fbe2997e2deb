"""Where the time of a training step goes besides the model: our path (c of `benchmarks.throughput`) with a
model that costs almost nothing (784 -> 10 linear, Fashion-MNIST, batch 64), against the hand-written loop
(b') with the same model, and with parts of our path taken away one at a time:

    python -m benchmarks.step_overhead [--steps 1000] [--rounds 3] [--data-dir data]

Prints milliseconds per step (median of the rounds, the paths run in turn within a round) and each part's share
of the difference (the median of the rounds' own differences):
the train metrics (each step's loss and correct predictions kept, summed once an epoch), our callbacks,
logger and progress bar, and what is left: Lightning's own loop (data fetcher, batch-transfer hooks, optimizer
closure, hook calls).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn
from torchvision import datasets
from torchvision import transforms as T

from benchmarks import throughput
from src.data.mnist import FashionMNISTDataModule
from src.models.classifier import ClassifierModule
from src.runs.record import skip_missing_nvml
from src.utils.command import keep_freed_memory

BATCH = 64
LINEAR = ["model=mlp", "model.hidden=[]"]  # flatten + one 784 -> 10 linear layer, as `tiny` below
QUIET = ["callbacks=none", "logger=none", "trainer.enable_progress_bar=false", "++trainer.enable_checkpointing=false"]


def tiny() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def without_metrics(module: ClassifierModule, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
    """ClassifierModule.training_step less its metric updates and logging: the loss alone."""
    x, y = batch
    return module.loss(module(x), y)


def ours(overrides: list[str], steps: int, lean: bool) -> float:
    original = ClassifierModule.training_step
    if lean:
        ClassifierModule.training_step = without_metrics
    try:
        return throughput.our_path(overrides, steps)
    finally:
        ClassifierModule.training_step = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", default="data", help="where Fashion-MNIST is (or is staged)")
    args = parser.parse_args()
    keep_freed_memory()
    skip_missing_nvml()  # for every path: importing Lightning set it for the whole process
    torch.manual_seed(0)
    FashionMNISTDataModule(data_dir=args.data_dir, local_copies=["/usr/share/datasets/fashion-mnist"]).prepare_data()
    seed_data = datasets.FashionMNIST(args.data_dir, train=True, transform=T.ToTensor())
    images, labels = seed_data.data.unsqueeze(1), seed_data.targets
    data = ["dataset=fashion_mnist", f"dataset.data_dir={args.data_dir}", f"dataset.batch_size={BATCH}"]
    paths = {
        "hand-written loop (b')": lambda: throughput.in_memory(tiny, images, labels, BATCH, args.steps, True),
        "ours (c)": lambda: ours([*LINEAR, *data], args.steps, lean=False),
        "ours without train metrics": lambda: ours([*LINEAR, *data], args.steps, lean=True),
        "ours without metrics, callbacks, logger, bar": lambda: ours([*LINEAR, *data, *QUIET], args.steps, lean=True),
    }
    ms = [[1000 * BATCH / v for v in values] for values in throughput.rounds(paths, args.rounds)]
    for name, values in zip(paths, ms, strict=True):
        print(f"{name:48}{statistics.median(values):8.3f} ms/step")

    def more(x: list[float], y: list[float]) -> float:  # what x costs over y: the rounds' own differences
        return statistics.median(a - b for a, b in zip(x, y, strict=True))

    loop, full, lean, bare = ms
    print(f"\nour path costs {more(full, loop):.3f} ms a step more than the hand-written loop:")
    print(f"  train metrics                      {more(full, lean):.3f} ms")
    print(f"  callbacks, logger, progress bar    {more(lean, bare):.3f} ms")
    print(f"  Lightning's loop and data fetching {more(bare, loop):.3f} ms")
    print(f"median of {args.rounds} rounds of {args.steps} steps, batch {BATCH}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
