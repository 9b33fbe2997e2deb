"""Optuna's Hydra sweeper, ending a search whose every trial failed with one line instead of Optuna's
"No trials are completed yet" traceback (each trial's own error is in its run directory and the sweep's
summary.md)."""

from __future__ import annotations

import sys

import optuna
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _OptunaSweeper


class OptunaSweeper(_OptunaSweeper):
    def sweep(self, arguments: list[str]) -> None:
        try:
            return super().sweep(arguments)
        except ValueError:  # Optuna's way of saying there is no best trial (its wording depends on the storage)
            impl = self.sweeper
            if _completed_trials(impl.study_name, impl.storage):
                raise
            print(
                f"error: every trial of the search {impl.study_name!r} failed; their errors are in the sweep's "
                f"summary.md (python -m src.summarize {impl.config.hydra.sweep.dir})",
                file=sys.stderr,
            )
            sys.exit(1)


def _completed_trials(study_name: str, storage: str | None) -> int:
    if storage is None:  # an in-memory study is gone; its error said "No trials are completed yet"
        return 0
    study = optuna.load_study(study_name=study_name, storage=storage)
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
