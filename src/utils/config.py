"""Checks of the composed config before anything runs: every value passed to a `_target_` must fit its parameter's
type hint, so `trainer.max_epochs=abc` fails at start naming the key, not an hour in."""

import inspect
import types
import typing
from collections.abc import Sequence
from typing import Any, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from src.utils.errors import UserError

# Top-level keys of conf/train.yaml and their types (the rest is checked against its `_target_`).
TOP_LEVEL = {"seed": int, "label_smoothing": float, "resume": bool, "optimized_metric": str, "lr_find": bool,
             "calibrate": bool}  # fmt: skip


class ConfigError(UserError):
    """A config value that cannot work; the message names the key."""


def _accepts(hint: Any, value: Any) -> bool:
    """True unless `value` clearly cannot be `hint`. Only simple types and sequences are judged."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if origin in (Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if hint is type(None) or value is None:
        return value is None and hint is type(None)
    if hint in (int, float):  # bool is an int to Python, not to a user; an int is a fine float
        return isinstance(value, (int, hint)) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        return isinstance(value, (list, tuple, ListConfig))
    if isinstance(hint, type):  # a class such as Tensor: no plain value from the command line is one
        return not isinstance(value, (bool, int, float, str)) or issubclass(hint, (bool, int, float, str))
    return True


def _parameters(obj: Any) -> tuple[set[str], dict[str, Any], bool]:
    """(names, hints, takes **kwargs) of a callable's parameters; a class's include its parents' if **kwargs go on."""
    names: set[str] = set()
    hints: dict[str, Any] = {}
    for fn in [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]:
        try:
            hints = {**typing.get_type_hints(fn), **hints}
        except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check against
            pass
        own = inspect.signature(fn).parameters
        names |= set(own) - {"self"}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values()):
            return names, hints, False
    return names, hints, True


def _name(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_name(arg) for arg in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_node(node: DictConfig, path: str) -> None:
    from hydra.utils import get_object

    if node._is_none() or node._is_missing():
        return
    if (target := node.get("_target_")) is not None:
        try:
            names, hints, takes_kwargs = _parameters(get_object(target))
        except Exception as e:  # noqa: BLE001 - reported as a config error
            raise ConfigError(f"{path}._target_: cannot import {target!r} ({e})") from e
        for key in (k for k in node if not str(k).startswith("_")):
            if key not in names and not takes_kwargs:
                raise ConfigError(f"{path}.{key}: {target} has no parameter {key!r}")
            value = OmegaConf.to_container(node[key], resolve=True) if OmegaConf.is_config(node[key]) else node[key]
            if key in hints and not _accepts(hints[key], value):
                raise ConfigError(f"{path}.{key}={value!r} has the wrong type: expected {_name(hints[key])}")
    for key in node:
        if isinstance(child := node._get_node(key), DictConfig) and not (path == "" and key == "hydra"):
            _check_node(child, f"{path}.{key}" if path else str(key))


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for a `???` value left unset, or the first value that cannot fit its parameter."""
    missing = [str(k) for k in cfg if k != "hydra" and OmegaConf.is_missing(cfg, k)]
    missing += [m for k in cfg if k != "hydra" and isinstance(cfg._get_node(k), DictConfig)
                for m in sorted(OmegaConf.missing_keys(cfg[k]))]  # fmt: skip
    if missing:
        raise ConfigError(f"{missing[0]} is required: set it on the command line ({missing[0]}=...)")
    for key, kind in TOP_LEVEL.items():
        if key in cfg and not _accepts(kind, cfg[key]):
            raise ConfigError(f"{key}={cfg[key]!r} has the wrong type: expected {kind.__name__}")
    _check_node(cfg, "")


def positive_int(cfg: DictConfig, key: str) -> int:
    """An entry point's option that must be a positive integer (a batch size, a count)."""
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def per_channel(values: Sequence[float], channels: int, name: str = "mean/std") -> list[float]:
    """One value per channel; a single value stands for every channel (configs and older checkpoints)."""
    values = [float(v) for v in values]
    if len(values) == 1:
        values *= channels
    if len(values) != channels:
        raise ConfigError(f"{name} has {len(values)} values but the images have {channels} channels")
    return values
