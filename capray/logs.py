"""capray's messages: the library logs, the CLI prints.

Every module logs to its `capray.*` logger (INFO: progress and summaries; WARNING: problems).
capray/__init__ gives the `capray` logger a NullHandler, so from Python nothing is printed until
the user configures logging (docs/python.md). The `capray` command, the `jobs/*.py` scripts and
the benchmarks call `install_cli_handler`: each record becomes one `[capray] <message>` line on
stdout, as the CLI has always printed them, and does not reach the root logger's handler too.

Ray worker processes (Ray Train workers, Ray Data actors, Ray tasks) have no handler of their
own, and what they write to stdout is what Ray forwards to the driver's console. So the driver
says at which level they print (`worker_level`, put in the job's runtime env by capray.runtime)
and every worker process installs the same handler at that level when it starts
(`worker_logging`, from Ray's worker_process_setup_hook); with none, workers stay as quiet as the
driver.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

LOGGER = "capray"
# The driver's level for the workers of its Ray job (capray.runtime); unset: they print nothing.
WORKER_ENV = "CAPRAY_WORKER_LOG_LEVEL"


class StdoutHandler(logging.Handler):
    """`[capray] <message>` lines on the current sys.stdout (pytest's capture, a redirect, Ray's pipe)."""

    def __init__(self, level: int = logging.NOTSET):
        super().__init__(level)
        self.setFormatter(logging.Formatter("[capray] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()  # interleaved with Ray's forwarded worker lines in order
        except (OSError, ValueError):  # a closed or broken stream: logging's own error report
            self.handleError(record)


def install_cli_handler(level: int = logging.INFO) -> Callable[[], None]:
    """Print capray's records at `level` and above as `[capray] ...` lines on stdout, and only
    there; returns the function that restores the logger as it was (handlers, level, propagation)."""
    logger = logging.getLogger(LOGGER)
    before = (list(logger.handlers), logger.level, logger.propagate)
    for h in [h for h in logger.handlers if isinstance(h, StdoutHandler)]:
        logger.removeHandler(h)
    logger.addHandler(StdoutHandler())
    logger.setLevel(level)
    logger.propagate = False

    def restore() -> None:
        logger.handlers[:] = before[0]
        logger.setLevel(before[1])
        logger.propagate = before[2]

    return restore


def worker_level() -> str | None:
    """The level name at which this driver shows capray's records, None when it shows none: what
    its Ray workers should print at (a handler only where the driver's records reach one)."""
    logger: logging.Logger | None = logging.getLogger(LOGGER)
    levels = []
    while logger is not None:
        levels += [h.level for h in logger.handlers if not isinstance(h, logging.NullHandler)]
        logger = logger.parent if logger.propagate else None
    if not levels:
        return None
    return logging.getLevelName(max(logging.getLogger(LOGGER).getEffectiveLevel(), min(levels)))


def worker_logging(level: str | None) -> None:
    """In a Ray worker process: print capray's records at `level` (from `worker_level`) to stdout,
    which Ray forwards to the driver; nothing when None."""
    if level:
        install_cli_handler(logging.getLevelName(level))
