"""Results table of a sweep, plus mean/std over runs that differ only by `seed` or fold. `SweepSummary` rewrites it
after every job, so a crashed or interrupted sweep still has one, and names the job folders after what varies."""

import csv
import io
import json
import os
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from src.utils.errors import one_line
from src.utils.io import write_atomically
from src.utils.resolvers import SWEEP_KEYS

COLUMNS = ("run", "status", "overrides", "val/loss", "val/acc", "test/acc", "test/loss", "epochs", "wall_time_s")
STATS = ("val/acc", "test/acc", "val/loss", "test/loss")
GROUPED_BY = ("seed=", "dataset.fold=")  # runs that differ only by these are repeats of one setting
UNFINISHED = {
    "FAILED": "Failed runs",
    "INTERRUPTED": "Interrupted runs (Ctrl-C or SIGTERM)",
    "INCOMPLETE": "Runs without a result (still running, or killed outright)",
}
_SWEEP_FUNCTION = re.compile(r"^(range|choice|interval|glob|tag)\(")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per run directory (a folder with `.hydra/overrides.yaml`) under `sweep_dir`, 2_... before 10_..."""
    rows = []
    found = sweep_dir.glob("**/.hydra/overrides.yaml")
    for file in sorted(found, key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", str(p))]):
        run_dir = file.parent.parent
        metrics, job = _read_json(run_dir / "metrics.json"), _read_json(run_dir / "job_status.json")
        resume = job.get("resume_command")
        row = {"run": str(run_dir.relative_to(sweep_dir))}
        row["status"] = job.get("status") or ("COMPLETED" if metrics else "INCOMPLETE")  # running, or killed
        row["overrides"] = " ".join(o for o in OmegaConf.load(file) if not str(o).startswith("hydra."))
        row["error"] = job.get("error") or (f"continue with: {resume}" if resume else "")
        row["wall_time_s"] = round(job["wall_time_s"], 1) if "wall_time_s" in job else None
        rows.append(row | {k: metrics.get(k) for k in COLUMNS if k.startswith(("val/", "test/", "epochs"))})
    return rows


def aggregate_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over completed runs whose overrides differ only by GROUPED_BY (other seeds, or folds)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        kept = [o for o in row["overrides"].split() if not o.startswith(GROUPED_BY)]
        if row["status"] == "COMPLETED" and len(kept) < len(row["overrides"].split()):
            groups.setdefault(" ".join(kept), []).append(row)
    table = []
    for overrides, group in ((o, g) for o, g in groups.items() if len(g) > 1):
        entry: dict[str, Any] = {"overrides": overrides, "runs": len(group)}
        for key in STATS:
            values = [r[key] for r in group if isinstance(r.get(key), (int, float))]
            entry[f"{key} mean"] = statistics.mean(values) if values else None
            entry[f"{key} std"] = statistics.stdev(values) if len(values) > 1 else None
        table.append(entry)
    return table


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value)


def _table(rows: list[dict[str, Any]], columns: Sequence[str], csv_file: Path, extra: Sequence[str] = ()) -> str:
    """`rows` written to `csv_file` (with the `extra` columns); returned as Markdown."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*columns, *extra], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(csv_file, buffer.getvalue())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows])


def summarize(sweep_dir: Path, metric: str = "val/acc") -> str:
    """Write summary.csv, summary.md (and summary_groups.csv) into `sweep_dir`, best `metric` first; return the text."""
    sign, rows = 1 if "loss" in metric else -1, collect(sweep_dir)
    rows.sort(key=lambda r: (0, sign * r[metric]) if isinstance(r.get(metric), (int, float)) else (1, 0.0))
    common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if len(rows) > 1 else set()
    for row in rows:  # each row keeps only what the sweep varied
        row["overrides"] = " ".join(o for o in row["overrides"].split() if o not in common)
    text = f"# Sweep {sweep_dir}\n\nEvery run: {' '.join(sorted(common)) or '(no common overrides)'}\n"
    text += f"Sorted by {metric}.\n\n" + _table(rows, COLUMNS, sweep_dir / "summary.csv", ["error"])
    for status, title in UNFINISHED.items():
        if these := [f"- {r['run']} ({r['overrides']}) {r['error']}".rstrip() for r in rows if r["status"] == status]:
            text += f"\n\n{title}:\n" + "\n".join(these)
    if groups := aggregate_groups(rows):
        columns = ["overrides", "runs", *(f"{k} {s}" for k in STATS for s in ("mean", "std"))]
        text += "\n\n## Over seeds and folds (mean and std of runs that differ only by seed or dataset.fold)\n\n"
        text += _table(groups, columns, sweep_dir / "summary_groups.csv")
    write_atomically(sweep_dir / "summary.md", text + "\n")
    return text


def varying_keys(overrides: list[str], searched: list[str]) -> list[str]:
    """Keys given several values on the command line (`a=1,2`, `a=range(...)`) or searched by the sweeper."""
    keys = []
    for override in overrides:
        key, _, value = override.partition("=")
        top_level = re.sub(r"\[[^]]*]|\{[^}]*}|\([^)]*\)", "", value)  # commas inside lists are one value
        if _SWEEP_FUNCTION.match(value) or "," in top_level:
            keys.append(key.lstrip("+~"))
    return keys + [k for k in searched if k not in keys]


class SweepSummary(Callback):
    """Hydra callback: in a sweep, rewrites the summary after every job (whose run writes job_status.json)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        searched = list((config.hydra.sweeper.get("params") or {}).keys())
        os.environ[SWEEP_KEYS] = ",".join(varying_keys(list(config.hydra.overrides.task), searched))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        status_file = Path(config.hydra.runtime.output_dir) / "job_status.json"
        if job_return.status == JobStatus.FAILED and not status_file.exists():  # it failed before it could say so
            error = {"status": "FAILED", "error": one_line(job_return._return_value)}
            write_atomically(status_file, json.dumps(error) + "\n")
        if config.hydra.mode == RunMode.MULTIRUN:
            summarize(Path(config.hydra.sweep.dir), config.get("optimized_metric", "val/acc"))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            print(summarize(sweep_dir, config.get("optimized_metric", "val/acc")))
            print(f"\nwritten: {sweep_dir / 'summary.csv'}, {sweep_dir / 'summary.md'}")
