"""Optuna's Hydra sweeper, ending a search whose every trial failed with one line instead of Optuna's
"No trials are completed yet" traceback (each trial's own error is in its run directory and the sweep's
summary.md)."""

from __future__ import annotations

from hydra.errors import CompactHydraException
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _OptunaSweeper


class SearchFailed(CompactHydraException):
    """Printed by Hydra as its message alone (exit status 1)."""


class OptunaSweeper(_OptunaSweeper):
    def sweep(self, arguments: list[str]) -> None:
        try:
            return super().sweep(arguments)
        except ValueError as e:
            if "No trials are completed yet" not in str(e):
                raise
            impl = self.sweeper
            raise SearchFailed(
                f"error: every trial of the search {impl.study_name!r} failed; their errors are in the sweep's "
                f"summary.md (python -m src.summarize {impl.config.hydra.sweep.dir})"
            ) from None
