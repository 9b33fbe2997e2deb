"""Re-measure every figure RESULTS.md reports and rewrite its tables (`make results`).

    python -m benchmarks.results [--only NAME[,NAME]] [--dry-run] [--cifar-dir DIR] [--mnist-dir DIR]
    python -m benchmarks.results --make-cifar-dir DIR [--cifar-tar PATH]

Each table in RESULTS.md that holds measured figures sits between two markers,
`<!-- results:NAME -->` and `<!-- /results:NAME -->`; only the text between them is rewritten, so the rest
of the file is never touched. Every row names the command it measures; that command runs as a subprocess
(one at a time), the whole process is timed (wall time), and the test accuracy is read from the run
directory's metrics.json (`hydra.run.dir=outputs/results/STAMP/JOB`). The evaluate row runs
`python -m src.evaluate` on the best checkpoint of the `fashion_cnn_adam` run; the throughput table parses
what `python -m benchmarks.throughput` prints. After each command RESULTS.md is updated, so an interrupted
`make results` keeps what it finished. A row whose command cannot run here (no data, no GPU, or the command
failed) keeps its current text; the command prints why. The data-paths table is a comparison: selecting
either of its rows runs both, and its rows are rewritten only when both were measured.

Data: Fashion-MNIST comes from `--fashion-mnist` (default: Debian's copy), staged into a fresh folder per
command so that each measurement includes decoding into a fresh cache (the folders are removed at the end).
CIFAR-10 rows need `--cifar-dir DIR` (`DIR/train/<class>/`, `DIR/test/<class>/`; its images are decoded into
`DIR/.cache` before each of them, untimed, as the reference they are compared with loaded decoded images);
`--make-cifar-dir DIR` builds that folder from the CIFAR-10 JPEG
training archive: 4,000 images per class in `train/`, the last 1,000 per class (by file name) in `test/`.

Under each table a line per measurement records the date, the machine (CPU, cores, memory, GPU), the torch
version and the commit; a wall time marked `*` was taken while other processes kept the cores busy (the load
they added is in that line).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import importlib.metadata
import json
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "RESULTS.md"
RESULTS_ROOT = REPO / "outputs" / "results"
FASHION_DEFAULT = "/usr/share/datasets/fashion-mnist"
CIFAR_TAR_DEFAULT = REPO.parent / "shared" / "data" / "cifar10-jpeg-train.tar.gz"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
BUSY_LOAD = 0.25  # other processes keeping this many cores busy on average make a wall time an upper bound
STAR_NOTE = (
    "\\* measured while other processes kept the cores busy (how much: in the measurement line), so this wall "
    "time is an upper bound: on 2 cores, another PyTorch process slows a run down several-fold."
)
STAR_PREFIX = "\\* measured while other processes"  # an older wording of the note is replaced too
PROVENANCE = re.compile(r"^Measured (?P<when>.+?) on (?P<machine>.+?): (?P<items>.+)\.$")
ITEM = re.compile(r"`(?P<row>[^`]+)`(?: \((?P<detail>[^()]*)\))?")


# ----------------------------------------------------------------------------------------------- RESULTS.md regions


def markers(name: str) -> tuple[str, str]:
    return f"<!-- results:{name} -->", f"<!-- /results:{name} -->"


def region(text: str, name: str) -> str:
    """The text between the two markers of table `name` (exactly one of each, in order)."""
    start, end = markers(name)
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"RESULTS.md needs exactly one {start} followed by one {end}")
    return text[text.index(start) + len(start) : text.index(end)]


def replace_region(text: str, name: str, content: str) -> str:
    """`text` with the part between the markers of `name` replaced by `content`; nothing else changes."""
    start, end = markers(name)
    region(text, name)  # checks the markers
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}{content}{end}{tail}"


# ----------------------------------------------------------------------------------------------- measurements


@dataclass
class Measurement:
    """What one command gave: its wall time, the load other processes added meanwhile, and its results."""

    wall_s: float
    other_load: float | None = None  # average cores kept busy by other processes while it ran
    metrics: dict = field(default_factory=dict)  # metrics.json of the run
    output: str = ""  # what it printed (throughput)
    when: str = ""  # the date it was measured
    machine: str = ""  # where: CPU, cores, memory, GPU, torch, commit (see `machine()`)
    note: str = ""  # settings worth recording beside the machine (the throughput benchmark's)

    @property
    def busy(self) -> bool:
        return self.other_load is not None and self.other_load >= BUSY_LOAD


def read_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"no readable metrics.json in {run_dir} ({e})") from e


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def seconds(m: Measurement, fmt: str = "{:.0f} s") -> str:
    return fmt.format(m.wall_s) + ("*" if m.busy else "")


THROUGHPUT_LINE = re.compile(r"^(?P<case>\S.*?)\s+" + r"\s+".join(rf"(?P<v{i}>[\d.]+)" for i in range(9)) + r"\s*$")


def parse_throughput(output: str) -> dict[str, list[float]]:
    """{case: [a, b, b', l, c, c/a, c/b, c/b', c/l]} from the table `python -m benchmarks.throughput` prints."""
    rows = {}
    for line in output.splitlines():
        match = THROUGHPUT_LINE.match(line)
        if match:
            rows[match["case"]] = [float(match[f"v{i}"]) for i in range(9)]
    return rows


def throughput_cells(case: str) -> Callable[[Measurement], list[str]]:
    def cells(m: Measurement) -> list[str]:
        values = parse_throughput(m.output).get(case)
        if values is None:
            raise RuntimeError(f"benchmarks.throughput printed no line for {case!r}")
        return [f"{v:,.0f}" for v in values[:5]] + [f"{v:.2f}" for v in values[5:]]

    return cells


# ----------------------------------------------------------------------------------------------- the tables


@dataclass
class Job:
    """One command to measure. `args` may hold {run_dir}, {data_dir}, {cifar_dir}, {mnist_dir}, {fashion}."""

    name: str
    args: list[str]
    needs: tuple[str, ...] = ()  # fashion, cifar, mnist, gpu
    after: str | None = None  # a job whose run this one reads (evaluate)
    make_train: bool = False  # `make train` in a fresh clone of HEAD
    reads_metrics: bool = True


@dataclass
class Row:
    name: str  # what --only takes and the measurement lines name
    label: str  # first cell, as in RESULTS.md
    job: str
    cells: Callable[[Measurement, dict[str, Measurement]], list[str]]  # the cells after the label


@dataclass
class Table:
    name: str
    header: list[str]
    rows: list[Row]
    together: bool = False  # a comparison: its rows are measured together or not at all


TRAIN = ["python", "-m", "src.train"]
FASHION = ["dataset.data_dir={data_dir}", "dataset.local_copies=[{fashion}]", "dataset.download=false"]
CIFAR = ["dataset=image_folder", "dataset.data_dir={cifar_dir}"]
RUN = ["hydra.run.dir={run_dir}"]


def train_job(name: str, overrides: list[str], data: list[str], needs: tuple[str, ...]) -> Job:
    return Job(name, [*TRAIN, *overrides, *data, *RUN], needs)


# The ablation: airbench94's choices as fast_cifar10 first had them (SGD, warm-up 23%, no EMA) on a shorter
# schedule (so the whole table costs about half an hour here), and the same run with one choice taken away or
# added (EMA, alternating flip, reflect padding), each alone. The base is spelled out, so later changes to the
# recipe do not move it.
ABLATION_BASE = {
    "optimizer": "sgd",
    "dataset.batch_size": "1024",
    "scheduler.end_factor": "0.07",
    "model.widths": "[64,128,128]",
    "trainer.max_epochs": "3",
    "scheduler.warmup": "0.23",
    "ema_decay": "null",
    "dataset.hflip": "true",
    "dataset.crop_padding_mode": "constant",
    "dataset.early_crop_epochs": "0",
    "val_tta": "null",
}
ABLATIONS = [
    ("recipe", "airbench94's choices as first adopted (the base)", {}),
    ("no-whitening", "stem trained from random filters (`model.whiten=false`)", {"model.whiten": "false"}),
    ("no-tta", "no test-time augmentation (`tta=none`)", {"tta": "none"}),
    ("mirror-tta", "mirror only (`tta=mirror`)", {"tta": "mirror"}),
    ("bn-scale", "BN scales trained (`model.bn_scale=true`)", {"model.bn_scale": "true"}),
    ("no-bias-lr", "BN biases at the common rate (`norm_lr_scale=1`)", {"norm_lr_scale": "1"}),
    ("no-label-smoothing", "no label smoothing (`label_smoothing=0`)", {"label_smoothing": "0"}),
    ("no-nesterov", "plain momentum (`optimizer.nesterov=false`)", {"optimizer.nesterov": "false"}),
    ("no-warmup", "no warm-up, linear decay only (`scheduler.warmup=0`)", {"scheduler.warmup": "0"}),
    ("ema", "plus an EMA of the weights (`ema_decay=0.9`)", {"ema_decay": "0.9"}),
    ("alternate-flip", "plus alternating flip (`dataset.hflip=alternate`)", {"dataset.hflip": "alternate"}),
    (
        "reflect-crop",
        "plus mirrored crop borders (`dataset.crop_padding_mode=reflect`)",
        {"dataset.crop_padding_mode": "reflect"},
    ),
]


# fast_cifar10 with one of its choices of early epochs changed: what the cheaper epochs save and cost.
CIFAR_WHOLE = ["dataset.early_crop_epochs=0"]  # whole images every epoch
CIFAR_24 = ["dataset.early_crop=24"]  # the first 4 epochs scaled to 24x24 (0.56x the pixels), not 28x28 (0.77x)
CIFAR_WINDOWS = ["dataset.early_resize=false"]  # random 28x28 windows of the images, not the images scaled
CIFAR_FP32 = ["trainer.precision=32-true"]  # fp32 throughout, not bf16 autocast: what the precision buys
# fast_cifar10 as it was before Muon (commit 915ad6e): SGD for every parameter, batch 1,024, 10 epochs, warm-up;
# whole images, pinned, so later recipe changes do not move it.
CIFAR_SGD = [
    "optimizer=sgd",
    "dataset.batch_size=1024",
    "trainer.max_epochs=10",
    "scheduler.warmup=0.23",
    "scheduler.end_factor=0.07",
    "dataset.early_crop_epochs=0",
]


def code(overrides: list[str]) -> str:
    """Overrides as a row label quotes them (Markdown code)."""
    return "`" + " ".join(overrides) + "`"


def ablation_overrides(change: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in {**ABLATION_BASE, **change}.items()]


def ablation_cells(m: Measurement, measured: dict[str, Measurement]) -> list[str]:
    acc, full = m.metrics["test/acc"], measured["ablation-recipe"].metrics["test/acc"]
    change = "" if m is measured["ablation-recipe"] else f"{100 * (acc - full):+.2f}"
    return [percent(acc), change, seconds(m)]


MNIST = ["dataset.data_dir={data_dir}", "dataset.local_copies=[{mnist_dir}]", "dataset.download=false"]
MNIST_7200 = ["dataset.data_dir={data_dir}", "dataset.download=false"]  # staged by run_job: 7,200 train digits
SEEDS = (0, 1)  # the recipes' bars are means over two seeds


def seed_jobs(name: str, overrides: list[str], data: list[str], needs: tuple[str, ...]) -> list[Job]:
    return [train_job(f"{name}-seed{seed}", [*overrides, f"seed={seed}"], data, needs) for seed in SEEDS]


JOBS = {
    job.name: job
    for job in [
        Job("make-train", ["make", "train", "ARGS=hydra.run.dir={run_dir}"], ("fashion",), make_train=True),
        train_job("fashion_cnn_adam", ["experiment=fashion_cnn_adam"], FASHION, ("fashion",)),
        train_job("fashion_cnn_dropout_sgd", ["experiment=fashion_cnn_dropout_sgd"], FASHION, ("fashion",)),
        train_job("fashion_mlp_adam", ["experiment=fashion_mlp_adam"], FASHION, ("fashion",)),
        train_job("cifar_cnn3_sgd", ["experiment=cifar_cnn3_sgd"], CIFAR, ("cifar",)),
        Job(
            "evaluate",
            ["python", "-m", "src.evaluate", "ckpt_path={best_checkpoint}", *RUN],
            ("fashion",),
            after="fashion_cnn_adam",
        ),
        *seed_jobs("fast_fashion_mnist", ["experiment=fast_fashion_mnist"], FASHION, ("fashion",)),
        train_job(
            "fast_fashion_mnist_per_sample",
            ["experiment=fast_fashion_mnist", "dataset.in_memory=false", "seed=0"],
            FASHION,
            ("fashion",),
        ),
        *seed_jobs("fast_mnist", ["experiment=fast_mnist"], MNIST, ("mnist",)),
        train_job("fast_mnist_7200", ["experiment=fast_mnist", "seed=0"], MNIST_7200, ("mnist",)),
        *seed_jobs("fast_cifar10", ["experiment=fast_cifar10"], CIFAR, ("cifar",)),
        train_job("fast_cifar10_whole", ["experiment=fast_cifar10", *CIFAR_WHOLE, "seed=0"], CIFAR, ("cifar",)),
        train_job("fast_cifar10_24", ["experiment=fast_cifar10", *CIFAR_24, "seed=0"], CIFAR, ("cifar",)),
        train_job("fast_cifar10_windows", ["experiment=fast_cifar10", *CIFAR_WINDOWS, "seed=0"], CIFAR, ("cifar",)),
        train_job("fast_cifar10_fp32", ["experiment=fast_cifar10", *CIFAR_FP32, "seed=0"], CIFAR, ("cifar",)),
        train_job("fast_cifar10_sgd", ["experiment=fast_cifar10", *CIFAR_SGD, "seed=0"], CIFAR, ("cifar",)),
        train_job("fast_cifar10_gpu", ["experiment=fast_cifar10_gpu"], CIFAR, ("cifar", "gpu")),
        *(
            train_job(f"ablation-{name}", ["experiment=fast_cifar10", *ablation_overrides(change)], CIFAR, ("cifar",))
            for name, _, change in ABLATIONS
        ),
        Job(
            "throughput",
            ["python", "-m", "benchmarks.throughput", "--data-dir", "{data_dir}"],
            ("fashion",),
            reads_metrics=False,
        ),
        Job(
            "startup",
            ["python", "-m", "benchmarks.startup", "--fashion-mnist", "{fashion}"],
            ("fashion",),
            reads_metrics=False,
        ),  # fmt: skip
        Job("compile", ["python", "-m", "benchmarks.compile_speed"], reads_metrics=False),
        Job("tests", ["python", "-m", "benchmarks.test_time"], reads_metrics=False),
    ]
}


def acc_and_time(data: str, fmt: str = "{:.0f} s") -> Callable[[Measurement, dict], list[str]]:
    return lambda m, _: [data, percent(m.metrics["test/acc"]), seconds(m, fmt)]


def evaluate_cells(m: Measurement, measured: dict[str, Measurement]) -> list[str]:
    acc, trained = m.metrics["test/acc"], measured["fashion_cnn_adam"].metrics["test/acc"]
    same = "same as training" if percent(acc) == percent(trained) else f"training gave {percent(trained)}"
    return ["real Fashion-MNIST", f"{percent(acc)} ({same})", seconds(m)]


def per_epoch_val_acc(run_dir: Path) -> list[float]:
    """The run's val/acc after each epoch, from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (run_dir / "tensorboard").is_dir():
        return []
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars("val/acc")] if "val/acc" in events.Tags()["scalars"] else []


