"""One error story for every entry point: a `UserError` is one line on stderr and exit status 1; anything else is a
bug and keeps its traceback. In a sweep every error is re-raised, so Hydra marks just that job failed."""

import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf.errors import MissingMandatoryValue

log = logging.getLogger(__name__)
T = TypeVar("T")


class UserError(Exception):
    """A mistake in what the user gave us; the message names the key, file or value and how to fix it."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the command (a KeyboardInterrupt: a sweep stops too)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's stop), raised where Ctrl-C would be, so both end the same way."""


def exit_code(interrupt: KeyboardInterrupt) -> int:
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM raises `Terminated` (in the main thread: only there can handlers be set)."""

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def is_user_error(error: BaseException) -> bool:
    """UserErrors, and what Hydra/OmegaConf raise for a config they cannot build. Not bare ValueErrors and
    TypeErrors: torch raises them for bugs (src/utils/config.py checks names and types first)."""
    if isinstance(error, InstantiationException):  # Hydra could not build what the config names
        return error.__cause__ is None or is_user_error(error.__cause__)
    return isinstance(error, (UserError, MissingMandatoryValue))


def one_line(error: BaseException) -> str:
    """The useful line of an error, also when Hydra's instantiate wrapped it."""
    if isinstance(error, InstantiationException) and error.__cause__ is not None:
        key = str(error).strip().splitlines()[-1].removeprefix("full_key: ")
        return f"{key}: {one_line(error.__cause__)}"
    if isinstance(error, MissingMandatoryValue):
        return f"{error.full_key} is required: set it on the command line ({error.full_key}=...)"
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = text.splitlines()[-1]  # a DataLoader worker's error ends with "module.DataError: message"
    return line.split(f"{type(error).__name__}: ", 1)[-1] if isinstance(error, UserError) else line


def _log_file_only(level: int, message: str, exc_info: BaseException | None = None) -> None:
    """Into the run's log file (Hydra's file handler), not again onto the console."""
    record = log.makeRecord(log.name, level, __file__, 0, message, (), None)
    if exc_info is not None:
        record.exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def report_errors(command: Callable[[], T]) -> T:
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return command()
    except RunInterrupted as e:
        _log_file_only(logging.WARNING, str(e))
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except Exception as e:
        if not is_user_error(e):
            _log_file_only(logging.ERROR, f"{type(e).__name__}: {e}", exc_info=e)
            raise
        if multirun:
            raise
        _log_file_only(logging.ERROR, one_line(e))
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(1)
