"""The config resolvers, registered on any import of `src` (omegaconf only), so saved run configs resolve later too."""

import os

from omegaconf import OmegaConf

SWEEP_KEYS = "IMAGE_CLASSIFY_SWEEP_KEYS"  # the keys a sweep varies, for its jobs (set by src.runs.sweeps)


def fast_precision(accelerator: str) -> str:
    """The recipes' `trainer.precision`: bf16 autocast where the hardware has bf16 (CUDA GPUs, CPUs with AVX-512 or
    AMX), else fp16 on CUDA, full precision elsewhere (bf16 ran 12x slower on an AVX2-only CPU; MPS: 32-true)."""
    import torch  # here, not at the top: configs compose without torch's import time

    cuda = torch.cuda.is_available()
    if accelerator == "cuda" or (accelerator in ("gpu", "auto") and cuda):
        return "bf16-mixed" if cuda and torch.cuda.is_bf16_supported() else "16-mixed"
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.backends.mps.is_available())
    return "bf16-mixed" if on_cpu and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def sweep_subdir(num: int, overrides: list[str]) -> str:
    """A sweep job's folder, its number and the values of what the sweep varies: `3_model=mlp,optimizer.lr=0.003`."""
    keys = set(os.environ.get(SWEEP_KEYS, "").split(","))
    varying = ",".join(o for o in overrides if o.partition("=")[0].lstrip("+~") in keys)
    name = varying.replace("/", "_")[:200]
    return f"{num}_{name}" if name else str(num)


OmegaConf.register_new_resolver("fast_precision", fast_precision, replace=True)
OmegaConf.register_new_resolver("sweep_subdir", sweep_subdir, replace=True)