def recipe_cells(data: str, bar: str) -> Callable[[Measurement, dict], list[str]]:
    """data, bar, epochs, val accuracy after each epoch, test accuracy, wall time."""

    def cells(m: Measurement, _: dict) -> list[str]:
        # TensorBoard's val/acc ends with the final validation of the best checkpoint: one value per epoch only.
        per_epoch = m.metrics.get("val/acc_per_epoch", [])[: m.metrics["epochs"]]
        val = " ".join(f"{100 * v:.1f}" for v in per_epoch)
        return [data, bar, str(m.metrics["epochs"]), val, percent(m.metrics["test/acc"]), seconds(m)]

    return cells


def seed_rows(name: str, label: str, data: str, bar: str) -> list[Row]:
    """A row per seed and one with their mean."""

    def mean(m: Measurement, measured: dict[str, Measurement]) -> list[str]:
        runs = [measured[f"{name}-seed{seed}"] for seed in SEEDS]
        acc, wall = statistics.mean(r.metrics["test/acc"] for r in runs), statistics.mean(r.wall_s for r in runs)
        return ["", bar, "", "", f"**{percent(acc)}**", f"{wall:.0f} s" + "*" * any(r.busy for r in runs)]

    rows = [Row(f"{name}-seed{seed}", f"{label} `seed={seed}`", f"{name}-seed{seed}", recipe_cells(data, bar))
            for seed in SEEDS]  # fmt: skip
    return [*rows, Row(f"{name}-mean", f"{label}, mean of {len(SEEDS)} seeds", f"{name}-seed{SEEDS[-1]}", mean)]


