"""The yardstick: a plain Lightning script, as a user would write one for the same task as `python -m src.train`,
with nothing else. The same network (conf/model/NAME.yaml), the same IDX files, batch size, split sizes and
normalization; a LightningModule whose training/validation/test steps log loss and accuracy, `ModelCheckpoint`
on val loss, `CSVLogger`, `Trainer.fit`, then `Trainer.test(ckpt_path="best")`; the Trainer's defaults otherwise.

    python -m benchmarks.bare_lightning --data-dir DIR [--model cnn3] [--limit-batches 1] [--max-epochs 1]

`DIR` holds torchvision's layout (`DIR/MNIST/raw/` or `DIR/FashionMNIST/raw/`, as src.train stages it).
`benchmarks.startup` times it against src.train; `benchmarks.throughput` times `BareModule`'s steps.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchvision import datasets
from torchvision import transforms as T

CONF = "conf"


class BareModule(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/acc", (logits.argmax(dim=1) == y).float().mean(), prog_bar=True)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="MNIST", choices=["MNIST", "FashionMNIST"])
    parser.add_argument("--model", default="cnn3")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-epochs", type=int, default=1)
    parser.add_argument("--limit-batches", type=int, default=None, help="train, val and test batches")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    L.seed_everything(42)
    transform = T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.5,))])
    dataset = getattr(datasets, args.dataset)
    train = dataset(args.data_dir, train=True, transform=transform)
    n_val = round(0.1 * len(train))
    train, val = random_split(train, [len(train) - n_val, n_val], generator=torch.Generator().manual_seed(42))
    test = dataset(args.data_dir, train=False, transform=transform)
    with open(f"{CONF}/model/{args.model}.yaml") as f:  # the same network, built without Hydra
        settings = yaml.safe_load(f)
    module, _, name = settings.pop("_target_").rpartition(".")
    net = getattr(importlib.import_module(module), name)(input_shape=(1, 28, 28), num_classes=10, **settings)
    output_dir = args.output_dir or tempfile.mkdtemp()
    trainer = L.Trainer(
        max_epochs=args.max_epochs,
        limit_train_batches=args.limit_batches,
        limit_val_batches=args.limit_batches,
        limit_test_batches=args.limit_batches,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(monitor="val/loss")],
        logger=L.pytorch.loggers.CSVLogger(output_dir),
        default_root_dir=output_dir,
    )
    model = BareModule(net)
    trainer.fit(model, DataLoader(train, args.batch_size, shuffle=True), DataLoader(val, args.batch_size))
    trainer.test(model, DataLoader(test, args.batch_size), ckpt_path="best")


if __name__ == "__main__":
    sys.exit(main())
