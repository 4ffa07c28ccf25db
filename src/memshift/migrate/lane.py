"""The backfill's fast lane: sessions read straight into what PostgreSQL takes.

Transcripts are most of a backfill's data, so the reference layout's plain ones go
straight into lines of COPY text, with no ``Message`` built (:class:`BackfillLayout`):
each message is checked with cheap, conservative tests that imply the full
validation would accept it unchanged. The session's other parts, when memshift
wrote them, go the same way (:func:`lean_parts`). A session with anything that is
not certainly fine is read by the layout as always, so what is quarantined, and
why, does not change.
"""

from __future__ import annotations

import collections
import json
import operator
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson

from memshift.migrate.bulk import NULL, EncodedState, TranscribedState, Transcript, copy_text
from memshift.model import (
    MAX_ID_BYTES,
    SESSION_STATUSES,
    TOOL_STATUS_RANK,
    Session,
    SessionState,
    _json_storable,
    now,
    text_problem,
    tool_run_hash,
)
from memshift.stores.layouts import Layout
from memshift.stores.layouts.reference import (
    _DIGITS,
    CHILDREN,
    ReferenceLayout,
    plain_entry_fields,
)
from memshift.stores.layouts.timestamps import format_timestamp, parse_timestamp


class BackfillLayout(ReferenceLayout):
    """The reference layout as the backfill reads it: plain transcripts straight into
    COPY text, and the keys of a session's parts told apart (to find orphans).

    A session takes the lane when its hash holds both times (otherwise they come from
    its parts, messages included) and every message is plain (:func:`plain_message`)
    with an id of its own. Its other keys are read by the layout as always, with an
    empty transcript: an error in them is the error the whole session would get, since
    the layout reads the messages before them and they are all fine. Any other session
    is read by the layout as always.
    """

    def decode(self, session_id: str, replies: list[Any]) -> SessionState | None:
        fields, raw_messages = replies[0], replies[1]
        if not (
            type(fields) is dict and b"created_at" in fields and b"updated_at" in fields
            and type(raw_messages) is list and raw_messages
        ):
            return super().decode(session_id, replies)
        plain = plain_transcript(raw_messages)
        if plain is None:
            return super().decode(session_id, replies)
        ids, columns = plain
        if len(set(ids)) < len(ids):
            return super().decode(session_id, replies)  # problems() names the repeated id
        lean = lean_parts(session_id, fields, *replies[2:])
        state = None
        if lean is None:  # the other parts as the layout reads them
            state = super().decode(session_id, [fields, [], *replies[2:]])
            assert state is not None  # the hash is there
        session = state.session if state is not None else lean[0]  # type: ignore[index]
        trimmed = session.messages_trimmed
        count = len(ids)
        if trimmed + count > _MAX_SEQ:
            return super().decode(session_id, replies)  # which says which seq is too large
        # One line a message: the session id, the seq, the columns, empty metadata.
        line = copy_text(session_id).replace("{", "{{").replace("}", "}}")
        line += "\t{}\t{}\t{}\t{}\t{}\t{}\t{{}}\n"
        text = "".join(map(line.format, range(trimmed, trimmed + count), *columns))
        transcript = Transcript(text, count, trimmed + count)
        if state is not None:
            return TranscribedState.model_construct(**dict(state), transcript=transcript)
        assert lean is not None
        return EncodedState.model_construct(
            session=session, transcript=transcript, parts=lean[1], event_count=lean[2]
        )

    def part_owner(self, key: bytes) -> str | None:
        """The id of the session whose part (``...:messages``, ``...:tools``, ...)
        ``key`` is; None for any other key."""
        text = key.decode("utf-8", "surrogateescape")
        head = f"{self.prefix}:session:"
        if not text.startswith(head):
            return None
        owner, _, child = text[len(head) :].rpartition(":")
        if child not in CHILDREN or not owner:
            return None
        if self.hash_tag:
            if len(owner) < 3 or owner[0] != "{" or owner[-1] != "}":
                return None
            return owner[1:-1]
        return owner


_MESSAGE_MEMBERS = frozenset({"id", "role", "content", "ts", "tool_call_id"})
# json.dumps with its defaults (", " and ": ", ASCII escapes): how much legacy Python wrote.
_PYTHON_DEFAULT = json.JSONEncoder()
_CANONICAL_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_SHORT_ID = MAX_ID_BYTES // 4  # characters that cannot be over MAX_ID_BYTES in UTF-8
_MAX_SEQ = 2**62  # the bound of a Count in the model