def throughput_row(name: str, label: str, case: str) -> Row:
    cells = throughput_cells(case)
    return Row(name, label, "throughput", lambda m, _: cells(m))


def printed(pattern: str) -> Callable[[Measurement, dict], list[str]]:
    """The values a benchmark printed on the line `pattern` (a regex with a group per cell)."""

    def cells(m: Measurement, _: dict) -> list[str]:
        found = re.search(pattern, m.output, re.M)
        if not found:
            raise RuntimeError(f"the benchmark printed no line matching {pattern!r}")
        return list(found.groups())

    return cells


def compile_row(name: str, label: str, case: str) -> Row:
    """benchmarks.compile_speed's line for `case`: eager and compiled (first step, images/s), when it pays."""
    return Row(name, label, "compile", printed(f"^{re.escape(case)}" + r"\s+([\d.]+ ?s)\s+(\d+)" * 2 + r"\s+(.+)$"))


def accuracy_and_time(m: Measurement, _: dict) -> list[str]:
    return [percent(m.metrics["test/acc"]), seconds(m, "{:.1f} s")]


RECIPE_HEADER = ["command", "data", "bar", "epochs", "val accuracy per epoch (%)", "test accuracy", "wall time"]
CIFAR_DATA = "CIFAR-10 JPEGs: 40k `train/` (39.2k train, 0.8k val), 10k held-out `test/`"

