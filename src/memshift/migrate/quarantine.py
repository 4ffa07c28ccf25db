"""Quarantine: sessions that cannot be migrated as they are, kept whole with a reason.

A session with any record that cannot be read or validated is quarantined whole (a
partly migrated session would resume wrongly): its raw bytes, every key of it, and a
reason naming the key and what is wrong. ``memshift quarantine retry`` reads it from
Redis again (after someone fixed it there) and migrates it if it is now valid;
``memshift quarantine dismiss`` records that an operator accepts its loss (who, when,
why). Open entries hold back the gates into cutover, pg_primary and retired: each is a
session missing from PostgreSQL.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from memshift.errors import MemshiftError, ValidationError
from memshift.sql.queries import query
from memshift.stores.redis import RawSession


def printable(session_id: str) -> str:
    """The id as text PostgreSQL can hold: invalid UTF-8 and NUL escaped, as in repr."""
    raw = session_id.encode("utf-8", "surrogateescape")
    text = raw.decode("utf-8", "backslashreplace")
    return text.replace("\x00", "\\x00")


def _jsonable(value: Any) -> Any:
    """Raw Redis replies as JSON: bytes as {"b64": ...} so that nothing is altered."""
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return [[_jsonable(k), _jsonable(v)] for k, v in value.items()]
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, BaseException):
        return {"error": str(value)}
    return value


@dataclass(frozen=True)
class Quarantined:
    source: str  # layout:prefix
    session_key: bytes
    session_id: str  # printable
    reason: str
    raw: dict[str, Any]

    @classmethod
    def from_read(cls, read: RawSession, source: str, reason: str | None = None) -> Quarantined:
        """The session as read: ``{key: [{"command", "reply"}, ...]}``, every command's
        reply kept (a key is read by several: HGETALL, then PTTL, of the session hash)."""
        key = read.session_id.encode("utf-8", "surrogateescape")
        raw: dict[str, list[dict[str, Any]]] = {}
        for command, reply in zip(read.commands, read.replies, strict=True):
            name, target, *args = (_text(part) for part in command)
            raw.setdefault(printable(target), []).append(
                {"command": " ".join((name, *args)), "reply": _jsonable(reply)})
        return cls(source, key, printable(read.session_id), reason or read.error or "?", raw)


def _text(part: Any) -> str:
    return part.decode("utf-8", "surrogateescape") if isinstance(part, bytes) else str(part)


def record_quarantine(conn: psycopg.Connection[Any], item: Quarantined, run_id: int | None) -> None:
    conn.execute(
        query("quarantine_record"),
        {
            "source": item.source,
            "session_key": item.session_key,
            "session_id": item.session_id,
            "reason": item.reason,
            "raw": Jsonb(item.raw),
            "run_id": run_id,
        },
    )


@dataclass(frozen=True)
class QuarantineEntry:
    id: int
    source: str
    session_id: str
    reason: str
    state: str
    seen: int
    first_seen: datetime
    last_seen: datetime
    dismissed_at: datetime | None = None
    dismissed_by: str | None = None
    dismissed_reason: str | None = None


def entries(
    conn: psycopg.Connection[Any], *, state: str | None = "open", limit: int = 100
) -> list[QuarantineEntry]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query("quarantine_list"), {"state": state, "limit": limit}).fetchall()
    return [QuarantineEntry(**row) for row in rows]


def entry(conn: psycopg.Connection[Any], entry_id: int) -> dict[str, Any]:
    """One quarantined session in full: its reason and its raw keys and values."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(query("quarantine_get"), {"id": entry_id}).fetchone()
    if row is None:
        raise MemshiftError(
            f"no quarantine entry {entry_id}; `memshift quarantine list --all` shows the "
            "entries"
        )
    row["session_key"] = bytes(row["session_key"])
    return row


def resolve(conn: psycopg.Connection[Any], source: str, session_key: bytes) -> None:
    conn.execute(query("quarantine_resolve"), {"source": source, "session_key": session_key})


def dismiss(
    conn: psycopg.Connection[Any], entry_ids: list[int], why: str, *, who: str
) -> list[int]:
    """Accept that these sessions are not migrated: each open entry becomes
    ``dismissed``, with who, when and why kept; returns the ids dismissed now.

    A dismissed session stays missing from PostgreSQL: after ``retired`` it reads as
    absent. So this needs a reason, and refuses ids that are not open entries (with
    what they are) before it changes anything.
    """
    if not why.strip():
        raise ValidationError("dismissing a quarantine entry needs a reason (--reason): it "
                              "is kept with the entry, for the audit")
    with conn.transaction():
        done = [row[0] for row in conn.execute(
            query("quarantine_dismiss"), {"ids": entry_ids, "who": who, "why": why})]
        refused = [i for i in dict.fromkeys(entry_ids) if i not in done]
        if refused:
            raise MemshiftError("; ".join(_not_open(conn, i) for i in refused)
                                + ": nothing was dismissed")
    return done


def _not_open(conn: psycopg.Connection[Any], entry_id: int) -> str:
    try:
        return f"quarantine entry {entry_id} is {entry(conn, entry_id)['state']}, not open"
    except MemshiftError as missing:
        return str(missing)
