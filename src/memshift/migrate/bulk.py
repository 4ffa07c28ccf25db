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

Rows travel as COPY text made beforehand (:func:`encode`), session by session: the
backfill encodes a batch in the thread that reads Redis while another batch is
being written, so the writing thread only sends bytes and waits for PostgreSQL. A
backfill hands over the plain transcripts it read as ready lines of COPY text
(:class:`Transcript`), made straight from the Redis values (see
:mod:`memshift.migrate.backfill`): the rows are the same, only no ``Message`` is
built on the way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql
from pydantic import ConfigDict

from memshift.model import SessionState
from memshift.sql.queries import query
from memshift.stores.layouts.timestamps import format_timestamp

# The tables a session's rows go to, and the columns of each, in COPY order. The
# staging tables (``stage_<table>``, created LIKE the real ones) take the same
# columns; the staging merge ignores the sessions' two counters and sets them itself
# (bulk_next_seq, bulk_next_event_seq), as a new session's are here.
TABLES = ("sessions", "messages", "tool_runs", "summaries", "checkpoints", "events")
COLUMNS: dict[str, tuple[str, ...]] = {
    "sessions": ("session_id", "tenant_id", "user_id", "status", "version", "created_at",
                 "updated_at", "messages_trimmed", "metadata", "expires_at", "next_seq",
                 "next_event_seq"),
    "messages": ("session_id", "seq", "message_id", "role", "content", "ts", "tool_call_id",
                 "metadata"),
    "tool_runs": ("session_id", "tool_call_id", "name", "args", "status", "attempts",
                  "last_error", "updated_at", "content_hash", "metadata"),
    "summaries": ("session_id", "version", "text", "covers_through", "updated_at",
                  "metadata"),
    "checkpoints": ("session_id", "checkpoint_id", "parent_id", "step", "state",
                    "created_at", "metadata"),
    "events": ("session_id", "event_seq", "type", "from_status", "to_status", "at", "data"),
}
_MESSAGES = TABLES.index("messages")
_COPY = {
    (target, table): sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(f"stage_{table}") if target == "stage"
        else sql.Identifier("memshift", table),
        sql.SQL(", ").join(map(sql.Identifier, COLUMNS[table])),
    )
    for target in ("stage", "direct")
    for table in TABLES
}
NULL = "\\N"  # NULL in COPY text
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(value: str) -> str:
    """``value`` as a field of COPY text: backslash, tab, newline and return escaped."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value


def _text(value: str | None) -> str:
    return NULL if value is None else copy_text(value)


def _time(value: datetime | None) -> str:
    if value is None:
        return NULL
    if value.tzinfo is None:  # (the model's times are aware; this one is read as UTC)
        return format_timestamp(value.replace(tzinfo=UTC))
    return value.isoformat(timespec="microseconds")  # with its offset, in C


def _json(value: Any) -> str:
    """A JSON value as a COPY text field (compact; jsonb keeps no formatting)."""
    if value == {}:
        return "{}"  # most records carry no metadata
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # what orjson refuses (e.g. an int over 64 bits), json writes
        text = json.dumps(value, separators=(",", ":"))
    return copy_text(text)


@dataclass(frozen=True)
class Transcript:
    """A session's messages as lines of COPY text in ``COLUMNS["messages"]`` order."""

    text: str  # one line per message, each ending with a newline
    count: int  # messages
    next_seq: int  # the seq after the last one (messages_trimmed when there is none)