TABLES = [
    Table(
        "seed-experiments",
        ["command", "data", "test accuracy", "wall time"],
        [
            Row(
                "make-train",
                "`make train` on a clean clone (venv + install + default run: `cnn3`, Adam 1e-3, batch 128, 8 epochs)",
                "make-train",
                lambda m, _: [
                    "real Fashion-MNIST (Debian's copy)",
                    percent(m.metrics["test/acc"]),
                    seconds(m, "{:.0f} s in all"),
                ],
            ),
            Row(
                "fashion_cnn_adam",
                "`experiment=fashion_cnn_adam`",
                "fashion_cnn_adam",
                acc_and_time("real Fashion-MNIST"),
            ),
            Row(
                "fashion_cnn_dropout_sgd",
                "`experiment=fashion_cnn_dropout_sgd`",
                "fashion_cnn_dropout_sgd",
                acc_and_time("real Fashion-MNIST"),
            ),
            Row(
                "fashion_mlp_adam",
                "`experiment=fashion_mlp_adam`",
                "fashion_mlp_adam",
                acc_and_time("real Fashion-MNIST"),
            ),
            Row(
                "cifar_cnn3_sgd",
                "`experiment=cifar_cnn3_sgd dataset=image_folder`",
                "cifar_cnn3_sgd",
                acc_and_time("CIFAR-10 JPEG split (32k train / 10k test)"),
            ),
            Row(
                "evaluate",
                "`python -m src.evaluate` on `fashion_cnn_adam`'s best checkpoint",
                "evaluate",
                evaluate_cells,
            ),
        ],
    ),
    Table(
        "recipes",
        RECIPE_HEADER,
        [
            *seed_rows("fast_fashion_mnist", "`fast_fashion_mnist`", "real Fashion-MNIST, 54k/6k/10k", ">= 94.0%"),
            *seed_rows("fast_mnist", "`fast_mnist`", "real MNIST, 54k/6k/10k", ">= 99.5%"),
            Row(
                "fast_mnist_7200",
                "`fast_mnist` on 7,200 digits, `seed=0`",
                "fast_mnist_7200",
                recipe_cells("the first 7,200 MNIST train digits (6,480/720), official 10k test", ">= 99.15%"),
            ),
        ],
        together=True,
    ),
    Table(
        "cifar10", RECIPE_HEADER, seed_rows("fast_cifar10", "`fast_cifar10`", CIFAR_DATA, "see below"), together=True
    ),
    Table(
        "cifar10-choices",
        ["`experiment=fast_cifar10 seed=0`", "test accuracy", "wall time"],
        [
            Row(
                "early-28",
                "the recipe (Muon for the conv filters, the first 4 of 8 epochs on the images scaled to 28x28)",
                "fast_cifar10-seed0",
                accuracy_and_time,
            ),
            Row("whole", f"whole images every epoch: {code(CIFAR_WHOLE)}", "fast_cifar10_whole", accuracy_and_time),
            Row(
                "early-24",
                f"the first 4 epochs scaled to 24x24: {code(CIFAR_24)}",
                "fast_cifar10_24",
                accuracy_and_time,
            ),
            Row(
                "windows",
                f"the first 4 epochs on random 28x28 windows, not scaled: {code(CIFAR_WINDOWS)}",
                "fast_cifar10_windows",
                accuracy_and_time,
            ),
            Row(
                "fp32",
                f"fp32 throughout, not bf16 autocast: {code(CIFAR_FP32)}",
                "fast_cifar10_fp32",
                accuracy_and_time,
            ),
            Row("sgd", f"SGD for all: {code(CIFAR_SGD)}", "fast_cifar10_sgd", accuracy_and_time),
        ],
        together=True,
    ),
    Table(
        "cifar10-gpu",
        RECIPE_HEADER,
        [Row("fast_cifar10_gpu", "`fast_cifar10_gpu`", "fast_cifar10_gpu", recipe_cells(CIFAR_DATA, "none (GPU)"))],
    ),
    Table(
        "data-paths",
        ["`experiment=fast_fashion_mnist seed=0`", "test accuracy", "wall time"],
        [
            Row("in-memory", "`dataset.in_memory=true` (default)", "fast_fashion_mnist-seed0", accuracy_and_time),
            Row(
                "per-sample",
                "`dataset.in_memory=false` (per-sample PIL transforms)",
                "fast_fashion_mnist_per_sample",
                accuracy_and_time,
            ),
        ],
        together=True,
    ),
    Table(
        "ablation",
        ["`experiment=fast_cifar10 " + " ".join(ablation_overrides({})) + "`", "test accuracy", "vs base", "wall time"],
        [Row(f"ablation-{name}", label, f"ablation-{name}", ablation_cells) for name, label, _ in ABLATIONS],
        together=True,
    ),
    Table(
        "throughput",
        [
            "case",
            "(a) seed loop",
            "(b) in-memory loop",
            "(b') + channels-last",
            "(l) Lightning",
            "(c) ours",
            "c/a",
            "c/b",
            "c/b'",
            "c/l",
        ],  # fmt: skip
        [
            throughput_row("throughput-cnn2-64", "cnn2, Fashion-MNIST, batch 64", "cnn2 Fashion-MNIST batch 64"),
            throughput_row("throughput-cnn2-256", "cnn2, Fashion-MNIST, batch 256", "cnn2 Fashion-MNIST batch 256"),
            throughput_row("throughput-cnn3-128", "cnn3, CIFAR-10-shaped, batch 128", "cnn3 CIFAR-10-shaped batch 128"),
            Row("throughput-worst-l", "worst c/l (target >= 0.95)", "throughput", printed(r"^worst c/l = ([\d.]+)")),
            Row(
                "throughput-worst-b256",
                "worst c/b' at batch >= 256 (target >= 0.95)",
                "throughput",
                printed(r"^worst c/b' at batch >= 256 = ([\d.]+)"),
            ),  # fmt: skip
        ],
    ),
    Table(
        "startup",
        [
            "`python -m benchmarks.startup` (Fashion-MNIST files, fresh processes, warm .pyc, median of 5)",
            "ours / bare",
        ],
        [
            Row(
                "startup-whole",
                "whole run: 1-batch fit, val, test and every output (target <= 1.2)",
                "startup",
                printed(r"^whole run ours/bare = ([\d.]+)"),
            ),  # fmt: skip
            Row(
                "startup-first-step",
                "command to the first training step (target <= 1.2)",
                "startup",
                printed(r"^first step ours/bare = ([\d.]+)"),
            ),  # fmt: skip
        ],
    ),
    Table(
        "compile",
        [
            "`python -m benchmarks.compile_speed` (training steps, 2 threads)",
            "eager: first step",
            "img/s",
            "compiled: first step",
            "img/s",
            "pays after",
        ],
        [
            compile_row("compile-airbench", "`airbench` 3x32x32, batch 1024, bf16", "airbench 3x32x32 batch 1024 bf16"),
            compile_row(
                "compile-bn_convnet", "`bn_convnet` 1x28x28, batch 256, bf16", "bn_convnet 1x28x28 batch 256 bf16"
            ),
            compile_row("compile-cnn3", "`cnn3` 1x28x28, batch 128, fp32", "cnn3 1x28x28 batch 128"),
        ],
    ),
    Table(
        "tests",
        ["`python -m benchmarks.test_time` (fresh clones of 79e3838 and this commit, side by side)", "figure"],
        [
            Row(
                "tests-make",
                "`make test`, ours / 79e3838 (target <= 0.5)",
                "tests",
                printed(r"^make test ours/baseline = ([\d.]+)"),
            ),
            Row(
                "tests-make-s",
                "`make test`: venv, install, lint, both tiers (target <= 10 min)",
                "tests",
                printed(r"^make test = (\d+ s)$"),
            ),
            Row(
                "tests-fast",
                'fast tier `pytest -m "not slow"`, ours / 79e3838, median of 3 (target <= 0.5)',
                "tests",
                printed(r"^fast tier ours/baseline = ([\d.]+)"),
            ),
            Row(
                "tests-fast-s",
                "fast tier, median of 3 (target <= 30 s with AVX-512, 60 s AVX2-only)",
                "tests",
                printed(r"^fast tier = ([\d.]+ s)$"),
            ),
        ],  # fmt: skip
    ),
]


