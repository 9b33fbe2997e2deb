"""A run's fixed cost against the bare Lightning script (benchmarks/bare_lightning.py), each a fresh process on the
same Fashion-MNIST IDX files with warm `.pyc` files, run in turn (paired), median of `--runs`:

- whole run: a 1-batch fit, validation and test, with all of a run's usual outputs (ours: TensorBoard,
  checkpoints, metrics.json, confusion matrix and the other figures, job status; bare: CSV log, checkpoint);
- first step: from the command to the first training step (which exits the process at once).

    python -m benchmarks.startup [--fashion-mnist DIR] [--runs 5]

DIR holds the four Fashion-MNIST IDX files, plain or gzipped (default: Debian's dataset-fashion-mnist, which
every machine here can install; MNIST's files have the same format and sizes, so the costs are MNIST's too).
Prints each pair, the medians and `whole run ours/bare = X` and `first step ours/bare = Y`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The same exit for both: Lightning's training loop ends the process when it reaches its first batch.
FIRST_STEP_EXITS = """
import os, runpy, sys
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
_TrainingEpochLoop.advance = lambda *args, **kwargs: os._exit(0)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__")
"""


def commands(data_dir: Path, out: Path) -> dict[str, list[str]]:
    one = "trainer.limit_{}_batches=1"
    ours = ["dataset=fashion_mnist", f"dataset.data_dir={data_dir}", "dataset.download=false", "trainer.max_epochs=1",
            *(one.format(split) for split in ("train", "val", "test")), f"hydra.run.dir={out / 'ours'}"]  # fmt: skip
    bare = ["--data-dir", str(data_dir), "--dataset", "FashionMNIST", "--limit-batches", "1", "--output-dir",
            str(out / "bare")]  # fmt: skip
    return {"ours": ["src.train", *ours], "bare": ["benchmarks.bare_lightning", *bare]}


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fashion-mnist", default="/usr/share/datasets/fashion-mnist", help="the four IDX files")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"  # staged once, as src.train does (the first, untimed, run)
        subprocess.run([sys.executable, "-c", "from src.data.mnist import FashionMNISTDataModule as D; "
                        f"D(data_dir='{data}', local_copies=['{args.fashion_mnist}'], download=False).prepare_data()"],
                       check=True)  # fmt: skip
        times: dict[str, list[float]] = {f"{what} {who}": [] for what in ("whole run", "first step")
                                         for who in ("ours", "bare")}  # fmt: skip
        for i in range(args.runs + 1):  # the first round warms caches (.pyc, decoded images): not counted
            # Each process its own output folder: ours continues a run found in its folder, never starts anew.
            whole_runs, first_steps = commands(data, Path(tmp) / f"{i}-whole"), commands(data, Path(tmp) / f"{i}-first")
            for who in whole_runs:
                whole, first = timed(["-m", *whole_runs[who]]), timed(["-c", FIRST_STEP_EXITS, *first_steps[who]])
                if i:
                    times[f"whole run {who}"].append(whole)
                    times[f"first step {who}"].append(first)
                    print(f"round {i} {who}: whole run {whole:.2f} s, first step {first:.2f} s", flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, value in median.items():
        print(f"median {name}: {value:.2f} s")
    print(f"whole run ours/bare = {median['whole run ours'] / median['whole run bare']:.2f}")
    print(f"first step ours/bare = {median['first step ours'] / median['first step bare']:.2f}")


if __name__ == "__main__":
    main()
