"""Redis layout adapters: how one team's Redis keys map to the memshift model.

A layout is sans-IO: it says which commands read a session and which Lua script
(with which keys and arguments) performs each guarded write, and it decodes replies
into model records. ``RedisStore`` runs the commands; so the sync and async stores
share every line of logic, and a new layout is one module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from memshift.model import (
    Checkpoint,
    MemorySummary,
    Message,
    Session,
    SessionState,
    ToolRun,
)


@dataclass(frozen=True)
class ScriptCall:
    """One guarded write: run ``script`` (a .lua file of the layout) with keys and args."""

    script: str
    keys: list[str]
    args: list[Any]


class Layout(Protocol):
    name: str
    prefix: str

    def script_dir(self) -> Path:
        """Folder holding the layout's .lua files."""
        ...

    def scan_pattern(self) -> str:
        """SCAN MATCH pattern that finds candidate session keys (glob characters escaped)."""
        ...

    def session_id_from_key(self, key: bytes) -> str | None:
        """The session id a scanned key belongs to, or None when it is not a session key."""
        ...

    def session_keys(self, session_id: str) -> list[str]:
        """Every key that holds part of the session (for TTL refresh and deletion)."""
        ...

    def read_commands(self, session_id: str) -> list[tuple[Any, ...]]:
        """Commands whose replies, in order, make up the whole session."""
        ...

    def decode(self, session_id: str, replies: list[Any]) -> SessionState | None:
        """Build the session from the replies of ``read_commands``; None when absent."""
        ...

    def save_session(self, session: Session, ttl_ms: int) -> ScriptCall: ...
    def append_message(self, session_id: str, message: Message, ttl_ms: int) -> ScriptCall: ...
    def upsert_tool_run(self, session_id: str, run: ToolRun, ttl_ms: int) -> ScriptCall: ...
    def put_summary(
        self, session_id: str, summary: MemorySummary, ttl_ms: int
    ) -> ScriptCall: ...
    def put_checkpoint(
        self, session_id: str, checkpoint: Checkpoint, ttl_ms: int
    ) -> ScriptCall: ...
    def set_status(
        self,
        session_id: str,
        status: str,
        at: str,
        data: str,
        version: int | None,
        event_seq: int | None,
        ttl_ms: int,
    ) -> ScriptCall: ...


def get_layout(name: str, prefix: str = "agent") -> Layout:
    """The layout adapter called ``name``; raise ConfigError naming the known ones."""
    from memshift.errors import ConfigError
    from memshift.stores.layouts.reference import ReferenceLayout

    layouts: dict[str, type[Any]] = {"reference": ReferenceLayout}
    if name not in layouts:
        raise ConfigError(
            f"unknown Redis layout {name!r}; known layouts: {', '.join(sorted(layouts))}"
        )
    layout: Layout = layouts[name](prefix=prefix)
    return layout