def plain_transcript(raws: list[Any]) -> tuple[list[str], list[Sequence[str]]] | None:
    """The message ids of a transcript and its COPY text columns (id, role, content,
    ts, tool call id), when every message is plain (:func:`plain_message`); else None.

    A transcript in memshift's own form (:data:`_WRITTEN`) is read whole, with no
    Python code per message: :func:`_as_written`. Any other is read message by
    message, which takes what may still be plain (other member orders, ``json.dumps``'
    spacing and ASCII escapes, times in other forms).
    """
    columns = _as_written(raws)
    if columns is not None:
        return columns
    ids: list[str] = []
    rows: list[tuple[str, str, str, str, str]] = []
    for raw in raws:
        message = plain_message(raw)
        if message is None:
            return None
        ids.append(message[0])
        rows.append(message[1])
    return ids, list(zip(*rows, strict=True))


# A message exactly as memshift's reference layout writes it (and orjson, or
# json.dumps with compact separators and without ASCII escapes, writes that dict): the
# members in this order, no whitespace, text without control characters (JSON has
# them escaped). Ids, role and tool call id hold no escape at all; the content may
# hold JSON's short escapes but \u: those are COPY text's escapes too, with the
# same meaning (\" and \\ and \n ...), so the JSON text is the COPY field as it is.
# No \/ either: orjson and json never write it, so each character has one spelling
# and ids that differ as text differ as values.
_PLAIN = r'[^"\\\x00-\x1f]'
_WRITTEN = re.compile(
    rf'^\{{"id":"({_PLAIN}{{1,{_SHORT_ID}}})","role":"({_PLAIN}{{1,64}})",'
    rf'"content":"({_PLAIN}*(?:\\["\\bfnrt]{_PLAIN}*)*)",'
    r'"ts":"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z)"'
    rf'(?:,"tool_call_id":(?:"({_PLAIN}{{1,{_SHORT_ID}}})"|null))?\}}$',
    re.MULTILINE,
)
_ID, _TS = operator.itemgetter(0), operator.itemgetter(3)


def _as_written(raws: list[Any]) -> tuple[list[str], list[Sequence[str]]] | None:
    """The columns of a transcript whose every message matches :data:`_WRITTEN`: one
    regular expression over the whole transcript, a line a message."""
    try:
        joined = b"\n".join(raws)
        text = joined.decode()  # valid UTF-8
    except (TypeError, UnicodeDecodeError):
        return None
    # As many matches as values, each a whole line, and as many lines as values.
    rows: list[tuple[str, str, str, str, str]] = _WRITTEN.findall(text)
    if len(rows) != len(raws) or joined.count(b"\n") != len(raws) - 1:
        return None
    ids = list(map(_ID, rows))
    try:  # the times are dates that exist
        collections.deque(map(datetime.fromisoformat, map(_TS, rows)), maxlen=0)
    except ValueError:
        return None
    columns: list[Sequence[str]] = list(zip(*rows, strict=True))
    columns[4] = [call or NULL for call in columns[4]]  # an absent call is ""
    return ids, columns


def plain_message(raw: Any) -> tuple[str, tuple[str, str, str, str, str]] | None:
    """A message's id, and its COPY text fields (id, role, content, ts, tool call
    id), when the full validation would surely accept it as it is; else None.

    Plain: the bytes are exactly what orjson (JSON.stringify, compact ``json.dumps``
    without ASCII escapes) or ``json.dumps`` with its defaults writes for the object
    they hold, so no member appears twice; the members are the layout's own (no
    ``metadata``, nothing unknown), all text (the tool call id may be null) that
    PostgreSQL can hold, the ids short and not empty, the role 1 to 64 characters,
    the time readable. orjson refuses invalid UTF-8, and a JSON string holds no
    control character unescaped: so without a backslash in the bytes, no value holds
    NUL, a lone surrogate or a character that COPY text escapes.
    """
    if type(raw) is not bytes:
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict or not data.keys() <= _MESSAGE_MEMBERS:
        return None
    message_id, role, content = data.get("id"), data.get("role"), data.get("content")
    call = data.get("tool_call_id")
    if not (
        type(message_id) is str and 0 < len(message_id) <= _SHORT_ID
        and type(role) is str and 0 < len(role) <= 64
        and type(content) is str
        and (call is None or (type(call) is str and 0 < len(call) <= _SHORT_ID))
    ):
        return None
    if orjson.dumps(data) != raw and _PYTHON_DEFAULT.encode(data).encode() != raw:
        return None
    stamp = _copy_time(data.get("ts"))
    if stamp is None:
        return None
    shown_id, shown_call = message_id, NULL if call is None else call
    if b"\\" in raw:  # escapes: maybe a NUL or a lone surrogate, and text to escape
        if text_problem(f"{message_id}{role}{content}{call or ''}"):
            return None
        shown_id, role, content = copy_text(message_id), copy_text(role), copy_text(content)
        shown_call = NULL if call is None else copy_text(call)
    return message_id, (shown_id, role, content, stamp, shown_call)


