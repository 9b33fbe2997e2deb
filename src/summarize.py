"""Entry point: the results table of a sweep (or any folder of runs), as summary.md and summary.csv in it.

python -m src.summarize outputs/multirun/2026-01-01/12-00-00-000000 [--metric test/acc]"""

import argparse
from pathlib import Path

from src.runs.sweeps import collect, summarize
from src.utils.errors import UserError, report_errors


def summarize_folder(sweep_dir: Path, metric: str) -> None:
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir} is not a directory")
    if not collect(sweep_dir):
        raise UserError(f"no runs (folders with .hydra/overrides.yaml) under {sweep_dir}")
    print(summarize(sweep_dir, metric))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metric", default="val/acc", help="sort by this metric (default: val/acc)")
    args = parser.parse_args()
    report_errors(lambda: summarize_folder(args.sweep_dir, args.metric))


if __name__ == "__main__":
    main()
