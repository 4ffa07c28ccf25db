"""The PostgreSQL side of the openai-agents layout: the SDK's SQLAlchemySession tables,
kept from the truth.

``SQLAlchemySession`` reads ``agent_messages`` (``id SERIAL, session_id VARCHAR,
message_data TEXT, created_at TIMESTAMP``) ``ORDER BY created_at, id`` and keeps one
``agent_sessions`` row per session. memshift's tables stay the truth; these two are a
projection of them, written by a trigger on ``memshift.messages`` in the transaction
that adds the messages, with the guarantees of the langchain projection (see
docs/layouts.md): each message once, in seq order (a per-session watermark over
contiguous seqs, under a lock on the session's mapping row), in the same transaction.
Session ids are kept as they are: the SDK takes any text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from memshift.stores.layouts.projection import (
    Drift,
    Framework,
    ProjectionError,
    TableName,
    check_shape,
    columns,
    drift,
    lock,
    refuse_foreign_rows,
    schema_of,
)

__all__ = ["DEFAULT_TABLES", "ProjectionError", "Tables", "check", "drifted", "install",
           "installed", "uninstall"]

_SQL = Framework("openai-agents")
_NAME = re.compile(r"\w+", re.ASCII)
_SESSIONS_SHAPE = {
    "session_id": "character varying",
    "created_at": "timestamp without time zone",
    "updated_at": "timestamp without time zone",
}
_MESSAGES_SHAPE = {
    "id": "integer",
    "session_id": "character varying",
    "message_data": "text",
    "created_at": "timestamp without time zone",
}


@dataclass(frozen=True)
class Tables:
    """The SDK's two tables (its ``sessions_table`` and ``messages_table``)."""

    sessions: str = "agent_sessions"
    messages: str = "agent_messages"
    schema: str | None = None  # None: the connection's current schema


DEFAULT_TABLES = Tables()


def installed(conn: psycopg.Connection[Any]) -> Tables | None:
    """The installed projection's tables, or None."""
    found = _SQL.installed_row(conn)
    return None if found is None else Tables(found[1], found[2], found[0])


def install(conn: psycopg.Connection[Any], tables: Tables = DEFAULT_TABLES) -> Tables:
    """Create the SDK's tables (if missing), the mapping and the trigger; catch up.

    Safe to run again, and while the application writes (each message is projected
    exactly once, by the trigger or by the catch-up).
    """
    for name in (tables.sessions, tables.messages):
        if not _NAME.fullmatch(name):
            raise ProjectionError(f"table name {name!r}: use letters, digits and '_' only")
    with conn.transaction():
        lock(conn)
        _SQL.refuse_another(conn)
        schema = schema_of(conn, tables.schema)
        wanted = Tables(tables.sessions, tables.messages, schema)
        conn.execute(_SQL("create_projection_record"))
        conn.execute(_SQL("create_sessions"))
        existing = installed(conn)
        if existing is not None and existing != wanted:
            raise ProjectionError(
                f"the openai-agents projection already writes {existing.schema}."
                f"{existing.sessions} and {existing.messages}, not {schema}.{tables.sessions} "
                f"and {tables.messages}; keep those tables, or run uninstall() first"
            )
        names = _identifiers(wanted)
        _create_tables(conn, wanted, names, fresh=existing is None)
        zone = conn.execute(_SQL("database_zone")).fetchone()
        assert zone is not None
        for name in ("item_function", "project_function"):
            conn.execute(_SQL(name, zone=sql.Literal(zone[0]), **names))
        _SQL.install_trigger(conn)
        conn.execute(_SQL("record_install"), {"schema": schema, "sessions": tables.sessions,
                                              "messages": tables.messages})
    _SQL.catch_up(conn)
    return wanted


def _identifiers(tables: Tables) -> dict[str, sql.Composable]:
    assert tables.schema is not None
    return {
        "sessions": sql.Identifier(tables.schema, tables.sessions),
        "messages": sql.Identifier(tables.schema, tables.messages),
        "index": sql.Identifier(f"idx_{tables.messages}_session_time"),
    }


def _create_tables(conn: psycopg.Connection[Any], tables: Tables,
                   names: dict[str, sql.Composable], *, fresh: bool) -> None:
    """The SDK's tables as its create_all makes them, or check the ones there."""
    assert tables.schema is not None
    for table, shape, create in ((tables.sessions, _SESSIONS_SHAPE, "create_sessions_table"),
                                 (tables.messages, _MESSAGES_SHAPE, "create_messages_table")):
        where = TableName(tables.schema, table)
        found = columns(conn, where)
        if found:
            check_shape(where, found, shape, "SQLAlchemySession")
        else:
            conn.execute(_SQL(create, **names))
    conn.execute(_SQL("create_messages_index", **names))
    if fresh:
        refuse_foreign_rows(conn, _SQL("foreign_rows", **names),
                            f"{tables.schema}.{tables.messages}")


def uninstall(conn: psycopg.Connection[Any]) -> None:
    """Stop projecting (the trigger and its functions go); the tables and rows stay."""
    _SQL.uninstall(conn)


def drifted(conn: psycopg.Connection[Any], tables: Tables, session_ids: Sequence[str]
            ) -> dict[str, Drift]:
    """The sessions whose SDK rows differ from the truth, with both sides."""
    projected = _SQL("projected", **_identifiers(tables))
    return drift(conn, f"{tables.schema}.{tables.messages}", _SQL("render"), projected,
                 session_ids)


def check(conn: psycopg.Connection[Any], tables: Tables, session_ids: Sequence[str]
          ) -> dict[str, str]:
    """Sessions whose SDK rows differ from the truth, with what differs."""
    return {sid: d.describe() for sid, d in drifted(conn, tables, session_ids).items()}
