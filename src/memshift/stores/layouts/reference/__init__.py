"""The reference Redis layout of DESIGN §3: one HASH per session and five child keys.

============================  ======  ==============================================
key                           type    content
============================  ======  ==============================================
``{p}:session:{sid}``         HASH    tenant_id, user_id, status, version, created_at,
                                      updated_at, messages_trimmed, metadata (JSON),
                                      expires_at (memshift's own, optional)
``{p}:session:{sid}:messages``  LIST  JSON ``{"id", "role", "content", "ts",
                                      "tool_call_id"?}``; seq = messages_trimmed + index
``{p}:session:{sid}:tools``   HASH    tool_call_id → JSON ``{"name", "args", "status",
                                      "attempts", "last_error", "updated_at"}``
``{p}:session:{sid}:summary``   STRING  JSON ``{"version", "text", "covers_through",
                                      "updated_at"}``
``{p}:session:{sid}:checkpoint``  STRING  JSON ``{"checkpoint_id", "parent_id",
                                      "step", "state", "created_at"}`` (latest only)
``{p}:session:{sid}:events``  STREAM  ``type``, ``from``, ``to``, ``at``, ``data`` (JSON);
                                      event_seq = index in the stream
============================  ======  ==============================================

Timestamps are written as fixed-width ISO 8601 UTC and read as ISO 8601 or epoch
milliseconds (see :mod:`memshift.stores.layouts.timestamps`). Values are read as
strict UTF-8 JSON; anything that cannot be read raises ValidationError naming the
full key, the field or index, and what is wrong, so the session is quarantined
whole. Unknown hash fields and unknown JSON members are refused the same way:
dropping them would lose data silently.

A session whose hash is missing but whose children exist (legacy code that only
RPUSHes) reads as :func:`memshift.model.placeholder_session`: status ``active``,
version 0, as old as its oldest part, exactly as PostgreSQL reports it.

Ambiguity: a session id that itself ends with ``:messages``, ``:tools``,
``:summary``, ``:checkpoint`` or ``:events`` cannot be told apart from a child key
of a shorter id, so :meth:`ReferenceLayout.session_id_from_key` skips such keys;
``load_session`` still works for such ids when they are named directly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from memshift.errors import ValidationError
from memshift.model import (
    TOOL_STATUS_RANK,
    Checkpoint,
    Event,
    MemorySummary,
    Message,
    Session,
    SessionState,
    StatusChange,
    ToolRun,
    legal_sources,
    now,
    parse,
    placeholder_session,
)
from memshift.stores.layouts import ScriptCall
from memshift.stores.layouts.timestamps import format_timestamp, parse_timestamp

__all__ = ["ID_CHECK_WINDOW", "ReferenceLayout"]

CHILDREN = ("messages", "tools", "summary", "checkpoint", "events")
HASH_FIELDS = (
    "tenant_id",
    "user_id",
    "status",
    "version",
    "created_at",
    "updated_at",
    "messages_trimmed",
    "metadata",
    "expires_at",
)
# append_message looks for the message id among this many of the latest messages, so
# that a retried append without a seq is a duplicate, not a second copy. A full scan
# would cost O(transcript) inside Redis on every append; a retry lands right after
# its first attempt, well inside the window.
ID_CHECK_WINDOW = 256
_GLOB = re.compile(r"([*?\[\]\\])")
_DIGITS = re.compile(r"\d+")


class ReferenceLayout:
    name = "reference"

    def __init__(self, prefix: str = "agent") -> None:
        self.prefix = prefix

    # -- keys -------------------------------------------------------------------------

    def script_dir(self) -> Path:
        return Path(__file__).parent / "lua"

    def _base(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"

    def session_keys(self, session_id: str) -> list[str]:
        base = self._base(session_id)
        return [base, *(f"{base}:{child}" for child in CHILDREN)]

    def scan_pattern(self) -> str:
        return _GLOB.sub(r"\\\1", self.prefix) + ":session:*"

    def session_id_from_key(self, key: bytes) -> str | None:
        # Invalid UTF-8 is kept (as lone surrogates) so the caller can quarantine the
        # session with its id escaped; check_session_id refuses it on load.
        text = key.decode("utf-8", "surrogateescape")
        head = f"{self.prefix}:session:"
        if not text.startswith(head):
            return None
        session_id = text[len(head) :]
        if not session_id or any(session_id.endswith(f":{child}") for child in CHILDREN):
            return None
        return session_id

    # -- reads ------------------------------------------------------------------------

    def read_commands(self, session_id: str) -> list[tuple[Any, ...]]:
        hash_key, messages, tools, summary, checkpoint, events = self.session_keys(session_id)
        return [
            ("HGETALL", hash_key),
            ("LRANGE", messages, 0, -1),
            ("HGETALL", tools),
            ("GET", summary),
            ("GET", checkpoint),
            ("XRANGE", events, "-", "+"),
            ("PTTL", hash_key),
        ]

    def decode(self, session_id: str, replies: list[Any]) -> SessionState | None:
        hash_reply, messages_reply, tools_reply, summary_raw, checkpoint_raw, events_reply, ttl = (
            replies
        )
        fields = _pairs(hash_reply)
        raw_messages = list(messages_reply or [])
        tool_pairs = _pairs(tools_reply)
        raw_events = list(events_reply or [])
        if not (
            fields or raw_messages or tool_pairs or summary_raw or checkpoint_raw or raw_events
        ):
            return None
        keys = self.session_keys(session_id)
        reader = _Reader(session_id)
        trimmed = reader.count(fields.get(b"messages_trimmed"), keys[0], "messages_trimmed")
        parts = SessionState(
            session=Session(session_id=session_id),
            messages=tuple(
                self._message(reader, keys[1], f"index {i}", trimmed + i, raw)
                for i, raw in enumerate(raw_messages)
            ),
            tool_runs=tuple(
                sorted(
                    (self._tool_run(reader, keys[2], k, raw) for k, raw in tool_pairs.items()),
                    key=lambda t: t.tool_call_id,
                )
            ),
            summaries=() if summary_raw is None else (self._summary(reader, keys[3], summary_raw),),
            checkpoints=()
            if checkpoint_raw is None
            else (self._checkpoint(reader, keys[4], checkpoint_raw),),
            events=tuple(
                self._event(reader, keys[5], i, entry) for i, entry in enumerate(raw_events)
            ),
        )
        if not fields:
            session = placeholder_session(session_id, parts.timestamps())
        else:
            session = self._session(reader, keys[0], fields, parts.timestamps(), ttl)
        return parts.model_copy(update={"session": session})

    def _session(
        self,
        reader: _Reader,
        key: str,
        fields: Mapping[Any, Any],
        seen: list[datetime],
        ttl: Any,
    ) -> Session:
        text = {reader.field_name(key, name): value for name, value in fields.items()}
        unknown = sorted(set(text) - set(HASH_FIELDS))
        if unknown:
            raise reader.error(key, f"field {unknown[0]!r}", "is not a field of the layout")
        data: dict[str, Any] = {"session_id": reader.session_id}
        for name in ("tenant_id", "user_id", "status"):
            if name in text:
                data[name] = reader.text(text[name], key, f"field {name!r}")
        for name in ("version", "messages_trimmed"):
            data[name] = reader.count(text.get(name), key, name)
        for name in ("created_at", "updated_at", "expires_at"):
            if name in text:
                where = f"field {name!r}"
                data[name] = reader.timestamp(reader.text(text[name], key, where), key, where)
        if "metadata" in text:
            data["metadata"] = reader.json_object(text["metadata"], key, "field 'metadata'")
        # Missing times: each other's, else as old as the oldest part (placeholder_session).
        oldest = min(seen, default=None)
        data.setdefault("created_at", data.get("updated_at", oldest))
        data.setdefault("updated_at", data["created_at"])
        if data["created_at"] is None:
            del data["created_at"], data["updated_at"]
        if isinstance(ttl, int) and ttl > 0:
            data["expires_at"] = now() + timedelta(milliseconds=ttl)
        session: Session = parse(Session, data, session_id=reader.session_id, where=f"key {key!r}")
        return session

    def _message(self, reader: _Reader, key: str, where: str, seq: int, raw: Any) -> Message:
        obj = reader.json_object(raw, key, where)
        data: dict[str, Any] = {"seq": seq}
        for name, value in obj.items():
            if name == "id":
                data["message_id"] = value
            elif name == "ts":
                data["ts"] = reader.timestamp(value, key, f"{where} member 'ts'")
            elif name in ("message_id", "seq"):
                raise reader.error(key, f"{where} member {name!r}", "is not a member of a message")
            else:
                data[name] = value
        if "ts" not in data:
            raise reader.error(key, where, "has no 'ts' member")
        message: Message = parse(
            Message, data, session_id=reader.session_id, where=f"key {key!r} {where}"
        )
        return message

    def _tool_run(self, reader: _Reader, key: str, name: Any, raw: Any) -> ToolRun:
        tool_call_id = reader.field_name(key, name)
        where = f"field {tool_call_id!r}"
        obj = reader.json_object(raw, key, where)
        if "tool_call_id" in obj:
            raise reader.error(key, f"{where} member 'tool_call_id'", "is not a member here")
        if "updated_at" not in obj:
            raise reader.error(key, where, "has no 'updated_at' member")
        data: dict[str, Any] = {"tool_call_id": tool_call_id, **obj}
        data["updated_at"] = reader.timestamp(
            obj["updated_at"], key, f"{where} member 'updated_at'"
        )
        run: ToolRun = parse(
            ToolRun, data, session_id=reader.session_id, where=f"key {key!r} {where}"
        )
        return run

    def _summary(self, reader: _Reader, key: str, raw: Any) -> MemorySummary:
        obj = reader.json_object(raw, key, "value")
        if "updated_at" not in obj:
            raise reader.error(key, "value", "has no 'updated_at' member")
        obj["updated_at"] = reader.timestamp(obj["updated_at"], key, "member 'updated_at'")
        summary: MemorySummary = parse(
            MemorySummary, obj, session_id=reader.session_id, where=f"key {key!r}"
        )
        return summary

    def _checkpoint(self, reader: _Reader, key: str, raw: Any) -> Checkpoint:
        obj = reader.json_object(raw, key, "value")
        if "created_at" not in obj:
            raise reader.error(key, "value", "has no 'created_at' member")
        obj["created_at"] = reader.timestamp(obj["created_at"], key, "member 'created_at'")
        checkpoint: Checkpoint = parse(
            Checkpoint, obj, session_id=reader.session_id, where=f"key {key!r}"
        )
        return checkpoint

    def _event(self, reader: _Reader, key: str, index: int, entry: Any) -> Event:
        entry_id, raw_fields = entry
        where = f"entry {index} ({reader.text(entry_id, key, f'entry {index} id')})"
        fields = {reader.field_name(key, k): v for k, v in _pairs(raw_fields).items()}
        unknown = sorted(set(fields) - {"type", "from", "to", "at", "data"})
        if unknown:
            raise reader.error(key, f"{where} field {unknown[0]!r}", "is not a field of an event")
        data: dict[str, Any] = {"event_seq": index}
        names = {"type": "type", "from": "from_status", "to": "to_status"}
        for name, target in names.items():
            if name in fields:
                data[target] = reader.text(fields[name], key, f"{where} field {name!r}")
        if "at" not in fields:
            raise reader.error(key, where, "has no 'at' field")
        at = reader.text(fields["at"], key, f"{where} field 'at'")
        data["at"] = reader.timestamp(at, key, f"{where} field 'at'")
        if "data" in fields:
            data["data"] = reader.json(fields["data"], key, f"{where} field 'data'")
        event: Event = parse(
            Event, data, session_id=reader.session_id, where=f"key {key!r} {where}"
        )
        return event

    def session_from_reply(self, session_id: str, fields: Any, ttl: Any) -> Session:
        key = self.session_keys(session_id)[0]
        return self._session(_Reader(session_id), key, _pairs(fields), [], ttl)

    def message_from_reply(self, session_id: str, seq: int, raw: bytes) -> Message:
        key = self.session_keys(session_id)[1]
        return self._message(_Reader(session_id), key, f"seq {seq}", seq, raw)

    def tool_run_from_reply(self, session_id: str, tool_call_id: str, raw: bytes) -> ToolRun:
        key = self.session_keys(session_id)[2]
        return self._tool_run(_Reader(session_id), key, tool_call_id.encode(), raw)

    # -- writes -----------------------------------------------------------------------

    def save_session(self, session: Session, ttl_ms: int) -> ScriptCall:
        return ScriptCall(
            "save_session", self.session_keys(session.session_id), [ttl_ms, *_session_args(session)]
        )

    def append_message(self, session_id: str, message: Message, ttl_ms: int) -> ScriptCall:
        body: dict[str, Any] = {
            "id": message.message_id,
            "role": message.role,
            "content": message.content,
            "ts": format_timestamp(message.ts),
        }
        if message.tool_call_id is not None:
            body["tool_call_id"] = message.tool_call_id
        seq = -1 if message.seq is None else message.seq
        return ScriptCall(
            "append_message",
            self.session_keys(session_id),
            [ttl_ms, _dumps(body), seq, message.message_id, ID_CHECK_WINDOW],
        )

    def upsert_tool_run(self, session_id: str, run: ToolRun, ttl_ms: int) -> ScriptCall:
        return self._tool_call(session_id, run, ttl_ms, b"", "")

    def replace_tool_run(
        self, session_id: str, run: ToolRun, expected: bytes, merged: ToolRun, ttl_ms: int
    ) -> ScriptCall:
        head, tail = _tool_json_parts(merged)
        return self._tool_call(session_id, run, ttl_ms, expected, f"{head}{merged.attempts}{tail}")

    def _tool_call(
        self, session_id: str, run: ToolRun, ttl_ms: int, expected: bytes, merged: str
    ) -> ScriptCall:
        # The record goes as the text around its attempts count, so that the script
        # can write it with a greater count without re-encoding JSON in Lua.
        head, tail = _tool_json_parts(run)
        return ScriptCall(
            "upsert_tool_run",
            self.session_keys(session_id),
            [
                ttl_ms,
                run.tool_call_id,
                head,
                tail,
                run.attempts,
                1 if run.terminal else 0,
                format_timestamp(run.updated_at),
                TOOL_STATUS_RANK[run.status],
                expected,
                merged,
            ],
        )

    def put_summary(self, session_id: str, summary: MemorySummary, ttl_ms: int) -> ScriptCall:
        body = {
            "version": summary.version,
            "text": summary.text,
            "covers_through": summary.covers_through,
            "updated_at": format_timestamp(summary.updated_at),
        }
        return ScriptCall(
            "put_summary",
            self.session_keys(session_id),
            [ttl_ms, _dumps(body), str(summary.version)],
        )

    def put_checkpoint(self, session_id: str, checkpoint: Checkpoint, ttl_ms: int) -> ScriptCall:
        body = {
            "checkpoint_id": checkpoint.checkpoint_id,
            "parent_id": checkpoint.parent_id,
            "step": checkpoint.step,
            "state": checkpoint.state,
            "created_at": format_timestamp(checkpoint.created_at),
        }
        return ScriptCall(
            "put_checkpoint",
            self.session_keys(session_id),
            [ttl_ms, _dumps(body), str(checkpoint.step), checkpoint.checkpoint_id],
        )

    def set_status(
        self, session_id: str, status: str, at: str, data: str, ttl_ms: int
    ) -> ScriptCall:
        return ScriptCall(
            "set_status",
            self.session_keys(session_id),
            [ttl_ms, status, at, data, ",".join(legal_sources(status))],
        )

    def apply_status_change(self, change: StatusChange, ttl_ms: int) -> ScriptCall:
        event = change.event
        return ScriptCall(
            "apply_status_change",
            self.session_keys(change.session.session_id),
            [
                ttl_ms,
                event.event_seq,
                event.type,
                event.from_status or "",
                event.to_status or "",
                format_timestamp(event.at),
                _dumps(event.data),
                *_session_args(change.session),
            ],
        )


def _session_args(session: Session) -> list[Any]:
    """The arguments of save_session_fields (common.lua) for this session record."""
    values: dict[str, str | None] = {
        "tenant_id": session.tenant_id,
        "user_id": session.user_id,
        "status": session.status,
        "version": str(session.version),
        "created_at": format_timestamp(session.created_at),
        "updated_at": format_timestamp(session.updated_at),
        "metadata": _dumps(session.metadata),
        "expires_at": None if session.expires_at is None else format_timestamp(session.expires_at),
    }
    present = [(k, v) for k, v in values.items() if v is not None]
    return [
        values["version"],
        values["updated_at"],
        values["created_at"],
        str(session.messages_trimmed),
        len(present),
        *(item for pair in present for item in pair),
        *(k for k, v in values.items() if v is None),
    ]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _tool_json_parts(run: ToolRun) -> tuple[str, str]:
    """The record's JSON before and after its attempts count, in the legacy member order."""
    head = _dumps({"name": run.name, "args": run.args, "status": run.status})
    tail = _dumps({"last_error": run.last_error, "updated_at": format_timestamp(run.updated_at)})
    return f'{head[:-1]},"attempts":', f",{tail[1:]}"


