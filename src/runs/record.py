"""A run's directory and its life: the Trainer that writes it, resuming, and `job_status.json`: COMPLETED, FAILED
(`error`: the one-line reason) or INTERRUPTED (`resume_command` continues it); a run killed outright has none."""

import contextlib
import ctypes
import json
import logging
import os
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from src.runs import checkpoints
from src.utils.config import ConfigError
from src.utils.errors import RunInterrupted, Terminated, exit_code, one_line, sigterm_as_interrupt
from src.utils.io import write_atomically

log = logging.getLogger(__name__)

# Overrides that say where a run writes, whether it resumes or what it trusts, not what it computes.
NOT_SETTINGS = ("hydra.", "resume=", "ckpt_path=", "paths.output_dir=", "trusted_packages=")
# Settings a resumed run may change: training longer is what resuming is for; the others never change a result.
SHOWN_OR_SPEED = ("trainer.enable_progress_bar", "trainer.enable_model_summary", "callbacks.progress_bar", "compile")
RESUMABLE_CHANGES = ("trainer.max_epochs", *SHOWN_OR_SPEED)
# Settings added since a run may have started, at the value that computes what the run did without them.
ADDED_SETTINGS = {
    "dataset.crop_padding_mode": "constant",
    "dataset.early_crop_epochs": 0,
    "dataset.early_resize": False,
}


class NoProfiler(PassThroughProfiler):
    """Lightning's default (no profiling) without a generator-based context around each hook call and loop section
    (about 130 a step): 0.05 ms a step less on this project's CPU machines."""

    def profile(self, action_name: str) -> contextlib.nullcontext:
        return contextlib.nullcontext(action_name)


def skip_missing_nvml() -> None:
    """Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 (CUDA checks that keep forks safe). Without NVML (a CPU machine)
    torch then tries to load it at every check, and Adam's step checks every step (0.1-0.2 ms); it falls back to
    the CUDA runtime's answer anyway, so there the variable only adds the failed loads."""
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1":
        try:
            ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]


def build_trainer(cfg: DictConfig, only: tuple[str, ...] | None = None, extra: Sequence[L.Callback] = ()) -> L.Trainer:
    """The Trainer with the config's callbacks (those in `only`, if given), `extra`, its loggers, SafeCheckpointIO."""
    skip_missing_nvml()
    chosen = [c for name, c in (cfg.get("callbacks") or {}).items() if c and (only is None or name in only)]
    callbacks = [c for c in map(instantiate, chosen) if c is not None] + list(extra)  # a factory may give none
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    plugins = [checkpoints.SafeCheckpointIO()]
    profiler = cfg.trainer.get("profiler") or (None if cfg.trainer.get("barebones") else NoProfiler())
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins, profiler=profiler)


def task_overrides() -> list[str]:
    """This run's command-line overrides that say what it computes (for HPARAMS and resume commands)."""
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(NOT_SETTINGS)]


def _settings(overrides: Path | list[str]) -> list[str]:
    items = OmegaConf.load(overrides) if isinstance(overrides, Path) else overrides
    ignored = (*NOT_SETTINGS, *(f"{key}{end}" for key in RESUMABLE_CHANGES for end in "=."))
    return sorted(o for o in items if not o.lstrip("+~").startswith(ignored))


