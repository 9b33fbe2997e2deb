"""Checks a composed config before anything runs: every value handed to a `_target_` must match the type
hint of the parameter it fills, so `trainer.max_epochs=abc` fails at start naming the key, not an hour in.
(Hydra's struct mode already rejects unknown keys and group choices.)"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Sequence
from typing import Any, Union

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from src.errors import UserError


class ConfigError(UserError):
    """A config value that cannot work; the message names the key."""


def fast_precision(accelerator: str) -> str:
    """`${fast_precision:${trainer.accelerator}}` (the recipes' `trainer.precision`): bf16 autocast where the
    hardware computes bfloat16 natively (CUDA GPUs that support it; CPUs with AVX-512 or AMX, where oneDNN has
    bf16 kernels), else full precision: on an AVX2-only CPU bf16 autocast ran the Fashion-MNIST recipe 12x
    slower than 32-true (README). A CUDA GPU without bf16 gets fp16 autocast; Apple's MPS, 32-true. The device
    is the one Lightning's `auto` and `gpu` pick: CUDA first, then MPS (`auto` falls back to the CPU)."""
    import torch  # here, not at the top: configs compose without torch's import time

    cuda = torch.cuda.is_available()
    if accelerator == "cuda" or (accelerator in ("gpu", "auto") and cuda):
        return "bf16-mixed" if cuda and torch.cuda.is_bf16_supported() else "16-mixed"
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.backends.mps.is_available())
    return "bf16-mixed" if on_cpu and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


OmegaConf.register_new_resolver("fast_precision", fast_precision, replace=True)


_SIMPLE = (bool, int, float, str)


def _accepts(hint: Any, value: Any) -> bool:
    """True unless `value` clearly cannot be `hint`. Only simple types and sequences are judged."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if value is None:
        return False
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        return isinstance(value, (list, tuple, ListConfig))
    if isinstance(hint, type):  # a class such as Tensor: no plain value from the command line is one
        return not isinstance(value, _SIMPLE) or issubclass(hint, _SIMPLE)
    return True


def _check_node(node: DictConfig, path: str) -> None:
    if node._is_none() or node._is_missing():
        return
    target = node.get("_target_")
    if target is not None:
        try:
            obj = get_object(target)
        except Exception as e:  # noqa: BLE001 - reported as a config error
            raise ConfigError(f"{path}._target_: cannot import {target!r} ({e})") from e
        params, hints, takes_kwargs = _parameters(obj)
        for key in node:
            if str(key).startswith("_"):
                continue
            if key not in params and not takes_kwargs:
                raise ConfigError(f"{path}.{key}: {target} has no parameter {key!r}")
            value = OmegaConf.to_container(node[key], resolve=True) if OmegaConf.is_config(node[key]) else node[key]
            if key in hints and not _accepts(hints[key], value):
                raise ConfigError(f"{path}.{key}={value!r} has the wrong type: expected {_name(hints[key])}")
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not (path == "" and key == "hydra"):
            _check_node(child, f"{path}.{key}" if path else str(key))


def _parameters(obj: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """Parameters and type hints of a callable; for a class whose __init__ passes **kwargs on to its
    parents (our datamodules), the parents' parameters too."""
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for fn in [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]:
        try:
            hints = {**typing.get_type_hints(fn), **hints}
        except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check against
            pass
        own = inspect.signature(fn).parameters
        params = {**{k: p for k, p in own.items() if k != "self"}, **params}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values()):
            return params, hints, False
    return params, hints, True


def _name(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_name(arg) for arg in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value whose type cannot fit its `_target_` parameter."""
    missing = []
    for key in cfg:  # `???` values left unset (Hydra's own node is not ours to check)
        if key == "hydra":
            continue
        if OmegaConf.is_missing(cfg, key):
            missing.append(str(key))
        elif isinstance(cfg._get_node(key), DictConfig):
            missing += sorted(OmegaConf.missing_keys(cfg[key]))  # full keys, e.g. dataset.data_dir
    if missing:
        raise ConfigError(f"{missing[0]} is required: set it on the command line ({missing[0]}=...)")
    for key, kind in (
        ("label_smoothing", float),
        ("resume", bool),
        ("optimized_metric", str),
        ("lr_find", bool),
        ("calibrate", bool),
    ):
        if key in cfg and not _accepts(kind, cfg[key]):
            raise ConfigError(f"{key}={cfg[key]!r} has the wrong type: expected {kind.__name__}")
    if not isinstance(cfg.get("seed"), int) or isinstance(cfg.get("seed"), bool):
        raise ConfigError(f"seed={cfg.get('seed')!r} has the wrong type: expected int")
    _check_node(cfg, "")
