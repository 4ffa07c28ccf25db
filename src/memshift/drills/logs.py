"""memshift's log records during a drill: counted and kept, not printed.

A drill's outage makes the router warn at every failed secondary write (and the
connection pool at every failed connect), which is right for an application and
noise in a table of figures. While a drill runs, those records go here instead of
stderr: the drill reports how many there were, and the security drill greps their
text for passwords.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class LogCapture(logging.Handler):
    """Every record of the ``memshift`` loggers, formatted, with counts by level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.levels: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.levels[record.levelname] += 1
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


# memshift's own loggers, and the connection pool's (it logs each failed connect).
LOGGERS = ("memshift", "psycopg.pool")


@contextmanager
def captured_logs() -> Iterator[LogCapture]:
    """Route the records (INFO and up) of :data:`LOGGERS` to a LogCapture meanwhile."""
    capture = LogCapture()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(capture)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield capture
    finally:
        for logger, (level, propagate) in zip(loggers, saved, strict=True):
            logger.removeHandler(capture)
            logger.setLevel(level)
            logger.propagate = propagate