class TranscribedState(SessionState):
    """A session whose messages come as a :class:`Transcript`; ``messages`` is empty."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    transcript: Transcript


class EncodedState(TranscribedState):
    """A session the backfill's lane read straight into COPY text: its session record
    and transcript as in :class:`TranscribedState`, its other parts as lines of COPY
    text (``parts``: tool runs, summaries, checkpoints, events), its record tuples
    empty. Only :func:`encode` reads it."""

    parts: tuple[str, str, str, str]
    event_count: int


@dataclass(frozen=True, slots=True)
class SessionRows:
    """One session's rows as UTF-8 COPY text, table by table (``TABLES``' order)."""

    session_id: str
    messages: int
    data: tuple[bytes, ...]


def encode(state: SessionState) -> SessionRows:
    """``state``'s rows, ready to COPY; the session row's counters are those the
    staging merge leaves on a new session."""
    sid = copy_text(state.session_id)
    s = state.session
    if isinstance(state, TranscribedState):
        messages, count = state.transcript.text, state.transcript.count
        next_seq = max(s.messages_trimmed, state.transcript.next_seq)
    else:
        messages = "".join(
            f"{sid}\t{NULL if m.seq is None else m.seq}\t{copy_text(m.message_id)}\t"
            f"{copy_text(m.role)}\t{copy_text(m.content)}\t{_time(m.ts)}\t"
            f"{_text(m.tool_call_id)}\t{_json(m.metadata)}\n"
            for m in state.messages
        )
        count = len(state.messages)
        last_seq = max((m.seq for m in state.messages if m.seq is not None), default=-1)
        next_seq = max(s.messages_trimmed, last_seq + 1)
    if isinstance(state, EncodedState):
        next_event_seq = state.event_count
    else:
        next_event_seq = 1 + max(
            (e.event_seq for e in state.events if e.event_seq is not None), default=-1
        )
    session = (
        f"{sid}\t{_text(s.tenant_id)}\t{_text(s.user_id)}\t{copy_text(s.status)}\t"
        f"{s.version}\t{_time(s.created_at)}\t{_time(s.updated_at)}\t{s.messages_trimmed}\t"
        f"{_json(s.metadata)}\t{_time(s.expires_at)}\t{next_seq}\t{next_event_seq}\n"
    )
    if isinstance(state, EncodedState):
        parts: tuple[str, ...] = (session, messages, *state.parts)
    else:
        parts = (session, messages, *_other_parts(sid, state))
    return SessionRows(state.session_id, count, tuple(part.encode() for part in parts))


def _other_parts(sid: str, state: SessionState) -> tuple[str, str, str, str]:
    """The COPY text of a session's tool runs, summaries, checkpoints and events."""
    tool_runs = "".join(
        f"{sid}\t{copy_text(t.tool_call_id)}\t{copy_text(t.name)}\t{_json(t.args)}\t"
        f"{t.status}\t{t.attempts}\t{_text(t.last_error)}\t{_time(t.updated_at)}\t"
        f"{t.content_hash()}\t{_json(t.metadata)}\n"
        for t in state.tool_runs
    )
    summaries = "".join(
        f"{sid}\t{u.version}\t{copy_text(u.text)}\t{u.covers_through}\t{_time(u.updated_at)}\t"
        f"{_json(u.metadata)}\n"
        for u in state.summaries
    )
    checkpoints = "".join(
        f"{sid}\t{copy_text(c.checkpoint_id)}\t{_text(c.parent_id)}\t{c.step}\t"
        f"{_json(c.state)}\t{_time(c.created_at)}\t{_json(c.metadata)}\n"
        for c in state.checkpoints
    )
    events = "".join(
        f"{sid}\t{NULL if e.event_seq is None else e.event_seq}\t{copy_text(e.type)}\t"
        f"{_text(e.from_status)}\t{_text(e.to_status)}\t{_time(e.at)}\t{_json(e.data)}\n"
        for e in state.events
    )
    return tool_runs, summaries, checkpoints, events


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

    def unchanged(self, sessions: Sequence[SessionState | SessionRows]) -> int:
        return sum(1 for s in sessions if s.session_id not in self.changed)


def _copy(cur: psycopg.Cursor[Any], target: str, sessions: Sequence[SessionRows]) -> int:
    """COPY the rows of ``sessions`` into the ``stage`` or ``direct`` tables; how many
    messages."""
    for index, table in enumerate(TABLES):
        data = b"".join(rows.data[index] for rows in sessions)
        if data:
            with cur.copy(_COPY[target, table]) as copy:
                copy.write(data)
    return sum(rows.messages for rows in sessions)


def merge_states(conn: psycopg.Connection[Any], states: Sequence[SessionState]) -> MergeResult:
    """Merge ``states`` (one per session id) inside the caller's transaction."""
    return merge_rows(conn, [encode(state) for state in states])


def merge_rows(conn: psycopg.Connection[Any], sessions: Sequence[SessionRows]) -> MergeResult:
    """Merge the :func:`encode`\\ d rows of sessions (one each) inside the caller's
    transaction."""
    result = MergeResult()
    if not sessions:
        return result
    result.messages = sum(rows.messages for rows in sessions)
    fresh = _fresh(conn, [rows.session_id for rows in sessions])
    rest = [rows for rows in sessions if rows.session_id not in fresh]
    if fresh:
        new = [rows for rows in sessions if rows.session_id in fresh]
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


def _insert_fresh(conn: psycopg.Connection[Any], sessions: Sequence[SessionRows]) -> bool:
    """COPY new sessions straight into the tables; False (nothing written) when a row
    of one of them appeared since :func:`_fresh` looked."""
    try:
        with conn.transaction(), conn.cursor() as cur:
            _copy(cur, "direct", sessions)
    except psycopg.errors.UniqueViolation:
        return False
    return True


def _merge_staged(
    conn: psycopg.Connection[Any], sessions: Sequence[SessionRows], result: MergeResult
) -> None:
    """COPY into the staging tables, then the guarded merges, statement by statement."""
    conn.execute(query("stage_create"))
    with conn.cursor() as cur:
        staged = _copy(cur, "stage", sessions)
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
