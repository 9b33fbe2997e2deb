"""Entry point: compose the config, fit, test the best checkpoint, report. E.g.:
python -m src.train dataset=cifar10 model=cnn3 optimizer=sgd optimizer.lr=0.01
python -m src.train -m model=mlp,cnn2,lenet optimizer.lr=1e-3,3e-3     # a sweep
python -m src.train --help        # config groups and their choices"""

import gc
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.utils.command import entry_point
from src.utils.errors import UserError


def build_module(cfg: DictConfig, datamodule: Any) -> Any:
    """The ClassifierModule for the config, shaped by the (set-up) data: input shape, classes, normalization."""
    from hydra.utils import instantiate

    from src.models.classifier import ClassifierModule

    net = instantiate(cfg.model, input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
    mean, std = datamodule.normalization()
    run_config = OmegaConf.to_container(cfg, resolve=False)  # kept in the checkpoint; re-resolved where used
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
        config=run_config,
        **{key: cfg[key] for key in ("label_smoothing", "channels_last", "norm_lr_scale", "compile")},
    )


def check_early_crops(net: Any, datamodule: Any) -> None:
    """A net that cannot take the early crops (one that flattens, not pools, its features) would fail at its first
    step with a shape error: say so before fitting."""
    import torch

    side, training = datamodule.early_crop, net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, datamodule.input_shape[0], side, side))
    except RuntimeError as e:
        needs = "early crops need a net that pools globally (model=airbench, bn_convnet)"
        raise UserError(f"dataset.early_crop={side}: this model cannot take {side}x{side} images; {needs}") from e
    finally:
        net.train(training)


def train(cfg: DictConfig) -> float:
    """Fit, validate and test the best checkpoint; return `cfg.optimized_metric` (for sweepers)."""
    import lightning as L  # here, not at the top: --help and config errors answer without torch
    from hydra.utils import instantiate

    from src.runs.record import RunRecord, build_trainer, resume_from, task_overrides
    from src.runs.reports import format_table, report_run
    from src.runs.tuning import CollectLogits, calibrate, find_lr, store_temperature
    from src.utils.config import ConfigError, validate

    with RunRecord(cfg) as record:
        validate(cfg)
        if cfg.get("ema_decay") is not None and not (cfg.get("callbacks") or {}).get("ema"):
            raise ConfigError(f"ema_decay={cfg.ema_decay} needs the ema callback (callbacks=default)")
        resume_from(cfg)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = instantiate(cfg.dataset)
        datamodule.prepare_data()
        datamodule.setup("fit")  # the model's shape and classes come from the data
        module = build_module(cfg, datamodule)
        if getattr(datamodule, "early_crop_epochs", 0):
            check_early_crops(module.net, datamodule)
        extra: dict[str, float] = {}
        if cfg.lr_find and cfg.ckpt_path is None:  # a resumed run keeps the learning rate it had
            finder = build_trainer(cfg, only=("progress_bar",))
            extra["lr_find/suggestion"] = find_lr(finder, module, datamodule, cfg.paths.output_dir)
        trainer = record.trainer = build_trainer(cfg)
        # The GC skips all set up so far: cheaper steps (RESULTS.md); collecting setup's garbage first costs 0.3 s.
        gc.freeze()
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        finally:
            gc.unfreeze()  # collectable again when the run is over (a sweep runs many in one process)
        # Accuracy before training, on the sanity check's val batches: about 1/num_classes, or something is wrong.
        untrained_acc = module.sanity_check_acc if cfg.ckpt_path is None else None
        best = "best" if getattr(trainer.checkpoint_callback, "best_model_path", "") else None  # else current weights
        val = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]
        test = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]
        if cfg.calibrate:
            extra |= calibrate(build_trainer(cfg, only=("progress_bar",), extra=[CollectLogits()]), module, datamodule)
            extra["test/ece_uncalibrated"] = test["test/ece"]
            test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
            store_temperature(trainer.checkpoint_callback.best_model_path, float(module.temperature))
        metrics = report_run(trainer, module, cfg.paths.output_dir, test, val, untrained_acc, task_overrides(), extra)
        if trainer.is_global_zero:
            print(format_table(metrics))
            print(f"run directory: {cfg.paths.output_dir}")
        if cfg.optimized_metric not in metrics:
            logged = sorted(k for k, v in metrics.items() if isinstance(v, float))
            raise ConfigError(f"optimized_metric={cfg.optimized_metric!r} was not logged; choose one of {logged}")
    return metrics[cfg.optimized_metric]


main = entry_point("train")(train)

if __name__ == "__main__":
    main()
