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
whole.

Unknown fields are kept, never refused or dropped:

- an unknown member of a message, tool run, summary or checkpoint JSON goes into
  that record's ``metadata``, merged with the record's own ``metadata`` member (a
  ``metadata`` member that is not an object counts as an unknown member itself);
- an unknown field of the session hash goes into
  ``session.metadata["redis_fields"][field]`` (as text), an unknown field of an event
  entry into ``event.data["redis_fields"][field]``;
- a name that the object being merged into already holds is not overwritten: the
  unknown value goes under ``["_extra"][name]`` instead (or ``_extra_1``,
  ``_extra_2``, ... when ``_extra`` is taken too), so both are kept.

Writes are the inverse: a record's non-empty ``metadata`` is written as its JSON's
``metadata`` member, and ``session.metadata["redis_fields"]``, when it is an object
of text values whose names are not fields of the layout, as hash fields again (the
rest of the metadata as the ``metadata`` field). So Redis -> model -> Redis -> model
gives the same model.

A session whose hash is missing but whose children exist (legacy code that only
RPUSHes) reads as :func:`memshift.model.placeholder_session`: status ``active``,
version 0, as old as its oldest part, exactly as PostgreSQL reports it.

Ambiguity: a session id that itself ends with ``:messages``, ``:tools``,
``:summary``, ``:checkpoint`` or ``:events`` names keys of a shorter id (the hash of
``a:tools`` is the tools key of ``a``), so such ids are refused (ValidationError,
before any I/O) for reads and writes alike, and
:meth:`ReferenceLayout.session_id_from_key` skips such keys. The hash-tag variant
has no such ids.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pydantic
from pydantic import TypeAdapter

