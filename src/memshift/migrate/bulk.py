"""Merge many sessions into PostgreSQL at once: COPY into staging, then set-based merges.

The merges are the guarded upserts of the live writes (``queries.sql`` includes the
same text in both), so a backfill batch and the application's dual-writes converge
whichever lands first, and a batch merged twice changes nothing the second time.
The caller owns the transaction: a batch is merged, and recorded as done, together.

Fast path: the sessions that PostgreSQL holds nothing of yet (a first backfill, the
common case) are COPYed straight into the tables, under a savepoint. Each guarded
upsert, finding no row, inserts exactly what a plain insert does, so the outcome is
the same; it is only cheaper (COPY inserts rows in bulk, where ``INSERT ... ON
CONFLICT`` inserts them one by one, speculatively, and staging writes them twice).
A live write that lands between the check and the COPY makes it fail on a unique
key (or wait for the writer, then fail): the savepoint is rolled back and the group
takes the staging merge like every other session, so the guards decide as always.

A backfill hands over the plain transcripts it read as lines of COPY text
(:class:`Transcript`), made straight from the Redis values (see
:mod:`memshift.migrate.backfill`): the rows are the same, only no ``Message`` is
built and no row is serialised field by field on the way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from pydantic import ConfigDict

from memshift.model import SessionState
from memshift.sql.queries import query

# Staging tables (created LIKE the real ones) and the columns COPY fills, with their
# types: the COPY is binary, so psycopg's C dumpers serialise the rows.
_STAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "stage_sessions": (
        ("session_id", "text"), ("tenant_id", "text"), ("user_id", "text"),
        ("status", "text"), ("version", "int8"), ("created_at", "timestamptz"),
        ("updated_at", "timestamptz"), ("messages_trimmed", "int8"), ("metadata", "jsonb"),
        ("expires_at", "timestamptz"),
    ),
    "stage_messages": (
        ("session_id", "text"), ("seq", "int8"), ("message_id", "text"), ("role", "text"),
        ("content", "text"), ("ts", "timestamptz"), ("tool_call_id", "text"),
        ("metadata", "jsonb"),
    ),
    "stage_tool_runs": (
        ("session_id", "text"), ("tool_call_id", "text"), ("name", "text"), ("args", "jsonb"),
        ("status", "text"), ("attempts", "int8"), ("last_error", "text"),
        ("updated_at", "timestamptz"), ("content_hash", "text"), ("metadata", "jsonb"),
    ),
    "stage_summaries": (
        ("session_id", "text"), ("version", "int8"), ("text", "text"),
        ("covers_through", "int8"), ("updated_at", "timestamptz"), ("metadata", "jsonb"),
    ),
    "stage_checkpoints": (
        ("session_id", "text"), ("checkpoint_id", "text"), ("parent_id", "text"),
        ("step", "int8"), ("state", "jsonb"), ("created_at", "timestamptz"),
        ("metadata", "jsonb"),
    ),
    "stage_events": (
        ("session_id", "text"), ("event_seq", "int8"), ("type", "text"),
        ("from_status", "text"), ("to_status", "text"), ("at", "timestamptz"),
        ("data", "jsonb"),
    ),
}
_COPY = {
    table: sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(c) for c, _ in columns)
    )
    for table, columns in _STAGES.items()
}
# The fast path's COPY into the real tables: the staged columns, and for sessions the
# two counters that the staging merge sets afterwards (bulk_next_seq, _event_seq).
_COUNTERS = (("next_seq", "int8"), ("next_event_seq", "int8"))
_DIRECT_COLUMNS = {
    table: columns + (_COUNTERS if table == "stage_sessions" else ())
    for table, columns in _STAGES.items()
}
_DIRECT = {
    table: sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier("memshift", table.removeprefix("stage_")),
        sql.SQL(", ").join(sql.Identifier(c) for c, _ in columns),
    )
    for table, columns in _DIRECT_COLUMNS.items()
}
_EMPTY = Jsonb({}, dumps=lambda _: "{}")  # most records carry no metadata
# Transcripts go in as COPY text, in these columns (metadata: always the empty object).
_TRANSCRIPT_COLUMNS = _STAGES["stage_messages"]
_TRANSCRIPT_COPY = {
    target: sql.SQL("COPY {} ({}) FROM STDIN").format(
        table, sql.SQL(", ").join(sql.Identifier(c) for c, _ in _TRANSCRIPT_COLUMNS)
    )
    for target, table in (
        ("stage", sql.Identifier("stage_messages")),
        ("direct", sql.Identifier("memshift", "messages")),
    )
}
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(value: str) -> str:
    """``value`` as a field of COPY text: backslash, tab, newline and return escaped."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value