# ----------------------------------------------------------------------------------------------- rendering


def split_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def parse_region(content: str) -> tuple[dict[str, str], list[str], list[tuple[str, str, list[tuple[str, str]]]]]:
    """Existing rows by label, other paragraphs kept as they are, and the measurement lines."""
    rows, notes, provenance = {}, [], []
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", content) if p.strip()]
    for paragraph in paragraphs:
        lines = paragraph.splitlines()
        if all(line.startswith("|") for line in lines):
            for line in lines[2:]:
                rows[split_cells(line)[0]] = line
        elif paragraph.startswith(STAR_PREFIX):
            continue
        elif len(lines) == 1 and (match := PROVENANCE.match(paragraph)):
            items = [(i["row"], i["detail"] or "") for i in ITEM.finditer(match["items"])]
            provenance.append((match["when"], match["machine"], items))
        else:
            notes.append(paragraph)
    return rows, notes, provenance


def render_region(content: str, table: Table, measured: dict[str, Measurement]) -> str:
    """The region of `table` with every row whose job was measured rebuilt; other rows and notes kept."""
    old_rows, notes, provenance = parse_region(content)
    if table.together and not all(row.job in measured for row in table.rows):
        measured = {}  # half a comparison measured now and half earlier would compare unlike things
    lines = [table_line(table.header), "|" + "---|" * len(table.header)]
    new_items = []
    for row in table.rows:
        m = measured.get(row.job)
        if m is None:
            lines.append(
                old_rows.get(row.label) or table_line([row.label] + ["not measured yet"] * (len(table.header) - 1))
            )
            continue
        cells = row.cells(m, measured)
        lines.append(table_line([row.label, *cells]))
        load = f"other processes added {m.other_load:.2f} cores" if m.other_load is not None else ""
        starred = any(cell.endswith("*") and not cell.endswith("**") for cell in cells)  # a busy time, not bold
        new_items.append((m.when, m.machine, row.name, "; ".join(filter(None, [m.note, load])) + "*" * starred))
    renewed = {name for *_, name, _ in new_items}
    kept = []
    for old_when, old_machine, items in provenance:
        items = [(name, detail) for name, detail in items if name not in renewed]
        if items:
            kept.append((old_when, old_machine, items))
    for when, host, name, detail in new_items:  # one line per date and machine
        line = next((k for k in kept if k[:2] == (when, host)), None)
        if line:
            line[2].append((name, detail))
        else:
            kept.append((when, host, [(name, detail)]))
    paragraphs = ["\n".join(lines), *notes]
    for p_when, p_machine, items in kept:
        listed = ", ".join(f"`{name}`" + (f" ({detail})" if detail else "") for name, detail in items)
        paragraphs.append(f"Measured {p_when} on {p_machine}: {listed}.")
    if any(detail.endswith("*") for _, _, items in kept for _, detail in items):
        paragraphs.append(STAR_NOTE)
    return "\n\n" + "\n\n".join(paragraphs) + "\n\n"


