"""Optuna's Hydra sweeper, ending a search whose every trial failed with one line instead of Optuna's
"No trials are completed yet" traceback (each trial's own error is in its run directory and the sweep's
summary.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _OptunaSweeper

NO_BEST_TRIAL = ("No trials are completed yet", "Record does not exist")  # in memory, in a database


class OptunaSweeper(_OptunaSweeper):
    def setup(self, **kwargs: Any) -> None:
        storage = self.sweeper.storage
        if isinstance(storage, str) and storage.startswith("sqlite:///"):  # SQLite creates no missing folder
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        super().setup(**kwargs)

    def sweep(self, arguments: list[str]) -> None:
        try:
            return super().sweep(arguments)
        except (ValueError, KeyError) as e:
            impl = self.sweeper
            if not any(text in str(e) for text in NO_BEST_TRIAL) or self._completed_trials():
                raise  # another error, e.g. a search space Optuna refuses: keep its traceback
            print(
                f"error: every trial of the search {impl.study_name!r} failed; their errors are in the sweep's "
                f"summary.md (python -m src.summarize {impl.config.hydra.sweep.dir})",
                file=sys.stderr,
            )
            sys.exit(1)

    def _completed_trials(self) -> int:
        import optuna  # here: Hydra imports every plugin module at the start of every run

        if self.sweeper.storage is None:  # an in-memory study's trials are gone with it
            return 0
        study = optuna.load_study(study_name=self.sweeper.study_name, storage=self.sweeper.storage)
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