from memshift.errors import ValidationError
from memshift.model import (
    SESSION_STATUSES,
    TOOL_STATUS_RANK,
    Checkpoint,
    Event,
    MemorySummary,
    Message,
    Record,
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
# that a retried append without a seq is a duplicate, not a second copy. Every message
# in the window costs Redis time on every append (256 made an append take three times
# as long as a plain RPUSH); a retry lands right after its first attempt, well inside.
ID_CHECK_WINDOW = 64
_GLOB = re.compile(r"([*?\[\]\\])")
_DIGITS = re.compile(r"\d+")
# Fields of an event entry in the stream, and the Event field each one fills.
_EVENT_FIELDS = {
    "type": "type",
    "from": "from_status",
    "to": "to_status",
    "at": "at",
    "data": "data",
}
_HASH_FIELD_SET = frozenset(HASH_FIELDS)
# The members of each record's JSON; any other member goes into its metadata.
_MESSAGE_MEMBERS = frozenset({"id", "role", "content", "ts", "tool_call_id", "metadata"})
_TOOL_MEMBERS = frozenset(
    {"name", "args", "status", "attempts", "last_error", "updated_at", "metadata"}
)
_SUMMARY_MEMBERS = frozenset({"version", "text", "covers_through", "updated_at", "metadata"})
_CHECKPOINT_MEMBERS = frozenset(
    {"checkpoint_id", "parent_id", "step", "state", "created_at", "metadata"}
)
# Where unknown fields of the session hash and of event entries are kept.
REDIS_FIELDS = "redis_fields"
# Names that replies carry over and over, decoded once.
_KNOWN_NAMES = {name.encode(): name for name in (*HASH_FIELDS, *_EVENT_FIELDS)}
_FIELD_WHERE = {name: f"field {name!r}" for name in (*HASH_FIELDS, *_EVENT_FIELDS)}

_LEGAL_SOURCES = {status: ",".join(legal_sources(status)) for status in SESSION_STATUSES}

_R = TypeVar("_R", bound=Record)
# The records of one key (a transcript, the tool runs, the events) are validated in
# one call rather than one call per record.
_BATCHES: dict[type[Record], TypeAdapter[Any]] = {
    Message: TypeAdapter(tuple[Message, ...]),
    ToolRun: TypeAdapter(tuple[ToolRun, ...]),
    Event: TypeAdapter(tuple[Event, ...]),
}


class ReferenceLayout:
    """The reference layout; with ``hash_tag=True``, its Redis Cluster variant.

    ``hash_tag=True`` writes the session id in braces (``{p}:session:{{sid}}``,
    ``{p}:session:{{sid}}:messages``, ...), so that Redis Cluster hashes only the id
    and all keys of a session land in one slot, where its Lua-guarded writes can run.
    Those are other key names than the legacy ones: choose it for a cluster that
    memshift (or an application using these names) writes, not to read a legacy
    cluster whose keys have no braces; reading those needs no hash tag.
    """

    name = "reference"
    scan_type = "hash"  # SCAN finds sessions by their hash

    def __init__(self, prefix: str = "agent", *, hash_tag: bool = False) -> None:
        self.prefix = prefix
        self.hash_tag = hash_tag
        if hash_tag:
            self.name = "reference-hashtag"

    # -- keys -------------------------------------------------------------------------

    def script_dir(self) -> Path:
        return Path(__file__).parent / "lua"

    def _base(self, session_id: str) -> str:
        return _session_keys(self.prefix, session_id, self.hash_tag)[0]

    def session_keys(self, session_id: str) -> list[str]:
        return list(_session_keys(self.prefix, session_id, self.hash_tag))

    def scan_pattern(self) -> str:
        # Braces are not glob characters in Redis: ``{*}`` matches them literally.
        tail = ":session:{*}" if self.hash_tag else ":session:*"
        return _GLOB.sub(r"\\\1", self.prefix) + tail

    def session_id_from_key(self, key: bytes) -> str | None:
        # Invalid UTF-8 is kept (as lone surrogates) so the caller can quarantine the
        # session with its id escaped; check_session_id refuses it on load.
        text = key.decode("utf-8", "surrogateescape")
        head = f"{self.prefix}:session:"
        if not text.startswith(head):
            return None
        session_id = text[len(head) :]
        if self.hash_tag:
            # A child key ends with ``}:child``, the hash with ``}``: no ambiguity here.
            if len(session_id) < 3 or session_id[0] != "{" or session_id[-1] != "}":
                return None
            return session_id[1:-1]
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
        messages = self._messages(reader, keys[1], trimmed, raw_messages)
        tool_runs = self._tool_runs(reader, keys[2], tool_pairs)
        summaries = () if summary_raw is None else (self._summary(reader, keys[3], summary_raw),)
        checkpoints = (
            () if checkpoint_raw is None else (self._checkpoint(reader, keys[4], checkpoint_raw),)
        )
        events = self._events(reader, keys[5], raw_events)
        parts = {
            "messages": messages,
            "tool_runs": tuple(sorted(tool_runs, key=lambda t: t.tool_call_id)),
            "summaries": summaries,
            "checkpoints": checkpoints,
            "events": events,
        }

        def seen() -> list[datetime]:  # wanted only when the hash lacks times
            return SessionState(session=Session(session_id=session_id), **parts).timestamps()

        if not fields:
            session = placeholder_session(session_id, seen())
        else:
            session = self._session(reader, keys[0], fields, seen, ttl)
        return SessionState(session=session, **parts)

    def _session(
        self,
        reader: _Reader,
        key: str,
        fields: Mapping[Any, Any],
        seen: Callable[[], list[datetime]],
        ttl: Any,
    ) -> Session:
        data: dict[str, Any] = {"session_id": reader.session_id}
        unknown: dict[str, str] = {}
        for raw_name, raw in fields.items():
            name = reader.field_name(key, raw_name)
            if name not in _HASH_FIELD_SET:
                unknown[name] = reader.text(raw, key, f"field {name!r}")
                continue
            where = _FIELD_WHERE[name]
            if name in ("version", "messages_trimmed"):
                data[name] = reader.count(raw, key, name)
            elif name == "metadata":
                data[name] = reader.json_object(raw, key, where)
            elif name.endswith("_at"):
                data[name] = reader.timestamp(reader.text(raw, key, where), key, where)
            else:
                data[name] = reader.text(raw, key, where)
        if unknown:
            data["metadata"] = _with_unknown(data.get("metadata", {}), {REDIS_FIELDS: unknown})
        # Missing times: each other's, else as old as the oldest part (placeholder_session).
        if "created_at" not in data or "updated_at" not in data:
            oldest = min(seen(), default=None)
            data.setdefault("created_at", data.get("updated_at", oldest))
            data.setdefault("updated_at", data["created_at"])
            if data["created_at"] is None:
                del data["created_at"], data["updated_at"]
        if isinstance(ttl, int) and ttl > 0:
            data["expires_at"] = now() + timedelta(milliseconds=ttl)
        session: Session = parse(Session, data, session_id=reader.session_id, where=f"key {key!r}")
        return session

    def _messages(
        self, reader: _Reader, key: str, trimmed: int, raw_messages: list[Any]
    ) -> tuple[Message, ...]:
        """The transcript: plain records at once, the rest record by record (which also
        names the first bad one and what is wrong with it)."""
        items = _plain_messages(raw_messages, trimmed)
        if items is not None:
            try:
                messages: tuple[Message, ...] = _BATCHES[Message].validate_python(items)
                return messages
            except pydantic.ValidationError:
                pass  # the general path below says which record and why
        return reader.records(
            Message,
            key,
            (
                self._message_data(reader, key, f"index {i}", trimmed + i, raw)
                for i, raw in enumerate(raw_messages)
            ),
        )

    def _message_data(
        self, reader: _Reader, key: str, where: str, seq: int, raw: Any
    ) -> tuple[str, dict[str, Any]]:
        """Where the message is and the fields that ``raw`` holds, ready for validation."""
        data = _keep_unknown(reader.json_object(raw, key, where), _MESSAGE_MEMBERS)
        if "ts" not in data:
            raise reader.error(key, where, "has no 'ts' member")
        data["ts"] = reader.timestamp(data["ts"], key, where, "member 'ts'")
        data["seq"] = seq
        if "id" in data:
            data["message_id"] = data.pop("id")
        return where, data

    def _tool_runs(
        self, reader: _Reader, key: str, pairs: dict[Any, Any]
    ) -> tuple[ToolRun, ...]:
        """The tool runs (in hash order): plain ones at once, as ``_messages`` does."""
        items = _plain_tool_runs(pairs)
        if items is not None:
            try:
                runs: tuple[ToolRun, ...] = _BATCHES[ToolRun].validate_python(items)
                return runs
            except pydantic.ValidationError:
                pass  # the general path below says which record and why
        return reader.records(
            ToolRun,
            key,
            (self._tool_run_data(reader, key, name, raw) for name, raw in pairs.items()),
        )

    def _events(self, reader: _Reader, key: str, entries: list[Any]) -> tuple[Event, ...]:
        """The status events in stream order: plain ones at once, as ``_messages`` does."""
        items = _plain_events(entries)
        if items is not None:
            try:
                events: tuple[Event, ...] = _BATCHES[Event].validate_python(items)
                return events
            except pydantic.ValidationError:
                pass  # the general path below says which record and why
        return reader.records(
            Event, key, (self._event_data(reader, key, i, entry) for i, entry in enumerate(entries))
        )

    def _tool_run_data(
        self, reader: _Reader, key: str, name: Any, raw: Any
    ) -> tuple[str, dict[str, Any]]:
        """Where the tool run is (its field) and its fields, ready for validation."""
        tool_call_id = reader.field_name(key, name)
        where = f"field {tool_call_id!r}"
        obj = _keep_unknown(reader.json_object(raw, key, where), _TOOL_MEMBERS)
        if "updated_at" not in obj:
            raise reader.error(key, where, "has no 'updated_at' member")
        data: dict[str, Any] = {"tool_call_id": tool_call_id, **obj}
        data["updated_at"] = reader.timestamp(obj["updated_at"], key, where, "member 'updated_at'")
        return where, data

    def _summary(self, reader: _Reader, key: str, raw: Any) -> MemorySummary:
        obj = _keep_unknown(reader.json_object(raw, key, "value"), _SUMMARY_MEMBERS)
        if "updated_at" not in obj:
            raise reader.error(key, "value", "has no 'updated_at' member")
        obj["updated_at"] = reader.timestamp(obj["updated_at"], key, "member 'updated_at'")
        summary: MemorySummary = parse(
            MemorySummary, obj, session_id=reader.session_id, where=f"key {key!r}"
        )
        return summary

    def _checkpoint(self, reader: _Reader, key: str, raw: Any) -> Checkpoint:
        obj = _keep_unknown(reader.json_object(raw, key, "value"), _CHECKPOINT_MEMBERS)
        if "created_at" not in obj:
            raise reader.error(key, "value", "has no 'created_at' member")
        obj["created_at"] = reader.timestamp(obj["created_at"], key, "member 'created_at'")
        checkpoint: Checkpoint = parse(
            Checkpoint, obj, session_id=reader.session_id, where=f"key {key!r}"
        )
        return checkpoint

    def _event_data(
        self, reader: _Reader, key: str, index: int, entry: Any
    ) -> tuple[str, dict[str, Any]]:
        """Where the event is (its entry) and its fields, ready for validation."""
        entry_id, raw_fields = entry
        where = f"entry {index} ({reader.text(entry_id, key, f'entry {index} id')})"
        data: dict[str, Any] = {"event_seq": index}
        unknown: dict[str, str] = {}
        for raw_name, value in _pairs(raw_fields).items():
            name = reader.field_name(key, raw_name)
            target = _EVENT_FIELDS.get(name)
            if target is None:
                unknown[name] = reader.text(value, key, where, f"field {name!r}")
                continue
            if name == "data":
                data[target] = reader.json(value, key, where, "field 'data'")
            else:
                data[target] = reader.text(value, key, where, _FIELD_WHERE[name])
        if unknown:
            # Data that is not an object is refused when the event is validated.
            event_data = data.get("data", {})
            if type(event_data) is dict:
                data["data"] = _with_unknown(event_data, {REDIS_FIELDS: unknown})
        if "at" not in data:
            raise reader.error(key, where, "has no 'at' field")
        data["at"] = reader.timestamp(data["at"], key, where, "field 'at'")
        return where, data

    def session_from_reply(self, session_id: str, fields: Any, ttl: Any) -> Session:
        return self._session(
            _Reader(session_id), self._base(session_id), _pairs(fields), list, ttl
        )

    def message_from_reply(self, session_id: str, seq: int, raw: bytes) -> Message:
        key = f"{self._base(session_id)}:messages"
        reader = _Reader(session_id)
        return reader.record(Message, key, self._message_data(reader, key, f"seq {seq}", seq, raw))

    def tool_run_from_reply(self, session_id: str, tool_call_id: str, raw: bytes) -> ToolRun:
        key = f"{self._base(session_id)}:tools"
        reader = _Reader(session_id)
        return reader.record(ToolRun, key, self._tool_run_data(reader, key, tool_call_id, raw))

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
        if message.metadata:
            body["metadata"] = message.metadata
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
        head, _, tail = _tool_json_parts(merged)
        return self._tool_call(session_id, run, ttl_ms, expected, f"{head}{merged.attempts}{tail}")

    def _tool_call(
        self, session_id: str, run: ToolRun, ttl_ms: int, expected: bytes, merged: str
    ) -> ScriptCall:
        # The record goes as the text around its attempts count, so that the script
        # can write it with a greater count without re-encoding JSON in Lua.
        head, updated_at, tail = _tool_json_parts(run)
        written = merged or f"{head}{run.attempts}{tail}"
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
                updated_at,
                TOOL_STATUS_RANK[run.status],
                expected,
                merged,
            ],
            written=written.encode("utf-8"),
        )

    def put_summary(self, session_id: str, summary: MemorySummary, ttl_ms: int) -> ScriptCall:
        body: dict[str, Any] = {
            "version": summary.version,
            "text": summary.text,
            "covers_through": summary.covers_through,
            "updated_at": format_timestamp(summary.updated_at),
        }
        if summary.metadata:
            body["metadata"] = summary.metadata
        return ScriptCall(
            "put_summary",
            self.session_keys(session_id),
            [ttl_ms, _dumps(body), str(summary.version)],
        )

    def put_checkpoint(self, session_id: str, checkpoint: Checkpoint, ttl_ms: int) -> ScriptCall:
        body: dict[str, Any] = {
            "checkpoint_id": checkpoint.checkpoint_id,
            "parent_id": checkpoint.parent_id,
            "step": checkpoint.step,
            "state": checkpoint.state,
            "created_at": format_timestamp(checkpoint.created_at),
        }
        if checkpoint.metadata:
            body["metadata"] = checkpoint.metadata
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
            [ttl_ms, status, at, data, _LEGAL_SOURCES[status]],
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