def _copy_time(value: Any) -> str | None:
    """A message time as COPY text (the canonical form), or None when unreadable."""
    try:
        if type(value) is str and _CANONICAL_TIME.fullmatch(value):
            datetime.fromisoformat(value)  # the digits may still be out of range
            return value
        return format_timestamp(parse_timestamp(value))
    except ValueError:
        return None


def for_backfill(layout: Layout) -> Layout:
    """The layout with the transcript lane, if it is the reference layout."""
    if type(layout) is ReferenceLayout:
        return BackfillLayout(layout.prefix, hash_tag=layout.hash_tag)
    return layout


# -- the rest of a session -------------------------------------------------------------
#
# A session's other parts (its hash, tool runs, summary, checkpoint and events) as
# memshift's reference layout writes them go straight into COPY text too: each value
# is checked with tests that imply the layout and the model would accept it
# unchanged, and no record is built but the session's. Anything else (an unknown
# field or member, metadata in a record, a JSON value in another spelling, a time in
# another form, a checkpoint that names itself as its parent) is read by the layout
# as always.

_SESSION_FIELDS = {name.encode(): name for name in (
    "tenant_id", "user_id", "status", "version", "created_at", "updated_at",
    "messages_trimmed", "metadata",
)}
_COUNTS = frozenset({"version", "messages_trimmed"})
_TIMES = frozenset({"created_at", "updated_at"})
_SESSION_STATUSES = frozenset(SESSION_STATUSES)
_TOOL_STATUSES = frozenset(TOOL_STATUS_RANK)
_TOOL_MEMBERS = frozenset({"name", "args", "status", "attempts", "last_error", "updated_at"})
_SUMMARY_MEMBERS = frozenset({"version", "text", "covers_through", "updated_at"})
_CHECKPOINT_MEMBERS = frozenset({"checkpoint_id", "parent_id", "step", "state", "created_at"})
_EVENT_FIELDS = {b"type": "type", b"from": "from", b"to": "to", b"at": "at", b"data": "data"}


class _NotLean(Exception):
    """This part is not in the form the lane reads: the layout reads the session."""


def lean_parts(
    session_id: str, fields: Any, tools: Any, summary: Any, checkpoint: Any, events: Any,
    ttl: Any,
) -> tuple[Session, tuple[str, str, str, str], int] | None:
    """The session record, the COPY text of its tool runs, summary, checkpoint and
    events, and how many events, as the layout and :func:`memshift.migrate.bulk.encode`
    would make them; None when a part is not in memshift's own form."""
    sid = copy_text(session_id)
    try:
        session = _lean_session(session_id, fields, ttl)
        entries = _lean_events(sid, events)
        return session, (
            _lean_tool_runs(sid, tools),
            "" if summary is None else _lean_summary(sid, summary),
            "" if checkpoint is None else _lean_checkpoint(sid, checkpoint),
            "".join(entries),
        ), len(entries)
    except _NotLean:
        return None


def _text(raw: Any) -> str:
    """Redis bytes as text the model holds as it is: UTF-8, no NUL."""
    if type(raw) is not bytes:
        raise _NotLean
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _NotLean from None
    if "\x00" in text:
        raise _NotLean
    return text


def _id(value: Any) -> str:
    """An id the model takes as it is (text, 1 to MAX_ID_BYTES bytes, no NUL), as a
    COPY text field."""
    if (type(value) is not str or not value or "\x00" in value
            or (len(value) > _SHORT_ID and len(value.encode("utf-8")) > MAX_ID_BYTES)):
        raise _NotLean
    return copy_text(value)


def _json(raw: Any) -> Any:
    """A JSON value written as the layout writes it (compact, no ASCII escapes, each
    member once: what orjson writes too) that JSONB stores exactly."""
    if type(raw) is not bytes:
        raise _NotLean
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _NotLean from None
    if orjson.dumps(value) != raw or not _json_storable(value):
        raise _NotLean
    return value


def _json_field(value: Any) -> str:
    """A JSON value read by :func:`_json` as a COPY text field."""
    return "{}" if value == {} else copy_text(orjson.dumps(value).decode())


def _object(raw: Any, members: frozenset[str]) -> dict[str, Any]:
    value = _json(raw)
    if type(value) is not dict or not value.keys() <= members:
        raise _NotLean
    return value


def _time(value: Any) -> str:
    """A time in the form memshift writes (which PostgreSQL reads as it is) that
    exists, as a COPY text field."""
    if type(value) is not str or not _CANONICAL_TIME.fullmatch(value):
        raise _NotLean
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise _NotLean from None
    return value


def _count(value: Any, low: int = 0) -> int:
    if type(value) is not int or not low <= value <= _MAX_SEQ:
        raise _NotLean
    return value


