"""Entry point: compose the config, fit, test the best checkpoint, report.

python -m src.train dataset=cifar10 model=cnn3 optimizer=sgd optimizer.lr=0.01
python -m src.train --help        # config groups and their choices
"""

from __future__ import annotations

import ctypes
import logging

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.calibration import CollectLogits, calibrate, store_temperature
from src.classifier import ClassifierModule
from src.config import ConfigError, validate
from src.console import quiet_console
from src.errors import report_errors
from src.lr_find import find_lr
from src.reports import format_table, report_run
from src.runs import RunRecord, build_trainer, resume_from, task_overrides

log = logging.getLogger(__name__)


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
        lr_scheduler=OmegaConf.to_container(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        label_smoothing=cfg.label_smoothing,
        channels_last=cfg.channels_last,
        config=run_config,
        norm_lr_scale=cfg.norm_lr_scale,
        compile=cfg.compile,
    )


def train(cfg: DictConfig) -> float:
    """Fit, validate and test the best checkpoint; return `cfg.optimized_metric` (for sweepers). However
    it ends, the run directory's job_status.json says how (src/runs.py)."""
    with RunRecord(cfg) as record:
        validate(cfg)
        resume_from(cfg)
        L.seed_everything(cfg.seed, workers=True)
        datamodule = instantiate(cfg.dataset)
        datamodule.prepare_data()
        datamodule.setup("fit")  # the model's shape and classes come from the data
        module = build_module(cfg, datamodule)
        extra: dict[str, float] = {}
        if cfg.lr_find and cfg.ckpt_path is None:  # a resumed run keeps the learning rate it had
            finder = build_trainer(cfg, only=("progress_bar",))
            extra["lr_find/suggestion"] = find_lr(finder, module, datamodule, cfg.paths.output_dir)
        trainer = record.trainer = build_trainer(cfg)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        # Accuracy before training, on the sanity check's val batches: about 1/num_classes, or something is wrong.
        untrained_acc = module.sanity_check_acc if cfg.ckpt_path is None else None
        # Report the weights with the best val loss (the current ones if no checkpoint was written).
        best = "best" if getattr(trainer.checkpoint_callback, "best_model_path", "") else None
        val = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]
        test = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]
        if cfg.calibrate:
            extra |= calibrate(build_trainer(cfg, only=("progress_bar",), extra=[CollectLogits()]), module, datamodule)
            extra["test/ece_uncalibrated"] = test["test/ece"]
            test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
            checkpoint = trainer.checkpoint_callback
            store_temperature(checkpoint.best_model_path, float(module.temperature))

        metrics = report_run(trainer, module, cfg.paths.output_dir, test, val, untrained_acc, task_overrides(), extra)
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
    quiet_console()
    return report_errors(lambda: train(cfg))


if __name__ == "__main__":
    main()
