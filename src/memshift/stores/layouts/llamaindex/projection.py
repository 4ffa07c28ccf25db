"""The PostgreSQL side of the llamaindex layout: PostgresChatStore's table, kept from the truth.

memshift's tables stay the truth; what ``PostgresChatStore`` reads (a ``chatstore``
table of ``id SERIAL, key VARCHAR UNIQUE, value JSON[]``: one row per chat key, its
messages in array order) is a projection of them, written by a trigger on
``memshift.messages`` in the transaction that adds the messages, whichever path adds
them (the router's dual writes, backfill merges, repair). It is the langchain
layout's design (docs/layouts.md), with an array in place of rows:

- **idempotent**: truth messages are append-only rows, inserted once; a repeated or
  late write inserts no row, so it projects nothing;
- **ordered**: each session's projection appends to its array over contiguous seqs
  only, from a watermark (``projected_next``), under a lock on the session's mapping
  row, so the array is the transcript in order even when seqs arrive out of order;
- **atomic**: a message is in the truth and in the chat store, or in neither.

Keys: PostgresChatStore is given the same key the application gave RedisChatStore,
the layout's key prefix followed by the session id; ``memshift.llamaindex_sessions``
records it for each session.
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
    drift,
    lock,
    refuse_foreign_rows,
    schema_of,
)

__all__ = [
    "DEFAULT_TABLE",
    "Projection",
    "ProjectionError",
    "check",
    "drifted",
    "install",
    "installed",
    "uninstall",
]

DEFAULT_TABLE = "chatstore"
# PostgresChatStore lower-cases the table name it is given.
_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]*", re.ASCII)
_ELEMENTS = {"_json": "json", "_jsonb": "jsonb"}
_sql = Framework("llamaindex")


@dataclass(frozen=True)
class Projection:
    """Where the projection writes: PostgresChatStore's table ``schema.table``."""

    schema: str
    table: str
    key_prefix: str
    element: str  # json or jsonb: PostgresChatStore(use_jsonb=...)

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table)

    def key(self, session_id: str) -> str:
        """The key PostgresChatStore (and RedisChatStore) know the session by."""
        return f"{self.key_prefix}{session_id}"


def installed(conn: psycopg.Connection[Any]) -> Projection | None:
    """The installed projection, or None."""
    found = _sql.installed_row(conn)
    return None if found is None else Projection(*found)


def install(
    conn: psycopg.Connection[Any],
    table: str = DEFAULT_TABLE,
    *,
    key_prefix: str = "",
    schema: str | None = None,
    use_jsonb: bool = False,
) -> Projection:
    """Create the chat store table (if missing), the mapping and the trigger; catch up.

    Safe to run again, and while the application writes: the trigger projects every
    message added from then on, and the catch-up every message added before, each
    exactly once. ``schema`` defaults to the connection's current schema (give the
    one PostgresChatStore is given, ``public`` by default); ``use_jsonb`` as given to
    PostgresChatStore, for a table that does not exist yet (an existing table's
    column type is kept).
    """
    if not _TABLE_NAME.fullmatch(table):
        raise ProjectionError(
            f"chat store table name {table!r} is not one PostgresChatStore keeps as it "
            "is; use lower-case letters, digits and '_' only"
        )
    with conn.transaction():
        lock(conn)
        # Each message projection projects every session of the truth: one per database.
        _sql.refuse_another(conn)
        schema = schema_of(conn, schema)
        conn.execute(_sql("create_projection_record"))
        conn.execute(_sql("create_sessions"))
        existing = installed(conn)
        if existing is not None and (existing.schema, existing.table, existing.key_prefix) != (
            schema, table, key_prefix
        ):
            raise ProjectionError(
                f"the llamaindex projection already writes {existing.schema}.{existing.table} "
                f"with key prefix {existing.key_prefix!r}, not {schema}.{table} with "
                f"{key_prefix!r}; keep that one, or run uninstall() first"
            )
        element = _create_table(conn, schema, table, "jsonb" if use_jsonb else "json",
                                fresh=existing is None)
        projection = Projection(schema, table, key_prefix, element)
        for name in ("message_function", "project_function"):
            conn.execute(_sql(name, table=projection.identifier, element=sql.SQL(element),
                              key_prefix=sql.Literal(key_prefix)))
        _sql.install_trigger(conn)
        conn.execute(_sql("record_install"), {"schema": schema, "table": table,
                                               "key_prefix": key_prefix, "element": element})
    _sql.catch_up(conn)
    return projection


def _create_table(
    conn: psycopg.Connection[Any], schema: str, table: str, element: str, *, fresh: bool
) -> str:
    """PostgresChatStore's table as its model creates it, or check the one there.

    Returns the type of its messages (json or jsonb).
    """
    shown = f"{schema}.{table}"
    identifier = sql.Identifier(schema, table)
    columns = {name: (kind, udt) for name, kind, udt in conn.execute(
        _sql("table_columns"), {"schema": schema, "table": table}
    ).fetchall()}
    if not columns:
        conn.execute(_sql("create_chat_table", table=identifier, element=sql.SQL(element),
                          unique=sql.Identifier(f"{table}:unique_key")))
    else:
        found = _ELEMENTS.get(columns.get("value", ("", ""))[1])
        if columns.get("key", ("",))[0] != "character varying" or found is None:
            raise ProjectionError(
                f"table {shown} is not a PostgresChatStore table: it needs key varchar and "
                "value json[] (or jsonb[]); name another table"
            )
        element = found
    conn.execute(_sql("create_chat_index", table=identifier,
                      index=sql.Identifier(f"{table}:idx_key")))
    if fresh:
        refuse_foreign_rows(conn, _sql("foreign_rows", table=identifier), shown, "chats")
    return element


def uninstall(conn: psycopg.Connection[Any]) -> None:
    """Stop projecting (the trigger and its functions go); the tables and rows stay."""
    _sql.uninstall(conn)


def drifted(
    conn: psycopg.Connection[Any], projection: Projection, session_ids: Sequence[str]
) -> dict[str, Drift]:
    """The sessions whose chat store array differs from the truth, with both sides."""
    projected = _sql("projected", table=projection.identifier,
                     key_prefix=sql.Literal(projection.key_prefix))
    where = f"{projection.schema}.{projection.table}"
    return drift(conn, where, _sql("render"), projected, session_ids)


def check(
    conn: psycopg.Connection[Any], projection: Projection, session_ids: Sequence[str]
) -> dict[str, str]:
    """Sessions whose chat store array differs from the truth, with what differs."""
    return {sid: d.describe() for sid, d in drifted(conn, projection, session_ids).items()}
