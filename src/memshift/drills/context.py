"""What a drill is given (a :class:`DrillContext`) and what it gives back (a :class:`DrillResult`).

A drill runs against real stores named by ``context.settings``: a Redis key prefix
of its own and, from ``memshift drill``, a scratch PostgreSQL database of its own
(the tests give it a fresh test database), so it may move the Plan, fill the repair
queue and the quarantine without touching anyone's migration. It measures
:class:`~memshift.migrate.rehearse.Figure` s: each says what was measured, what it
must be, and whether it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memshift.config import Settings
from memshift.errors import MemshiftError
from memshift.migrate.rehearse import Figure

__all__ = ["DrillContext", "DrillResult", "DrillSkipped", "DrillTimeout", "Figure", "Figures"]


class DrillTimeout(MemshiftError):
    """A drill ran past its time limit; it stopped at the next step it could."""


class DrillSkipped(MemshiftError):
    """A drill cannot run here (the message says why); it is reported, not failed."""


@dataclass(frozen=True)
class DrillContext:
    """Where a drill runs and how big it is.

    ``settings`` name the stores (``prefix`` is the drill's own), ``workdir`` holds
    its files (spool, a private Redis's data), ``quick`` picks the short
    configuration (tests, CI), ``seed`` makes its random choices repeatable, and
    ``deadline`` (``time.monotonic()``) is when it must give up.
    """

    settings: Settings
    workdir: Path
    quick: bool = False
    seed: int = 0
    deadline: float = float("inf")

    @property
    def redis_url(self) -> str:
        assert self.settings.redis_url, "a drill needs settings.redis_url"
        return self.settings.redis_url

    @property
    def postgres_dsn(self) -> str:
        assert self.settings.postgres_dsn, "a drill needs settings.postgres_dsn"
        return self.settings.postgres_dsn

    @property
    def prefix(self) -> str:
        return self.settings.prefix

    def pick(self, quick: Any, full: Any) -> Any:
        """The quick or the full configuration's value."""
        return quick if self.quick else full

    def left(self) -> float:
        """Seconds until the deadline (never below 0.1, for timeouts of subprocesses)."""
        return max(0.1, self.deadline - time.monotonic())

    def check_time(self, doing: str) -> None:
        """Raise DrillTimeout when the deadline has passed (called between steps)."""
        if time.monotonic() > self.deadline:
            raise DrillTimeout(f"the drill ran out of time while {doing}")

    def wait_for(self, ready: Callable[[], bool], doing: str, *, poll: float = 0.02) -> None:
        """Poll ``ready`` until it is true; DrillTimeout at the deadline."""
        while not ready():
            self.check_time(doing)
            time.sleep(poll)


@dataclass
class Figures:
    """A drill's figures as it measures them."""

    items: list[Figure] = field(default_factory=list)

    def expect(self, name: str, value: Any, expected: Any, ok: bool | None = None) -> None:
        """A figure that must equal ``expected`` (or pass the ``ok`` given)."""
        self.items.append(Figure(name, value, expected, value == expected if ok is None else ok))

    def at_most(self, name: str, value: float, limit: float) -> None:
        self.items.append(Figure(name, value, f"≤ {limit:g}", value <= limit))

    def at_least(self, name: str, value: float, floor: float) -> None:
        self.items.append(Figure(name, value, f"≥ {floor:g}", value >= floor))

    def info(self, name: str, value: Any) -> None:
        """A measurement with no pass criterion (sizes, depths, durations)."""
        self.items.append(Figure(name, value, None, True))


@dataclass(frozen=True)
class DrillResult:
    """One drill's outcome: its figures, or the error that stopped it."""

    drill: str
    family: str
    figures: tuple[Figure, ...]
    seconds: float
    limit: float
    error: str | None = None  # why it stopped (a crash or its time limit), if it did
    skipped: str | None = None  # why it could not run here, if it could not

    @property
    def ok(self) -> bool:
        """Passed, or skipped: only a drill that ran and failed is not ok."""
        return self.error is None and all(f.ok for f in self.figures)

    @property
    def verdict(self) -> str:
        if self.skipped is not None:
            return "skipped"
        return "pass" if self.ok else "fail"

    def figure(self, name: str) -> Any:
        """The value of the figure called ``name`` (KeyError when there is none)."""
        for item in self.figures:
            if item.name == name:
                return item.value
        raise KeyError(f"drill {self.drill} has no figure {name!r}")

    def failed(self) -> list[Figure]:
        return [f for f in self.figures if not f.ok]

    def as_json(self) -> dict[str, Any]:
        return {"drill": self.drill, "family": self.family, "verdict": self.verdict,
                "seconds": round(self.seconds, 2), "limit_seconds": self.limit,
                "error": self.error, "skipped": self.skipped,
                "figures": [f.as_json() for f in self.figures]}