@functools.lru_cache(maxsize=1024)
def _session_keys(prefix: str, session_id: str, hash_tag: bool = False) -> tuple[str, ...]:
    """The keys of a session, kept for the sessions written most recently."""
    if not hash_tag:
        _refuse_child_suffix(session_id)
    base = f"{prefix}:session:{{{session_id}}}" if hash_tag else f"{prefix}:session:{session_id}"
    return (base, *(f"{base}:{child}" for child in CHILDREN))


def _refuse_child_suffix(session_id: str) -> None:
    """Refuse an id whose keys would be another session's: ``a:tools`` is ``a``'s tools key."""
    for child in CHILDREN:
        if session_id.endswith(f":{child}"):
            owner = session_id[: -len(child) - 1]
            raise ValidationError(
                f"session id {session_id!r} ends with ':{child}': in the reference layout "
                f"its key would be the {child} key of session {owner!r}, so it is refused; "
                "use another id, or the reference-hashtag layout, whose keys cannot collide",
                session_id=session_id,
                where="session_id",
            )


def _session_args(session: Session) -> list[Any]:
    """The arguments of save_session_fields (common.lua) for this session record."""
    metadata, extra = _split_redis_fields(session.metadata)
    values: dict[str, str | None] = {
        "tenant_id": session.tenant_id,
        "user_id": session.user_id,
        "status": session.status,
        "version": str(session.version),
        "created_at": format_timestamp(session.created_at),
        "updated_at": format_timestamp(session.updated_at),
        "metadata": _dumps(metadata),
        "expires_at": None if session.expires_at is None else format_timestamp(session.expires_at),
    }
    present = [(k, v) for k, v in values.items() if v is not None]
    present.extend(extra.items())
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


