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

_STAGES: dict[str, tuple[str, ...]] = {
    "stage_sessions": (
        "session_id", "tenant_id", "user_id", "status", "version", "created_at",
        "updated_at", "messages_trimmed", "metadata", "expires_at",
    ),
    "stage_messages": (
        "session_id", "seq", "message_id", "role", "content", "ts", "tool_call_id", "metadata",
    ),
    "stage_tool_runs": (
        "session_id", "tool_call_id", "name", "args", "status", "attempts", "last_error",
        "updated_at", "content_hash", "metadata",
    ),
    "stage_summaries": (
        "session_id", "version", "text", "covers_through", "updated_at", "metadata",
    ),
    "stage_checkpoints": (
        "session_id", "checkpoint_id", "parent_id", "step", "state", "created_at", "metadata",
    ),
    "stage_events": (
        "session_id", "event_seq", "type", "from_status", "to_status", "at", "data",
    ),
}

# Each merge returns the session id of every row it changed.
_MERGES = (
    "bulk_merge_sessions",
    "bulk_merge_messages",
    "bulk_message_conflicts",
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
             s.messages_trimmed, Jsonb(s.metadata), s.expires_at)
        )
        rows["stage_messages"].extend(
            (sid, m.seq, m.message_id, m.role, m.content, m.ts, m.tool_call_id,
             Jsonb(m.metadata))
            for m in state.messages
        )
        rows["stage_tool_runs"].extend(
            (sid, t.tool_call_id, t.name, Jsonb(t.args), t.status, t.attempts, t.last_error,
             t.updated_at, t.content_hash(), Jsonb(t.metadata))
            for t in state.tool_runs
        )
        rows["stage_summaries"].extend(
            (sid, u.version, u.text, u.covers_through, u.updated_at, Jsonb(u.metadata))
            for u in state.summaries
        )
        rows["stage_checkpoints"].extend(
            (sid, c.checkpoint_id, c.parent_id, c.step, Jsonb(c.state), c.created_at,
             Jsonb(c.metadata))
            for c in state.checkpoints
        )
        rows["stage_events"].extend(
            (sid, e.event_seq, e.type, e.from_status, e.to_status, e.at, Jsonb(e.data))
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
            if table == "stage_messages":
                result.messages = len(rows)
            statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, _STAGES[table]))
            )
            with cur.copy(statement) as copy:
                for row in rows:
                    copy.write_row(row)
        for name in _MERGES:
            cur.execute(query(name))
            touched = {row[0] for row in cur.fetchall()}
            if name == "bulk_message_conflicts":
                result.conflicted |= touched
            else:
                result.changed |= touched
        for name in _AFTER:
            cur.execute(query(name))
    return result
