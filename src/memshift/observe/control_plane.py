"""The control plane as operators read it: recorded parity results and their trend,
the sessions failing parity now, the repair queue and the quarantine's size.

Read-only. ``memshift inspect`` and the dashboard call these (and the Plan, backfill
and quarantine functions of ``memshift.migrate``), so both show the same state from
the same queries. Every function takes an open connection (:func:`open_control_plane`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from memshift.errors import StoreUnavailable
from memshift.migrate.backfill import connect
from memshift.migrate.parity import iso_z
from memshift.migrate.quarantine import QuarantineEntry, printable
from memshift.redact import redact
from memshift.sql.queries import query


def open_control_plane(dsn: str) -> psycopg.Connection[Any]:
    """A connection to the control plane (schema checked, UTC); StoreUnavailable, with
    the password hidden, when PostgreSQL cannot be reached."""
    try:
        return connect(dsn)
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(
            f"PostgreSQL at {redact(dsn)} cannot be reached: {redact(str(exc)).strip()}"
        ) from None


# Bucket widths the parity trend picks from, in seconds: round numbers on a time axis.
_BUCKETS = (1, 5, 10, 30, 60, 300, 600, 900, 1800, 3600, 3 * 3600, 6 * 3600, 86400)


@dataclass(frozen=True)
class RecordedResult:
    """One row of ``memshift.parity_results`` (its diffs were stored redacted)."""

    id: int
    session_id: str
    status: str
    checks: dict[str, bool | None]
    diffs: list[dict[str, Any]]
    checked_at: datetime
    read_path: str | None  # the live compare's read path; None for `memshift parity`

    @property
    def failed_checks(self) -> list[str]:
        return [name for name, ok in self.checks.items() if ok is False]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "session_id": self.session_id,
            "status": self.status,
            "failed_checks": self.failed_checks,
            "checks": dict(self.checks),
            "diffs": list(self.diffs),
            "checked_at": iso_z(self.checked_at),
            "read_path": self.read_path,
        }


def parity_results(
    conn: psycopg.Connection[Any], session_id: str, *, limit: int = 10
) -> list[RecordedResult]:
    """One session's recorded parity results, newest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query("parity_results_of"),
                           {"session_id": session_id, "limit": limit}).fetchall()
    return [RecordedResult(**row) for row in rows]


def failing_sessions(
    conn: psycopg.Connection[Any], *, hours: float = 24, limit: int = 100
) -> list[RecordedResult]:
    """Sessions whose latest result is ``fail`` or ``error``, among those that failed in
    the last ``hours`` (by the clock of the newest result), newest first."""
    since = _newest(conn)
    if since is None:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query("parity_failing"),
                           {"since": since - timedelta(hours=hours), "limit": limit}).fetchall()
    return [RecordedResult(**row) for row in rows]


def _newest(conn: psycopg.Connection[Any]) -> datetime | None:
    row = conn.execute(query("parity_span"), {"seconds": 0}).fetchone()
    return row[1] if row else None


@dataclass(frozen=True)
class TrendPoint:
    at: datetime  # the start of the bucket
    passed: int
    failed: int
    pending: int
    errors: int

    @property
    def judged(self) -> int:
        """Results judged (pending ones are not, as in the gate and the rule)."""
        return self.passed + self.failed + self.errors

    @property
    def pass_rate(self) -> float | None:
        """Percent of the judged results that passed; None when none was judged."""
        return 100.0 * self.passed / self.judged if self.judged else None

    def as_json(self) -> dict[str, Any]:
        rate = self.pass_rate
        return {"at": iso_z(self.at), "epoch": self.at.timestamp(), "pass": self.passed,
                "fail": self.failed, "pending": self.pending, "error": self.errors,
                "pass_rate": None if rate is None else round(rate, 3)}


@dataclass(frozen=True)
class ParityTrend:
    bucket_seconds: int
    points: list[TrendPoint]

    def as_json(self) -> dict[str, Any]:
        return {"bucket_seconds": self.bucket_seconds,
                "points": [p.as_json() for p in self.points]}


def parity_trend(
    conn: psycopg.Connection[Any], *, hours: float = 24, max_points: int = 60
) -> ParityTrend:
    """Results by status over the last ``hours`` before the newest result, in at most
    about ``max_points`` buckets of a round width."""
    row = conn.execute(query("parity_span"), {"seconds": hours * 3600}).fetchone()
    first, last = row if row else (None, None)
    if first is None or last is None:
        return ParityTrend(_BUCKETS[0], [])
    wanted = (last - first).total_seconds() / max(max_points, 1)
    bucket = next((b for b in _BUCKETS if b >= wanted), math.ceil(wanted))
    with conn.cursor() as cur:
        rows = cur.execute(query("parity_trend"), {"bucket": bucket, "since": first}).fetchall()
    return ParityTrend(bucket, [TrendPoint(*r) for r in rows])


@dataclass(frozen=True)
class RepairEntry:
    """One row of the repair queue: a write that ``target`` missed."""

    id: int
    session_id: str
    target: str
    operation: str
    error: str
    enqueued_at: datetime
    attempts: int  # repair attempts that failed so far
    last_error: str | None
    last_attempt_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "session_id": self.session_id, "target": self.target,
            "operation": self.operation, "error": self.error,
            "enqueued_at": iso_z(self.enqueued_at), "attempts": self.attempts,
            "last_error": self.last_error,
            "last_attempt_at": iso_z(self.last_attempt_at) if self.last_attempt_at else None,
        }


def repair_entries(
    conn: psycopg.Connection[Any], *, session_id: str | None = None, limit: int = 200
) -> list[RepairEntry]:
    """The repair queue, oldest first: all of it (up to ``limit``), or one session's."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query("repair_entries"),
                           {"session_id": session_id, "limit": limit}).fetchall()
    return [RepairEntry(**row) for row in rows]


@dataclass(frozen=True)
class RepairDepth:
    target: str
    entries: int
    sessions: int
    oldest: datetime

    def as_json(self) -> dict[str, Any]:
        return {"target": self.target, "entries": self.entries, "sessions": self.sessions,
                "oldest": iso_z(self.oldest)}


def repair_depth(conn: psycopg.Connection[Any]) -> list[RepairDepth]:
    """Queued repairs per target store: rows, sessions, the oldest's enqueue time."""
    return [RepairDepth(*row) for row in conn.execute(query("repair_counts")).fetchall()]


def quarantine_of(conn: psycopg.Connection[Any], session_id: str) -> list[QuarantineEntry]:
    """A session's quarantine entries, open and resolved, from any layout and prefix."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query("quarantine_of_session"),
                           {"session_id": printable(session_id)}).fetchall()
    return [QuarantineEntry(**row) for row in rows]


def quarantine_open(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(query("quarantine_open_count")).fetchone()
    return int(row[0]) if row else 0