@dataclass(frozen=True)
class Transcript:
    """A session's messages as lines of COPY text in ``_TRANSCRIPT_COLUMNS``' order."""

    text: str  # one line per message, each ending with a newline
    count: int  # messages
    next_seq: int  # the seq after the last one (messages_trimmed when there is none)


class TranscribedState(SessionState):
    """A session whose messages come as a :class:`Transcript`; ``messages`` is empty."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    transcript: Transcript


def _json(value: dict[str, Any]) -> Jsonb:
    return Jsonb(value) if value else _EMPTY


# Each merge returns (session id, rows changed) for every session it changed.
_MERGES = (
    "bulk_merge_sessions",
    "bulk_merge_tool_runs",
    "bulk_merge_summaries",
    "bulk_merge_checkpoints",
    "bulk_merge_events",
)
_AFTER = ("bulk_next_seq", "bulk_next_event_seq")


@dataclass
class MergeResult:
    changed: set[str] = field(default_factory=set)  # sessions the merge changed
    conflicted: set[str] = field(default_factory=set)  # sessions with a message conflict
    messages: int = 0  # messages staged

    def unchanged(self, states: Sequence[SessionState]) -> int:
        return sum(1 for s in states if s.session_id not in self.changed)


def _message_count(state: SessionState) -> int:
    if isinstance(state, TranscribedState):
        return state.transcript.count
    return len(state.messages)


def _next_seq(state: SessionState) -> int:
    """next_seq as the staging merge leaves it on a new session."""
    if isinstance(state, TranscribedState):
        return max(state.session.messages_trimmed, state.transcript.next_seq)
    last_seq = max((m.seq for m in state.messages if m.seq is not None), default=-1)
    return max(state.session.messages_trimmed, last_seq + 1)


def _rows(
    states: Iterable[SessionState], *, counters: bool = False
) -> dict[str, list[tuple[Any, ...]]]:
    """The rows of every table; with ``counters``, sessions rows end with next_seq and
    next_event_seq as the staging merge would leave them on a new session."""
    rows: dict[str, list[tuple[Any, ...]]] = {name: [] for name in _STAGES}
    for state in states:
        sid = state.session_id
        s = state.session
        session: tuple[Any, ...] = (
            sid, s.tenant_id, s.user_id, s.status, s.version, s.created_at, s.updated_at,
            s.messages_trimmed, _json(s.metadata), s.expires_at,
        )
        if counters:
            last_event = max(
                (e.event_seq for e in state.events if e.event_seq is not None), default=-1
            )
            session += (_next_seq(state), last_event + 1)
        rows["stage_sessions"].append(session)
        rows["stage_messages"].extend(
            (sid, m.seq, m.message_id, m.role, m.content, m.ts, m.tool_call_id,
             _json(m.metadata))
            for m in state.messages
        )
        rows["stage_tool_runs"].extend(
            (sid, t.tool_call_id, t.name, Jsonb(t.args), t.status, t.attempts, t.last_error,
             t.updated_at, t.content_hash(), _json(t.metadata))
            for t in state.tool_runs
        )
        rows["stage_summaries"].extend(
            (sid, u.version, u.text, u.covers_through, u.updated_at, _json(u.metadata))
            for u in state.summaries
        )
        rows["stage_checkpoints"].extend(
            (sid, c.checkpoint_id, c.parent_id, c.step, Jsonb(c.state), c.created_at,
             _json(c.metadata))
            for c in state.checkpoints
        )
        rows["stage_events"].extend(
            (sid, e.event_seq, e.type, e.from_status, e.to_status, e.at, _json(e.data))
            for e in state.events
        )
    return rows


def _copy(
    cur: psycopg.Cursor[Any], statements: dict[str, sql.Composed],
    columns: dict[str, tuple[tuple[str, str], ...]], rows: dict[str, list[tuple[Any, ...]]],
) -> None:
    for table, table_rows in rows.items():
        if not table_rows:
            continue
        with cur.copy(statements[table]) as copy:
            copy.set_types([kind for _, kind in columns[table]])
            for row in table_rows:
                copy.write_row(row)


def _copy_transcripts(
    cur: psycopg.Cursor[Any], target: str, states: Sequence[SessionState]
) -> int:
    """COPY the transcripts of ``states`` (into ``stage`` or ``direct``); how many rows."""
    transcripts = [s.transcript for s in states if isinstance(s, TranscribedState)]
    if not any(t.count for t in transcripts):
        return 0
    with cur.copy(_TRANSCRIPT_COPY[target]) as copy:
        copy.write("".join(t.text for t in transcripts).encode())
    return sum(t.count for t in transcripts)


def merge_states(conn: psycopg.Connection[Any], states: Sequence[SessionState]) -> MergeResult:
    """Merge ``states`` (one per session id) inside the caller's transaction."""
    result = MergeResult()
    if not states:
        return result
    result.messages = sum(map(_message_count, states))
    fresh = _fresh(conn, [s.session_id for s in states])
    rest = [s for s in states if s.session_id not in fresh]
    if fresh:
        new = [s for s in states if s.session_id in fresh]
        if _insert_fresh(conn, new):
            result.changed.update(fresh)
        else:
            rest.extend(new)
    if rest:
        _merge_staged(conn, rest, result)
    return result


