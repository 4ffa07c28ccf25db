"""Merge many sessions into PostgreSQL at once: COPY into staging, then set-based merges.

The merges are the guarded upserts of the live writes (``queries.sql`` includes the
same text in both), so a backfill batch and the application's dual-writes converge
whichever lands first, and a batch merged twice changes nothing the second time.
The caller owns the transaction: a batch is merged, and recorded as done, together.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

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
_EMPTY = Jsonb({}, dumps=lambda _: "{}")  # most records carry no metadata


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


def _rows(states: Iterable[SessionState]) -> dict[str, list[tuple[Any, ...]]]:
    rows: dict[str, list[tuple[Any, ...]]] = {name: [] for name in _STAGES}
    for state in states:
        sid = state.session_id
        s = state.session
        rows["stage_sessions"].append(
            (sid, s.tenant_id, s.user_id, s.status, s.version, s.created_at, s.updated_at,
             s.messages_trimmed, _json(s.metadata), s.expires_at)
        )
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


def merge_states(conn: psycopg.Connection[Any], states: Sequence[SessionState]) -> MergeResult:
    """Merge ``states`` (one per session id) inside the caller's transaction."""
    result = MergeResult()
    if not states:
        return result
    conn.execute(query("stage_create"))
    with conn.cursor() as cur:
        for table, rows in _rows(states).items():
            if not rows:
                continue
            with cur.copy(_COPY[table]) as copy:
                copy.set_types([kind for _, kind in _STAGES[table]])
                for row in rows:
                    copy.write_row(row)
            if table == "stage_messages":
                result.messages = len(rows)
        cur.execute(query("bulk_merge_messages"))
        inserted = cur.fetchall()
        result.changed.update(sid for sid, _ in inserted)
        if sum(count for _, count in inserted) < result.messages:
            # Some staged messages were already there: check those for conflicts.
            cur.execute(query("bulk_message_conflicts"))
            result.conflicted.update(sid for sid, _ in cur.fetchall())
        for name in _MERGES:
            cur.execute(query(name))
            result.changed.update(sid for sid, _ in cur.fetchall())
        for name in _AFTER:
            cur.execute(query(name))
    return result