def _optional_text(value: Any) -> str:
    """Text or null (as COPY text): JSON text holds no NUL here (:func:`_json` checked)."""
    if value is None:
        return NULL
    if type(value) is not str:
        raise _NotLean
    return copy_text(value)


def _lean_session(session_id: str, fields: Any, ttl: Any) -> Session:
    if type(fields) is not dict:
        raise _NotLean
    data: dict[str, Any] = {"session_id": session_id}
    for raw_name, raw in fields.items():
        name = _SESSION_FIELDS.get(raw_name)
        if name is None:
            raise _NotLean  # unknown fields go into the metadata: the layout's work
        if name == "metadata":
            value: Any = _json(raw)
            if type(value) is not dict:
                raise _NotLean
        else:
            value = _text(raw)
            if name in _COUNTS:
                if not _DIGITS.fullmatch(value) or int(value) > _MAX_SEQ:
                    raise _NotLean
                value = int(value)
            elif name in _TIMES:
                try:
                    value = parse_timestamp(value)
                except ValueError:
                    raise _NotLean from None
            elif name == "status" and value not in _SESSION_STATUSES:
                raise _NotLean
        data[name] = value
    if "created_at" not in data or "updated_at" not in data:
        raise _NotLean
    if isinstance(ttl, int) and ttl > 0:
        data["expires_at"] = now() + timedelta(milliseconds=ttl)
    return Session.model_construct(**data)


def _lean_tool_runs(sid: str, pairs: Any) -> str:
    """The tool runs' lines, in tool call id order (as the layout sorts them)."""
    if not pairs:
        return ""
    if type(pairs) is not dict:
        raise _NotLean
    lines = []
    for raw_id, raw in pairs.items():
        tool_call_id = _text(raw_id)
        shown_id = _id(tool_call_id)
        data = _object(raw, _TOOL_MEMBERS)
        name = data.get("name")
        if type(name) is not str or not name:
            raise _NotLean
        args = data.get("args", {})
        status = data.get("status", "pending")
        last_error = data.get("last_error")
        if status not in _TOOL_STATUSES:
            raise _NotLean
        lines.append((tool_call_id, (
            f"{sid}\t{shown_id}\t{copy_text(name)}\t{_json_field(args)}\t{status}\t"
            f"{_count(data.get('attempts', 0))}\t{_optional_text(last_error)}\t"
            f"{_time(data.get('updated_at'))}\t"
            f"{tool_run_hash(name, args, status, last_error, {})}\t{{}}\n"
        )))
    lines.sort(key=_FIRST)
    return "".join(line for _, line in lines)


_FIRST = operator.itemgetter(0)


def _lean_summary(sid: str, raw: Any) -> str:
    data = _object(raw, _SUMMARY_MEMBERS)
    text = data.get("text")
    if type(text) is not str:
        raise _NotLean
    return (
        f"{sid}\t{_count(data.get('version'), low=1)}\t{copy_text(text)}\t"
        f"{_count(data.get('covers_through', -1), low=-1)}\t{_time(data.get('updated_at'))}\t"
        "{}\n"
    )


def _lean_checkpoint(sid: str, raw: Any) -> str:
    data = _object(raw, _CHECKPOINT_MEMBERS)
    checkpoint_id, parent_id = data.get("checkpoint_id"), data.get("parent_id")
    state = data.get("state", {})
    if type(state) is not dict or parent_id == checkpoint_id:  # (the model refuses it)
        raise _NotLean
    parent = NULL if parent_id is None else _id(parent_id)
    return (
        f"{sid}\t{_id(checkpoint_id)}\t{parent}\t{_count(data.get('step'))}\t"
        f"{_json_field(state)}\t{_time(data.get('created_at'))}\t{{}}\n"
    )


def _lean_events(sid: str, entries: Any) -> list[str]:
    if not entries:
        return []
    if type(entries) is not list:
        raise _NotLean
    lines = []
    for index, entry in enumerate(entries):
        fields = plain_entry_fields(entry)  # the layout's own plain shape
        if fields is None:
            raise _NotLean
        data: dict[str, Any] = {}
        for raw_name, raw in fields.items():
            name = _EVENT_FIELDS.get(raw_name)
            if name is None:
                raise _NotLean
            data[name] = _json(raw) if name == "data" else _text(raw)
        kind, event_data = data.get("type", "status"), data.get("data", {})
        if kind == "" or type(event_data) is not dict:
            raise _NotLean
        lines.append(
            f"{sid}\t{index}\t{copy_text(kind)}\t{_optional_text(data.get('from'))}\t"
            f"{_optional_text(data.get('to'))}\t{_time(data.get('at'))}\t"
            f"{_json_field(event_data)}\n"
        )
    return lines
