"""The backfill's fast lane: sessions read straight into what PostgreSQL takes.

Transcripts are most of a backfill's data, so the reference layout's plain ones go
straight into lines of COPY text, with no ``Message`` built (:class:`BackfillLayout`):
each message is checked with cheap, conservative tests that imply the full
validation would accept it unchanged. A session with any message that is not
certainly fine is read by the layout as always, so what is quarantined, and why,
does not change.
"""

from __future__ import annotations

import collections
import json
import operator
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from memshift.migrate.bulk import NULL, TranscribedState, Transcript, copy_text
from memshift.model import MAX_ID_BYTES, SessionState, text_problem
from memshift.stores.layouts import Layout
from memshift.stores.layouts.reference import CHILDREN, ReferenceLayout
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
        state = super().decode(session_id, [fields, [], *replies[2:]])
        assert state is not None  # the hash is there
        trimmed = state.session.messages_trimmed
        count = len(ids)
        if trimmed + count > _MAX_SEQ:
            return super().decode(session_id, replies)  # which says which seq is too large
        # One line a message: the session id, the seq, the columns, empty metadata.
        line = copy_text(session_id).replace("{", "{{").replace("}", "}}")
        line += "\t{}\t{}\t{}\t{}\t{}\t{}\t{{}}\n"
        text = "".join(map(line.format, range(trimmed, trimmed + count), *columns))
        transcript = Transcript(text, count, trimmed + count)
        return TranscribedState.model_construct(**dict(state), transcript=transcript)

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
    rf'^\{{"id":"({_PLAIN}{{1,{MAX_ID_BYTES // 4}}})","role":"({_PLAIN}{{1,64}})",'
    rf'"content":"({_PLAIN}*(?:\\["\\bfnrt]{_PLAIN}*)*)",'
    r'"ts":"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z)"'
    rf'(?:,"tool_call_id":(?:"({_PLAIN}{{1,{MAX_ID_BYTES // 4}}})"|null))?\}}$',
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
