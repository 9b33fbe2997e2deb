"""Training throughput, in one process on the same model, batch size and data:

  (a) the seeds' plain PyTorch loop: DataLoader over the torchvision dataset with ToTensor, num_workers=0
  (b) a plain PyTorch loop over in-memory tensors (the practical limit)
  (c) this project's Lightning training path (datamodule + ClassifierModule + Trainer, as src.train builds it)

    python -m benchmarks.throughput [--steps 150] [--data-dir data]

Prints images/second for each and the ratios c/a and c/b: cnn2 on Fashion-MNIST at batch 64 and 256, cnn3 on
CIFAR-10-shaped data at batch 128 (random pixels in CIFAR's shape: the cost does not depend on the content).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms as T

from src.classifier import ClassifierModule
from src.data.common import ImageClassificationDataModule
from src.data.mnist import FashionMNISTDataModule
from src.models.cnn2 import CNN2
from src.models.cnn3 import CNN3


def plain_loop(model: nn.Module, loader: DataLoader, steps: int, warmup: int = 10) -> float:
    """Images/s of a textbook loop (forward, cross-entropy, backward, Adam step) after `warmup` steps."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    seen, start, step = 0, 0.0, 0
    while step < steps + warmup:
        for x, y in loader:
            if step == warmup:
                seen, start = 0, time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            seen += len(x)
            step += 1
            if step == steps + warmup:
                break
    return seen / (time.perf_counter() - start)


class _Clock(L.Callback):
    """Times training steps after a warm-up, as plain_loop does."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.seen, self.start, self.end = warmup, 0, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        if trainer.global_step >= self.warmup:
            self.seen += len(batch[1])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self.end = time.perf_counter()


def lightning_path(make_net: Callable[[], nn.Module], datamodule: ImageClassificationDataModule, steps: int) -> float:
    """Images/s of our ClassifierModule under Lightning's Trainer, with the project's default trainer settings
    that affect the hot path (logging every 50 steps), but no validation, checkpoints or progress bar."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = ClassifierModule(
        make_net(),
        class_names=datamodule.class_names,
        input_shape=datamodule.input_shape,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
    )
    clock = _Clock(warmup=10)
    trainer = L.Trainer(
        max_steps=steps + 10,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        log_every_n_steps=50,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=datamodule)
    return clock.seen / (clock.end - clock.start)


def fashion_cases(data_dir: str, steps: int) -> list[tuple[str, float, float, float]]:
    rows = []
    for batch in (64, 256):
        datamodule = FashionMNISTDataModule(
            data_dir=data_dir, local_copies=["/usr/share/datasets/fashion-mnist"], batch_size=batch, num_workers=0
        )
        datamodule.prepare_data()
        seed_data = datamodule.dataset_class(data_dir, train=True, transform=T.ToTensor())
        a = plain_loop(CNN2((1, 28, 28), 10), DataLoader(seed_data, batch_size=batch, shuffle=True), steps)
        images = seed_data.data.unsqueeze(1).float().div(255)
        memory = DataLoader(TensorDataset(images, seed_data.targets), batch_size=batch, shuffle=True)
        b = plain_loop(CNN2((1, 28, 28), 10), memory, steps)
        c = lightning_path(lambda: CNN2((1, 28, 28), 10), datamodule, steps)
        rows.append((f"cnn2 Fashion-MNIST batch {batch}", a, b, c))
    return rows


def cifar_case(steps: int) -> tuple[str, float, float, float]:
    """CIFAR-10-shaped data: (a) and (c) decode PIL images per sample as torchvision's CIFAR10 does."""
    from PIL import Image

    n, batch = 4096, 128
    pixels = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))

    class PilCifar(torch.utils.data.Dataset):
        def __init__(self, transform: Callable | None = None) -> None:
            self.transform = transform

        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int):
            image = Image.fromarray(pixels[i].numpy())
            return (self.transform(image) if self.transform else image), int(labels[i])

    class SyntheticCifar(ImageClassificationDataModule):
        def load(self, train: bool) -> torch.utils.data.Dataset:
            self.class_names, self.input_shape = [str(i) for i in range(10)], (3, 32, 32)
            return PilCifar()

    a = plain_loop(CNN3((3, 32, 32), 10), DataLoader(PilCifar(T.ToTensor()), batch_size=batch, shuffle=True), steps)
    images = pixels.permute(0, 3, 1, 2).float().div(255)
    b = plain_loop(
        CNN3((3, 32, 32), 10), DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True), steps
    )
    c = lightning_path(lambda: CNN3((3, 32, 32), 10), SyntheticCifar(batch_size=batch, num_workers=0), steps)
    return ("cnn3 CIFAR-10-shaped batch 128", a, b, c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="timed training steps per measurement")
    parser.add_argument("--data-dir", default="data", help="where Fashion-MNIST is (or is staged)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [*fashion_cases(args.data_dir, args.steps), cifar_case(args.steps)]
    print(f"\n{'case':34} {'(a) seed loop':>14} {'(b) in-memory':>14} {'(c) ours':>10} {'c/a':>6} {'c/b':>6}")
    for name, a, b, c in rows:
        print(f"{name:34} {a:14.0f} {b:14.0f} {c:10.0f} {c / a:6.2f} {c / b:6.2f}")
    print(f"images/second, {args.steps} timed steps each, torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
