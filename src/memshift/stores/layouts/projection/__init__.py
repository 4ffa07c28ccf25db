"""Framework tables kept from the truth: what every framework layout's PostgreSQL side shares.

A framework layout (langchain, openai-agents) keeps its framework's own PostgreSQL
table(s) from memshift's truth with a trigger on ``memshift.messages`` (why, in
docs/layouts.md). Each has a ``projection.sql`` of named statements; this module
loads them, serialises installers, keeps to one framework projection per database
(each projects every session of the truth), and catches up on what the truth held
before the trigger existed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from memshift.errors import ConfigError

__all__ = ["RECORDS", "ProjectionError", "Statements", "TableName", "catch_up", "check_shape",
           "columns", "difference", "lock", "refuse_another", "schema_of"]

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
# Where each framework records that its projection is installed.
RECORDS = {
    "langchain": "memshift.langchain_projection",
    "openai-agents": "memshift.openai_agents_projection",
    "llamaindex": "memshift.llamaindex_projection",
}


class ProjectionError(ConfigError):
    """A framework projection cannot be installed or does not match; says what to do."""


@dataclass(frozen=True)
class TableName:
    """A framework's table: ``schema.table``."""

    schema: str
    table: str

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table)

    def __str__(self) -> str:
        return f"{self.schema}.{self.table}"


class Statements:
    """The named statements of a package's ``projection.sql``, identifiers filled in."""

    def __init__(self, package: str) -> None:
        self.package = package

    def __call__(self, name: str, **identifiers: sql.Composable) -> sql.SQL | sql.Composed:
        text = sql.SQL(_texts(self.package)[name])  # our own file: its text becomes SQL
        return text.format(**identifiers) if identifiers else text


@cache
def _texts(package: str) -> dict[str, str]:
    text = resources.files(package).joinpath("projection.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


_SHARED = Statements("memshift.stores.layouts.projection")


def lock(conn: psycopg.Connection[Any]) -> None:
    """Serialise installers (inside the caller's transaction)."""
    conn.execute(_SHARED("lock"))


def refuse_another(conn: psycopg.Connection[Any], mine: str) -> None:
    """ProjectionError when another framework's projection is installed in this database."""
    for framework, record in RECORDS.items():
        if framework == mine:
            continue
        row = conn.execute(_SHARED("record_exists"), {"table": record}).fetchone()
        if row and row[0] and conn.execute(
                sql.SQL("SELECT 1 FROM {}").format(sql.Identifier(*record.split(".")))
        ).fetchone():
            raise ProjectionError(
                f"the {framework} projection is installed in this database; each projects "
                f"every session of memshift's truth, so only one framework's can be: "
                f"uninstall it first, or migrate {mine} sessions with a database of their own"
            )


def schema_of(conn: psycopg.Connection[Any], schema: str | None) -> str:
    """``schema``, or the connection's current schema (where frameworks create tables)."""
    if schema is not None:
        return schema
    row = conn.execute(_SHARED("current_schema")).fetchone()
    assert row is not None
    return str(row[0])


def columns(conn: psycopg.Connection[Any], table: TableName) -> dict[str, str]:
    """The table's columns and their types (empty when it does not exist)."""
    return dict(conn.execute(_SHARED("table_columns"),
                             {"schema": table.schema, "table": table.table}).fetchall())


def check_shape(table: TableName, found: dict[str, str], shape: dict[str, str],
                framework: str) -> None:
    """ProjectionError naming the columns a framework's existing table lacks."""
    wrong = {name: kind for name, kind in shape.items() if found.get(name) != kind}
    if wrong:
        raise ProjectionError(
            f"table {table} is not a {framework} table: it needs "
            + ", ".join(f"{name} {kind}" for name, kind in wrong.items())
            + "; name another table"
        )


def catch_up(conn: psycopg.Connection[Any], project: sql.SQL | sql.Composed,
             batch_size: int = 500) -> int:
    """Run ``project`` (``%(ids)s``: session ids) over every session holding messages.

    A page of sessions per transaction, so the catch-up never holds many sessions'
    locks for long; returns how many messages it projected.
    """
    added, after = 0, ""
    while True:
        ids = [row[0] for row in conn.execute(
            _SHARED("sessions_after"), {"after": after, "limit": batch_size}).fetchall()]
        if not ids:
            return added
        with conn.transaction():
            row = conn.execute(project, {"ids": ids}).fetchone()
        added += int(row[0]) if row is not None else 0
        after = ids[-1]


def difference(where: str, want: list[Any], have: list[Any]) -> str:
    """What a framework table holds of a session against what the truth says it should."""
    first = next((i for i, (w, h) in enumerate(zip(want, have, strict=False)) if w != h),
                 min(len(want), len(have)))
    return (f"{where} holds {len(have)} messages, the truth {len(want)}; they differ from "
            f"position {first} on")
