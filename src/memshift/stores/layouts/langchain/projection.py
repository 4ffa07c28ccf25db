"""The PostgreSQL side of the langchain layout: langchain-postgres' table, kept from the truth.

memshift's tables stay the truth; what ``PostgresChatMessageHistory`` reads (a
``chat_history`` table of ``id SERIAL, session_id UUID, message JSONB, created_at``,
read ``ORDER BY id``) is a projection of them, written by a trigger on
``memshift.messages`` in the transaction that adds the messages, whichever path adds
them (the router's dual writes, backfill merges, repair). Why a trigger, and why this
keeps the guarantees, is in docs/layouts.md. In short:

- **idempotent**: truth messages are append-only rows, inserted once; a repeated or
  late write inserts no row, so it projects nothing;
- **ordered**: each session's projection advances a watermark (``projected_next``)
  over contiguous seqs only, under a lock on the session's mapping row, so the
  table's ``id`` order is the transcript's order even when seqs arrive out of order;
- **atomic**: a message is in the truth and in the chat history table, or in neither.

Session ids: langchain-postgres needs UUIDs. A session's UUID is
:func:`session_uuid`, uuid5 of the original id in memshift's fixed namespace (the
same in Python and in SQL), for every id, UUID-shaped or not, so that no chosen id
can land on another session's UUID. ``memshift.langchain_sessions`` maps each
original id to its UUID for the application.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
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

__all__ = [
    "DEFAULT_TABLE",
    "NAMESPACE",
    "Projection",
    "ProjectionError",
    "check",
    "drifted",
    "install",
    "installed",
    "session_uuid",
    "uninstall",
]

# Fixed for ever: changing it would move every session to another UUID.
NAMESPACE = uuid.UUID("66726afd-1f8c-4eb1-93d6-226c47f8a089")
DEFAULT_TABLE = "chat_history"
_TABLE_NAME = re.compile(r"\w+", re.ASCII)  # what PostgresChatMessageHistory accepts
_SHAPE = {
    "id": "integer",
    "session_id": "uuid",
    "message": "jsonb",
    "created_at": "timestamp with time zone",
}
_SQL = Framework("langchain")
Projection = TableName  # where the projection writes: langchain-postgres' table


def session_uuid(session_id: str) -> uuid.UUID:
    """The UUID that ``PostgresChatMessageHistory`` is given for ``session_id``."""
    return uuid.uuid5(NAMESPACE, session_id)


def installed(conn: psycopg.Connection[Any]) -> Projection | None:
    """The installed projection, or None."""
    found = _SQL.installed_row(conn)
    return None if found is None else Projection(found[0], found[1])


def install(
    conn: psycopg.Connection[Any], table: str = DEFAULT_TABLE, *, schema: str | None = None
) -> Projection:
    """Create the chat history table (if missing), the mapping and the trigger; catch up.

    Safe to run again, and while the application writes: the trigger projects every
    message added from then on, and the catch-up every message added before, each
    exactly once. ``schema`` defaults to the connection's current schema, where
    ``PostgresChatMessageHistory.create_tables`` puts the table.
    """
    if not _TABLE_NAME.fullmatch(table):
        raise ProjectionError(
            f"chat history table name {table!r} is not one PostgresChatMessageHistory "
            "accepts; use letters, digits and '_' only"
        )
    with conn.transaction():
        lock(conn)
        _SQL.refuse_another(conn)
        crypto = _pgcrypto(conn)
        projection = Projection(schema_of(conn, schema), table)
        conn.execute(_SQL("create_projection_record"))
        conn.execute(_SQL("create_sessions"))
        existing = installed(conn)
        if existing is not None and existing != projection:
            raise ProjectionError(
                f"the langchain projection already writes {existing}, not {projection}; "
                "keep that table, or run uninstall() first"
            )
        _create_table(conn, projection, fresh=existing is None)
        for name in ("uuid_function", "message_function", "project_function"):
            conn.execute(_SQL(name, table=projection.identifier, crypto=sql.Identifier(crypto),
                              namespace=sql.Literal(NAMESPACE.hex)))
        _SQL.install_trigger(conn)
        conn.execute(_SQL("record_install"),
                     {"schema": projection.schema, "table": projection.table})
    _SQL.catch_up(conn)
    return projection


def _pgcrypto(conn: psycopg.Connection[Any]) -> str:
    try:
        with conn.transaction():
            conn.execute(_SQL("pgcrypto"))
    except psycopg.Error as exc:
        raise ProjectionError(
            "the langchain projection needs the pgcrypto extension (for uuid5) and it "
            f"could not be installed: {exc.diag.message_primary}; ask a superuser to "
            "run CREATE EXTENSION pgcrypto in this database"
        ) from None
    row = conn.execute(_SQL("pgcrypto_schema")).fetchone()
    assert row is not None
    return str(row[0])


def _create_table(conn: psycopg.Connection[Any], projection: Projection, *, fresh: bool) -> None:
    """langchain-postgres' table as its create_tables makes it, or check the one there."""
    found = columns(conn, projection)
    if not found:
        conn.execute(_SQL("create_chat_table", table=projection.identifier))
    else:
        check_shape(projection, found, _SHAPE, "langchain-postgres chat history")
    index = sql.Identifier(f"idx_{projection.table}_session_id")
    conn.execute(_SQL("create_chat_index", table=projection.identifier, index=index))
    if fresh:
        refuse_foreign_rows(conn, _SQL("foreign_rows", table=projection.identifier),
                            str(projection))


def uninstall(conn: psycopg.Connection[Any]) -> None:
    """Stop projecting (the trigger and its functions go); the tables and rows stay."""
    _SQL.uninstall(conn)


def drifted(
    conn: psycopg.Connection[Any], projection: Projection, session_ids: Sequence[str]
) -> dict[str, Drift]:
    """The sessions whose chat history rows differ from the truth, with both sides."""
    return drift(conn, str(projection), _SQL("render"),
                 _SQL("projected", table=projection.identifier), session_ids)


def check(
    conn: psycopg.Connection[Any], projection: Projection, session_ids: Sequence[str]
) -> dict[str, str]:
    """Sessions whose chat history rows differ from the truth, with what differs."""
    return {sid: d.describe() for sid, d in drifted(conn, projection, session_ids).items()}
