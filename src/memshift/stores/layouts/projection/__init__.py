"""Framework tables kept from the truth: what every framework layout's PostgreSQL side shares.

A framework layout (langchain, openai-agents, llamaindex) keeps its framework's own
PostgreSQL table(s) from memshift's truth with a trigger on ``memshift.messages``
(why, in docs/layouts.md). Each has a ``projection.sql`` of named statements: how it
renders a message, creates its tables, projects sessions and reads its rows back.
What they all do the same way is here (:class:`Framework`, and ``projection.sql``
beside this module): loading the statements, serialising installers, one framework
projection per database (each projects every session of the truth), the trigger and
its removal, catching up on what the truth held before the trigger existed, and
comparing a framework table with the truth (:func:`drift`, for parity).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Protocol, runtime_checkable

import psycopg
from psycopg import sql

from memshift.errors import ConfigError

__all__ = ["FRAMEWORKS", "Drift", "Framework", "KeepsProjection", "ProjectionError",
           "Statements", "TableName", "check_shape", "columns", "drift", "lock",
           "refuse_foreign_rows", "schema_of"]

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
# The layouts that keep a framework's table from memshift's messages.
FRAMEWORKS = ("langchain", "openai-agents", "llamaindex")


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


class Framework(Statements):
    """A framework layout's projection: the statements of its package's
    ``projection.sql``, and what every projection does alike with the objects it has
    in memshift's schema, all named after the layout (``langchain``, or
    ``openai_agents`` for ``openai-agents``): ``memshift.<name>_projection`` records
    where it writes, ``memshift.<name>_project(ids)`` projects sessions, and the
    trigger ``<name>_projection`` on ``memshift.messages`` calls it.
    """

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.stem = layout.replace("-", "_")
        super().__init__(f"memshift.stores.layouts.{self.stem}")

    def shared(self, name: str) -> sql.Composed:
        """A statement of the shared ``projection.sql`` about this framework's objects."""
        def named(suffix: str) -> sql.Identifier:
            return sql.Identifier("memshift", f"{self.stem}{suffix}")

        return sql.SQL(_texts(_SHARED.package)[name]).format(
            record=named("_projection"), project=named("_project"),
            inserted=named("_project_inserted"),
            trigger=sql.Identifier(f"{self.stem}_projection"))

    def installed_row(self, conn: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
        """The row of the framework's ``installed`` statement (where its projection
        writes), or None when its projection is not installed."""
        row = conn.execute(_SHARED("record_exists"),
                           {"table": f"memshift.{self.stem}_projection"}).fetchone()
        if row is None or not row[0]:
            return None
        found: tuple[Any, ...] | None = conn.execute(self("installed")).fetchone()
        return found

    def refuse_another(self, conn: psycopg.Connection[Any]) -> None:
        """ProjectionError when another framework's projection is installed here."""
        for other in FRAMEWORKS:
            if other != self.layout and Framework(other).installed_row(conn) is not None:
                raise ProjectionError(
                    f"the {other} projection is installed in this database; each projects "
                    "every session of memshift's truth, so only one framework's can be: "
                    f"uninstall it first, or migrate {self.layout} sessions with a database "
                    "of their own"
                )

    def install_trigger(self, conn: psycopg.Connection[Any]) -> None:
        """(Re)create the trigger that projects every statement's new messages."""
        for name in ("trigger_function", "drop_trigger", "create_trigger"):
            conn.execute(self.shared(name))

    def uninstall(self, conn: psycopg.Connection[Any]) -> None:
        """Stop projecting (the trigger and its functions go); the tables and rows stay."""
        with conn.transaction():
            lock(conn)
            if self.installed_row(conn) is None:
                return
            for name in ("drop_trigger", "drop_functions", "forget_install"):
                conn.execute(self.shared(name))

    def catch_up(self, conn: psycopg.Connection[Any], batch_size: int = 500) -> int:
        """Project every session holding messages (what the trigger did not see).

        A page of sessions per transaction, so the catch-up never holds many
        sessions' locks for long; returns how many messages it projected.
        """
        added, after = 0, ""
        while True:
            ids = [row[0] for row in conn.execute(
                _SHARED("sessions_after"), {"after": after, "limit": batch_size}).fetchall()]
            if not ids:
                return added
            with conn.transaction():
                row = conn.execute(self.shared("project"), {"ids": ids}).fetchone()
            added += int(row[0]) if row is not None else 0
            after = ids[-1]


def lock(conn: psycopg.Connection[Any]) -> None:
    """Serialise installers (inside the caller's transaction)."""
    conn.execute(_SHARED("lock"))


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


def refuse_foreign_rows(conn: psycopg.Connection[Any], count: sql.SQL | sql.Composed, where: str,
                        rows: str = "rows") -> None:
    """ProjectionError when a framework table memshift is to fill already holds rows
    (``count`` counts those memshift did not write)."""
    row = conn.execute(count).fetchone()
    if row is not None and row[0]:
        raise ProjectionError(
            f"table {where} already holds {row[0]} {rows} that memshift did not write; "
            "memshift projects the truth into a table of its own: name another table, or "
            f"empty this one if its {rows} are also in Redis"
        )


@dataclass(frozen=True)
class Drift:
    """A session whose framework rows are not what the truth says they should be.

    ``want`` (the truth's messages, as the framework stores them) and ``have`` (the
    framework table's rows) are in the framework's reading order; position 0 holds
    seq ``first_seq`` (the messages Redis had trimmed before the migration are in
    neither).
    """

    session_id: str
    where: str  # the framework table, schema.table
    first_seq: int
    want: list[Any]
    have: list[Any]

    @property
    def first_difference(self) -> int:
        """The first position whose rows differ (or that only one side holds)."""
        pairs = zip(self.want, self.have, strict=False)
        return next((i for i, (w, h) in enumerate(pairs) if w != h),
                    min(len(self.want), len(self.have)))

    def describe(self) -> str:
        return (f"{self.where} holds {len(self.have)} messages, the truth {len(self.want)}; "
                f"they differ from position {self.first_difference} on")


@runtime_checkable
class KeepsProjection(Protocol):
    """A layout that keeps its framework's table from the truth: parity checks that table."""

    def projection_drift(self, conn: psycopg.Connection[Any],
                         session_ids: Sequence[str]) -> dict[str, Drift] | None:
        """The sessions whose framework rows differ from the truth (absent: they match),
        or None when no projection of this layout is installed (nothing to check)."""
        ...


def drift(conn: psycopg.Connection[Any], where: str, render: sql.Composable,
          projected: sql.Composable, session_ids: Sequence[str]) -> dict[str, Drift]:
    """Compare a framework table with the truth for ``session_ids``, in one statement.

    ``render`` is the framework's SQL expression of one truth message ``m`` as it
    stores it; ``projected`` its query of ``(session_id, messages)`` for ``%(ids)s``,
    in its reading order. One statement reads both sides in one snapshot, so a write
    landing meanwhile cannot make them look different; only the sessions that differ
    come back. A table that cannot be read raises ProjectionError saying why.

    A session whose truth has a missing seq shows its later messages as not projected
    yet: they wait for the gap to be filled (parity's ``pg_invariants_hold`` names the
    gap).
    """
    statement = _SHARED("drift", expected=_SHARED("expected", render=render),
                        projected=projected)
    try:
        rows = conn.execute(statement, {"ids": list(session_ids)}).fetchall()
    except psycopg.OperationalError:
        raise  # the connection, not the table: the caller's to report
    except psycopg.Error as exc:
        raise ProjectionError(
            f"{where} cannot be compared with memshift's truth: "
            f"{exc.diag.message_primary or exc}; check that the table is the projection's "
            "(install() again recreates what is missing)"
        ) from None
    return {sid: Drift(sid, where, int(first), list(want), list(have))
            for sid, first, want, have in rows}