def update_results(path: Path, measured: dict[str, Measurement], tables: list[Table]) -> None:
    """Rewrite the regions of `tables` (read afresh: others may edit the file meanwhile)."""
    text = path.read_text()
    new = text
    for table in tables:
        new = replace_region(new, table.name, render_region(region(new, table.name), table, measured))
    if new != text:
        tmp = path.with_name(f".{path.name}.results-tmp")
        tmp.write_text(new)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- the machine


def machine() -> str:
    """CPU model, cores, memory, GPU, torch version and commit, for the measurement lines."""
    cpu, memory = "unknown CPU", ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"^model name\s*:\s*(.+)$", info, re.M).group(1).strip()
        flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M).group(1).split()
        extras = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
        if not extras and "avx2" in flags:  # the measured speed differs several-fold across these
            extras = ["AVX2, no AVX-512"]
        cpu += f" ({', '.join(extras)})" if extras else ""
        kib = int(re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M).group(1))
        memory = f", {kib / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    gpu = "no GPU"
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
        gpu = ", ".join(names) if out.returncode == 0 and names else gpu
    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = "?"
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    # Changes to what runs (code, configs), not to the RESULTS.md this script itself rewrites.
    changes = [*git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)*.md"]
    if subprocess.run(changes, capture_output=True, text=True).stdout.strip():
        head += " with uncommitted changes"
    return f"{cpu}, {os.cpu_count()} cores{memory}, {gpu}, torch {torch}, commit {head or 'unknown'}"


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have used (user, nice, system, irq, softirq), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        return sum(int(fields[i]) for i in (0, 1, 2, 5, 6)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def has_gpu() -> bool:
    probe = [sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"]
    return subprocess.run(probe, capture_output=True).returncode == 0


# ----------------------------------------------------------------------------------------------- running


def fashion_files(folder: Path) -> bool:
    return all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in IDX_FILES)


def missing(job: Job, args: argparse.Namespace) -> str | None:
    """Why `job` cannot run here, or None."""
    for need in job.needs:
        if need == "fashion" and not fashion_files(Path(args.fashion_mnist)):
            return f"no Fashion-MNIST IDX files in {args.fashion_mnist} (--fashion-mnist DIR)"
        if need == "cifar" and not args.cifar_dir:
            return "no CIFAR-10 image folder (--cifar-dir DIR; --make-cifar-dir DIR builds one)"
        if need == "cifar" and not (Path(args.cifar_dir) / "train").is_dir():
            return f"{args.cifar_dir}/train does not exist (--make-cifar-dir {args.cifar_dir} builds it)"
        if need == "mnist" and not args.mnist_dir:
            return "no real MNIST (--mnist-dir DIR with the four IDX files)"
        if need == "gpu" and not args.dry_run and not has_gpu():
            return "no GPU on this machine"
        if need == "gpu" and args.dry_run and not shutil.which("nvidia-smi"):
            return "no GPU on this machine"
    return None


def command(job: Job, folder: Path, args: argparse.Namespace, best_checkpoint: str = "BEST_CHECKPOINT") -> list[str]:
    values = {
        "run_dir": str(folder / job.name),
        "data_dir": str(folder / "data" / job.name),
        "fashion": str(Path(args.fashion_mnist).resolve()),
        "cifar_dir": str(Path(args.cifar_dir).resolve()) if args.cifar_dir else "CIFAR_DIR",
        "mnist_dir": str(Path(args.mnist_dir).resolve()) if args.mnist_dir else "MNIST_DIR",
        "best_checkpoint": best_checkpoint,
    }
    out = []
    for arg in job.args:  # only these placeholders: other braces (a script's own) stay as they are
        for key, value in values.items():
            arg = arg.replace(f"{{{key}}}", value)
        out.append(arg)
    return out


def selected(only: str | None) -> tuple[list[Table], set[str]]:
    """The tables concerned and the jobs to run (with the jobs they read) for `--only`."""
    names = [n.strip() for n in only.split(",") if n.strip()] if only else [t.name for t in TABLES]
    rows = {row.name: row for table in TABLES for row in table.rows}
    unknown = [n for n in names if n not in rows and n not in {t.name for t in TABLES}]
    if unknown:
        choices = ", ".join([t.name for t in TABLES] + list(rows))
        raise SystemExit(f"error: --only {','.join(unknown)}: not a table or row; choose from {choices}")
    jobs = {row.job for t in TABLES for row in t.rows if t.name in names or row.name in names}
    jobs |= {row.job for t in TABLES if t.together and any(r.job in jobs for r in t.rows) for row in t.rows}
    for name in list(jobs):
        if JOBS[name].after:
            jobs.add(JOBS[name].after)
    tables = [t for t in TABLES if any(row.job in jobs for row in t.rows)]
    return tables, jobs


def warm_cache(cmd: list[str]) -> None:
    """Decode the images of the training command `cmd` into their `.cache` (a no-op when it holds them)."""
    code = (
        "import sys; from hydra import compose, initialize_config_dir; from hydra.utils import instantiate; "
        "initialize_config_dir(sys.argv[1], version_base='1.3'); "
        "data = instantiate(compose('train', overrides=sys.argv[2:]).dataset); data.prepare_data(); data.setup()"
    )
    overrides = [a for a in cmd if "=" in a and not a.startswith("hydra.")]
    subprocess.run([sys.executable, "-c", code, str(REPO / "conf"), *overrides], cwd=REPO, check=True)


def run_job(job: Job, cmd: list[str], folder: Path, log: Path, args: argparse.Namespace) -> Measurement:
    """Run `cmd` (its `python` is this interpreter), timing the whole process."""
    cwd = REPO
    argv = [sys.executable, *cmd[1:]] if cmd[0] == "python" else cmd
    if job.make_train:  # a clean clone of HEAD: `make train` creates its venv and gets the data there
        cwd = folder / "clone"
        shutil.rmtree(cwd, ignore_errors=True)
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(cwd)], check=True)
    if "cifar" in job.needs:  # decoded beforehand, untimed: the reference's timed process loaded decoded images too
        warm_cache(cmd)
    if job.name == "fast_mnist_7200":
        write_mnist_subset(Path(args.mnist_dir), folder / "data" / job.name / "MNIST" / "raw", 7200)
    if job.name == "throughput":  # benchmarks.throughput stages from Debian's copy itself; give it ours
        data = folder / "data" / job.name
        data.mkdir(parents=True, exist_ok=True)
        for name in IDX_FILES:
            source = next(
                p for p in (Path(args.fashion_mnist) / f"{name}.gz", Path(args.fashion_mnist) / name) if p.is_file()
            )
            shutil.copy(source, data / source.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    busy, own, start = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    busy_after, own_after = busy_cpu_seconds(), children_cpu_seconds()
    other = None
    if busy is not None and busy_after is not None:
        other = max(0.0, (busy_after - busy) - (own_after - own)) / wall
    if job.make_train:
        shutil.rmtree(cwd, ignore_errors=True)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-5:])
        raise RuntimeError(f"exit status {proc.returncode}; the end of {log}:\n{tail}")
    m = Measurement(wall, other, output=log.read_text())
    if job.name == "throughput":  # its settings: "images/second, median of 3 rounds of 100 timed steps, ..."
        settings = re.search(r"^images/second, (median of .*?), torch [^,]*, (.*)$", m.output, re.M)
        m.note = f"{settings[1]}, {settings[2]}" if settings else ""
    if job.reads_metrics:
        m.metrics = {**read_metrics(folder / job.name), "val/acc_per_epoch": per_epoch_val_acc(folder / job.name)}
    return m


