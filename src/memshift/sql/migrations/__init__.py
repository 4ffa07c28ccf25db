"""Numbered SQL migrations (``NNNN_name.sql`` beside this file) and their runner.

``upgrade`` applies what is missing, each migration in its own transaction, and
records it in ``memshift.schema_version`` with a checksum. An advisory lock makes it
safe to run from several processes at once; running it twice changes nothing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

import psycopg
from psycopg.rows import class_row

from memshift.errors import SchemaError, StoreUnavailable
from memshift.redact import redact

# Any constant works; it only has to be the same in every memshift process.
_LOCK_KEY = 0x6D656D7368696674  # "memshift"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class AppliedMigration:
    version: int
    name: str
    checksum: str
    applied_at: datetime


@dataclass(frozen=True)
class SchemaStatus:
    current: int
    latest: int
    applied: list[AppliedMigration]
    pending: list[Migration]
    modified: list[int]  # applied migrations whose file has changed since

    @property
    def up_to_date(self) -> bool:
        return not self.pending and not self.modified


def migrations() -> list[Migration]:
    """Every migration shipped with this version of memshift, in order."""
    found = []
    for entry in resources.files(__package__).iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def latest_version() -> int:
    return migrations()[-1].version


_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS memshift;
CREATE TABLE IF NOT EXISTS memshift.schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


def _connect(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(
            f"cannot connect to PostgreSQL at {redact(dsn)}: {redact(str(exc)).strip()}; "
            "check MEMSHIFT_POSTGRES_DSN (or --postgres-dsn) and that the server runs"
        ) from None


def _applied(conn: psycopg.Connection[tuple[object, ...]]) -> list[AppliedMigration]:
    exists = conn.execute("SELECT to_regclass('memshift.schema_version')").fetchone()
    if not exists or exists[0] is None:
        return []
    with conn.cursor(row_factory=class_row(AppliedMigration)) as cur:
        cur.execute(
            "SELECT version, name, checksum, applied_at "
            "FROM memshift.schema_version ORDER BY version"
        )
        return cur.fetchall()


def _status(conn: psycopg.Connection[tuple[object, ...]]) -> SchemaStatus:
    shipped = migrations()
    applied = _applied(conn)
    by_version = {m.version: m for m in shipped}
    done = {a.version for a in applied}
    modified = [
        a.version
        for a in applied
        if a.version in by_version and by_version[a.version].checksum != a.checksum
    ]
    return SchemaStatus(
        current=max(done, default=0),
        latest=shipped[-1].version,
        applied=applied,
        pending=[m for m in shipped if m.version not in done],
        modified=modified,
    )


def status(dsn: str) -> SchemaStatus:
    """Which migrations the database at ``dsn`` has, and which it lacks."""
    with _connect(dsn) as conn:
        return _status(conn)


def upgrade(dsn: str) -> list[Migration]:
    """Apply the missing migrations; return those applied (empty when up to date)."""
    with _connect(dsn) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute(_BOOTSTRAP)
            state = _status(conn)
            if state.modified:
                raise SchemaError(
                    f"migrations {state.modified} were changed after they were applied; "
                    "a shipped migration must never change: add a new one instead"
                )
            for migration in state.pending:
                with conn.transaction():
                    conn.execute(migration.sql.encode("utf-8"))
                    conn.execute(
                        "INSERT INTO memshift.schema_version (version, name, checksum) "
                        "VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
            return state.pending
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


def require_current(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Raise SchemaError unless the database has every migration this code expects."""
    state = _status(conn)
    if state.pending:
        raise SchemaError(
            f"the PostgreSQL schema is at version {state.current} but this memshift needs "
            f"{state.latest}; run `memshift db upgrade` first"
        )