def _fresh(conn: psycopg.Connection[Any], ids: list[str]) -> set[str]:
    """The ids of which PostgreSQL holds no row at all (yet)."""
    rows = conn.execute(query("bulk_fresh_sessions"), {"ids": ids}).fetchall()
    return {sid for (sid,) in rows}


def _insert_fresh(conn: psycopg.Connection[Any], states: Sequence[SessionState]) -> bool:
    """COPY new sessions straight into the tables; False (nothing written) when a row
    of one of them appeared since :func:`_fresh` looked."""
    try:
        with conn.transaction(), conn.cursor() as cur:
            _copy(cur, _DIRECT, _DIRECT_COLUMNS, _rows(states, counters=True))
            _copy_transcripts(cur, "direct", states)
    except psycopg.errors.UniqueViolation:
        return False
    return True


def _merge_staged(
    conn: psycopg.Connection[Any], states: Sequence[SessionState], result: MergeResult
) -> None:
    """COPY into the staging tables, then the guarded merges, statement by statement."""
    conn.execute(query("stage_create"))
    with conn.cursor() as cur:
        rows = _rows(states)
        _copy(cur, _COPY, _STAGES, rows)
        staged = len(rows["stage_messages"]) + _copy_transcripts(cur, "stage", states)
        cur.execute(query("bulk_merge_messages"))
        inserted = cur.fetchall()
        result.changed.update(sid for sid, _ in inserted)
        if sum(count for _, count in inserted) < staged:
            # Some staged messages were already there: check those for conflicts.
            cur.execute(query("bulk_message_conflicts"))
            result.conflicted.update(sid for sid, _ in cur.fetchall())
        for name in _MERGES:
            cur.execute(query(name))
            result.changed.update(sid for sid, _ in cur.fetchall())
        for name in _AFTER:
            cur.execute(query(name))