def write_mnist_subset(source: Path, target: Path, n: int) -> None:
    """MNIST's IDX files in torchvision's layout with only the first `n` training digits (the test split whole)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        data = next(p for p in (source / name, source / f"{name}.gz") if p.is_file()).read_bytes()
        data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        if name.startswith("train"):
            header, size = (16, 784) if "images" in name else (8, 1)
            data = data[:4] + n.to_bytes(4, "big") + data[8:header] + data[header : header + n * size]
        (target / name).write_bytes(data)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # subprocess.run then kills the command it waits for


def run(args: argparse.Namespace) -> int:
    tables, jobs = selected(args.only)
    text = Path(args.results).read_text()
    for table in tables:  # before anything runs
        try:
            region(text, table.name)
        except ValueError as e:
            raise SystemExit(f"error: {args.results}: {e}") from None
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    folder = (Path(args.output) / stamp).resolve()
    order = [name for name in JOBS if name in jobs]  # JOBS lists a job's dependency before it
    skipped = {name: why for name in order if (why := missing(JOBS[name], args))}
    for name in order:
        if JOBS[name].after in skipped and name not in skipped:
            skipped[name] = f"needs {JOBS[name].after}, which cannot run: {skipped[JOBS[name].after]}"

    if args.dry_run:
        for table in tables:
            print(f"== {table.name} ({markers(table.name)[0]} in {args.results})")
            for row in table.rows:
                if row.job not in jobs:
                    continue
                job = JOBS[row.job]
                if row.job in skipped:
                    print(f"  {row.name}: skipped, kept as it is: {skipped[row.job]}")
                    continue
                cmd = command(job, folder, args, f"<best checkpoint of {job.after}>")
                where = f"  (in a fresh clone of HEAD at {folder / 'clone'})" if job.make_train else ""
                print(f"  {row.name}: {shlex.join(cmd)}{where}")
        return 0

    signal.signal(signal.SIGTERM, _interrupt)
    print(f"measuring on {machine()}; runs in {folder}")
    measured: dict[str, Measurement] = {}
    failed = []
    for name in order:
        job = JOBS[name]
        if name in skipped:
            print(f"{name}: skipped, its rows stay as they are: {skipped[name]}")
            continue
        if job.after and job.after not in measured:
            print(f"{name}: skipped, {job.after} did not finish")
            continue
        best = measured[job.after].metrics.get("best_checkpoint", "") if job.after else ""
        cmd = command(job, folder, args, best)
        print(f"{name}: {shlex.join(cmd)}", flush=True)
        when, host = dt.date.today().isoformat(), machine()  # at each start: the commit may move meanwhile
        try:
            m = run_job(job, cmd, folder, folder / "logs" / f"{name}.log", args)
            m.when, m.machine = when, host
            for table in tables:  # the cells must build from what was measured
                for row in table.rows:
                    if row.job == name:
                        row.cells(m, {**measured, name: m})
        except (RuntimeError, KeyError, subprocess.CalledProcessError) as e:
            print(f"{name}: FAILED, its rows stay as they are: {e}", file=sys.stderr)
            failed.append(name)
            continue
        measured[name] = m
        load = f", other processes added {m.other_load:.2f} cores" if m.other_load is not None else ""
        acc = f", test accuracy {percent(m.metrics['test/acc'])}" if "test/acc" in m.metrics else ""
        print(f"{name}: {m.wall_s:.1f} s{acc}{load}", flush=True)
        update_results(Path(args.results), measured, tables)
    shutil.rmtree(folder / "data", ignore_errors=True)
    print(f"RESULTS.md tables updated: {', '.join(t.name for t in tables)}" if measured else "nothing measured")
    if failed:
        print(f"failed: {', '.join(failed)} (logs in {folder / 'logs'})", file=sys.stderr)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------- CIFAR folder


def make_cifar_dir(target: Path, archive: Path, test_per_class: int = 1000) -> None:
    """DIR/train and DIR/test from the JPEG archive's `train/<class>/*.jpg`: per class, the last
    `test_per_class` files by name go to test/, the rest to train/. Deterministic; built in a temporary
    folder and renamed into place."""
    if (target / "train").is_dir() and (target / "test").is_dir():
        print(f"{target} already holds train/ and test/; remove it to rebuild")
        return
    if target.exists() and any(target.iterdir()):
        raise SystemExit(f"error: {target} exists and is not empty")
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    by_class: dict[str, list[tarfile.TarInfo]] = {}
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[0] == "train":
                by_class.setdefault(parts[1], []).append(member)
        if not by_class:
            raise SystemExit(f"error: {archive} holds no train/<class>/ images")
        for cls, files in sorted(by_class.items()):
            files.sort(key=lambda m: m.name)
            if len(files) <= test_per_class:
                raise SystemExit(f"error: class {cls} has {len(files)} images, not more than {test_per_class}")
            for i, member in enumerate(files):
                split = "test" if i >= len(files) - test_per_class else "train"
                out = tmp / split / cls / Path(member.name).name
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    target.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        os.replace(tmp / split, target / split)
    tmp.rmdir()
    counts = {s: sum(1 for _ in (target / s).glob("*/*")) for s in ("train", "test")}
    print(f"{target}: {counts['train']} images in train/, {counts['test']} in test/ ({len(by_class)} classes)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Tables and rows: " + ", ".join(f"{t.name} ({', '.join(r.name for r in t.rows)})" for t in TABLES),
    )
    parser.add_argument("--only", metavar="NAME[,NAME]", help="tables or rows to re-measure (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--fashion-mnist", default=FASHION_DEFAULT, metavar="DIR", help="the four Fashion-MNIST IDX files"
    )
    parser.add_argument(
        "--cifar-dir",
        metavar="DIR",
        help="CIFAR-10 image folder (train/ and test/); rows needing it are skipped without",
    )
    parser.add_argument("--mnist-dir", metavar="DIR", help="the four MNIST IDX files; fast_mnist is skipped without")
    parser.add_argument(
        "--make-cifar-dir", metavar="DIR", help="build the CIFAR-10 image folder from --cifar-tar and exit"
    )
    parser.add_argument(
        "--cifar-tar", default=str(CIFAR_TAR_DEFAULT), metavar="PATH", help="the CIFAR-10 JPEG training archive"
    )
    parser.add_argument("--results", default=str(RESULTS), help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS_ROOT), help="where the runs go (a folder per invocation)")
    args = parser.parse_args(argv)
    if args.make_cifar_dir:
        if not Path(args.cifar_tar).is_file():
            raise SystemExit(f"error: no archive at {args.cifar_tar} (--cifar-tar PATH)")
        make_cifar_dir(Path(args.make_cifar_dir), Path(args.cifar_tar))
        return 0
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; RESULTS.md keeps what was measured before", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
