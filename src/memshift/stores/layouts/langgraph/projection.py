"""The PostgreSQL side of the langgraph layout: PostgresSaver's tables, kept from the truth.

memshift's tables stay the truth; what ``PostgresSaver`` (langgraph-checkpoint-
postgres) reads, its ``checkpoints``, ``checkpoint_blobs`` and ``checkpoint_writes``
tables, is a projection of them, written by triggers on ``memshift.checkpoints``
and ``memshift.tool_runs`` in the transaction that adds the truth rows, whichever
path adds them. It is the langchain layout's design (docs/layouts.md):

- **idempotent**: truth checkpoints are inserted once; a repeated one inserts no row,
  so it projects nothing; a pending write changes in the truth only when the merge
  picks a newer one, and the projection follows it;
- **no order to keep**: PostgresSaver orders checkpoints by id and finds blobs by
  channel version, so rows may land in any order;
- **atomic**: a checkpoint or write is in the truth and in PostgresSaver's tables,
  or in neither.

Values: RedisSaver keeps channel values inline as JSON and pending writes as its
serializer's bytes; PostgresSaver keeps primitive channel values inline, others as
blobs, and reads a blob of type ``json`` with its own serializer. The projection
stores each non-primitive value as such a blob, with RedisSaver's markers for an
Interrupt and a Send turned into the constructor envelopes PostgresSaver revives
(``memshift.langgraph_revive`` in ``projection.sql``).

The tables are PostgresSaver's own: :func:`install` runs ``PostgresSaver.setup()``
when they are missing (langgraph-checkpoint-postgres installed), or says to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from memshift.errors import ConfigError

__all__ = ["TABLES", "Projection", "ProjectionError", "catch_up", "install", "installed",
           "uninstall"]

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
# The columns each table must have (PostgresSaver's migrations, up to v9).
TABLES = {
    "checkpoints": {"thread_id", "checkpoint_ns", "checkpoint_id", "parent_checkpoint_id",
                    "type", "checkpoint", "metadata"},
    "checkpoint_blobs": {"thread_id", "checkpoint_ns", "channel", "version", "type", "blob"},
    "checkpoint_writes": {"thread_id", "checkpoint_ns", "checkpoint_id", "task_id", "idx",
                          "channel", "type", "blob", "task_path"},
}


class ProjectionError(ConfigError):
    """The checkpoint projection cannot be installed; says what to do."""


@dataclass(frozen=True)
class Projection:
    """Where the projection writes: PostgresSaver's tables in ``schema``."""

    schema: str

    def table(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)


