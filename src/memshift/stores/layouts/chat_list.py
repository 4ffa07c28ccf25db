"""A chat history as one Redis LIST of JSON messages per session, the way LangChain's
``RedisChatMessageHistory`` (newest first) and LlamaIndex's ``RedisChatStore`` (oldest
first) keep it. A message's seq is its place counted from the oldest; the session
record is a placeholder (status ``active``, version 0, as old as its oldest message)
that expires with the key. Each framework's module says how its entries read.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any, ClassVar

from memshift.errors import ValidationError
from memshift.model import Message, Session, SessionState, parse, placeholder_session
from memshift.stores.layouts import ScriptCall
from memshift.stores.layouts.framework import (
    FrameworkLayout,
    escape_glob,
    invalid,
    with_expiry,
)

# append_message looks for a message id among this many of the newest messages, so
# that a retried append without a seq is a duplicate, not a second copy.
ID_CHECK_WINDOW = 64


class ChatListLayout(FrameworkLayout):
    """One LIST per session at ``{key_prefix}{session_id}``; the scripts in the
    subclass's ``lua/`` push with the framework's order."""

    scan_type = "list"
    newest_first: ClassVar[bool]  # LPUSHed (LangChain) rather than RPUSHed
    roles: ClassVar[Collection[str]]
    role_kind: ClassVar[str]  # what a role must be, e.g. "a LlamaIndex MessageRole"

    prefix: str
    key_prefix: str

    def entry_fields(self, entry: Any, seq: int) -> dict[str, Any]:
        """The model's fields of a decoded list entry (ValueError when it has none)."""
        raise NotImplementedError

    def entry_json(self, message: Message) -> str:
        """The list entry the framework would write for ``message``."""
        raise NotImplementedError

    # -- keys -------------------------------------------------------------------------

    def key(self, session_id: str) -> str:
        return f"{self.key_prefix}{session_id}"

    def session_keys(self, session_id: str) -> list[str]:
        return [self.key(session_id)]

    def scan_pattern(self) -> str:
        return escape_glob(self.key_prefix) + "*"

    def session_id_from_key(self, key: bytes) -> str | None:
        # Invalid UTF-8 is kept (as lone surrogates) so that the caller quarantines the
        # session with its id escaped.
        text = key.decode("utf-8", "surrogateescape")
        if not text.startswith(self.key_prefix) or len(text) == len(self.key_prefix):
            return None
        return text[len(self.key_prefix) :]

    # -- reads ------------------------------------------------------------------------

    def read_commands(self, session_id: str) -> list[tuple[Any, ...]]:
        key = self.key(session_id)
        return [("LRANGE", key, 0, -1), ("PTTL", key)]

    def decode(self, session_id: str, replies: list[Any]) -> SessionState | None:
        entries, ttl = replies
        if not entries:
            return None
        indexed = list(enumerate(entries))
        if self.newest_first:
            indexed.reverse()
        messages = tuple(
            self._message(session_id, self._seq(index, len(indexed)), raw, index)
            for index, raw in indexed
        )
        session = placeholder_session(session_id, [m.ts for m in messages])
        return SessionState(session=with_expiry(session, ttl), messages=messages)

    def _seq(self, index: int, length: int) -> int:
        return length - 1 - index if self.newest_first else index

    def message_from_reply(self, session_id: str, seq: int, raw: bytes) -> Message:
        # Oldest first, the place an operator can look at is the seq; newest first, it
        # depends on the length, which a reply does not carry.
        return self._message(session_id, seq, raw, None if self.newest_first else seq)

    def _message(self, session_id: str, seq: int, raw: Any, index: int | None) -> Message:
        where = f"key {self.key(session_id)!r} message seq {seq}"
        if index is not None:
            where += f" (LINDEX {index})"
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as exc:
            raise invalid(session_id, where, f"is not valid UTF-8 at byte {exc.start}: "
                          f"{raw[:200]!r}") from None
        try:
            entry = json.loads(text)
        except ValueError as exc:
            raise invalid(session_id, where,
                          f"is not valid JSON ({exc}): {text[:200]!r}") from None
        try:
            fields = self.entry_fields(entry, seq)
        except ValueError as exc:
            raise invalid(session_id, where, str(exc)) from None
        message: Message = parse(Message, fields, session_id=session_id, where=where)
        return message

    # -- writes -----------------------------------------------------------------------

    def save_session(self, session: Session, ttl_ms: int) -> ScriptCall:
        return ScriptCall("save_session", self.session_keys(session.session_id), [ttl_ms])

    def append_message(self, session_id: str, message: Message, ttl_ms: int) -> ScriptCall:
        if message.role not in self.roles:
            raise ValidationError(
                f"session {session_id!r}: role {message.role!r} is not {self.role_kind}, "
                f"so {self.keeper} could not read it back; use one of "
                f"{', '.join(sorted(self.roles))}",
                session_id=session_id,
                where="append_message",
            )
        seq = -1 if message.seq is None else message.seq
        return ScriptCall(
            "append_message",
            self.session_keys(session_id),
            [ttl_ms, self.entry_json(message), seq, message.message_id, ID_CHECK_WINDOW],
        )
