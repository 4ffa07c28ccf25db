"""Records of a declarative layout: their fields into the model's, and back.

A value that does not fit raises ValidationError naming the session, the key, the
place in it and the rule of the description it breaks, e.g. ``key 'acme:chat:7:log'
index 3: member 'who' is missing ([messages] fields.role = 'who' in acme.toml)``.

Fields the description does not map are kept, never dropped: an unknown member of a
JSON value (or field of the session hash) goes into the record's ``metadata`` when
``metadata`` is not mapped, and comes back as a member on write; when ``metadata``
is mapped to a member, unknown ones are merged into it (a name it already holds goes
under ``_extra``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from memshift.errors import ValidationError
from memshift.model import (
    SESSION_STATUSES,
    TOOL_STATUS_RANK,
    Checkpoint,
    MemorySummary,
    Message,
    Record,
    Session,
    ToolRun,
    parse,
)
from memshift.stores.layouts.declarative.spec import REQUIRED, Section
from memshift.stores.layouts.timestamps import format_timestamp, parse_timestamp

__all__ = ["EPOCH", "Place", "decode_json_record", "decode_session", "derived_id",
           "encode_json", "encode_session"]

# A time the description does not map, or a value lacks: unknown, shown as the epoch.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# How each model field's value is read: kind, and whether null is allowed.
_KINDS: dict[str, tuple[str, bool]] = {
    "tenant_id": ("text", True), "user_id": ("text", True), "status": ("status", False),
    "version": ("count", False), "created_at": ("time", False), "updated_at": ("time", False),
    "messages_trimmed": ("count", False), "metadata": ("object", False),
    "message_id": ("id", False), "role": ("text", False), "content": ("text", False),
    "ts": ("time", False), "tool_call_id": ("id", True), "name": ("text", False),
    "args": ("any", False), "attempts": ("count", False), "last_error": ("text", True),
    "text": ("text", False), "covers_through": ("int", False), "checkpoint_id": ("id", False),
    "parent_id": ("id", True), "step": ("count", False), "state": ("object", False),
}
# Times a record must have: the epoch when unmapped or missing (never "now", so that
# two reads of the same value give the same record).
_UNKNOWN_TIME = {"messages": ("ts",), "tool_runs": ("updated_at",),
                 "summary": ("updated_at",), "checkpoint": ("created_at",)}
_STATUSES = {"session": frozenset(SESSION_STATUSES), "tool_runs": frozenset(TOOL_STATUS_RANK)}
_MODELS: dict[str, type[Record]] = {"messages": Message, "tool_runs": ToolRun,
                                    "summary": MemorySummary, "checkpoint": Checkpoint}


class Place:
    """Where a value is, for errors: session, key, place in the key, description file."""

    def __init__(self, session_id: str, key: str, where: str, source: str) -> None:
        self.session_id, self.key, self.where, self.source = session_id, key, where, source

    @property
    def text(self) -> str:
        return f"key {self.key!r} {self.where}".rstrip()

    def error(self, problem: str, rule: str = "") -> ValidationError:
        because = f" ({rule} in {self.source})" if rule else ""
        return ValidationError(f"session {self.session_id!r}, {self.text}: {problem}{because}",
                               session_id=self.session_id, where=self.text)


# -- reading ---------------------------------------------------------------------------


def derived_id(seq: int) -> str:
    """The id of a message whose description maps no message id: from its place."""
    return f"seq-{seq}"


def decode_json_record(section: Section, place: Place, raw: Any, extra: dict[str, Any]) -> Any:
    """The record a JSON value holds (``extra``: fields that come from the key, e.g. seq)."""
    obj = _json(raw, place)
    if type(obj) is not dict:
        raise place.error(f"is JSON {type(obj).__name__}, expected an object",
                          f"[{section.name}] holds JSON objects")
    data = _mapped(section, place, obj, member=True)
    data.update(extra)
    if section.name == "messages" and "message_id" not in data:
        data["message_id"] = derived_id(data["seq"])
    model = _MODELS[section.name]
    return parse(model, data, session_id=place.session_id, where=place.text)


def decode_session(
    section: Section, place: Place, fields: Mapping[str, str]
) -> dict[str, Any]:
    """The session fields the hash holds (times may be missing: the caller fills them)."""
    return _mapped(section, place, dict(fields), member=False)


def _mapped(section: Section, place: Place, obj: dict[str, Any], *, member: bool
            ) -> dict[str, Any]:
    noun = "member" if member else "field"
    data: dict[str, Any] = {}
    for ours, theirs in section.fields.items():
        if theirs not in obj or (obj[theirs] is None and not _KINDS[ours][1]):
            if ours in REQUIRED[section.name]:
                raise place.error(f"{noun} {theirs!r} is missing", section.rule(ours))
            continue
        data[ours] = _value(section, place, ours, obj[theirs], from_text=not member)
    for ours in _UNKNOWN_TIME.get(section.name, ()):
        data.setdefault(ours, EPOCH)
    unknown = {name: value for name, value in obj.items()
               if name not in section.fields.values()}
    if unknown:
        data["metadata"] = _with_unknown(data.get("metadata", {}), unknown)
    return data


def _value(section: Section, place: Place, ours: str, value: Any, *, from_text: bool) -> Any:
    kind, nullable = _KINDS[ours]
    theirs = section.fields[ours]
    where = Place(place.session_id, place.key,
                  f"{place.where} {'field' if from_text else 'member'} {theirs!r}".strip(),
                  place.source)
    if value is None and nullable:
        return None

    def wrong(expected: str) -> ValidationError:
        return where.error(f"is {value!r}, expected {expected}", section.rule(ours))

    if kind == "status":
        ours_known = _STATUSES[section.name]
        mapped = section.statuses.get(value, value) if isinstance(value, str) else None
        if mapped not in ours_known:
            listed = ", ".join([*section.statuses, *sorted(ours_known)])
            raise where.error(
                f"is {value!r}, not a status the description maps ({listed}); add it to "
                f"[{section.name}] statuses", section.rule(ours))
        return mapped
    if kind in ("count", "int"):
        if isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)
        if type(value) is not int or (kind == "count" and value < 0):
            raise wrong("a whole number" + (" of 0 or more" if kind == "count" else ""))
        return value
    if kind == "time":
        try:
            return parse_timestamp(value)
        except ValueError as exc:
            raise where.error(str(exc), section.rule(ours)) from None
    if from_text and kind in ("object", "any"):
        value = _json(value, where)
    if kind == "object" and type(value) is not dict:
        raise wrong("a JSON object")
    if kind == "id" and type(value) is int:
        return str(value)
    if kind in ("text", "id") and not isinstance(value, str):
        raise wrong("text")
    return value


def _json(raw: Any, place: Place) -> Any:
    text = raw
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise place.error(f"is not valid UTF-8 at byte {exc.start}: {raw[:200]!r}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise place.error(f"is not valid JSON ({exc}): {str(text)[:200]!r}") from None


def _with_unknown(known: Any, unknown: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(known) if isinstance(known, dict) else {}
    clashes = {name: value for name, value in unknown.items() if name in merged}
    merged.update({name: value for name, value in unknown.items() if name not in merged})
    if clashes:
        slot, n = "_extra", 0
        while slot in merged:
            n += 1
            slot = f"_extra_{n}"
        merged[slot] = clashes
    return merged


# -- writing ---------------------------------------------------------------------------


def encode_json(section: Section, record: Record) -> str:
    """The JSON value for ``record`` under the description (unmapped fields left out)."""
    values = record.model_dump()
    out: dict[str, Any] = {}
    if "metadata" not in section.fields:
        out.update(_spread(section, record, values.get("metadata") or {}))
    for ours, theirs in section.fields.items():
        # A null is left out: a missing member reads back as null.
        if values[ours] is not None:
            out[theirs] = _out(section, ours, values[ours], text=False)
    return _dumps(out)


def encode_session(section: Section, session: Session) -> tuple[dict[str, str], list[str]]:
    """The hash fields to set (as text) and the mapped fields to delete (null values)."""
    values = session.model_dump()
    pairs: dict[str, str] = {}
    if "metadata" not in section.fields:
        for name, value in _spread(section, session, session.metadata).items():
            pairs[name] = value if isinstance(value, str) else _dumps(value)
    deletes: list[str] = []
    for ours, theirs in section.fields.items():
        value = values[ours]
        if value is None:
            deletes.append(theirs)
        else:
            pairs[theirs] = str(_out(section, ours, value, text=True))
    return pairs, deletes


def _spread(section: Section, record: Record, metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata written back as the unknown members it was read from."""
    taken = set(section.fields.values())
    clash = sorted(taken & set(metadata))
    if clash:
        raise ValidationError(
            f"{type(record).__name__} metadata {clash[0]!r} has the name of a mapped field "
            f"of [{section.name}], so it cannot be written beside it; map metadata to a "
            "field of its own in the layout description",
            where=f"[{section.name}] fields",
        )
    return dict(metadata)


def _out(section: Section, ours: str, value: Any, *, text: bool) -> Any:
    kind, _ = _KINDS[ours]
    if value is None:
        return None
    if kind == "status":
        return section.theirs(value)
    if kind == "time":
        if section.timestamps == "epoch_ms":
            ms = int(value.timestamp() * 1000)
            return str(ms) if text else ms
        return format_timestamp(value)
    if text and kind in ("object", "any"):
        return _dumps(value)
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
