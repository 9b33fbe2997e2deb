"""Results table of a sweep: every run with its overrides, status, best val loss, test accuracy, epochs and
wall time, sorted by the optimized metric, plus mean/std over runs that differ only by `seed` or fold.
`python -m src.summarize DIR` writes it for any folder of runs; `SweepSummary` (a Hydra callback in
conf/train.yaml) rewrites it after every job of a sweep, so a crashed or interrupted sweep still has a
table of what finished, and names the sweep's job folders after what the sweep varies.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import statistics
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per run directory (a folder with `.hydra/overrides.yaml`) under `sweep_dir`."""
    rows = []

    def natural(path: Path) -> list[Any]:  # runs 2_... before 10_...
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]

    for overrides_file in sorted(sweep_dir.glob("**/.hydra/overrides.yaml"), key=natural):
        run_dir = overrides_file.parent.parent
        overrides = [o for o in OmegaConf.load(overrides_file) if not str(o).startswith("hydra.")]
        metrics, job = _read_json(run_dir / "metrics.json"), _read_json(run_dir / "job_status.json")
        # No job_status.json: still running, or killed outright (SIGKILL, power loss).
        status = job.get("status") or ("COMPLETED" if metrics else "INCOMPLETE")
        resume = job.get("resume_command")
        row = {
            "run": str(run_dir.relative_to(sweep_dir)),
            "status": status,
            "overrides": " ".join(overrides),
            "error": job.get("error") or (f"continue with: {resume}" if resume else ""),
            "wall_time_s": round(job["wall_time_s"], 1) if "wall_time_s" in job else None,
            "epochs": metrics.get("epochs"),
        }
        row.update({k: metrics.get(k) for k in COLUMNS if k.startswith(("val/", "test/"))})
        rows.append(row)
    return rows


def sort_rows(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Best first by `metric` (ascending for losses, descending otherwise); failed runs last."""
    sign = 1 if "loss" in metric else -1

    def key(row: dict[str, Any]) -> tuple[int, float]:
        value = row.get(metric)
        return (0, sign * value) if isinstance(value, (int, float)) else (1, 0.0)

    return sorted(rows, key=key)


def aggregate_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over completed runs whose overrides differ only by GROUPED_BY (repeats with other seeds,
    the folds of a cross-validation)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        overrides = row["overrides"].split()
        if row["status"] == "COMPLETED" and any(o.startswith(GROUPED_BY) for o in overrides):
            rest = " ".join(o for o in overrides if not o.startswith(GROUPED_BY))
            groups.setdefault(rest, []).append(row)
    table = []
    for overrides, group in groups.items():
        if len(group) < 2:
            continue
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


def markdown(rows: list[dict[str, Any]], columns: tuple[str, ...] | list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def drop_common_overrides(rows: list[dict[str, Any]]) -> list[str]:
    """Keep in each row only the overrides that vary across runs (what the sweep swept); return the rest."""
    common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if len(rows) > 1 else set()
    for row in rows:
        row["overrides"] = " ".join(o for o in row["overrides"].split() if o not in common)
    return sorted(common)


def summarize(sweep_dir: Path, metric: str = "val/acc") -> str:
    """Write summary.csv and summary.md into `sweep_dir`; return the Markdown."""
    rows = sort_rows(collect(sweep_dir), metric)
    common = drop_common_overrides(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, "error"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(sweep_dir / "summary.csv", buffer.getvalue())
    text = f"# Sweep {sweep_dir}\n\nEvery run: {' '.join(common) or '(no common overrides)'}\n"
    text += f"Sorted by {metric}.\n\n" + markdown(rows, COLUMNS)
    for status, title in (
        ("FAILED", "Failed runs"),
        ("INTERRUPTED", "Interrupted runs (Ctrl-C or SIGTERM)"),
        ("INCOMPLETE", "Runs without a result (still running, or killed outright)"),
    ):
        these = [r for r in rows if r["status"] == status]
        if these:
            lines = [f"- {r['run']} ({r['overrides']}) {r['error']}".rstrip() for r in these]
            text += f"\n\n{title}:\n" + "\n".join(lines)
    groups = aggregate_groups(rows)
    if groups:
        columns = ["overrides", "runs", *(f"{k} {s}" for k in STATS for s in ("mean", "std"))]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(groups)
        write_atomically(sweep_dir / "summary_groups.csv", buffer.getvalue())
        text += "\n\n## Over seeds and folds (mean and std of runs that differ only by seed or dataset.fold)\n\n"
        text += markdown(groups, columns)
    write_atomically(sweep_dir / "summary.md", text + "\n")
    return text


_SWEEP_FUNCTION = re.compile(r"^(range|choice|interval|glob|tag)\(")


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
    """Hydra callback: in a sweep, rewrites the sweep's summary table after every job (each run writes its
    own job_status.json, src/runs.py)."""

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
