"""Re-run the test split on a checkpoint, using the config saved with it, into a new run directory:

python -m src.evaluate ckpt_path=outputs/2026-01-01/12-00-00-000000/checkpoints/last.ckpt
"""

from __future__ import annotations

from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.checkpoints import load_checkpoint
from src.console import quiet_console
from src.data import DataError
from src.errors import report_errors
from src.reports import format_table, report_run
from src.runs import build_trainer


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test `cfg.ckpt_path` on its own dataset config (with `cfg.dataset` overrides); return the metrics."""
    module = load_checkpoint(cfg.ckpt_path)
    run_cfg = OmegaConf.create(module.hparams.config)
    run_cfg.dataset = OmegaConf.merge(run_cfg.dataset, {k: v for k, v in cfg.dataset.items() if v is not None})
    run_cfg.trainer = OmegaConf.merge(run_cfg.trainer, cfg.trainer, {"strategy": "auto", "num_nodes": 1})
    run_cfg.paths.output_dir = HydraConfig.get().runtime.output_dir

    datamodule = instantiate(run_cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("test")
    if list(datamodule.class_names) != list(module.hparams.class_names):
        raise DataError(
            f"the data has classes {datamodule.class_names} but the checkpoint was trained on "
            f"{list(module.hparams.class_names)}"
        )
    trainer = build_trainer(run_cfg, only=("progress_bar", "prediction_figures"))
    test = trainer.test(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, verbose=False, weights_only=True)
    metrics = report_run(trainer, module, run_cfg.paths.output_dir, test[0])
    if trainer.is_global_zero:
        print(format_table(metrics))
        print(f"run directory: {run_cfg.paths.output_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    quiet_console()
    report_errors(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
