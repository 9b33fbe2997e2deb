"""What every Hydra entry point does around its body; nothing here imports torch: `--help` answers without it."""

import ctypes
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from src.utils.errors import report_errors

CONF = str(Path(__file__).resolve().parents[2] / "conf")
# Lightning INFO lines that say nothing about this run.
NOISE = ("💡 Tip:", "GPU available: False", "TPU available: False", "HPU available: False")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISE)


def quiet_console() -> None:
    # Lightning's lines once, plainly, on the console (as when it is imported before Hydra sets up logging).
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).addHandler(logging.StreamHandler())
        logging.getLogger(name).propagate = False
    for name in ("pytorch.utilities.rank_zero", "fabric.utilities.rank_zero"):
        logging.getLogger(f"lightning.{name}").addFilter(_DropNoise())
    # Lightning's own use of a torch API that torch 2.14 deprecates: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # In-process loading (num_workers=0) is the measured fastest on small CPU machines.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def keep_freed_memory() -> None:
    """Keep freed blocks in glibc's heap: by default it unmaps large ones, so every CPU training step page-faults its
    activations in afresh (measured up to 2x slower steps)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks under 32 MB come from the heap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of free heap
    libc.mallopt(-2, 256 << 20)  # M_TOP_PAD: grow the heap in 256 MB steps


def entry_point(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    def wrap(body: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @hydra.main(version_base="1.3", config_path=CONF, config_name=config_name)
        def main(cfg: DictConfig) -> Any:
            os.environ.setdefault("MPLBACKEND", "Agg")  # figures go to files and TensorBoard, never a screen
            quiet_console()
            keep_freed_memory()
            return report_errors(lambda: body(cfg))

        return main

    return wrap