def _tool_json_parts(run: ToolRun) -> tuple[str, str, str]:
    """The record's JSON before and after its attempts count, in the legacy member
    order, and its ``updated_at`` as written there."""
    updated_at = format_timestamp(run.updated_at)
    head = _dumps({"name": run.name, "args": run.args, "status": run.status})
    rest: dict[str, Any] = {"last_error": run.last_error, "updated_at": updated_at}
    if run.metadata:
        rest["metadata"] = run.metadata
    tail = _dumps(rest)
    return f'{head[:-1]},"attempts":', updated_at, f",{tail[1:]}"


def _split_redis_fields(metadata: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Session metadata without the hash fields it holds, and those fields.

    ``metadata["redis_fields"]`` goes back to the hash only when it can come back
    as it is: a non-empty object of text values, none named like a field of the
    layout. Otherwise it stays in the ``metadata`` field's JSON.
    """
    fields = metadata.get(REDIS_FIELDS)
    if (
        type(fields) is not dict
        or not fields
        or any(type(v) is not str or k in _HASH_FIELD_SET for k, v in fields.items())
    ):
        return metadata, {}
    return {k: v for k, v in metadata.items() if k != REDIS_FIELDS}, fields


def _with_unknown(known: dict[str, Any], unknown: Mapping[str, Any]) -> dict[str, Any]:
    """``known`` with the ``unknown`` members added, overwriting none of its own.

    An unknown member whose name ``known`` already holds goes under ``_extra``
    instead (``_extra_1``, ``_extra_2``, ... when that name is taken too).
    """
    merged = dict(known)
    clashes: dict[str, Any] = {}
    for name, value in unknown.items():
        if name in merged:
            clashes[name] = value
        else:
            merged[name] = value
    if clashes:
        slot, n = "_extra", 0
        while slot in merged:
            n += 1
            slot = f"_extra_{n}"
        merged[slot] = clashes
    return merged


def _keep_unknown(obj: dict[str, Any], known: frozenset[str]) -> dict[str, Any]:
    """A record's JSON object with its unknown members moved into its ``metadata``."""
    explicit = obj.get("metadata", {})
    if obj.keys() <= known and type(explicit) is dict:
        return obj
    if type(explicit) is not dict:
        # Not an object: not the record's metadata, but a member to keep like any other.
        known = known - {"metadata"}
        explicit = {}
    kept = {name: value for name, value in obj.items() if name in known}
    unknown = {name: value for name, value in obj.items() if name not in known}
    kept["metadata"] = _with_unknown(explicit, unknown)
    return kept


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


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) < len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"member {name!r} appears twice")
            seen.add(name)
    return result


