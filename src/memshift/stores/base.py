"""The one Store protocol, sync and async, with the same method names.

Writes carry the monotonic rules of DESIGN §2: a write never makes state older, so
any write may land any number of times, in any order, and the stores converge.
A message's ``seq`` is assigned by the primary (``None`` on a first write) and carried
as given on a replicated write. ``set_status`` is the primary's call: it checks the
transition, bumps the session version and records the event; the secondary receives
the result whole through ``apply_status_change``.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from memshift.model import (
    Checkpoint,
    MemorySummary,
    Message,
    Session,
    SessionState,
    StatusChange,
    ToolRun,
)


class Outcome(enum.StrEnum):
    """What a guarded write did."""

    APPLIED = "applied"  # the write changed the store
    UNCHANGED = "unchanged"  # the store already held exactly this
    STALE = "stale"  # the store holds something newer; the write was ignored


@runtime_checkable
class Store(Protocol):
    name: str

    def load_session(self, session_id: str) -> SessionState | None: ...
    def save_session(self, session: Session | Mapping[str, Any]) -> Outcome: ...
    def append_message(
        self, session_id: str, message: Message | Mapping[str, Any]
    ) -> Message: ...
    def upsert_tool_run(self, session_id: str, run: ToolRun | Mapping[str, Any]) -> ToolRun: ...
    def put_summary(
        self, session_id: str, summary: MemorySummary | Mapping[str, Any]
    ) -> Outcome: ...
    def put_checkpoint(
        self, session_id: str, checkpoint: Checkpoint | Mapping[str, Any]
    ) -> Outcome: ...
    def set_status(
        self,
        session_id: str,
        status: str,
        *,
        at: datetime | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> StatusChange: ...
    def apply_status_change(self, change: StatusChange) -> Outcome: ...
    def list_sessions(self, *, batch_size: int = 500) -> Iterator[str]: ...
    def close(self) -> None: ...


@runtime_checkable
class AsyncStore(Protocol):
    name: str

    async def load_session(self, session_id: str) -> SessionState | None: ...
    async def save_session(self, session: Session | Mapping[str, Any]) -> Outcome: ...
    async def append_message(
        self, session_id: str, message: Message | Mapping[str, Any]
    ) -> Message: ...
    async def upsert_tool_run(
        self, session_id: str, run: ToolRun | Mapping[str, Any]
    ) -> ToolRun: ...
    async def put_summary(
        self, session_id: str, summary: MemorySummary | Mapping[str, Any]
    ) -> Outcome: ...
    async def put_checkpoint(
        self, session_id: str, checkpoint: Checkpoint | Mapping[str, Any]
    ) -> Outcome: ...
    async def set_status(
        self,
        session_id: str,
        status: str,
        *,
        at: datetime | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> StatusChange: ...
    async def apply_status_change(self, change: StatusChange) -> Outcome: ...
    def list_sessions(self, *, batch_size: int = 500) -> AsyncIterator[str]: ...
    async def close(self) -> None: ...
