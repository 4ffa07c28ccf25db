"""A LangChain chat history that migrates: construct it instead of RedisChatMessageHistory.

Before::

    def get_session_history(session_id: str) -> BaseChatMessageHistory:
        return RedisChatMessageHistory(session_id, url=REDIS_URL, ttl=3600)

During the migration (one router for the process, built once)::

    router = MigratingStore(
        RedisStore(REDIS_URL, layout=LangChainLayout(), ttl_seconds=3600),
        PostgresStore(POSTGRES_DSN),
        PlanWatcher(POSTGRES_DSN),
    )

    def get_session_history(session_id: str) -> BaseChatMessageHistory:
        return MigratingChatMessageHistory(session_id, router)

An application on LangChain's async methods (``ainvoke``, ``astream``, or
``aget_messages``/``aadd_messages`` directly) gives it the async router instead,
built inside the event loop; the same class then serves the async methods without a
thread, as langchain-postgres' history does with an ``async_connection``::

    router = AsyncMigratingStore(
        AsyncRedisStore(REDIS_URL, layout=LangChainLayout(), ttl_seconds=3600),
        AsyncPostgresStore(POSTGRES_DSN),
        AsyncPlanWatcher(POSTGRES_DSN),
    )
    chain = RunnableWithMessageHistory(
        runnable, lambda session_id: MigratingChatMessageHistory(session_id, router))
    await chain.ainvoke(inputs, config={"configurable": {"session_id": "user-42"}})

Over the sync router the async methods run the sync ones in a thread (LangChain's
default); over the async router the sync ones are refused, saying which to call.

After the migration::

    def get_session_history(session_id: str) -> BaseChatMessageHistory:
        return PostgresChatMessageHistory("chat_history", str(session_uuid(session_id)),
                                          sync_connection=conn)

Every call goes through the router, so it follows the Plan: writes to the primary
and then the secondary (a failed secondary write is queued for repair, never an
error), reads from the store the Plan names for the read path (``history`` unless
given) and the session's cohort, rollback at once. The Redis keys stay in
LangChain's format, so a process still on RedisChatMessageHistory reads what this
one writes while Redis is the primary; in PostgreSQL, langchain-postgres' table is
kept from the truth (see :mod:`memshift.stores.layouts.langchain.projection`).

``clear()`` and ``aclear()`` are refused (:class:`ClearRefused`): the transcript is append-only in
memshift, and a history deleted in one store but not the other would break sessions
mid-migration.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage, message_to_dict, messages_from_dict

from memshift.errors import ConfigError, MemshiftError, SessionNotFound, ValidationError
from memshift.model import Message, Session, SessionState, check_session_id, now, parse
from memshift.stores.layouts.langchain import session_uuid
from memshift.stores.layouts.langchain.messages import fields_from_dict, to_dict
from memshift.stores.migrating import AsyncMigratingStore, MigratingStore

__all__ = ["ClearRefused", "MigratingChatMessageHistory", "session_uuid"]

DEFAULT_READ_PATH = "history"
# What to await instead of each sync member that an async router refuses.
_ASYNC_TWINS = {"messages": "aget_messages", "add_messages": "aadd_messages"}


class ClearRefused(MemshiftError):
    """``clear()`` during a migration: memshift keeps every message of a session."""


class MigratingChatMessageHistory(BaseChatMessageHistory):
    """LangChain's chat history interface over a :class:`MigratingStore` or an
    :class:`AsyncMigratingStore`.

    ``store`` is a router whose Redis store has the langchain layout: a sync one for
    ``messages``/``add_messages`` (the async methods then run them in a thread), an
    async one for ``aget_messages``/``aadd_messages``. ``read_path`` names the slice
    its reads belong to (``memshift slice set history --percent N``); ``tenant_id``,
    when given, is the tenant for tenant allow/deny lists and for the session record
    of a session created while PostgreSQL is the primary.
    """

    def __init__(
        self,
        session_id: str,
        store: MigratingStore | AsyncMigratingStore,
        *,
        read_path: str = DEFAULT_READ_PATH,
        tenant_id: str | None = None,
    ) -> None:
        self.session_id = check_session_id(session_id)
        self.read_path = read_path
        self.tenant_id = tenant_id
        self._store = store

    @property
    def messages(self) -> list[BaseMessage]:
        """The transcript, oldest first, from the store the Plan names for this read."""
        state = self._sync("messages").load_session(
            self.session_id, read_path=self.read_path, tenant_id=self.tenant_id
        )
        return _langchain_messages(state)

    @messages.setter
    def messages(self, value: list[BaseMessage]) -> None:
        raise NotImplementedError("assign no messages; add them with add_messages()")

    async def aget_messages(self) -> list[BaseMessage]:
        """:attr:`messages`, awaiting the async router (or in a thread over a sync one)."""
        if not isinstance(self._store, AsyncMigratingStore):
            return await super().aget_messages()
        state = await self._store.load_session(
            self.session_id, read_path=self.read_path, tenant_id=self.tenant_id
        )
        return _langchain_messages(state)

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append each message, in order, through the router."""
        store = self._sync("add_messages")
        for message in messages:
            record = self._record(message)
            try:
                store.append_message(self.session_id, record)
            except SessionNotFound:
                store.save_session(self._new_session())
                store.append_message(self.session_id, record)

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """:meth:`add_messages`, awaiting the async router (or in a thread over a sync one)."""
        if not isinstance(self._store, AsyncMigratingStore):
            await super().aadd_messages(messages)
            return
        for message in messages:
            record = self._record(message)
            try:
                await self._store.append_message(self.session_id, record)
            except SessionNotFound:
                await self._store.save_session(self._new_session())
                await self._store.append_message(self.session_id, record)

    def clear(self) -> None:
        raise self._clear_refused()

    async def aclear(self) -> None:
        raise self._clear_refused()

    def _clear_refused(self) -> ClearRefused:
        return ClearRefused(
            f"session {self.session_id!r}: clear() would delete a history that memshift "
            "keeps in two stores while it migrates them; start a new session id instead, "
            "or clear it after the migration with PostgresChatMessageHistory"
        )

    def _sync(self, method: str) -> MigratingStore:
        """The sync router, or a ConfigError saying to use the async method instead."""
        if isinstance(self._store, AsyncMigratingStore):
            raise ConfigError(
                f"session {self.session_id!r}: {method} is sync, but this history was "
                f"given an AsyncMigratingStore; await {_ASYNC_TWINS[method]}() instead "
                "(RunnableWithMessageHistory does with ainvoke and astream), or give it "
                "a MigratingStore"
            )
        return self._store

    def _new_session(self) -> Session:
        # PostgreSQL is the primary and this session is new: it is created, as Redis
        # creates a list on the first push (a racing creator makes this a no-op).
        return Session(session_id=self.session_id, tenant_id=self.tenant_id)

    def _record(self, message: BaseMessage) -> Message:
        # What LangChain's own stores hold: the message as JSON (tuples become lists).
        entry = json.loads(json.dumps(message_to_dict(message)))
        where = "add_messages"
        try:
            fields = fields_from_dict(entry, 0)
        except ValueError as exc:
            raise ValidationError(f"session {self.session_id!r}, {where}: {exc}",
                                  session_id=self.session_id, where=where) from None
        fields.update(seq=None, message_id=uuid.uuid4().hex, ts=now())
        record: Message = parse(Message, fields, session_id=self.session_id, where=where)
        return record



def _langchain_messages(state: SessionState | None) -> list[BaseMessage]:
    return [] if state is None else messages_from_dict([to_dict(m) for m in state.messages])
