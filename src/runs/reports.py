"""What a tested run writes for people: metrics.json and TensorBoard's HPARAMS tab (`report_run`); its figures are
drawn by src/callbacks/figures.py when testing ends."""

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.model_summary import ModelSummary
from omegaconf import OmegaConf

from src.models.classifier import ClassifierModule
from src.utils.io import write_atomically

SUMMARY_KEYS = tuple(
    "lr_find/suggestion val/acc_untrained val/loss val/acc test/loss test/acc test/acc_top5 test/ece_uncalibrated "
    "calibration/temperature test/ece".split()
)
HPARAM_SECTIONS = ("dataset", "model", "optimizer", "scheduler", "seed", "label_smoothing", "trainer")


def strict_json(value: Any) -> Any:
    """`value` with NaN and infinities as None, so `json.dumps(allow_nan=False)` writes strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def chance_level(confusion_matrix: Sequence[Sequence[int]]) -> float:
    """The accuracy of always guessing the most common test class (1/num_classes when balanced)."""
    counts = [sum(row) for row in confusion_matrix]
    return max(counts) / max(1, sum(counts))


def format_table(metrics: dict[str, Any], keys: tuple[str, ...] = SUMMARY_KEYS) -> str:
    """A console table of the headline figures and per-class scores; a warning when no better than guessing."""
    values = {k: metrics[k] for k in keys if isinstance(metrics.get(k), float)}
    rows = [(k, f"{v:.4g}" if k.startswith(("lr_find", "calibration")) else f"{v:.4f}") for k, v in values.items()]
    if "test/acc_per_class" in metrics:
        rows.append(("test, per class:", "   acc   prec  recall   f1"))
        for name in metrics["test/acc_per_class"]:
            scores = [metrics.get(f"test/{k}_per_class", {}).get(name) for k in ("acc", "precision", "recall", "f1")]
            rows.append((f"  {name}", " ".join("     -" if v is None else f"{v:6.4f}" for v in scores)))
    width = max((len(k) for k, _ in rows), default=10) + 2
    line = "-" * (width + 28)
    table = [line, *(f"{k:<{width}}{v:>28}" for k, v in rows), line]
    if metrics.get("test/at_chance_level"):
        acc, chance = metrics["test/acc"], metrics["test/chance_level"]
        table.append(
            f"WARNING: test accuracy {acc:.4f} is at chance level ({chance:.4f}): the model learned nothing; "
            "check the data and labels, or try another optimizer.lr"
        )
    return "\n".join(table)


def report_run(
    trainer: L.Trainer,
    module: ClassifierModule,
    output_dir: str | Path,
    test: dict[str, float],
    val: dict[str, float] | None = None,
    untrained_acc: float | None = None,
    overrides: Sequence[str] = (),
    extra: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A tested run's metrics (on every rank: train() returns them on each); rank 0 also writes the files and tab."""
    result = module.test_result
    assert result is not None, "report_run() comes after trainer.test()"
    chance = chance_level(result.confusion_matrix)
    metrics = {
        **({} if untrained_acc is None else {"val/acc_untrained": untrained_acc}),
        **{k: float(v) for k, v in (val or {}).items() if k.startswith("val/")},
        **{k: float(test[k]) for k in ("test/loss", "test/acc", "test/acc_top5", "test/ece") if k in test},
        **(extra or {}),
        "test/acc_per_class": result.acc_per_class,
        "test/precision_per_class": result.precision,
        "test/recall_per_class": result.recall,
        "test/f1_per_class": result.f1,
        "test/reliability": [{"confidence": c, "accuracy": a, "images": n} for c, a, n in result.reliability],
        "test/confusion_matrix": result.confusion_matrix,
        "test/chance_level": chance,
        "test/at_chance_level": bool(test.get("test/acc", 0.0) <= chance),
        "class_names": list(module.hparams.class_names),
        "num_parameters": ModelSummary(module).total_parameters,
        "epochs": trainer.current_epoch,
        "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None) or trainer.ckpt_path,
    }
    if not trainer.is_global_zero:
        return metrics
    output_dir = Path(output_dir)
    write_atomically(output_dir / "metrics.json", json.dumps(strict_json(metrics), indent=2, allow_nan=False) + "\n")
    for logger in trainer.loggers:
        if untrained_acc is not None:
            logger.log_metrics({"val/acc_untrained": untrained_acc}, step=0)
        _log_hparams(logger, module, metrics, overrides)
    return metrics


def _log_hparams(logger: Logger, module: ClassifierModule, metrics: dict[str, Any], overrides: Sequence[str]) -> None:
    """The run's command-line overrides first (in a sweep, what varies), then the config sections."""
    if not (config := module.hparams.get("config")):
        return
    config = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    given = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    params: dict[str, Any] = {"overrides": given} if given else {}
    params.update({k: config.get(k) for k in HPARAM_SECTIONS if k in config})
    if isinstance(params.get("trainer"), dict):
        params["trainer"] = {"max_epochs": params["trainer"].get("max_epochs")}
    final = {f"hparams/{k.replace('/', '_')}": v for k, v in metrics.items() if isinstance(v, float)}
    tensorboard = isinstance(logger, TensorBoardLogger)  # its HPARAMS tab shows the final metrics beside them
    logger.log_hyperparams(params, **({"metrics": final} if tensorboard else {}))
