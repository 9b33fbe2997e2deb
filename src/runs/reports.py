"""What a tested run writes for people: metrics.json, its figures and TensorBoard's HPARAMS tab (`report_run`)."""

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.model_summary import ModelSummary
from omegaconf import OmegaConf

from src.callbacks.figures import save_figure
from src.models.classifier import ClassifierModule
from src.utils.io import write_atomically

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
    figure = confusion_figure(result.confusion_matrix, metrics["class_names"])
    save_figure(figure, trainer, output_dir, "confusion_matrix")
    figure = reliability_diagram(result.reliability, metrics.get("test/ece"))
    save_figure(figure, trainer, output_dir, "reliability_diagram")
    for logger in trainer.loggers:
        if untrained_acc is not None:
            logger.log_metrics({"val/acc_untrained": untrained_acc}, step=0)
        _log_hparams(logger, module, metrics, overrides)
    return metrics


def confusion_figure(matrix: Sequence[Sequence[int]], names: Sequence[str]) -> "Figure":
    from matplotlib.figure import Figure

    n, most = len(names), max(max(row) for row in matrix)
    fig = Figure(figsize=(max(6, 0.6 * n), max(6, 0.6 * n)))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, most))
    for (i, j), count in np.ndenumerate(np.asarray(matrix)):
        ax.text(j, i, count, ha="center", va="center", color="white" if count > most / 2 else "black", fontsize=8)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted class", ylabel="true class", title="Confusion matrix")
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    return fig


def reliability_diagram(bins: Sequence[tuple[float, float, int]], ece: float | None) -> "Figure":
    """Accuracy against confidence per bin (shade: how many images); a calibrated model's bars reach the diagonal."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    total, width = max(1, sum(n for _, _, n in bins)), 1 / len(bins)
    for i, (_, accuracy, count) in enumerate(bins):
        shade = 0.3 + 0.7 * count / total
        ax.bar((i + 0.5) * width, accuracy, width=width, color="tab:blue", alpha=shade, edgecolor="k")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top class probability)", ylabel="accuracy")
    ax.set_title("Reliability diagram" + (f" (ECE {ece:.4f}, {len(bins)} bins)" if ece is not None else ""))
    ax.legend(loc="upper left")
    return fig


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
