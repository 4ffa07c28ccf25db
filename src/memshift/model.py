"""The truth model: plain typed records for one agent session and its parts.

Stores translate at their edges; comparison, merging and validation work on these
records only. Text must be storable by PostgreSQL exactly as it is: no NUL and no
lone surrogates (which is what invalid UTF-8 becomes once decoded with
``surrogateescape``). Such text is refused with an error naming the field, never
altered silently.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from functools import cache
from typing import Annotated, Any, Literal

import pydantic
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationInfo,
)

from memshift.errors import ValidationError

MAX_ID_BYTES = 512
# JSON values nest at most this deep: pydantic's JSON parser, which reads rows back
# from PostgreSQL (and the retired stage's cache), stops at 200 levels, and a record
# wraps its values in a few more. Deeper values are refused on the way in, so that
# nothing is stored that cannot be read back.
MAX_JSON_DEPTH = 100

SessionStatus = Literal["active", "waiting_tool", "paused", "completed", "failed", "expired"]
ToolStatus = Literal["pending", "running", "retrying", "succeeded", "failed"]

SESSION_STATUSES: tuple[str, ...] = (
    "active",
    "waiting_tool",
    "paused",
    "completed",
    "failed",
    "expired",
)
TERMINAL_TOOL_STATUSES = frozenset({"succeeded", "failed"})
# Rank breaks ties between two tool-run writes with the same timestamp, so that every
# store picks the same winner whatever order the writes arrive in.
TOOL_STATUS_RANK = {"pending": 0, "running": 1, "retrying": 2, "succeeded": 3, "failed": 3}

LEGAL_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "active": ("waiting_tool", "paused", "completed", "failed", "expired"),
    "waiting_tool": ("active", "failed", "expired"),
    "paused": ("active", "failed", "expired"),
    "completed": ("active",),
    "failed": ("active",),
    "expired": (),
}


def check_status(session_id: str, status: str) -> str:
    """``status`` when it is a session status; ValidationError naming the session if not."""
    if status not in LEGAL_TRANSITIONS:
        raise ValidationError(
            f"session {session_id!r}: unknown status {status!r}; "
            f"statuses are: {', '.join(LEGAL_TRANSITIONS)}",
            session_id=session_id,
            where="set_status",
        )
    return status


def legal_sources(to_status: str) -> list[str]:
    """The statuses from which a move to ``to_status`` is legal."""
    return [src for src, targets in LEGAL_TRANSITIONS.items() if to_status in targets]


def text_problem(value: str) -> str | None:
    """Why PostgreSQL cannot hold ``value`` exactly, or None when it can."""
    nul = value.find("\x00")
    if nul >= 0:
        return f"contains a NUL character at offset {nul} (PostgreSQL text cannot hold NUL)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid UTF-8 at offset {exc.start} (lone surrogate {value[exc.start]!r})"
    return None


# Validation runs in pydantic's Rust core where it can: a pattern refuses NUL, and
# pydantic refuses lone surrogates (invalid UTF-8) in every str field by itself. The
# few Python checks left are skipped for rows read back from PostgreSQL, which cannot
# hold what they refuse (validate with ``context=TRUSTED``).
TRUSTED = {"trusted": True}
_NO_NUL = r"^[^\x00]*\z"


def _trusted(info: ValidationInfo) -> bool:
    return bool(info.context) and info.context.get("trusted") is True  # type: ignore[union-attr]


def _check_id_size(value: str, info: ValidationInfo) -> str:
    # A UTF-8 character takes at most 4 bytes: short ids need no encoding to check.
    if len(value) * 4 > MAX_ID_BYTES and not _trusted(info):
        size = len(value.encode("utf-8"))
        if size > MAX_ID_BYTES:
            raise ValueError(
                f"id is {size} bytes long; at most {MAX_ID_BYTES} bytes are allowed"
            )
    return value


def _check_id(value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise ValueError(f"text {problem}")
    if not value:
        raise ValueError("id is empty")
    size = len(value.encode("utf-8"))
    if size > MAX_ID_BYTES:
        raise ValueError(f"id is {size} bytes long; at most {MAX_ID_BYTES} bytes are allowed")
    return value


def _json_storable(value: Any) -> bool:
    """True when JSONB can store ``value`` exactly: the fast walk, no paths built."""
    stack = [value]
    containers = 0
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str:
            if "\x00" in item or (not item.isascii() and text_problem(item)):
                return False
        elif kind is dict:
            containers += 1
            for key, child in item.items():
                if type(key) is not str or "\x00" in key or (
                    not key.isascii() and text_problem(key)
                ):
                    return False
                stack.append(child)
        elif kind is list:
            containers += 1
            stack.extend(item)
        elif kind is float:
            if item != item or item in (float("inf"), float("-inf")):
                return False
        elif not (item is None or kind is bool or kind is int):
            return False
    # Only a value with more containers than levels allowed can nest too deep.
    return containers <= MAX_JSON_DEPTH or not _too_deep(value)


def _too_deep(value: Any) -> bool:
    """Whether containers nest in ``value`` deeper than MAX_JSON_DEPTH (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children = item.values() if type(item) is dict else item
        stack.extend((child, depth + 1) for child in children
                     if type(child) is dict or type(child) is list)
    return False


def _json_problem(value: Any, path: str = "$", depth: int = 1) -> str | None:
    """Where and why JSONB cannot store ``value`` exactly (the slow walk, for errors)."""
    if isinstance(value, dict | list) and depth > MAX_JSON_DEPTH:
        return f"value at {path} is nested deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, str):
        problem = text_problem(value)
        return f"string at {path} {problem}" if problem else None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"key {key!r} at {path} is not a string"
            problem = text_problem(key)
            if problem:
                return f"key at {path} {problem}"
            found = _json_problem(item, f"{path}.{key}", depth + 1)
            if found:
                return found
        return None
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _json_problem(item, f"{path}[{index}]", depth + 1)
            if found:
                return found
        return None
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return f"number at {path} is {value}, which JSON cannot hold"
    if value is not None and not isinstance(value, bool | int | float):
        return f"value at {path} of type {type(value).__name__} is not JSON"
    return None


def _check_json(value: Any, info: ValidationInfo) -> Any:
    """Refuse JSON values that JSONB cannot store exactly (NUL, lone surrogates, NaN)."""
    if _trusted(info) or _json_storable(value):
        return value
    raise ValueError(_json_problem(value) or "value cannot be stored as JSON")


def _utc(value: datetime, info: ValidationInfo) -> datetime:
    if value.tzinfo is UTC or _trusted(info):
        return value
    if value.tzinfo is None:
        raise ValueError("timestamp has no time zone; give it in UTC (e.g. 2026-05-19T10:00:00Z)")
    return value.astimezone(UTC)


Text = Annotated[str, StringConstraints(pattern=_NO_NUL)]
Id = Annotated[
    str, StringConstraints(min_length=1, pattern=_NO_NUL), AfterValidator(_check_id_size)
]
JsonObject = Annotated[dict[str, Any], AfterValidator(_check_json)]
JsonValue = Annotated[Any, AfterValidator(_check_json)]
Timestamp = Annotated[datetime, AfterValidator(_utc)]
Count = Annotated[int, Field(ge=0, le=2**62)]


def now() -> datetime:
    return datetime.now(UTC)


def check_session_id(session_id: object) -> str:
    """Validate a session id given to the API; raise ValidationError naming the problem."""
    # Every store call checks its id, a routed write three times: an ASCII id without
    # NUL needs no encoding to check, and no more than this.
    if (type(session_id) is str and 0 < len(session_id) <= MAX_ID_BYTES
            and session_id.isascii() and "\x00" not in session_id):
        return session_id
    if not isinstance(session_id, str):
        raise ValidationError(
            f"session id must be a str, got {type(session_id).__name__} {session_id!r}"
        )
    try:
        return _check_id(session_id)
    except ValueError as exc:
        raise ValidationError(
            f"session id {session_id!r}: {exc}", session_id=None, where="session_id"
        ) from None


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = self.model_dump(mode="json")
        return data


class Session(Record):
    session_id: Id
    tenant_id: Text | None = None
    user_id: Text | None = None
    status: SessionStatus = "active"
    version: Count = 0
    created_at: Timestamp = Field(default_factory=now)
    updated_at: Timestamp = Field(default_factory=now)
    messages_trimmed: Count = 0
    metadata: JsonObject = Field(default_factory=dict)
    expires_at: Timestamp | None = None


def placeholder_session(session_id: str, seen: list[datetime]) -> Session:
    """The session record a store reports when it holds parts of a session but no record.

    It is as old as its oldest part, so that every store reports the same one.
    """
    first = min(seen, default=None) or now()
    return Session(session_id=session_id, created_at=first, updated_at=first)


class Message(Record):
    """One transcript entry. ``seq`` is None until the primary store assigns it."""

    seq: Count | None = None
    message_id: Id
    role: Annotated[Text, Field(min_length=1, max_length=64)]
    content: Text
    ts: Timestamp = Field(default_factory=now)
    tool_call_id: Id | None = None
    # What else the message carries (name, usage, a legacy record's unknown members);
    # it takes no part in same_content: other metadata is not a conflict.
    metadata: JsonObject = Field(default_factory=dict)

    def same_content(self, other: Message) -> bool:
        """Two writes of one message: equal unless id, role, content or tool call differ."""
        return (self.message_id, self.role, self.content, self.tool_call_id) == (
            other.message_id,
            other.role,
            other.content,
            other.tool_call_id,
        )


# What content_hash hashes: json.dumps(sort_keys=True, separators=(",", ":"),
# ensure_ascii=False), with one encoder made once rather than one a call.
_HASHED_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def tool_run_hash(
    name: str, args: Any, status: str, last_error: str | None, metadata: dict[str, Any]
) -> str:
    """:meth:`ToolRun.content_hash` of a run with these fields."""
    fields = [name, args, status, last_error]
    if metadata:
        fields.append(metadata)
    return hashlib.sha1(_HASHED_JSON.encode(fields).encode("utf-8")).hexdigest()


class ToolRun(Record):
    tool_call_id: Id
    name: Annotated[Text, Field(min_length=1)]
    args: JsonValue = Field(default_factory=dict)
    status: ToolStatus = "pending"
    attempts: Count = 0
    last_error: Text | None = None
    updated_at: Timestamp = Field(default_factory=now)
    metadata: JsonObject = Field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_TOOL_STATUSES

    def content_hash(self) -> str:
        """Stable hash of what a winning write replaces; the last tie-break in merges.

        Metadata is part of it, since a winning write replaces it too. Empty metadata
        is left out, so runs without any hash as they did before metadata existed and
        the hashes PostgreSQL stored then still break ties the same way.
        """
        return tool_run_hash(self.name, self.args, self.status, self.last_error, self.metadata)

    def merge_key(self) -> tuple[bool, datetime, int, str]:
        """Order in which writes win: terminal first, then newer, then rank, then hash."""
        return (self.terminal, self.updated_at, TOOL_STATUS_RANK[self.status], self.content_hash())


def merge_tool_runs(old: ToolRun, new: ToolRun) -> ToolRun:
    """The monotonic merge every store applies: a lattice join, so order never matters.

    The fields come from the write with the greater ``merge_key`` (a terminal status
    is never replaced by a non-terminal one); ``attempts`` is the maximum of both.
    """
    winner = new if new.merge_key() > old.merge_key() else old
    attempts = max(old.attempts, new.attempts)
    if winner.attempts == attempts:
        return winner
    return winner.model_copy(update={"attempts": attempts})


class MemorySummary(Record):
    version: Annotated[int, Field(ge=1, le=2**62)]
    text: Text
    covers_through: Annotated[int, Field(ge=-1, le=2**62)] = -1
    updated_at: Timestamp = Field(default_factory=now)
    metadata: JsonObject = Field(default_factory=dict)


class Checkpoint(Record):
    checkpoint_id: Id
    parent_id: Id | None = None
    step: Count
    state: JsonObject = Field(default_factory=dict)
    created_at: Timestamp = Field(default_factory=now)
    metadata: JsonObject = Field(default_factory=dict)

    @pydantic.model_validator(mode="after")
    def _no_self_parent(self) -> Checkpoint:
        if self.parent_id == self.checkpoint_id:
            raise ValueError(f"checkpoint {self.checkpoint_id!r} names itself as its parent")
        return self


class Event(Record):
    """One status transition, append-only; ``event_seq`` is assigned by the primary."""

    event_seq: Count | None = None
    type: Annotated[Text, Field(min_length=1)] = "status"
    from_status: Text | None = None
    to_status: Text | None = None
    at: Timestamp = Field(default_factory=now)
    data: JsonObject = Field(default_factory=dict)


class StatusChange(Record):
    """What ``set_status`` did: the session as it is after the change, and the event.

    A secondary store replicates it whole with ``apply_status_change``: the session
    record moves only as a whole snapshot under its version, so a late status change
    can never overwrite fields that a newer session write set.
    """

    session: Session
    event: Event

    @property
    def session_version(self) -> int:
        return self.session.version


class SessionState(Record):
    """The whole of one session, as one store holds it."""

    session: Session
    messages: tuple[Message, ...] = ()
    tool_runs: tuple[ToolRun, ...] = ()
    summaries: tuple[MemorySummary, ...] = ()
    checkpoints: tuple[Checkpoint, ...] = ()
    events: tuple[Event, ...] = ()

    @property
    def session_id(self) -> str:
        return self.session.session_id

    @property
    def message_count(self) -> int:
        """Messages ever appended: those trimmed away plus those still held."""
        if not self.messages:
            return self.session.messages_trimmed
        return max(self.session.messages_trimmed, (self.messages[-1].seq or 0) + 1)

    @property
    def latest_summary(self) -> MemorySummary | None:
        return max(self.summaries, key=lambda s: s.version, default=None)

    @property
    def latest_checkpoint(self) -> Checkpoint | None:
        return max(self.checkpoints, key=lambda c: (c.step, c.checkpoint_id), default=None)

    def timestamps(self) -> list[datetime]:
        """Every timestamp of the session's parts (for placeholder sessions)."""
        return [
            *(m.ts for m in self.messages),
            *(t.updated_at for t in self.tool_runs),
            *(s.updated_at for s in self.summaries),
            *(c.created_at for c in self.checkpoints),
            *(e.at for e in self.events),
        ]

    def problems(self) -> list[str]:
        """What makes this session unfit to migrate as it is (empty when it is fit).

        Records are valid one by one; these are faults of the whole: a message id
        used twice, seqs out of order, a checkpoint chain with a cycle.
        """
        found: list[str] = []
        seen: dict[str, int | None] = {}
        last = -1
        for message in self.messages:
            if message.message_id in seen:
                found.append(
                    f"message id {message.message_id!r} is used at seq {seen[message.message_id]}"
                    f" and again at seq {message.seq}"
                )
            seen[message.message_id] = message.seq
            if message.seq is not None:
                if message.seq <= last:
                    found.append(f"message seq {message.seq} follows seq {last}")
                last = message.seq
        parents = {c.checkpoint_id: c.parent_id for c in self.checkpoints}
        for start in parents:
            path = [start]
            node = parents.get(start)
            while node is not None and node in parents:
                if node in path:
                    found.append(
                        "checkpoint chain has a cycle: " + " -> ".join([*path, node])
                    )
                    break
                path.append(node)
                node = parents[node]
            if found and found[-1].startswith("checkpoint chain"):
                break
        return found

    def tool_run(self, tool_call_id: str) -> ToolRun | None:
        return next((t for t in self.tool_runs if t.tool_call_id == tool_call_id), None)


def parse(
    cls: type[Record], data: Any, *, session_id: str | None, where: str, trusted: bool = False
) -> Any:
    """Build a record from raw data, turning pydantic's error into one that names the place."""
    try:
        return cls.model_validate(data, context=TRUSTED if trusted else None)
    except pydantic.ValidationError as exc:
        raise _invalid(cls, exc, session_id, where) from None


@cache
def _sequence_of(cls: type[Record]) -> TypeAdapter[tuple[Any, ...]]:
    return TypeAdapter(tuple[cls, ...])  # type: ignore[valid-type]


def parse_json_list(
    cls: type[Record], raw: str | bytes, *, session_id: str, where: str, trusted: bool = False
) -> tuple[Any, ...]:
    """Records from a JSON array, validated in one call (in pydantic's Rust core).

    ``trusted`` skips the checks that data read back from PostgreSQL cannot fail.
    """
    try:
        return _sequence_of(cls).validate_json(raw, context=TRUSTED if trusted else None)
    except pydantic.ValidationError as exc:
        raise _invalid(cls, exc, session_id, where) from None


def _invalid(
    cls: type[Record], exc: pydantic.ValidationError, session_id: str | None, where: str
) -> ValidationError:
    owner = f"session {session_id!r}, " if session_id is not None else ""
    return ValidationError(
        f"{owner}{where}: invalid {cls.__name__}: {_problems(exc)}",
        session_id=session_id,
        where=where,
    )


_MESSAGES = {
    "string_pattern_mismatch": "text contains a NUL character (PostgreSQL text cannot hold NUL)",
    "string_unicode": "text is not valid UTF-8 (it holds a lone surrogate)",
    "string_too_short": "must not be empty",
}


def _problems(exc: pydantic.ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'value'}: "
        f"{_MESSAGES.get(err['type'], err['msg'])}"
        for err in exc.errors(include_url=False)
    )


def build(cls: type[Record], session_id: str | None, where: str, **fields: Any) -> Any:
    """Keyword form of :func:`parse` for API callers."""
    return parse(cls, fields, session_id=session_id, where=where)


def coerce(cls: type[Record], value: Any, *, session_id: str | None, where: str) -> Any:
    """Accept a record or a mapping of its fields from API callers; validate the latter."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict) or hasattr(value, "keys"):
        return parse(cls, dict(value), session_id=session_id, where=where)
    raise ValidationError(
        f"{where}: expected a {cls.__name__} or a mapping of its fields, "
        f"got {type(value).__name__}",
        session_id=session_id,
        where=where,
    )
