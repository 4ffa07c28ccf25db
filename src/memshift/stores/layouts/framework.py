"""What the layouts of a framework's own keys share (LangChain, LlamaIndex, the OpenAI
Agents SDK, LangGraph): such keys hold only some parts of a session, so writes of the
other parts are refused before anything is sent (:class:`FrameworkLayout`), and a
session record is a placeholder whose expiry is its key's TTL (:func:`with_expiry`).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, ClassVar, NoReturn

from memshift.errors import ValidationError
from memshift.model import (
    Checkpoint,
    MemorySummary,
    Session,
    StatusChange,
    ToolRun,
    now,
)
from memshift.stores.layouts import NotInLayout, ScriptCall

# memshift's default prefix; each framework layout reads it as its framework's default.
MEMSHIFT_DEFAULT_PREFIX = "agent"
_GLOB = re.compile(r"([*?\[\]\\])")


def escape_glob(text: str) -> str:
    """``text`` with the characters SCAN MATCH reads as a pattern escaped."""
    return _GLOB.sub(r"\\\1", text)


def with_expiry(session: Session, pttl: Any) -> Session:
    """The session expiring when its key does, given the key's PTTL reply."""
    if isinstance(pttl, int) and pttl > 0:
        return session.model_copy(update={"expires_at": now() + timedelta(milliseconds=pttl)})
    return session


def invalid(session_id: str, where: str, problem: str) -> ValidationError:
    """The error for a stored record that cannot be read, naming where it is."""
    return ValidationError(f"session {session_id!r}, {where}: {problem}",
                           session_id=session_id, where=where)


class FrameworkLayout:
    """The refusals of a layout whose keys hold only some parts of a session.

    A subclass says who keeps the keys (``keeper``) and what they hold (``kept``), and
    overrides the methods of the parts it does hold.
    """

    name: str
    keeper: ClassVar[str]  # e.g. "RedisChatStore", as the refusal names it
    kept: ClassVar[str] = "messages"
    tool_runs: ClassVar[str] = "tool runs"  # what the framework calls them
    holds_every_part: ClassVar[bool] = False  # the router checks writes against it first

    def refuse(self, session_id: str, what: str) -> NoReturn:
        raise NotInLayout(
            f"session {session_id!r}: the {self.name} layout has no place for {what} "
            f"({self.keeper} keeps only {self.kept}); nothing was written. Keep such "
            f"state in the reference layout, or write only {self.kept} to this one"
        )

    def session_from_reply(self, session_id: str, fields: Any, ttl: Any) -> Session:
        self.refuse(session_id, "a session record")

    def tool_run_from_reply(self, session_id: str, tool_call_id: str, raw: bytes) -> ToolRun:
        self.refuse(session_id, self.tool_runs)

    def upsert_tool_run(self, session_id: str, run: ToolRun, ttl_ms: int) -> ScriptCall:
        self.refuse(session_id, self.tool_runs)

    def replace_tool_run(
        self, session_id: str, run: ToolRun, expected: bytes, merged: ToolRun, ttl_ms: int
    ) -> ScriptCall:
        self.refuse(session_id, self.tool_runs)

    def put_summary(self, session_id: str, summary: MemorySummary, ttl_ms: int) -> ScriptCall:
        self.refuse(session_id, "memory summaries")

    def put_checkpoint(self, session_id: str, checkpoint: Checkpoint, ttl_ms: int) -> ScriptCall:
        self.refuse(session_id, "checkpoints")

    def set_status(
        self, session_id: str, status: str, at: str, data: str, ttl_ms: int
    ) -> ScriptCall:
        self.refuse(session_id, "a session status")

    def apply_status_change(self, change: StatusChange, ttl_ms: int) -> ScriptCall:
        self.refuse(change.session.session_id, "a session status")