# One decoder for every value: json.loads with these options would build a new one
# per call.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_members, parse_constant=_no_constant)
# The decoder's scanner reads one value from an index (the C one where there is one).
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _loads(text: str) -> Any:
    """``json.loads`` with the decoder's options, fast for text without outer whitespace."""
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        end = -1
    if end == len(text):
        return value
    # Whitespace around the value, or not JSON: the full decoder reads or explains it.
    return _DECODER.decode(text)


# Plain records: strict UTF-8 bytes of one JSON object, without outer whitespace,
# holding only members that need no unknown-member handling (no ``metadata``
# either), and a readable timestamp. Their fields are read in one tight loop per key,
# giving exactly what the general path (``_message_data`` and its kin) gives them;
# the general path reads any other record, and names the first bad one and why.
_PLAIN_MESSAGE_MEMBERS = frozenset({"id", "role", "content", "ts", "tool_call_id"})
_PLAIN_TOOL_MEMBERS = frozenset({"name", "args", "status", "attempts", "last_error", "updated_at"})
_EVENT_TARGETS = {name.encode(): target for name, target in _EVENT_FIELDS.items()}


def _plain_object(raw: Any, members: frozenset[str], stamp: str) -> dict[str, Any] | None:
    """The members of a plain record, its ``stamp`` member read as a time; else None."""
    if type(raw) is not bytes:
        return None
    try:
        text = raw.decode("utf-8")
        data, end = _SCAN(text, 0)
        if end != len(text) or type(data) is not dict or not data.keys() <= members:
            return None
        data[stamp] = parse_timestamp(data[stamp])
    except (StopIteration, ValueError, RecursionError, KeyError):
        return None
    result: dict[str, Any] = data
    return result


