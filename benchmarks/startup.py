"""Seconds from the command to the first training step of a run, whole process (imports, config, data from
its cache, model, Trainer, sanity check):

    python -m benchmarks.startup [--runs 3] [OVERRIDES ...]     # default: the default run, python -m src.train

Each run is a fresh process running src.train with OVERRIDES, its first training step replaced by an
immediate exit, so only the start-up is timed; prints each run's seconds and the median. The first run may
include decoding the dataset into its cache (later runs read the cache, as any second run does).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

RUN_UNTIL_FIRST_STEP = """
import os, runpy, sys
import src.models.classifier as c
def first_step(self, batch, batch_idx):
    os._exit(0)
c.ClassifierModule.training_step = first_step
sys.argv = ["src.train", *sys.argv[1:]]
runpy.run_module("src.train", run_name="__main__")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="as for python -m src.train")
    args = parser.parse_args()
    seconds = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as run_dir:
            command = [sys.executable, "-c", RUN_UNTIL_FIRST_STEP, *args.overrides, f"hydra.run.dir={run_dir}"]
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            seconds.append(time.perf_counter() - start)
        print(f"first training step after {seconds[-1]:.2f} s", flush=True)
    command = " ".join(["python -m src.train", *args.overrides])
    print(f"median {statistics.median(seconds):.2f} s over {args.runs} runs of {command}")


if __name__ == "__main__":
    main()