def _pairs(reply: Any) -> dict[Any, Any]:
    """HGETALL or stream fields as a dict, whether the client parsed the reply or not."""
    if not reply:
        return {}
    if isinstance(reply, Mapping):
        return dict(reply)
    items = list(reply)
    return dict(zip(items[::2], items[1::2], strict=True))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unique_members(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError(f"member {name!r} appears twice")
        result[name] = value
    return result


class _Reader:
    """Turns raw reply values into Python values, raising errors that name the key."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id

    def error(self, key: str, where: str, problem: str) -> ValidationError:
        place = f"key {key!r} {where}"
        return ValidationError(
            f"session {self.session_id!r}, {place}: {problem}",
            session_id=self.session_id,
            where=place,
        )

    def text(self, raw: Any, key: str, where: str) -> str:
        if isinstance(raw, str):
            return raw
        if not isinstance(raw, bytes | bytearray):
            raise self.error(key, where, f"expected bytes from Redis, got {type(raw).__name__}")
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = bytes(raw)[exc.start : exc.end]
            raise self.error(
                key, where, f"is not valid UTF-8 at byte {exc.start} ({bad!r}): {bytes(raw)!r}"
            ) from None

    def field_name(self, key: str, raw: Any) -> str:
        if isinstance(raw, bytes | bytearray):
            try:
                return bytes(raw).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self.error(
                    key, f"field {bytes(raw)!r}", f"name is not valid UTF-8 at byte {exc.start}"
                ) from None
        return str(raw)

    def count(self, raw: Any, key: str, field: str) -> int:
        if raw is None:
            return 0
        value = self.text(raw, key, f"field {field!r}")
        if not _DIGITS.fullmatch(value):
            raise self.error(key, f"field {field!r}", f"{value!r} is not a non-negative integer")
        return int(value)

    def timestamp(self, value: Any, key: str, where: str) -> datetime:
        try:
            return parse_timestamp(value)
        except ValueError as exc:
            raise self.error(key, where, str(exc)) from None

    def json(self, raw: Any, key: str, where: str) -> Any:
        text = self.text(raw, key, where)
        try:
            return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_members)
        except ValueError as exc:
            raise self.error(key, where, f"is not valid JSON ({exc}): {text[:200]!r}") from None

    def json_object(self, raw: Any, key: str, where: str) -> dict[str, Any]:
        value = self.json(raw, key, where)
        if not isinstance(value, dict):
            raise self.error(key, where, f"is JSON {type(value).__name__}, expected an object")
        return value
