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
    ProjectionError,
    Statements,
    TableName,
    catch_up,
    check_shape,
    columns,
    difference,
    lock,
    refuse_another,
    schema_of,
)

__all__ = ["DEFAULT_TABLES", "ProjectionError", "Tables", "check", "install", "installed",
           "uninstall"]

_SQL = Statements("memshift.stores.layouts.openai_agents")
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
    row = conn.execute("SELECT to_regclass('memshift.openai_agents_projection')").fetchone()
    if row is None or row[0] is None:
        return None
    found = conn.execute(_SQL("installed")).fetchone()
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
        refuse_another(conn, "openai-agents")
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
        for name in ("item_function", "project_function", "trigger_function",
                     "drop_trigger", "create_trigger"):
            conn.execute(_SQL(name, zone=sql.Literal(zone[0]), **names))
        conn.execute(_SQL("record_install"), {"schema": schema, "sessions": tables.sessions,
                                              "messages": tables.messages})
    catch_up(conn, _SQL("project"))
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
        row = conn.execute(_SQL("foreign_rows", **names)).fetchone()
        if row is not None and row[0]:
            raise ProjectionError(
                f"table {tables.schema}.{tables.messages} already holds {row[0]} rows that "
                "memshift did not write; memshift projects the truth into tables of its "
                "own: name other tables, or empty these if their rows are also in Redis"
            )


def uninstall(conn: psycopg.Connection[Any]) -> None:
    """Stop projecting (the trigger and its functions go); the tables and rows stay."""
    with conn.transaction():
        lock(conn)
        if installed(conn) is None:
            return
        conn.execute(_SQL("drop_trigger"))
        conn.execute(_SQL("drop_functions"))
        conn.execute(_SQL("forget_install"))


def check(conn: psycopg.Connection[Any], tables: Tables, session_ids: Sequence[str]
          ) -> dict[str, str]:
    """Sessions whose SDK rows differ from the truth, with what differs."""
    names = _identifiers(tables)
    problems: dict[str, str] = {}
    for sid in session_ids:
        want = [r[0] for r in conn.execute(_SQL("expected_items"), {"session_id": sid})]
        have = [r[0] for r in conn.execute(_SQL("projected_items", **names),
                                           {"session_id": sid})]
        if want != have:
            problems[sid] = difference(f"{tables.schema}.{tables.messages}", want, have)
    return problems
