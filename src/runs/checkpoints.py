"""Checkpoints, written atomically and read `weights_only` (a `.ckpt` is a pickle that can call any function), and
`open_run`: of a run's stored config it builds only network and datamodule classes of ours or torch's, refusing any
other `_target_`. Also src.export's models: NAME.onnx or NAME.pt (TorchScript, a program: only trusted ones)."""

import importlib
import io
import json
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
    return {target for _, target in _targets(config, "") if isinstance(target, str)}


def allowed_kinds() -> tuple[type, ...]:
    """What a resumed run's config may build: the kinds of object of our config groups."""
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
    """Refuse a config (at `key`) whose `_target_` is of no allowed kind, unless `trusted` names it or its package."""
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


def _checked(config: Any, key: str, source: str | Path) -> dict[str, Any]:
    """`config[key]` resolved (an interpolation may point anywhere) and its targets checked: exactly what is built."""
    try:
        node = OmegaConf.to_container(config[key], resolve=True) if OmegaConf.is_config(config[key]) else config[key]
    except Exception as e:  # noqa: BLE001 - a doctored or broken interpolation
        raise CheckpointError(f"{source} refused: its {key} config does not resolve ({one_line(e)})") from e
    if not isinstance(node, dict):
        raise CheckpointError(f"{source} refused: its {key} config is {type(node).__name__}, not a mapping")
    if "${" in json.dumps(node, default=str):  # instantiate would resolve it again, unchecked
        raise CheckpointError(f"{source} refused: its {key} config resolves to another interpolation")
    check_targets(node, source, key)
    return node


def open_run(
    ckpt_path: str | Path, dataset: dict[str, Any] | None = None, map_location: Any = "cpu"
) -> tuple[ClassifierModule, L.LightningDataModule | None]:
    """The checkpoint's ClassifierModule in eval mode; with `dataset` (overrides of the stored dataset config, None
    values ignored), also the run's datamodule, set up for testing and checked to have the checkpoint's classes."""
    hparams = checkpoint_hparams(ckpt_path)
    config = OmegaConf.create(hparams["config"])
    model = _checked(config, "model", ckpt_path)
    net = instantiate(model, input_shape=hparams["input_shape"], num_classes=len(hparams["class_names"]))
    try:  # compile: a training switch, not for evaluate/predict/export
        module = ClassifierModule.load_from_checkpoint(
            ckpt_path, net=net, map_location=map_location, weights_only=True, compile=False
        )
    except RuntimeError as e:  # weights that do not fit the architecture its own config names
        raise CheckpointError(f"{ckpt_path} does not match its own model config ({one_line(e)})") from e
    if dataset is None:
        return module.eval(), None
    config.dataset = OmegaConf.merge(config.dataset, {k: v for k, v in dataset.items() if v is not None})
    datamodule = instantiate(_checked(config, "dataset", ckpt_path))
    datamodule.prepare_data()
    datamodule.setup("test")
    if list(datamodule.class_names) != (names := list(module.hparams.class_names)):
        raise CheckpointError(f"the data has classes {datamodule.class_names} but {ckpt_path} was trained on {names}")
    return module.eval(), datamodule


class SafeCheckpointIO(TorchCheckpointIO):
    """The Trainer's checkpoint IO: loads `weights_only=True`, saves atomic (a run killed mid-save keeps the last)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        write_atomically(Path(path), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> Any:
        return read_checkpoint(path, map_location=map_location or "cpu")  # state only: its config is not built


FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}  # the suffix tells the formats apart
METADATA = ("class_names", "input_shape", "mean", "std")


class ExportError(UserError):
    """A model that cannot be exported, an export that disagrees with PyTorch, or an exported file we cannot read."""


def first_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # torch.onnx colours its messages
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def quiet_torch_jit() -> Iterator[None]:
    """torch.jit.trace/save/load each warn that TorchScript is deprecated: the docs say it once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        yield


def format_of(path: Path) -> str | None:
    return next((fmt for fmt, suffix in FORMATS.items() if path.suffix == suffix), None)


@dataclass(frozen=True)
class Exported:  # an exported model opened for inference, with the metadata its file carries
    class_names: list[str]
    input_shape: list[int]
    mean: list[float]
    std: list[float]
    logits: Callable[[torch.Tensor], torch.Tensor]  # images (N, C, H, W) in [0, 1] -> float32 logits on the CPU


def _with_metadata(values: Mapping[str, str | bytes], name: str, logits: Callable) -> Exported:
    if missing := [key for key in METADATA if key not in values]:
        raise ExportError(f"{name} has no {missing[0]} metadata: only models exported by src.export can be used")
    try:
        meta = {key: json.loads(values[key]) for key in METADATA}
        names, shape = [str(c) for c in meta["class_names"]], [int(v) for v in meta["input_shape"]]
        mean, std = [float(v) for v in meta["mean"]], [float(v) for v in meta["std"]]
    except (ValueError, TypeError) as e:
        raise ExportError(f"{name} has unreadable metadata ({e})") from e
    if len(shape) != 3 or len(names) < 2:
        raise ExportError(f"{name} has unusable metadata: input_shape {shape}, {len(names)} class names")
    return Exported(names, shape, mean, std, logits)


def open_exported(data: bytes, fmt: str, name: str, device: str | torch.device = "cpu") -> Exported:
    """An exported model from its file's bytes; `name` (the file) goes into error messages."""
    device = torch.device(device)
    if fmt == "onnx":
        import onnxruntime as ort
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

        if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ExportError(f"device={device} for an ONNX model needs onnxruntime-gpu; use device=cpu")
        providers = (["CUDAExecutionProvider"] if device.type == "cuda" else []) + ["CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(data, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own error types: anything here is the file's fault
            raise ExportError(f"{name} is not a readable ONNX model ({first_line(e)})") from e

        def run_onnx(images: torch.Tensor) -> torch.Tensor:
            array = images.detach().cpu().float().contiguous().numpy()
            try:
                return torch.from_numpy(session.run(["logits"], {"images": array})[0])
            except InvalidArgument as e:  # an input it was not exported for
                raise ExportError(f"{name} does not take images of shape {tuple(array.shape)}: {first_line(e)}") from e

        return _with_metadata(session.get_modelmeta().custom_metadata_map, name, run_onnx)
    files = {f"{key}.json": "" for key in METADATA}
    try:
        with quiet_torch_jit():
            script = torch.jit.load(io.BytesIO(data), map_location=device, _extra_files=files)
    except RuntimeError as e:  # torch.jit's error for anything that is not a TorchScript archive
        raise ExportError(f"{name} is not a readable TorchScript model ({first_line(e)})") from e

    def run_script(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return script(images.to(device)).float().cpu()

    return _with_metadata({key: files[f"{key}.json"] for key in METADATA if files[f"{key}.json"]}, name, run_script)
