"""The follower's position and lag: the sessions notified and not applied yet (the
oldest of them holds the position back), the counts, the status the CLI prints, and
the followers as PostgreSQL records them (``memshift follow --status``)."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg
from prometheus_client import Gauge
from psycopg.rows import dict_row

from memshift.observe.metrics import REGISTRY
from memshift.sql.queries import query

LAG = Gauge(
    "memshift_follow_lag_seconds",
    "Age of the oldest change to Redis that the follower has not applied to PostgreSQL "
    "(0 when it is caught up).",
    registry=REGISTRY,
)
PENDING = Gauge(
    "memshift_follow_pending_sessions",
    "Sessions with notified changes waiting to be re-read and applied.",
    registry=REGISTRY,
)


class Pending:
    """Sessions with notified changes not applied yet, each with its first change's time.

    Insertion order is arrival order, so the first entry is the oldest change.
    """

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._first: dict[str, float] = {}
        self.events = 0

    def add(self, session_id: str, at: float) -> None:
        with self._ready:
            self.events += 1
            if session_id not in self._first:
                # A waiting worker sleeps until the oldest entry is due; only a first
                # entry brings a due time earlier than that.
                if not self._first:
                    self._ready.notify()
                self._first[session_id] = at

    def put_back(self, batch: dict[str, float]) -> None:
        """Return a batch that could not be applied, keeping each session's oldest time."""
        with self._ready:
            merged = dict(batch)
            for sid, at in self._first.items():
                merged[sid] = min(at, merged.get(sid, at))
            self._first = dict(sorted(merged.items(), key=lambda item: item[1]))

    def take(self, older_than: float, limit: int) -> dict[str, float]:
        """Up to ``limit`` sessions whose first change came before ``older_than``."""
        with self._ready:
            taken: dict[str, float] = {}
            for sid, at in self._first.items():
                if at > older_than or len(taken) >= limit:
                    break
                taken[sid] = at
            for sid in taken:
                del self._first[sid]
            return taken

    def oldest(self) -> float | None:
        with self._ready:
            return next(iter(self._first.values()), None)

    def wait(self, timeout: float) -> None:
        if timeout > 0:
            with self._ready:
                self._ready.wait(timeout)

    def wake(self) -> None:
        with self._ready:
            self._ready.notify_all()

    def __len__(self) -> int:
        with self._ready:
            return len(self._first)


class Totals:
    """What the follower did since it started, counted from every thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {"applied": 0, "expired": 0, "quarantined": 0}

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                self.counts[name] += value

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


@dataclass
class FollowStatus:
    """The follower as it is now: for the CLI's status lines and for scripts."""

    follower_id: int = 0
    lag_seconds: float = 0.0
    pending_sessions: int = 0
    events: int = 0
    events_per_second: float = 0.0
    sessions_applied: int = 0
    sessions_per_second: float = 0.0
    sessions_expired: int = 0
    quarantined: int = 0
    caught_up: bool = False  # no catch-up sweep is due or running

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FollowerRow:
    """One follower as PostgreSQL records it (``memshift follow --status``)."""

    follower_id: int
    source: str
    layout: str
    prefix: str
    state: str
    worker: str | None
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_seconds: float
    applied_through: datetime
    lag_seconds: float
    events: int
    sessions_applied: int
    sessions_expired: int
    quarantined: int
    events_per_second: float
    sessions_per_second: float
    sweeps: int
    last_sweep_started_at: datetime | None
    last_sweep_finished_at: datetime | None
    last_sweep_scanned: int | None
    last_sweep_applied: int | None

    @property
    def responding(self) -> bool:
        """A running follower whose heartbeat is recent (else it died or hangs)."""
        return self.state == "running" and self.heartbeat_age_seconds < 10.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self) | {"responding": self.responding}


def followers(conn: psycopg.Connection[Any]) -> list[FollowerRow]:
    """Every follower with its position, lag, counters and last sweep."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query("follow_status")).fetchall()
    return [FollowerRow(**row) for row in rows]
