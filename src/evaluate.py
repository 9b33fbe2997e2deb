"""Entry point: test a checkpoint again, on its run's test split (or the same data elsewhere), into a new run
directory (metrics.json, figures, TensorBoard):

python -m src.evaluate ckpt_path=outputs/2026-01-01/12-00-00-000000/checkpoints/last.ckpt [dataset.data_dir=DIR]

From the config saved in the checkpoint only the network and the datamodule are built (src/runs/checkpoints.py
`open_run`); the Trainer, callbacks and logger are this command's own (conf/evaluate.yaml).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.utils.command import entry_point


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test `cfg.ckpt_path` on its own dataset config (with `cfg.dataset` overrides); return the metrics."""
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
