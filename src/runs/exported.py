"""Models written by src.export, opened for inference by src.export (its parity check) and src.predict: NAME.onnx
(a graph of standard operators, run by onnxruntime) or NAME.pt (TorchScript: a program torch.jit.load runs,
so only your own or trusted ones), with their metadata; images in [0, 1] in, logits out."""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from src.utils.errors import UserError

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
    """The export format a file name says, or None (a checkpoint)."""
    return next((fmt for fmt, suffix in FORMATS.items() if path.suffix == suffix), None)


@dataclass(frozen=True)
class Exported:
    """An exported model opened for inference, with the metadata its file carries."""

    class_names: list[str]
    input_shape: list[int]
    mean: list[float]
    std: list[float]
    logits: Callable[[torch.Tensor], torch.Tensor]  # images (N, C, H, W) in [0, 1] -> float32 logits on the CPU


def _with_metadata(values: Mapping[str, str | bytes], name: str, logits: Callable) -> Exported:
    """The model `logits` runs, with the metadata of its file `name`, checked."""
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