def _plain_messages(raws: list[Any], trimmed: int) -> list[dict[str, Any]] | None:
    """Every message's fields, ready for validation, if every one is plain; else None."""
    items = []
    seq = trimmed
    for raw in raws:
        data = _plain_object(raw, _PLAIN_MESSAGE_MEMBERS, "ts")
        if data is None:
            return None
        data["seq"] = seq
        if "id" in data:
            data["message_id"] = data.pop("id")
        items.append(data)
        seq += 1
    return items


def _plain_tool_runs(pairs: dict[Any, Any]) -> list[dict[str, Any]] | None:
    """Every tool run's fields, ready for validation, if every one is plain; else None."""
    items = []
    for name, raw in pairs.items():
        data = _plain_object(raw, _PLAIN_TOOL_MEMBERS, "updated_at")
        if data is None or type(name) is not bytes:
            return None
        try:
            items.append({"tool_call_id": name.decode("utf-8"), **data})
        except UnicodeDecodeError:
            return None
    return items


def plain_entry_fields(entry: Any) -> dict[Any, Any] | None:
    """The fields of a stream entry of the plain shape (an ASCII id, fields as a
    dict, as redis-py gives them); else None."""
    if type(entry) not in (list, tuple) or len(entry) != 2:
        return None
    entry_id, fields = entry
    if type(entry_id) is not bytes or not entry_id.isascii() or type(fields) is not dict:
        return None
    return fields


