"""Entry point: test a checkpoint again, on its run's test split (or the same data elsewhere), into a new run
directory. Of its saved config only the network and datamodule are built (`open_run`); the rest: conf/evaluate.yaml."""

from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.utils.command import entry_point


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    from src.runs.checkpoints import open_run  # here: --help and config errors answer without torch
    from src.runs.record import build_trainer
    from src.runs.reports import format_table, report_run

    module, datamodule = open_run(cfg.ckpt_path, OmegaConf.to_container(cfg.dataset))
    trainer = build_trainer(cfg)
    test = trainer.test(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, verbose=False, weights_only=True)[0]
    metrics = report_run(trainer, module, cfg.paths.output_dir, test)
    if trainer.is_global_zero:
        print(format_table(metrics))
        print(f"run directory: {cfg.paths.output_dir}")
    return metrics


main = entry_point("evaluate")(evaluate)

if __name__ == "__main__":
    main()
