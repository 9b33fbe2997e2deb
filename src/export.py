"""Entry point: export a checkpoint to ONNX or TorchScript (deprecated in PyTorch), normalization and temperature
inside, written only when it gives PyTorch's classes and probabilities on `parity_images` test images."""

import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from src.models.classifier import ClassifierModule, tta_logits
from src.runs.checkpoints import (
    FORMATS,
    METADATA,
    Exported,
    ExportError,
    first_line,
    open_exported,
    open_run,
    quiet_torch_jit,
)
from src.utils.command import entry_point
from src.utils.config import positive_int
from src.utils.io import write_atomically

PARITY_TOLERANCE = 1e-4  # largest allowed difference of a class probability (fp32)


class Exportable(nn.Module):
    """The network behind its normalization (constant buffers: torchvision's Normalize checks std for zeros, a branch
    torch.export refuses), with the run's test-time augmentation and temperature: images in [0, 1] in, logits out."""

    def __init__(self, module: ClassifierModule) -> None:
        super().__init__()
        self.net, self.tta, channels = module.net, module.tta, (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(module.hparams.mean, dtype=torch.float32).view(channels))
        self.register_buffer("std", torch.tensor(module.hparams.std, dtype=torch.float32).view(channels))
        self.register_buffer("temperature", module.temperature.detach().clone().float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return tta_logits(self.net, (images - self.mean) / self.std, self.tta) / self.temperature


def to_onnx(model: Exportable, meta: Mapping[str, Any]) -> bytes:
    """The model as one ONNX file (weights inside), batch axis dynamic, metadata as model properties."""
    import onnx

    for name in ("onnxscript", "onnx_ir"):  # their INFO lines list each optimization pass
        logging.getLogger(name).setLevel(logging.WARNING)
    example = torch.rand(2, *meta["input_shape"])  # not 1: torch.export would fix a batch axis of size 1
    try:
        batch = ({0: torch.export.Dim("batch")},)
        program = torch.onnx.export(
            model, (example,), input_names=["images"], output_names=["logits"], dynamic_shapes=batch, verbose=False
        )
    except torch.onnx.OnnxExporterError as e:
        cause = e.__cause__ or e
        raise ExportError(f"{type(model.net).__name__} cannot be exported to ONNX: {first_line(cause)}") from e
    proto = program.model_proto
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch.dim_param:  # torch.export fixed the batch size (the model branches on it)
        why = f"torch.export fixed its batch size at {batch.dim_value} (does the model depend on the batch size?)"
        raise ExportError(f"{type(model.net).__name__} cannot be exported to ONNX: {why}")
    onnx.helper.set_model_props(proto, {key: json.dumps(meta[key]) for key in METADATA})
    return proto.SerializeToString()


def to_torchscript(model: Exportable, meta: Mapping[str, Any]) -> bytes:
    """The model traced to TorchScript (tracing keeps the batch axis free), metadata as extra files."""
    example = torch.rand(2, *meta["input_shape"])
    buffer = io.BytesIO()
    try:
        with quiet_torch_jit(), torch.no_grad():
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, buffer, _extra_files={f"{key}.json": json.dumps(meta[key]) for key in METADATA})
    except RuntimeError as e:  # what torch.jit raises for a module it cannot trace
        raise ExportError(f"{type(model.net).__name__} cannot be exported to TorchScript: {first_line(e)}") from e
    return buffer.getvalue()


def parity_batches(datamodule: Any, count: int) -> list[torch.Tensor]:
    """The first `count` test images in [0, 1] (the datamodule is opened without normalization), in batches."""
    batches, n = [], 0
    for batch in datamodule.test_dataloader():
        images = datamodule.on_after_batch_transfer(batch, 0)[0][: count - n].float()  # in-memory: uint8 / 255
        batches.append(images)
        n += len(images)
        if n == count:
            break
    if not batches:
        raise ExportError(f"the test split of {datamodule.where(train=False)} has no images to check the export on")
    return batches


def parity(module: ClassifierModule, exported: Exported, batches: Sequence[torch.Tensor]) -> tuple[int, int, float]:
    """(images, images whose class differs, largest probability difference) of the export against PyTorch's model."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (exported.mean, exported.std))
    total, differ, worst = 0, 0, 0.0
    for images in batches:
        with torch.inference_mode():
            expected = module.predict_step((images - mean) / std)
        got = exported.logits(images).softmax(-1)
        total += len(images)
        differ += int((expected.argmax(-1) != got.argmax(-1)).sum())
        worst = max(worst, float((expected - got).abs().max()))
    return total, differ, worst


def export(cfg: DictConfig) -> Path:
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ExportError("ckpt_path is required: python -m src.export ckpt_path=CKPT [format=onnx|torchscript]")
    if (fmt := str(cfg.format)) not in FORMATS:
        raise ExportError(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
    count = positive_int(cfg, "parity_images")
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    out = Path(str(cfg.out)).expanduser() if cfg.out is not None else ckpt.with_suffix(FORMATS[fmt])
    if out.suffix != FORMATS[fmt]:  # src.predict reads the format from the suffix
        raise ExportError(f"out={out}: a {fmt} file must end in {FORMATS[fmt]}")
    if out.is_dir():
        raise ExportError(f"out={out} is a folder; give a file name, e.g. out={out / ('model' + FORMATS[fmt])}")

    started = time.monotonic()
    # The run's test split with normalization turned off; data problems show before the (slower) export.
    module, datamodule = open_run(ckpt, {**OmegaConf.to_container(cfg.dataset), "mean": [0.0], "std": [1.0]})
    batches = parity_batches(datamodule, count)
    hp = module.hparams  # what travels in the file: classes, input shape, the normalization inside it
    names, shape = [str(c) for c in hp.class_names], [int(v) for v in hp.input_shape]
    meta = {"class_names": names, "input_shape": shape, "mean": list(hp.mean), "std": list(hp.std)}
    data = (to_onnx if fmt == "onnx" else to_torchscript)(Exportable(module).eval(), meta)
    total, differ, worst = parity(module, open_exported(data, fmt, f"the exported {fmt} model"), batches)
    same = f"{total - differ} of {total} with PyTorch's class, largest probability difference {worst:.2e}"
    print(f"parity on {total} test images: {same} (fp32; at most {PARITY_TOLERANCE:.0e} allowed)", flush=True)
    if differ or not worst <= PARITY_TOLERANCE:  # `not <=`: a NaN difference fails too
        change = f"{differ} of {total} test images change class, largest probability difference {worst:.2e}"
        raise ExportError(f"the {fmt} export disagrees with PyTorch ({change}); nothing written to {out}")
    write_atomically(out, data)  # creates its folder
    io_shapes = f"images float32 (N, {', '.join(map(str, shape))}) in [0, 1] -> logits (N, {len(names)})"
    print(f"exported {out} ({fmt}, {len(data) / 1e6:.1f} MB): {io_shapes}, in {time.monotonic() - started:.1f} s")
    return out


main = entry_point("export")(export)

if __name__ == "__main__":
    main()