def _plain_events(entries: list[Any]) -> list[dict[str, Any]] | None:
    """Every event's fields, ready for validation, if every entry holds only known
    fields as bytes (data as JSON) and a readable ``at``; else None."""
    items = []
    for index, entry in enumerate(entries):
        fields = plain_entry_fields(entry)
        if fields is None:
            return None
        data: dict[str, Any] = {"event_seq": index}
        try:
            for raw_name, value in fields.items():
                target = _EVENT_TARGETS[raw_name]
                if type(value) is not bytes:
                    return None
                text = value.decode("utf-8")
                data[target] = _loads(text) if target == "data" else text
            data["at"] = parse_timestamp(data["at"])
        except (KeyError, ValueError, RecursionError):
            return None
        items.append(data)
    return items


class _Reader:
    """Turns raw reply values into Python values, raising errors that name the key.

    A place in a key is given as ``where`` and an optional ``detail`` (``"index 3"``,
    ``"member 'ts'"``), joined only when an error names it.
    """

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id

    def error(self, key: str, where: str, problem: str) -> ValidationError:
        place = f"key {key!r} {where}"
        return ValidationError(
            f"session {self.session_id!r}, {place}: {problem}",
            session_id=self.session_id,
            where=place,
        )

    def text(self, raw: Any, key: str, where: str, detail: str = "") -> str:
        if type(raw) is bytes:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                pass
        elif isinstance(raw, str):
            return raw
        where = _join(where, detail)
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
        if type(raw) is bytes:
            known = _KNOWN_NAMES.get(raw)
            if known is not None:
                return known
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

    def timestamp(self, value: Any, key: str, where: str, detail: str = "") -> datetime:
        try:
            return parse_timestamp(value)
        except ValueError as exc:
            raise self.error(key, _join(where, detail), str(exc)) from None

    def json(self, raw: Any, key: str, where: str, detail: str = "") -> Any:
        text = self.text(raw, key, where, detail)
        try:
            return _loads(text)
        except (ValueError, RecursionError) as exc:  # nested too deep for the decoder
            raise self.error(
                key, _join(where, detail), f"is not valid JSON ({exc}): {text[:200]!r}"
            ) from None

    def json_object(self, raw: Any, key: str, where: str) -> dict[str, Any]:
        value = self.json(raw, key, where)
        if type(value) is not dict:
            raise self.error(key, where, f"is JSON {type(value).__name__}, expected an object")
        return value

    def record(self, cls: type[_R], key: str, prepared: tuple[str, dict[str, Any]]) -> _R:
        where, data = prepared
        record: _R = parse(cls, data, session_id=self.session_id, where=f"key {key!r} {where}")
        return record

    def records(
        self, cls: type[_R], key: str, prepared: Iterable[tuple[str, dict[str, Any]]]
    ) -> tuple[_R, ...]:
        """Validate the records of one key at once; an error names the first bad one."""
        wheres: list[str] = []
        items: list[dict[str, Any]] = []
        try:
            for where, data in prepared:
                wheres.append(where)
                items.append(data)
        except ValidationError:
            self._validate(cls, key, wheres, items)  # a record before it is reported first
            raise
        return self._validate(cls, key, wheres, items)

    def _validate(
        self, cls: type[_R], key: str, wheres: list[str], items: list[dict[str, Any]]
    ) -> tuple[_R, ...]:
        try:
            records: tuple[_R, ...] = _BATCHES[cls].validate_python(items)
        except pydantic.ValidationError as exc:
            first = min(int(error["loc"][0]) for error in exc.errors())
            # parse raises for this record, with the message a single record gets.
            self.record(cls, key, (wheres[first], items[first]))
            raise
        return records


def _join(where: str, detail: str) -> str:
    return f"{where} {detail}" if where and detail else where or detail
