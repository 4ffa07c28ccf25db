"""One exception root for everything memshift raises.

Library code raises these; only the CLI turns them into messages and exit codes.
Every message says what was wrong, with which session, key or row, and what to do.
"""

from __future__ import annotations


class MemshiftError(Exception):
    """Root of every error memshift raises on purpose."""

    exit_code = 1


class ConfigError(MemshiftError):
    """A setting is missing or invalid; the message names the setting and how to set it."""

    exit_code = 2


class ValidationError(MemshiftError, ValueError):
    """A record or argument does not satisfy the model (names session, key or field)."""

    exit_code = 3

    def __init__(self, message: str, *, session_id: str | None = None, where: str | None = None):
        super().__init__(message)
        self.session_id = session_id
        self.where = where


class SessionNotFound(MemshiftError):
    exit_code = 4

    def __init__(self, session_id: str, store: str):
        super().__init__(
            f"session {session_id!r} does not exist in {store}; "
            "create it with save_session() before writing to it"
        )
        self.session_id = session_id
        self.store = store


class IllegalTransition(MemshiftError):
    """A status change that the session state machine does not allow."""

    exit_code = 5

    def __init__(self, session_id: str, from_status: str, to_status: str, allowed: list[str]):
        allowed_text = ", ".join(allowed) if allowed else "none: it is final"
        super().__init__(
            f"session {session_id!r}: illegal status change {from_status!r} -> {to_status!r}; "
            f"from {from_status!r} the allowed moves are: {allowed_text}"
        )
        self.session_id = session_id
        self.from_status = from_status
        self.to_status = to_status


class MessageConflict(MemshiftError):
    """A message for a seq (or message id) that already holds different content.

    The existing message is kept; the conflict is recorded, never overwritten.
    """

    exit_code = 6

    def __init__(self, session_id: str, seq: int, detail: str):
        super().__init__(
            f"session {session_id!r}: message seq {seq} conflicts with the stored message "
            f"({detail}); the stored message was kept and the conflict recorded"
        )
        self.session_id = session_id
        self.seq = seq


class SeqGap(MemshiftError):
    """A message with a seq beyond the next free one, in a store that cannot hold gaps."""

    exit_code = 6

    def __init__(self, session_id: str, seq: int, next_seq: int, store: str):
        super().__init__(
            f"session {session_id!r}: message seq {seq} would leave a gap in {store} "
            f"(next free seq is {next_seq}); write the missing messages first, or let "
            "the repair worker copy the session from the primary"
        )
        self.session_id = session_id
        self.seq = seq
        self.next_seq = next_seq


class EventGap(MemshiftError):
    """A replicated status event beyond the next event_seq, in a store that cannot hold gaps."""

    exit_code = 6

    def __init__(self, session_id: str, event_seq: int, next_event_seq: int, store: str):
        super().__init__(
            f"session {session_id!r}: event_seq {event_seq} would leave a gap in {store} "
            f"(next event_seq is {next_event_seq}); nothing was written: let the repair "
            "worker copy the session from the primary"
        )
        self.session_id = session_id
        self.event_seq = event_seq
        self.next_event_seq = next_event_seq


class SchemaError(MemshiftError):
    """The PostgreSQL schema is missing or older than this code expects."""

    exit_code = 7


class StoreUnavailable(MemshiftError):
    """A store could not be reached; the message names it (never with a password)."""

    exit_code = 8