@cache
def _texts() -> dict[str, str]:
    folder = resources.files("memshift.stores.layouts.langgraph")
    text = folder.joinpath("projection.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def _sql(name: str, **identifiers: sql.Composable) -> sql.SQL | sql.Composed:
    text = sql.SQL(_texts()[name])  # our own file: its text, not input, becomes SQL
    return text.format(**identifiers) if identifiers else text


def _rows(conn: psycopg.Connection[Any], query: sql.SQL | sql.Composed | str,
          params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """Rows as tuples, whatever row factory the caller's connection has (PostgresSaver
    wants dict rows)."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(query, params)
        return cur.fetchall() if cur.description else []


def installed(conn: psycopg.Connection[Any]) -> Projection | None:
    """The installed projection, or None."""
    (row,) = _rows(conn, "SELECT to_regclass('memshift.langgraph_projection')")
    if row[0] is None:
        return None
    found = _rows(conn, _sql("installed"))
    return Projection(found[0][0]) if found else None


def install(conn: psycopg.Connection[Any], *, schema: str | None = None) -> Projection:
    """Make sure PostgresSaver's tables exist, add the triggers, and catch up.

    Safe to run again, and while the truth is written: the triggers project every row
    added from then on, and the catch-up every row added before. ``schema`` defaults
    to the connection's current schema, where ``PostgresSaver.setup()`` puts its
    tables. ``conn`` must be in autocommit mode when the tables are missing (setup
    creates indexes concurrently).
    """
    if schema is None:
        schema = _current_schema(conn)
    _ensure_tables(conn, schema)
    projection = Projection(schema)
    with conn.transaction():
        conn.execute(_sql("lock"))
        conn.execute(_sql("create_projection_record"))
        existing = installed(conn)
        if existing is not None and existing != projection:
            raise ProjectionError(
                f"the langgraph projection already writes the tables in schema "
                f"{existing.schema!r}, not {schema!r}; keep those, or run uninstall() first"
            )
        names = {"checkpoints": projection.table("checkpoints"),
                 "blobs": projection.table("checkpoint_blobs"),
                 "writes": projection.table("checkpoint_writes")}
        for name in ("revive_function", "blob_function", "put_checkpoints_function",
                     "put_writes_function", "trigger_functions", "drop_triggers",
                     "create_triggers"):
            # Several statements in one text: never prepared (a caller's connection may
            # prepare everything, as PostgresSaver asks for).
            conn.execute(_sql(name, **names) if name.startswith("put_") else _sql(name),
                         prepare=False)
        conn.execute(_sql("record_install"), {"schema": schema})
    catch_up(conn)
    return projection


def _ensure_tables(conn: psycopg.Connection[Any], schema: str) -> None:
    found = _tables(conn, schema)
    if not found and schema == _current_schema(conn):
        _setup(conn)
        found = _tables(conn, schema)
    missing = {name: sorted(cols - found.get(name, set()))
               for name, cols in TABLES.items() if cols - found.get(name, set())}
    if missing:
        raise ProjectionError(
            f"schema {schema!r} lacks PostgresSaver's tables or columns ("
            + "; ".join(f"{name}: {', '.join(cols)}" for name, cols in missing.items())
            + "); create them with PostgresSaver.setup() (langgraph-checkpoint-postgres) "
            "on a connection to this database, then install again"
        )


def _tables(conn: psycopg.Connection[Any], schema: str) -> dict[str, set[str]]:
    return {name: set(columns)
            for name, columns in _rows(conn, _sql("saver_tables"), {"schema": schema})}


def _current_schema(conn: psycopg.Connection[Any]) -> str:
    return str(_rows(conn, _sql("current_schema"))[0][0])


def _setup(conn: psycopg.Connection[Any]) -> None:
    """PostgresSaver.setup(): the framework creates its own tables, at its own version."""
    try:
        from langgraph.checkpoint.postgres import PostgresSaver
    except ImportError:
        return  # _ensure_tables says what to do
    if not conn.autocommit:
        raise ProjectionError(
            "PostgresSaver's tables are missing and PostgresSaver.setup() needs a "
            "connection in autocommit mode; give one (psycopg.connect(dsn, autocommit=True))"
        )
    PostgresSaver(conn).setup()


def uninstall(conn: psycopg.Connection[Any]) -> None:
    """Stop projecting (the triggers and their functions go); the tables and rows stay."""
    with conn.transaction():
        conn.execute(_sql("lock"))
        if installed(conn) is None:
            return
        conn.execute(_sql("drop_triggers"), prepare=False)
        conn.execute(_sql("drop_functions"), prepare=False)
        conn.execute(_sql("forget_install"))


def catch_up(conn: psycopg.Connection[Any], batch_size: int = 200) -> int:
    """Project what the truth holds, a page of sessions at a time; returns the sessions.

    Rows already projected are kept (checkpoints, blobs) or rewritten with the same
    values (writes), so running it again changes nothing.
    """
    done, after = 0, ""
    while True:
        ids = [row[0] for row in _rows(conn, _sql("sessions_after"),
                                        {"after": after, "limit": batch_size})]
        if not ids:
            return done
        with conn.transaction():
            conn.execute(_sql("catch_up"), {"ids": ids})
        done += len(ids)
        after = ids[-1]
