"""A layout described in a TOML file: for teams whose keys are their own.

The description (:mod:`.spec`) names, per part of a session, its key pattern, its
Redis type, how its fields map to the model and, for messages, the list's order.
Reads decode each part with :mod:`.records`; writes are the guarded Lua scripts in
``lua/`` with the field names as arguments, so the same monotonic rules hold as in
the reference layout: a session version, summary version or checkpoint step never
goes back, a message seq is never taken twice, and a tool run is merged by the
model's own rule (the script hands a differing stored run back to Python).

What a description has no place for is refused before anything is sent
(:class:`~memshift.stores.layouts.NotInLayout`): status changes and
events (there is no events table yet), and parts whose table is missing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from memshift.model import (
    Checkpoint,
    MemorySummary,
    Message,
    Session,
    SessionState,
    StatusChange,
    ToolRun,
    now,
    parse,
    placeholder_session,
)
from memshift.stores.layouts import NotInLayout, ScriptCall
from memshift.stores.layouts.declarative.records import (
    Place,
    decode_json_record,
    decode_session,
    derived_id,
    encode_json,
    encode_session,
)
from memshift.stores.layouts.declarative.spec import LayoutSpec, Section, load_spec
from memshift.stores.layouts.timestamps import format_timestamp

__all__ = ["DeclarativeLayout", "load_layout"]

_MEMSHIFT_DEFAULT_PREFIX = "agent"
# append_message looks for a message id among this many of the newest messages.
ID_CHECK_WINDOW = 64


def load_layout(path: str | Path, prefix: str = _MEMSHIFT_DEFAULT_PREFIX) -> DeclarativeLayout:
    """The layout that the TOML file at ``path`` describes (ConfigError if it cannot be)."""
    return DeclarativeLayout(load_spec(Path(path)), prefix, name=str(path))


class DeclarativeLayout:
    """The keys a :class:`LayoutSpec` describes, with ``prefix`` for ``{prefix}``.

    The description's own ``prefix`` is used when ``prefix`` is memshift's default
    (``agent``). ``name`` is what ``get_layout`` is given to build it again (the
    file's path), so that jobs started from a router's settings find the same layout.
    """

    # A description may leave parts out (they are refused): the router checks first.
    holds_every_part = False

    def __init__(self, spec: LayoutSpec, prefix: str = _MEMSHIFT_DEFAULT_PREFIX, *,
                 name: str | None = None) -> None:
        self.spec = spec
        self.name = name or str(spec.path)
        self.prefix = spec.prefix if prefix == _MEMSHIFT_DEFAULT_PREFIX and spec.prefix \
            else prefix
        self.scan_type = spec.discovery.type
        self._sections = list(spec.sections.values())
        self._regex = {s.name: s.key.regex(self.prefix) for s in self._sections}
        self._source = spec.path.name

    # -- keys -------------------------------------------------------------------------

    def script_dir(self) -> Path:
        return Path(__file__).parent / "lua"

    def session_keys(self, session_id: str) -> list[str]:
        return [s.key.key(self.prefix, session_id) for s in self._sections]

    def scan_pattern(self) -> str:
        return self.spec.discovery.key.glob(self.prefix)

    def session_id_from_key(self, key: bytes) -> str | None:
        text = key.decode("utf-8", "surrogateescape")
        found = self._regex[self.spec.discovery.name].fullmatch(text)
        if found is None:
            return None
        # The key of another part (a tools hash that the session pattern matches too)
        # is not a session: such ids are ambiguous, and skipped.
        if any(regex.fullmatch(text) for name, regex in self._regex.items()
               if name != self.spec.discovery.name):
            return None
        return found["id"]

    # -- reads ------------------------------------------------------------------------

    def read_commands(self, session_id: str) -> list[tuple[Any, ...]]:
        keys = self.session_keys(session_id)
        reads = {"hash": ("HGETALL",), "list": ("LRANGE", 0, -1), "string": ("GET",)}
        commands: list[tuple[Any, ...]] = [
            (reads[s.type][0], key, *reads[s.type][1:]) for s, key in zip(
                self._sections, keys, strict=True)
        ]
        return [*commands, ("PTTL", self.spec.discovery.key.key(self.prefix, session_id))]

    def decode(self, session_id: str, replies: list[Any]) -> SessionState | None:
        parts = {s.name: (s, key, reply) for s, key, reply in zip(
            self._sections, self.session_keys(session_id), replies[:-1], strict=True)}
        if not any(reply for _, _, reply in parts.values()):
            return None
        fields = self._session_fields(session_id, parts.get("session"))
        trimmed = fields.get("messages_trimmed", 0)
        state = SessionState(
            session=Session(session_id=session_id),
            messages=self._messages(session_id, parts.get("messages"), trimmed),
            tool_runs=self._tool_runs(session_id, parts.get("tool_runs")),
            summaries=self._latest(session_id, parts.get("summary")),
            checkpoints=self._latest(session_id, parts.get("checkpoint")),
        )
        session = self._session(session_id, fields, state.timestamps())
        ttl = replies[-1]
        if isinstance(ttl, int) and ttl > 0:
            session = session.model_copy(
                update={"expires_at": now() + timedelta(milliseconds=ttl)})
        return state.model_copy(update={"session": session})

    def _place(self, session_id: str, key: str, where: str = "") -> Place:
        return Place(session_id, key, where, self._source)

    def _session_fields(self, session_id: str, part: tuple[Section, str, Any] | None
                        ) -> dict[str, Any]:
        if part is None or not part[2]:
            return {}
        section, key, reply = part
        pairs = reply.items() if isinstance(reply, dict) else zip(
            reply[::2], reply[1::2], strict=True)
        text: dict[str, str] = {}
        for name, value in pairs:
            field = self._text(session_id, key, "field name", name)
            text[field] = self._text(session_id, key, f"field {field!r}", value)
        return decode_session(section, self._place(session_id, key), text)

    def _text(self, session_id: str, key: str, where: str, raw: Any) -> str:
        try:
            return bytes(raw).decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as exc:
            raise self._place(session_id, key, where).error(
                f"is not valid UTF-8 at byte {exc.start}: {raw!r}") from None

    def _session(self, session_id: str, fields: dict[str, Any], seen: list[datetime]
                 ) -> Session:
        if not fields:
            return placeholder_session(session_id, seen)
        data = {"session_id": session_id, **fields}
        # Missing times: each other's, else as old as the oldest part.
        oldest = min(seen, default=None)
        data.setdefault("created_at", data.get("updated_at", oldest))
        data.setdefault("updated_at", data["created_at"])
        if data["created_at"] is None:
            del data["created_at"], data["updated_at"]
        key = self.spec.sections["session"].key.key(self.prefix, session_id)
        session: Session = parse(Session, data, session_id=session_id, where=f"key {key!r}")
        return session

    def _messages(self, session_id: str, part: tuple[Section, str, Any] | None,
                  trimmed: int) -> tuple[Message, ...]:
        if part is None or not part[2]:
            return ()
        section, key, entries = part
        indexed = list(enumerate(entries))  # (LINDEX index, entry)
        if section.order == "newest_first":
            indexed.reverse()
        return tuple(
            self._message(section, session_id, key, trimmed + place, raw, index)
            for place, (index, raw) in enumerate(indexed)
        )

    def _message(self, section: Section, session_id: str, key: str, seq: int, raw: Any,
                 index: int | None) -> Message:
        where = f"seq {seq}" if index is None else f"index {index} (seq {seq})"
        message: Message = decode_json_record(
            section, self._place(session_id, key, where), raw, {"seq": seq})
        return message

    def _tool_runs(self, session_id: str, part: tuple[Section, str, Any] | None
                   ) -> tuple[ToolRun, ...]:
        if part is None or not part[2]:
            return ()
        section, key, reply = part
        pairs = reply.items() if isinstance(reply, dict) else zip(
            reply[::2], reply[1::2], strict=True)
        runs = [self._tool_run(section, session_id, key,
                               self._text(session_id, key, "field name", name), raw)
                for name, raw in pairs]
        return tuple(sorted(runs, key=lambda run: run.tool_call_id))

    def _tool_run(self, section: Section, session_id: str, key: str, tool_call_id: str,
                  raw: Any) -> ToolRun:
        run: ToolRun = decode_json_record(
            section, self._place(session_id, key, f"field {tool_call_id!r}"), raw,
            {"tool_call_id": tool_call_id})
        return run

    def _latest(self, session_id: str, part: tuple[Section, str, Any] | None) -> tuple[Any, ...]:
        if part is None or part[2] is None:
            return ()
        section, key, raw = part
        return (decode_json_record(section, self._place(session_id, key, "value"), raw, {}),)

    def message_from_reply(self, session_id: str, seq: int, raw: bytes) -> Message:
        section = self._need("messages", session_id, "messages")
        return self._message(section, session_id, section.key.key(self.prefix, session_id),
                             seq, raw, None)

    def tool_run_from_reply(self, session_id: str, tool_call_id: str, raw: bytes) -> ToolRun:
        section = self._need("tool_runs", session_id, "tool runs")
        return self._tool_run(section, session_id, section.key.key(self.prefix, session_id),
                              tool_call_id, raw)

    def session_from_reply(self, session_id: str, fields: Any, ttl: Any) -> Session:
        self._refuse(session_id, "status changes (a description has no events table yet)")

    # -- writes -----------------------------------------------------------------------

    def _call(self, script: str, session_id: str, target: str | None, ttl_ms: int,
              args: list[Any], written: str | None = None) -> ScriptCall:
        # Every script of lua/ reads KEYS as the session's keys, one per table in the
        # order session, messages, tool_runs, summary, checkpoint (tables the
        # description lacks are left out), and ARGV as the TTL, the index in KEYS of
        # the key SCAN finds sessions by (its TTL is the session's), the index of the
        # key written, then its own arguments (field and member names among them).
        names = [s.name for s in self._sections]
        anchor = names.index(self.spec.discovery.name) + 1
        index = names.index(target) + 1 if target else anchor
        return ScriptCall(script, self.session_keys(session_id), [ttl_ms, anchor, index, *args],
                          written=None if written is None else written.encode("utf-8"))

    def save_session(self, session: Session, ttl_ms: int) -> ScriptCall:
        section = self.spec.sections.get("session")
        if section is None:  # no session record to write: pass it on to PostgreSQL
            return self._call("accept", session.session_id, None, ttl_ms, [])
        pairs, deletes = encode_session(section, session)
        return self._call("save_session", session.session_id, "session", ttl_ms, [
            section.fields.get("version", ""), section.fields.get("updated_at", ""),
            section.fields.get("messages_trimmed", ""), str(session.version),
            format_timestamp(session.updated_at), str(session.messages_trimmed),
            len(pairs), *(item for pair in pairs.items() for item in pair), *deletes,
        ])

    def append_message(self, session_id: str, message: Message, ttl_ms: int) -> ScriptCall:
        section = self._need("messages", session_id, "messages")
        if "message_id" not in section.fields and (
                message.seq is None or message.message_id != derived_id(message.seq)):
            self._refuse(session_id, f"message id {message.message_id!r} ([messages] maps "
                         "no message_id, so the id would read back as seq-N)")
        has_hash = "session" in self.spec.sections
        fields = section.fields
        return self._call("append_message", session_id, "messages", ttl_ms, [
            encode_json(section, message), -1 if message.seq is None else message.seq,
            message.message_id, ID_CHECK_WINDOW, section.order,
            1 if has_hash else 0,
            self.spec.sections["session"].fields.get("messages_trimmed", "") if has_hash else "",
            fields.get("message_id", ""), fields["role"], fields["content"],
            fields.get("tool_call_id", ""),
        ])

    def upsert_tool_run(self, session_id: str, run: ToolRun, ttl_ms: int) -> ScriptCall:
        return self._tool_call(session_id, run, ttl_ms, b"", None)

    def replace_tool_run(self, session_id: str, run: ToolRun, expected: bytes, merged: ToolRun,
                         ttl_ms: int) -> ScriptCall:
        return self._tool_call(session_id, run, ttl_ms, expected, merged)

    def _tool_call(self, session_id: str, run: ToolRun, ttl_ms: int, expected: bytes,
                   merged: ToolRun | None) -> ScriptCall:
        section = self._need("tool_runs", session_id, "tool runs")
        raw = encode_json(section, run)
        merged_raw = "" if merged is None else encode_json(section, merged)
        return self._call("upsert_tool_run", session_id, "tool_runs", ttl_ms,
                          [run.tool_call_id, raw, expected, merged_raw],
                          written=merged_raw or raw)

    def put_summary(self, session_id: str, summary: MemorySummary, ttl_ms: int) -> ScriptCall:
        section = self._need("summary", session_id, "memory summaries")
        return self._call("put_summary", session_id, "summary", ttl_ms, [
            encode_json(section, summary), str(summary.version), section.fields["version"]])

    def put_checkpoint(self, session_id: str, checkpoint: Checkpoint, ttl_ms: int) -> ScriptCall:
        section = self._need("checkpoint", session_id, "checkpoints")
        return self._call("put_checkpoint", session_id, "checkpoint", ttl_ms, [
            encode_json(section, checkpoint), str(checkpoint.step), checkpoint.checkpoint_id,
            section.fields["step"], section.fields["checkpoint_id"]])

    def set_status(self, session_id: str, status: str, at: str, data: str, ttl_ms: int
                   ) -> ScriptCall:
        self._refuse(session_id, "status changes (a description has no events table yet)")

    def apply_status_change(self, change: StatusChange, ttl_ms: int) -> ScriptCall:
        self._refuse(change.session.session_id,
                     "status changes (a description has no events table yet)")

    def _need(self, table: str, session_id: str, what: str) -> Section:
        section = self.spec.sections.get(table)
        if section is None:
            self._refuse(session_id, f"{what} (it has no [{table}] table)")
        return section

    def _refuse(self, session_id: str, what: str) -> NoReturn:
        raise NotInLayout(
            f"session {session_id!r}: layout {self._source} has no place for {what}; "
            "nothing was written. Describe it in the layout file, or keep such writes "
            "away from this layout"
        )
