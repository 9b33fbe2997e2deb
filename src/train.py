"""Entry point: compose the config, fit, test the best checkpoint, report.

python -m src.train dataset=cifar10 model=cnn3 optimizer=sgd optimizer.lr=0.01
python -m src.train --help        # config groups and their choices
"""

from __future__ import annotations

import ctypes
import logging
import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.checkpoints import checkpoint_hparams
from src.classifier import ClassifierModule
from src.config import ConfigError, validate
from src.errors import report_errors
from src.reports import final_metrics, format_table

log = logging.getLogger(__name__)
# In-process loading (num_workers=0) is the measured fastest on small CPU machines; don't nag about it.
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def keep_freed_memory() -> None:
    """Tell glibc to keep freed blocks in the heap: by default it unmaps large ones, so every CPU training
    step page-faults its activations in afresh (measured up to 2x slower steps, varying run to run)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks under 32 MB come from the heap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of free heap
    libc.mallopt(-2, 256 << 20)  # M_TOP_PAD: grow the heap in 256 MB steps


def build_trainer(cfg: DictConfig, skip: tuple[str, ...] = ()) -> L.Trainer:
    """The Trainer with the config's callbacks (except those named in `skip`) and logger."""
    show_progress = cfg.trainer.get("enable_progress_bar", True)
    callbacks = [
        instantiate(c)
        for name, c in cfg.callbacks.items()
        if c and name not in skip and (name != "progress_bar" or show_progress)
    ]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger))


def _overrides(overrides_yaml: Path | list[str]) -> list[str]:
    """A run's overrides that define what it computes (not where it writes or whether it resumes)."""
    items = OmegaConf.load(overrides_yaml) if isinstance(overrides_yaml, Path) else overrides_yaml
    ignored = ("hydra.", "resume=", "ckpt_path=", "paths.output_dir=")
    return sorted(o for o in items if not o.lstrip("+~").startswith(ignored))


def find_last_checkpoint(runs_root: Path, overrides: list[str]) -> Path:
    """`last.ckpt` of the most recent run under `runs_root` started with the same overrides."""
    wanted = _overrides(overrides)
    candidates = [
        path.parent.parent / "checkpoints" / "last.ckpt"
        for path in runs_root.glob("**/.hydra/overrides.yaml")
        if _overrides(path) == wanted
    ]
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        raise ConfigError(f"resume=true: no run under {runs_root}/ with overrides {wanted} has checkpoints/last.ckpt")
    return max(candidates, key=lambda c: c.stat().st_mtime)


def resume_from(cfg: DictConfig) -> None:
    """`ckpt_path=PATH` or `resume=true`: continue the run that wrote the checkpoint in its own directory,
    so its best-checkpoint tracking, TensorBoard curves and metrics.json carry on."""
    if cfg.resume and cfg.ckpt_path is None:
        cfg.ckpt_path = str(find_last_checkpoint(Path(cfg.paths.runs_root), list(HydraConfig.get().overrides.task)))
    if cfg.ckpt_path is None:
        return
    checkpoint = Path(cfg.ckpt_path)
    if not checkpoint.is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")
    saved = checkpoint_hparams(checkpoint)["config"]
    if cfg.dataset._target_ != saved["dataset"]["_target_"]:
        raise ConfigError(f"ckpt_path={checkpoint} was trained on another dataset ({saved['dataset']['_target_']})")
    if OmegaConf.to_container(cfg.model) != saved["model"]:
        raise ConfigError(f"ckpt_path={checkpoint} was trained with the model {saved['model']}; use the same")
    run_dir = checkpoint.parent.parent
    if checkpoint.parent.name == "checkpoints" and (run_dir / ".hydra").is_dir():
        cfg.paths.output_dir = str(run_dir)
    log.info("resuming from %s; writing to %s", checkpoint, cfg.paths.output_dir)


def build_module(cfg: DictConfig, datamodule: L.LightningDataModule) -> ClassifierModule:
    """The model for the config, shaped by the (set-up) data: input shape, classes, normalization."""
    net = instantiate(cfg.model, input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
    mean, std = datamodule.normalization()
    run_config = OmegaConf.to_container(cfg, resolve=False)  # re-resolved where it is used (evaluate)
    run_config.pop("hydra", None)
    return ClassifierModule(
        net,
        class_names=datamodule.class_names,
        input_shape=datamodule.input_shape,
        mean=mean,
        std=std,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        label_smoothing=cfg.label_smoothing,
        channels_last=cfg.channels_last,
        config=run_config,
    )


def train(cfg: DictConfig) -> float:
    """Fit, validate and test the best checkpoint; return `cfg.optimized_metric` (for sweepers)."""
    validate(cfg)
    resume_from(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")  # the model's shape and classes come from the data
    module = build_module(cfg, datamodule)
    trainer = build_trainer(cfg)
    if cfg.ckpt_path is None:  # accuracy before training: about 1/num_classes, or something is wrong
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    # Report the weights with the best val loss (the current ones if no checkpoint was written, e.g. max_epochs=0).
    best = "best" if getattr(trainer.checkpoint_callback, "best_model_path", "") else None
    trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)

    metrics = final_metrics(trainer)
    if trainer.is_global_zero:
        print(format_table(metrics))
        print(f"run directory: {cfg.paths.output_dir}")
    if cfg.optimized_metric not in metrics:
        raise ConfigError(
            f"optimized_metric={cfg.optimized_metric!r} was not logged; choose one of "
            f"{sorted(k for k, v in metrics.items() if isinstance(v, float))}"
        )
    return metrics[cfg.optimized_metric]


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    keep_freed_memory()
    return report_errors(lambda: train(cfg))


if __name__ == "__main__":
    main()
