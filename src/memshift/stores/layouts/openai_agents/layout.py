"""The Redis layout of the OpenAI Agents SDK's ``RedisSession`` (``openai-agents[redis]``).

=================================  ======  ========================================
key                                type    content
=================================  ======  ========================================
``{key_prefix}:{sid}``             HASH    ``session_id``, ``created_at``,
                                           ``updated_at`` (epoch seconds)
``{key_prefix}:{sid}:messages``    LIST    ``json.dumps(item)`` per item, RPUSHed:
                                           oldest first, seq = index
``{key_prefix}:{sid}:counter``     STRING  the SDK's counter (not read)
=================================  ======  ========================================

All three keys share one expiry (``PEXPIREAT``) when the session has a ``ttl``.
``key_prefix`` is the SDK's (default ``agents:session``): memshift's default prefix
``agent`` stands for it; any other memshift prefix is the key prefix with each ``.``
read as ``:`` (``--prefix myapp.sessions`` for ``myapp:sessions``), since memshift
prefixes hold no ``:``. How items map to the model is in
:mod:`~memshift.stores.layouts.openai_agents.items`; the session record has the
hash's times, status ``active`` and version 0, and the hash's TTL as its expiry.

The SDK stores only items: tool runs, summaries, checkpoints and status changes
raise :class:`~memshift.stores.layouts.NotInLayout` before anything is sent.
``save_session`` writes nothing and replies ``applied``, so that a router passes the
session on to PostgreSQL. Items carry no id of memshift's: a message's id is
``oa-{seq}``, so an append without a seq cannot be recognised when retried (the
drop-in adapter always sends the seq).

``pop_item`` and compaction (``_atomic_replace_items``) rewrite the list, which would
shift the seqs: do not use them on sessions being migrated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from memshift.errors import ValidationError
from memshift.model import Message, Session, SessionState, parse, placeholder_session
from memshift.stores.layouts import ScriptCall
from memshift.stores.layouts.framework import (
    MEMSHIFT_DEFAULT_PREFIX,
    FrameworkLayout,
    escape_glob,
    invalid,
    with_expiry,
)
from memshift.stores.layouts.openai_agents import projection
from memshift.stores.layouts.openai_agents.items import fields_from_item, item_id, to_json
from memshift.stores.layouts.projection import Drift

__all__ = ["DEFAULT_KEY_PREFIX", "OpenAIAgentsLayout"]

DEFAULT_KEY_PREFIX = "agents:session"
_REDIS_FIELDS = "redis_fields"


class OpenAIAgentsLayout(FrameworkLayout):
    """Sessions as the SDK's ``RedisSession`` keeps them: a hash and an item list."""

    name = "openai-agents"
    scan_type = "hash"
    keeper = "the SDK's RedisSession"
    kept = "items"

    def __init__(self, prefix: str = MEMSHIFT_DEFAULT_PREFIX, *,
                 tables: projection.Tables = projection.DEFAULT_TABLES) -> None:
        self.prefix = prefix
        self.key_prefix = (DEFAULT_KEY_PREFIX if prefix == MEMSHIFT_DEFAULT_PREFIX
                           else prefix.replace(".", ":"))
        self.tables = tables

    def prepare_postgres(self, conn: psycopg.Connection[Any]) -> None:
        """Install the SQLAlchemySession projection (into ``tables``) unless installed."""
        if projection.installed(conn) is None:
            projection.install(conn, self.tables)

    def projection_drift(self, conn: psycopg.Connection[Any],
                         session_ids: Sequence[str]) -> dict[str, Drift] | None:
        """Sessions whose SDK rows differ from the truth (parity's projection check)."""
        found = projection.installed(conn)
        return None if found is None else projection.drifted(conn, found, session_ids)

    # -- keys -------------------------------------------------------------------------

    def script_dir(self) -> Path:
        return Path(__file__).parent / "lua"

    def session_keys(self, session_id: str) -> list[str]:
        base = f"{self.key_prefix}:{session_id}"
        return [base, f"{base}:messages", f"{base}:counter"]

    def scan_pattern(self) -> str:
        return escape_glob(self.key_prefix) + ":*"

    def session_id_from_key(self, key: bytes) -> str | None:
        text = key.decode("utf-8", "surrogateescape")
        head = f"{self.key_prefix}:"
        if not text.startswith(head) or len(text) == len(head):
            return None
        return text[len(head):]

    # -- reads ------------------------------------------------------------------------

    def read_commands(self, session_id: str) -> list[tuple[Any, ...]]:
        hash_key, messages, _ = self.session_keys(session_id)
        return [("HGETALL", hash_key), ("LRANGE", messages, 0, -1), ("PTTL", hash_key)]

    def decode(self, session_id: str, replies: list[Any]) -> SessionState | None:
        hash_reply, entries, ttl = replies
        fields = _pairs(hash_reply)
        if not fields and not entries:
            return None
        messages = tuple(self._message(session_id, seq, raw, True)
                         for seq, raw in enumerate(entries or []))
        if fields:
            session = self._session(session_id, fields)
        else:
            session = placeholder_session(session_id, [m.ts for m in messages])
        return SessionState(session=with_expiry(session, ttl), messages=messages)

    def _session(self, session_id: str, fields: dict[Any, Any]) -> Session:
        key = self.session_keys(session_id)[0]
        data: dict[str, Any] = {"session_id": session_id}
        unknown: dict[str, str] = {}
        for raw_name, raw_value in fields.items():
            name = _text(session_id, key, "field name", raw_name)
            value = _text(session_id, key, f"field {name!r}", raw_value)
            if name in ("created_at", "updated_at"):
                data[name] = _seconds(session_id, key, name, value)
            elif name != "session_id" or value != session_id:
                unknown[name] = value
        if unknown:
            data["metadata"] = {_REDIS_FIELDS: unknown}
        data.setdefault("created_at", data.get("updated_at"))
        data.setdefault("updated_at", data["created_at"])
        if data["created_at"] is None:
            del data["created_at"], data["updated_at"]
        session: Session = parse(Session, data, session_id=session_id, where=f"key {key!r}")
        return session

    def message_from_reply(self, session_id: str, seq: int, raw: bytes) -> Message:
        return self._message(session_id, seq, raw, False)

    def _message(self, session_id: str, seq: int, raw: Any, indexed: bool) -> Message:
        key = self.session_keys(session_id)[1]
        where = f"key {key!r} item {seq}" + (f" (LINDEX {seq})" if indexed else "")
        text = _text(session_id, key, f"item {seq}", raw)
        try:
            item = json.loads(text)
        except ValueError as exc:
            raise invalid(session_id, where,
                          f"is not valid JSON ({exc}): {text[:200]!r}") from None
        try:
            fields = fields_from_item(item, seq)
        except ValueError as exc:
            raise invalid(session_id, where, str(exc)) from None
        message: Message = parse(Message, fields, session_id=session_id, where=where)
        return message

    def session_from_reply(self, session_id: str, fields: Any, ttl: Any) -> Session:
        self.refuse(session_id, "a session status")

    # -- writes -----------------------------------------------------------------------

    def save_session(self, session: Session, ttl_ms: int) -> ScriptCall:
        return ScriptCall("save_session", self.session_keys(session.session_id), [ttl_ms])

    def append_message(self, session_id: str, message: Message, ttl_ms: int) -> ScriptCall:
        # An item has no room for an id: the id is the seq, so the seq must be known.
        if message.seq is None or message.message_id != item_id(message.seq):
            where = "without a seq" if message.seq is None else f"at seq {message.seq}"
            raise ValidationError(
                f"session {session_id!r}: message {message.message_id!r} {where} cannot be "
                "kept in an SDK item, whose id is its place (oa-<seq>); append with the "
                "seq and that id, as memshift.adapters.openai_agents.MigratingSession does",
                session_id=session_id, where="append_message")
        return ScriptCall("append_message", self.session_keys(session_id),
                          [ttl_ms, to_json(message), message.seq, session_id])


def _pairs(reply: Any) -> dict[Any, Any]:
    if not reply:
        return {}
    if isinstance(reply, dict):
        return dict(reply)
    items = list(reply)
    return dict(zip(items[::2], items[1::2], strict=True))


def _text(session_id: str, key: str, where: str, raw: Any) -> str:
    if not isinstance(raw, bytes):
        return str(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(session_id, f"key {key!r} {where}",
                      f"is not valid UTF-8 at byte {exc.start}: {raw[:200]!r}") from None


def _seconds(session_id: str, key: str, field: str, value: str) -> datetime:
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except (ValueError, OverflowError, OSError):
        raise invalid(session_id, f"key {key!r} field {field!r}",
                      f"{value!r} is not a time in epoch seconds") from None
