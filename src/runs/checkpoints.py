"""Checkpoints: written atomically, read with `torch.load(weights_only=True)` (a `.ckpt` is a pickle, which can
call any function it names; ours hold only tensors and plain values), and `open_run`, the one way a finished run
is opened again (evaluate, predict, export). Of a stored config, `open_run` builds only network and datamodule
classes of ours or torch's; a resumed run (src/runs/record.py) also accepts our packages' other components, what
its own command names and `trusted_packages`. Any other `_target_` is refused with one line naming it."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from src.models.classifier import ClassifierModule
from src.utils.errors import UserError, one_line
from src.utils.io import write_atomically

PROJECT = ("src.",)  # our own classes, and functions defined in src/callbacks and src/models (factories)
FACTORIES = ("src.callbacks.", "src.models.")
# Library classes a run config may name. Not all of torch: `torch.hub.load` as a target would fetch code.
LIBRARY = tuple(
    "torch.nn. torch.optim. lightning.Trainer lightning.pytorch.callbacks. lightning.pytorch.loggers. "
    "lightning.pytorch.profilers. optuna.samplers.".split()
)
NETWORK_OR_DATA: tuple[type, ...] = (torch.nn.Module, L.LightningDataModule)


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, not ours, or refused as unsafe."""


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
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"it names {found.group(1)}" if found else str(e).strip().splitlines()[0]
            why = f"loading it would run code ({what}); only checkpoints written by this project load"
            raise CheckpointError(f"{path} refused: {why}") from e
        raise CheckpointError(f"{path} is not a readable checkpoint (not written by PyTorch, or cut short: {e})") from e


def _targets(node: Any, key: str) -> Iterator[tuple[str, Any]]:
    """(full key, target) of every `_target_` in a plain config tree."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield key, node["_target_"]
        for k, v in node.items():
            yield from _targets(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _targets(v, f"{key}[{i}]")


def config_targets(config: Any) -> set[str]:
    """Every `_target_` a config names."""
    return {target for _, target in _targets(config, "") if isinstance(target, str)}


def allowed_kinds() -> tuple[type, ...]:
    """What a resumed run's config may build: the kinds of object our config groups configure."""
    import optuna
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.profilers import Profiler

    kinds = (L.Callback, L.Trainer, Logger, Profiler, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)
    return (*NETWORK_OR_DATA, *kinds, optuna.samplers.BaseSampler)


def _refusal(target: Any, kinds: tuple[type, ...]) -> str | None:
    """Why `target` may not be instantiated, or None: it must name a class of an allowed kind in an importable module
    (`src.utils.io.os.system` passes a prefix check), or a factory function of src/callbacks or src/models."""
    if not isinstance(target, str) or not target.startswith((*PROJECT, *LIBRARY)):
        return f"outside the allowed packages ({', '.join((*PROJECT, *LIBRARY))})"
    module_name, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:  # e.g. a class of another version of this project
        return f"which is not a class of an importable module ({type(e).__name__}: {e})"
    factory = callable(obj) and not isinstance(obj, type) and obj.__module__.startswith(FACTORIES)
    if factory or (isinstance(obj, type) and issubclass(obj, kinds)):
        return None
    return f"not a {'network or datamodule' if kinds == NETWORK_OR_DATA else 'component'} class of ours or torch's"


def check_targets(
    config: Any, source: str | Path, key: str = "", kinds: tuple[type, ...] = NETWORK_OR_DATA, trusted: Sequence = ()
) -> None:
    """Refuse a config (at `key`) with a `_target_` that is not an allowed kind of class, unless `trusted` names it
    or a package above it (a resumed run trusts what its own command names, and `trusted_packages`)."""
    for where, target in _targets(config, key):
        if isinstance(target, str) and any(target == t or target.startswith(f"{t}.") for t in trusted):
            continue
        if why := _refusal(target, kinds):
            package = str(target).split(".")[0]
            how = "" if kinds == NETWORK_OR_DATA else f"; if you trust it: trusted_packages=[{package}]"
            raise CheckpointError(f"{source} refused: its config sets {where}._target_={target!r}, {why}{how}")


def checkpoint_hparams(path: str | Path) -> dict[str, Any]:
    """Our checkpoint's hyper-parameters (classes, input shape, normalization, run config); weights left unread."""
    content = read_checkpoint(path, mmap=True)
    hparams = content.get("hyper_parameters") if isinstance(content, dict) else None
    if not isinstance(hparams, dict) or not isinstance(hparams.get("config"), dict) or "model" not in hparams["config"]:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no run config in its hyper-parameters)")
    return hparams


def open_run(
    ckpt_path: str | Path, dataset: dict[str, Any] | None = None, map_location: Any = "cpu"
) -> tuple[ClassifierModule, L.LightningDataModule | None]:
    """The checkpoint's ClassifierModule in eval mode; with `dataset` (overrides of the stored dataset config, None
    values ignored), also the run's datamodule, set up for testing and checked to have the checkpoint's classes."""
    hparams = checkpoint_hparams(ckpt_path)
    config = OmegaConf.create(hparams["config"])
    check_targets(hparams["config"]["model"], ckpt_path, "model")
    net = instantiate(config.model, input_shape=hparams["input_shape"], num_classes=len(hparams["class_names"]))
    try:  # compile: a training switch, not for evaluate/predict/export
        module = ClassifierModule.load_from_checkpoint(
            ckpt_path, net=net, map_location=map_location, weights_only=True, compile=False
        )
    except RuntimeError as e:  # weights that do not fit the architecture its own config names
        raise CheckpointError(f"{ckpt_path} does not match its own model config ({one_line(e)})") from e
    if dataset is None:
        return module.eval(), None
    config.dataset = OmegaConf.merge(config.dataset, {k: v for k, v in dataset.items() if v is not None})
    check_targets(OmegaConf.to_container(config.dataset), ckpt_path, "dataset")
    datamodule = instantiate(config.dataset)
    datamodule.prepare_data()
    datamodule.setup("test")
    if list(datamodule.class_names) != (names := list(module.hparams.class_names)):
        raise CheckpointError(f"the data has classes {datamodule.class_names} but {ckpt_path} was trained on {names}")
    return module.eval(), datamodule


class SafeCheckpointIO(TorchCheckpointIO):
    """The Trainer's checkpoint reader and writer: loads are `weights_only=True`, saves atomic (src/utils/io.py),
    so a run killed mid-save leaves the previous checkpoint intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        write_atomically(Path(path), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> Any:
        # Restores state only (nothing in it is instantiated), so its config needs no check here.
        return read_checkpoint(path, map_location=map_location or "cpu")
