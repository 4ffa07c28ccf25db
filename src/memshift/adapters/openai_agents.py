"""An OpenAI Agents SDK session that migrates: construct it instead of RedisSession.

Before::

    session = RedisSession.from_url(conversation_id, url=REDIS_URL, ttl=3600)
    result = await Runner.run(agent, "Hello", session=session)

During the migration (one router for the process, built once, inside the event loop)::

    router = AsyncMigratingStore(
        AsyncRedisStore(REDIS_URL, layout=OpenAIAgentsLayout(), ttl_seconds=3600),
        AsyncPostgresStore(POSTGRES_DSN),
        AsyncPlanWatcher(POSTGRES_DSN),
    )
    session = MigratingSession(conversation_id, router)
    result = await Runner.run(agent, "Hello", session=session)

After the migration::

    session = SQLAlchemySession.from_url(conversation_id, url=SQLALCHEMY_URL)

It implements the SDK's ``Session`` protocol. Every call goes through the router, so
it follows the Plan (writes to the primary, then the secondary or the repair queue;
reads from the store the Plan names; rollback at once). The Redis keys stay the
SDK's, so a process still on RedisSession reads what this one writes while Redis is
the primary; in PostgreSQL, the SDK's tables are kept from the truth (see
:mod:`memshift.stores.layouts.openai_agents.projection`).

Items have no room for an id, so an item's id is its seq: ``add_items`` reads the
session's length from the primary (read path ``openai-agents-append``: never cut it
over) and writes each item at the next seq; if another writer took that seq first,
it reads the length again and goes on. ``pop_item`` and ``clear_session`` are
refused (:class:`HistoryRewriteRefused`): memshift keeps a transcript append-only,
and a rewrite in one store but not the other breaks sessions mid-migration. (The
SDK only pops on its own to undo a retried turn, best effort: it logs and goes on.)
"""

from __future__ import annotations

import json
from typing import Any

from agents.items import TResponseInputItem
from agents.memory.session_settings import SessionSettings, resolve_session_limit

from memshift.errors import MemshiftError, MessageConflict, SeqGap, ValidationError
from memshift.model import Message, parse
from memshift.stores.layouts.openai_agents.items import fields_from_item, to_item
from memshift.stores.migrating import AsyncMigratingStore

__all__ = ["APPEND_READ_PATH", "HistoryRewriteRefused", "MigratingSession"]

DEFAULT_READ_PATH = "history"
# Where add_items reads the session's length: a read path no slice should name, so
# that the router serves it from the primary, which assigns the seqs.
APPEND_READ_PATH = "openai-agents-append"
# How many times add_items reads the length again when other writers take its seqs.
_MAX_ROUNDS = 8


class HistoryRewriteRefused(MemshiftError):
    """``pop_item`` or ``clear_session`` during a migration: the transcript is append-only."""


class MigratingSession:
    """The SDK's ``Session`` protocol over an :class:`AsyncMigratingStore`.

    ``store`` is a router whose Redis store has the openai-agents layout. Reads use
    ``read_path`` (``memshift slice set history --percent N`` cuts them over);
    ``tenant_id``, when given, is the tenant for tenant allow/deny lists.
    """

    def __init__(
        self,
        session_id: str,
        store: AsyncMigratingStore,
        *,
        read_path: str = DEFAULT_READ_PATH,
        tenant_id: str | None = None,
        session_settings: SessionSettings | None = None,
    ) -> None:
        self.session_id = session_id
        self.session_settings = session_settings
        self.read_path = read_path
        self.tenant_id = tenant_id
        self._store = store

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The history in order; with a limit, its latest ``limit`` items."""
        state = await self._store.load_session(
            self.session_id, read_path=self.read_path, tenant_id=self.tenant_id)
        items: list[Any] = [] if state is None else [to_item(m) for m in state.messages]
        wanted = resolve_session_limit(limit, self.session_settings)
        if wanted is None:
            return items
        return items[-wanted:] if wanted > 0 else []

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append the items in order, each at the next seq of the primary."""
        pending = [json.loads(json.dumps(item)) for item in items]  # as the SDK stores them
        for _ in range(_MAX_ROUNDS):
            seq = await self._length()
            try:
                while pending:
                    await self._store.append_message(self.session_id,
                                                     self._record(pending[0], seq))
                    pending.pop(0)
                    seq += 1
                return
            except (MessageConflict, SeqGap):
                continue  # another writer took this seq: count again
        raise MemshiftError(
            f"session {self.session_id!r}: {len(pending)} item(s) not added, other writers "
            f"took their seqs {_MAX_ROUNDS} times in a row, or the primary store lacks "
            "messages that the other holds (run `memshift repair`); retry the call"
        )

    async def pop_item(self) -> TResponseInputItem | None:
        raise HistoryRewriteRefused(
            f"session {self.session_id!r}: pop_item() would remove an item that memshift "
            "keeps in two stores while it migrates them; add a correcting item instead"
        )

    async def clear_session(self) -> None:
        raise HistoryRewriteRefused(
            f"session {self.session_id!r}: clear_session() would delete a history that "
            "memshift keeps in two stores while it migrates them; start a new session id "
            "instead, or clear it after the migration with SQLAlchemySession"
        )

    async def _length(self) -> int:
        state = await self._store.load_session(
            self.session_id, read_path=APPEND_READ_PATH, tenant_id=self.tenant_id)
        return 0 if state is None else state.message_count

    def _record(self, item: Any, seq: int) -> Message:
        where = "add_items"
        try:
            fields = fields_from_item(item, seq)
        except ValueError as exc:
            raise ValidationError(f"session {self.session_id!r}, {where}: item {exc}",
                                  session_id=self.session_id, where=where) from None
        record: Message = parse(Message, fields, session_id=self.session_id, where=where)
        return record