def find_last_checkpoint(runs_root: Path, overrides: list[str]) -> Path:
    """`last.ckpt` of the most recent run under `runs_root` started with the same settings."""
    wanted = _settings(overrides)
    runs = [p.parent.parent for p in runs_root.glob("**/.hydra/overrides.yaml") if _settings(p) == wanted]
    if not (candidates := [c for c in (r / "checkpoints" / "last.ckpt" for r in runs) if c.is_file()]):
        raise ConfigError(f"resume=true: no run under {runs_root}/ with overrides {wanted} has checkpoints/last.ckpt")
    return max(candidates, key=lambda c: c.stat().st_mtime)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _flat(child, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def differing_settings(cfg: DictConfig, saved: dict[str, Any]) -> list[str]:
    """Keys that differ from the checkpoint's run config, but for where runs write, resume and RESUMABLE_CHANGES."""
    now, then = _flat(OmegaConf.to_container(cfg, resolve=False)), {**ADDED_SETTINGS, **_flat(saved)}
    scheduled = now.get("scheduler._target_") or then.get("scheduler._target_")  # its state fixes the run's length
    resumable = [k for k in RESUMABLE_CHANGES if not (scheduled and k == "trainer.max_epochs")]
    ignored = ("ckpt_path", "resume", "paths", "hydra", "trusted_packages", *resumable)
    keys = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
    return [k for k in keys if not any(k == i or k.startswith(f"{i}.") for i in ignored)]


def resume_from(cfg: DictConfig) -> None:
    """`ckpt_path=PATH` or `resume=true`: continue the checkpoint's run in its own directory (a run directory that holds
    a run is continued, never overwritten); refused when a setting not in RESUMABLE_CHANGES differs."""
    if cfg.resume and cfg.ckpt_path is None:
        cfg.ckpt_path = str(find_last_checkpoint(Path(cfg.paths.runs_root), list(HydraConfig.get().overrides.task)))
    own = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if in_place := cfg.ckpt_path is None and own.is_file():  # a requeued SLURM job, or hydra.run.dir of an earlier run
        log.info("%s already holds a run: continuing it", cfg.paths.output_dir)
        cfg.ckpt_path = str(own)
    if cfg.ckpt_path is None:
        return
    checkpoint = Path(cfg.ckpt_path)
    saved = checkpoints.checkpoint_hparams(checkpoint)["config"]
    # The run's own objects are built again: trusted are those its command names, and trusted_packages.
    own_targets = checkpoints.config_targets(OmegaConf.to_container(cfg, resolve=False))
    trusted = [*own_targets, *cfg.get("trusted_packages", [])]
    checkpoints.check_targets(saved, checkpoint, kinds=checkpoints.allowed_kinds(), trusted=trusted)
    if differ := differing_settings(cfg, saved):
        what = f"{cfg.paths.output_dir} holds a run" if in_place else f"ckpt_path={checkpoint} was"
        instead = "choose another hydra.run.dir" if in_place else "start a new run without ckpt_path"
        raise ConfigError(
            f"{what} trained with other settings ({', '.join(differ)}); continue it with the same ones (only "
            f"trainer.max_epochs without a scheduler, console settings and compile may change), or {instead}"
        )
    run_dir = checkpoint.parent.parent
    if checkpoint.parent.name == "checkpoints" and (run_dir / ".hydra").is_dir():
        cfg.paths.output_dir = str(run_dir)
    log.info("resuming from %s; writing to %s", checkpoint, cfg.paths.output_dir)


def resume_command(cfg: DictConfig) -> str:
    """The command that continues this run: `resume=true` when that finds it, else `ckpt_path=` its last.ckpt."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else ["..."]
    overrides = [o for o in overrides if not o.startswith(("resume=", "ckpt_path="))]
    last = Path(cfg.paths.output_dir).resolve() / "checkpoints" / "last.ckpt"
    try:  # resume=true takes the newest matching run: say it only when that is this one
        found = find_last_checkpoint(Path(cfg.paths.runs_root), overrides).resolve() == last
    except ConfigError:
        found = False
    return shlex.join(["python", "-m", "src.train", *overrides, "resume=true" if found else f"ckpt_path={last}"])


class RunRecord:
    """`with RunRecord(cfg) as record:` writes `job_status.json` however the run ends, Ctrl-C or SIGTERM becoming a
    `RunInterrupted` that says how to continue. Set `record.trainer` once it exists (the epoch reached)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.trainer: L.Trainer | None = None
        self._sigterm = sigterm_as_interrupt()

    def __enter__(self) -> "RunRecord":
        self.started = time.time()
        self._sigterm.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._sigterm.__exit__(None, None, None)
        # Lightning turns Ctrl-C inside any trainer call (also lr_find's and calibration's) into sys.exit(1).
        interrupt = error.__context__ if isinstance(error, SystemExit) else error
        if isinstance(error, SystemExit) and self.trainer is not None and self.trainer.interrupted:
            interrupt = interrupt if isinstance(interrupt, KeyboardInterrupt) else KeyboardInterrupt()
        status: dict[str, Any] = {"status": "COMPLETED"}
        if isinstance(interrupt, KeyboardInterrupt):
            status, message = self._interrupted("SIGTERM" if isinstance(interrupt, Terminated) else "SIGINT")
        elif error is not None:
            status = {"status": "FAILED", "error": one_line(error)}
        if rank_zero_only.rank == 0:
            status["wall_time_s"] = round(time.time() - self.started, 3)
            run_dir = Path(self.cfg.paths.output_dir)
            hydra_dir = HydraConfig.get().runtime.get("output_dir") if HydraConfig.initialized() else None
            statuses = {run_dir: status}
            if hydra_dir and Path(hydra_dir).resolve() != run_dir.resolve():  # resumed: say where the run went on
                statuses[Path(hydra_dir)] = {**status, "continued_run": str(run_dir)}
            for folder, content in statuses.items():
                write_atomically(folder / "job_status.json", json.dumps(content, indent=2) + "\n")
        if isinstance(interrupt, KeyboardInterrupt):
            raise RunInterrupted(message, exit_code(interrupt)) from None

    def _interrupted(self, signal_name: str) -> tuple[dict[str, Any], str]:
        last = Path(self.cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        completed = command = None
        if last.is_file():
            saved = checkpoints.read_checkpoint(last, mmap=True)  # at an epoch's end (or CheckpointAtStart's, step 0)
            completed = saved["epoch"] + 1 if saved.get("global_step") else 0
            epoch = max(epoch, completed)  # a signal between an epoch's checkpoint and the next epoch's start
            command = resume_command(self.cfg)
        status = {"status": "INTERRUPTED", "signal": signal_name, "epoch": epoch, "epochs_completed": completed}
        status |= {"checkpoint": str(last) if completed is not None else None, "resume_command": command}
        if completed is None:
            return status, f"interrupted ({signal_name}) before the first checkpoint; nothing to resume: run it again"
        where = f"{last} holds the run after {completed} epoch{'' if completed == 1 else 's'}"
        return status, f"interrupted ({signal_name}) in epoch {epoch}; {where}; continue with: {command}"
