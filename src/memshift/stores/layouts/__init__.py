"""Redis layout adapters: how one team's Redis keys map to the memshift model.

A layout is sans-IO: it says which commands read a session and which Lua script
(with which keys and arguments) performs each guarded write, and it decodes replies
into model records. ``RedisStore`` runs the commands; so the sync and async stores
share every line of logic, and a new layout is one module.

Every guarded write of a layout is one Lua script (loaded once, called by SHA) that
replies with a list whose first element says what happened. The store interprets
the reply; the layout decodes the records a reply carries, because only the layout
knows how it encodes them. Replies, by script:

- ``save_session``, ``put_summary``, ``put_checkpoint``: ``[outcome]`` with outcome
  ``applied``, ``unchanged`` or ``stale``.
- ``append_message``: ``[appended, seq]``, ``[duplicate, seq, stored]``,
  ``[trimmed, seq]`` (below the trimmed part, cannot be checked: taken as a
  duplicate), ``[conflict, seq, stored, reason]`` (reason ``content`` or ``id``) or
  ``[gap, next_seq]``.
- ``upsert_tool_run``: ``[applied | unchanged, merged]`` or ``[compare, stored]`` when
  the script cannot order the two records itself; the store then merges in Python
  and writes the result only if the stored record is still ``stored``
  (:meth:`ScriptedLayout.replace_tool_run`), looping while it keeps changing.
- ``set_status`` (the primary's change): ``[applied, version, event_seq, from,
  session_fields, ttl_ms]`` with the session as it is afterwards, ``[missing]`` or
  ``[illegal, current]``.
- ``apply_status_change`` (a replicated change): ``[outcome]`` or
  ``[gap, next_event_seq]`` when the event would leave a gap (nothing written).
- any script: ``[invalid, key, field, what]`` when a stored value it must compare
  cannot be read; nothing was written.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import psycopg

from memshift.errors import ConfigError
from memshift.model import (
    Checkpoint,
    MemorySummary,
    Message,
    Session,
    SessionState,
    StatusChange,
    ToolRun,
)

LUA_LIBRARY = Path(__file__).resolve().parent / "lua" / "common.lua"
"""The Lua functions every layout's scripts share. Redis scripts cannot include code,
so :func:`script_text` puts the library in front of each script once, when it is
registered (then it is called by SHA)."""


@functools.cache
def script_text(folder: Path, name: str) -> str:
    """Script ``name`` of a layout's script folder, with the shared library in front."""
    body = (folder / f"{name}.lua").read_text(encoding="utf-8")
    return f"{LUA_LIBRARY.read_text(encoding='utf-8')}\n{body}"


class NotInLayout(ConfigError):
    """A write of state that the layout's keys have no place for; nothing was sent.

    (LangChain's keys hold only messages, for instance.) The message names the
    session and what could not be written.
    """


@dataclass(frozen=True)
class ScriptCall:
    """One guarded write: run ``script`` (a .lua file of the layout) with keys and args.

    ``written``, when given, is the value the script stores and replies with when it
    writes the record exactly as sent: a reply carrying these bytes needs no decoding.
    """

    script: str
    keys: list[str]
    args: list[Any]
    written: bytes | None = None


@dataclass(frozen=True)
class RawSession:
    """One session as read from Redis: its commands, raw replies, and what they mean."""

    session_id: str
    commands: list[tuple[Any, ...]]
    replies: list[Any]
    state: SessionState | None  # None when absent, or when ``error`` is set
    error: str | None  # why it cannot be read or validated


class Layout(Protocol):
    name: str
    prefix: str
    scan_type: str  # the Redis type of the keys that scan_pattern finds (SCAN TYPE)

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
        self, session_id: str, status: str, at: str, data: str, ttl_ms: int
    ) -> ScriptCall:
        """The primary's status change: check the move, bump the version, add the event."""
        ...

    def apply_status_change(self, change: StatusChange, ttl_ms: int) -> ScriptCall:
        """Replicate a status change that the primary made (event and session snapshot)."""
        ...

    def session_from_reply(self, session_id: str, fields: Any, ttl: Any) -> Session:
        """The session record from its stored fields (and TTL) as a reply carries them."""
        ...

    def message_from_reply(self, session_id: str, seq: int, raw: bytes) -> Message:
        """The stored message a reply carries (raise ValidationError naming the key)."""
        ...

    def tool_run_from_reply(self, session_id: str, tool_call_id: str, raw: bytes) -> ToolRun:
        """The stored tool run a reply carries (raise ValidationError naming the key)."""
        ...

    def replace_tool_run(
        self, session_id: str, run: ToolRun, expected: bytes, merged: ToolRun, ttl_ms: int
    ) -> ScriptCall:
        """``upsert_tool_run`` that writes ``merged`` if the stored record is ``expected``."""
        ...


@runtime_checkable
class PreparesPostgres(Protocol):
    """A layout that keeps tables of its own in PostgreSQL beside the truth (e.g. a
    framework's table, kept from the truth); backfill prepares them first."""

    def prepare_postgres(self, conn: psycopg.Connection[Any]) -> None:
        """Create what the layout needs in PostgreSQL; safe to run again."""
        ...


def get_layout(name: str, prefix: str = "agent") -> Layout:
    """The layout adapter called ``name``; raise ConfigError naming the known ones.

    A name ending in ``.toml`` is the path of a declarative layout's description.
    """
    from memshift.stores.layouts.declarative import load_layout
    from memshift.stores.layouts.langchain import LangChainLayout
    from memshift.stores.layouts.langgraph import LangGraphLayout
    from memshift.stores.layouts.llamaindex import LlamaIndexLayout
    from memshift.stores.layouts.openai_agents import OpenAIAgentsLayout
    from memshift.stores.layouts.reference import ReferenceLayout

    if name.endswith(".toml"):
        return load_layout(name, prefix)

    layouts: dict[str, Callable[[str], Any]] = {
        "reference": ReferenceLayout,
        # The reference layout with the session id as a hash tag, for Redis Cluster.
        "reference-hashtag": functools.partial(ReferenceLayout, hash_tag=True),
        # LangChain's RedisChatMessageHistory (langchain-community).
        "langchain": LangChainLayout,
        # The OpenAI Agents SDK's RedisSession (openai-agents).
        "openai-agents": OpenAIAgentsLayout,
        # LlamaIndex's RedisChatStore (llama-index-storage-chat-store-redis).
        "llamaindex": LlamaIndexLayout,
        # LangGraph's RedisSaver checkpointer (langgraph-checkpoint-redis), read only.
        "langgraph": LangGraphLayout,
    }
    if name not in layouts:
        raise ConfigError(
            f"unknown Redis layout {name!r}; known layouts: {', '.join(sorted(layouts))}, "
            "or the path of a layout description ending in .toml"
        )
    layout: Layout = layouts[name](prefix)
    return layout
