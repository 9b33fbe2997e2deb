"""Checkpoints: written atomically, opened without running anyone's code.

A `.ckpt` is a pickle, and unpickling can call any function the file names. Every checkpoint this project
opens (train's resume, evaluate, predict, export) goes through `torch.load(weights_only=True)`, which
rebuilds only tensors and plain containers: our checkpoints hold nothing else. The run config stored in a
checkpoint is instantiated (model, datamodule, trainer, callbacks) only when each of its `_target_`s lies
in ALLOWED_TARGETS; anything else is refused with one line naming it.
"""

from __future__ import annotations

import importlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.io import TorchCheckpointIO

from src.classifier import ClassifierModule
from src.errors import UserError, one_line

# What a run config may instantiate: our own packages and the library classes the config groups name.
# Not all of torch: `torch.hub.load` or `torch.load` as a target would run or fetch code.
ALLOWED_TARGETS = (
    "src.",
    "torch.optim.",  # optimizers and torch.optim.lr_scheduler
    "lightning.Trainer",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "optuna.samplers.",
)


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, not ours, or refused as unsafe."""


def _refusal(path: Path, error: Exception) -> CheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f"it names {found.group(1)}" if found else str(error).strip().splitlines()[0]
    return CheckpointError(
        f"{path} refused: loading it would run code ({what}); only checkpoints written by this project load"
    )


def read_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's content, unpickled with `weights_only=True` (tensors and plain values only)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give a .ckpt file, e.g. {path}/checkpoints/last.ckpt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - anything unreadable is "not a checkpoint we can open"
        if re.search(r"GLOBAL|unsupported", str(e), re.IGNORECASE):  # a function, class or opcode it refuses
            raise _refusal(path, e) from e
        why = f"not written by PyTorch, or cut short: {type(e).__name__}: {e}"
        raise CheckpointError(f"{path} is not a readable checkpoint ({why})") from e


def _targets(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(full key, target) of every `_target_` in a plain config tree."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield key or "<root>", node["_target_"]
        for k, v in node.items():
            yield from _targets(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _targets(v, f"{key}[{i}]")


def config_targets(config: Any) -> set[str]:
    """Every `_target_` a config names (to trust what the user's own command line names)."""
    return {target for _, target in _targets(config) if isinstance(target, str)}


def _allowed_kinds() -> tuple[type, ...]:
    """What a checked config may build: the kinds of object our config groups configure."""
    import lightning as L
    import optuna
    from lightning.pytorch.loggers import Logger

    return (
        torch.nn.Module,
        L.LightningDataModule,
        L.Callback,
        L.Trainer,
        Logger,
        torch.optim.Optimizer,
        torch.optim.lr_scheduler.LRScheduler,
        optuna.samplers.BaseSampler,
    )


# Functions a config may call (factories that return one of the allowed kinds, or None).
ALLOWED_FUNCTIONS = ("src.console.progress_bar", "src.console.model_summary", "src.speed.ema")


def _refuse_target(target: Any) -> str | None:
    """Why `target` may not be instantiated from a checked config, or None. Beyond the package prefix, the
    name must be a class of an allowed kind in an importable module (`src.reports.os.system` passes the
    prefix, but `src.reports.os` is no module and os.system no such class), or an allowed function."""
    if not isinstance(target, str) or not target.startswith(ALLOWED_TARGETS):
        return f"outside the allowed packages ({', '.join(ALLOWED_TARGETS)})"
    if target in ALLOWED_FUNCTIONS:
        return None
    module_name, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:  # e.g. a class of another version of this project
        return f"which is not a class of an importable module ({type(e).__name__}: {e})"
    if not (isinstance(obj, type) and issubclass(obj, _allowed_kinds())):
        return "not a model, datamodule, callback, logger, trainer, optimizer, scheduler or sampler class"
    return None


def check_targets(config: dict[str, Any], source: str | Path, trusted: set[str] = frozenset()) -> None:
    """Refuse a config that would instantiate anything but the allowed kinds of object in ALLOWED_TARGETS
    (or `trusted`: the targets of the config the user is running now, e.g. a run resumed with its own
    callback names it again)."""
    for key, target in _targets(config):
        why = None if target in trusted else _refuse_target(target)
        if why:
            raise CheckpointError(f"{source} refused: its config sets {key}._target_={target!r}, {why}")


def checkpoint_hparams(path: str | Path, trusted: set[str] = frozenset()) -> dict[str, Any]:
    """The hyper-parameters of one of our checkpoints (class names, input shape, normalization, run
    config), its config checked (see check_targets). Memory-mapped: the weights are not read for this."""
    content = read_checkpoint(path, mmap=True)
    hparams = content.get("hyper_parameters") if isinstance(content, dict) else None
    if not isinstance(hparams, dict) or not isinstance(hparams.get("config"), dict) or "model" not in hparams["config"]:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no run config in its hyper-parameters)")
    check_targets(hparams["config"], path, trusted)
    return hparams


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> ClassifierModule:
    """Rebuild a trained ClassifierModule from its checkpoint alone: the architecture from the run config
    saved in it, class names, input shape and normalization from its hyper-parameters."""
    hparams = checkpoint_hparams(path)
    num_classes = len(hparams["class_names"])
    net = instantiate(hparams["config"]["model"], input_shape=hparams["input_shape"], num_classes=num_classes)
    try:
        module = ClassifierModule.load_from_checkpoint(  # compile: a training switch, not for evaluate/export
            path, net=net, map_location=map_location, weights_only=True, compile=False
        )
    except RuntimeError as e:  # weights that do not fit the architecture its own config names
        raise CheckpointError(f"{path} does not match its own model config ({one_line(e)})") from e
    return module.eval()


class SafeCheckpointIO(TorchCheckpointIO):
    """The Trainer's checkpoint reader and writer (`plugins=[SafeCheckpointIO()]`): every load is
    `weights_only=True`, and every save goes to a temporary file in the checkpoint's own folder, renamed
    over the target, so a run killed mid-save leaves the previous checkpoint intact (Lightning's own save
    stages through TMPDIR, which may be another filesystem, where the final move is a copy)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> Any:
        """Restores state only (nothing in it is instantiated), so its config needs no check here."""
        return read_checkpoint(path, map_location=map_location or "cpu")
