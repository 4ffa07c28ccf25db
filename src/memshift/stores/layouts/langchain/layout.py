"""The Redis layout of LangChain's ``RedisChatMessageHistory`` (langchain-community).

========================  ======  ==================================================
key                       type    content
========================  ======  ==================================================
``{key_prefix}{sid}``     LIST    ``json.dumps(message_to_dict(message))`` per message,
                                  LPUSHed: newest first. ``EXPIRE key ttl`` after
                                  every push when the history has a ``ttl``.
========================  ======  ==================================================

``key_prefix`` is LangChain's (default ``message_store:``); here it is the memshift
``prefix`` followed by ``:``, and memshift's default prefix ``agent`` stands for
LangChain's default ``message_store``. A message's seq is its place counted from the
oldest (``LLEN - 1 - index``); how its fields map to the model is in
:mod:`~memshift.stores.layouts.langchain.messages`. The session record is the
placeholder every store reports for a session it holds only parts of (status
``active``, version 0, as old as its oldest message), with the key's TTL as its
expiry.

In PostgreSQL, memshift's tables stay the truth and langchain-postgres' chat history
table is kept from them (:mod:`~memshift.stores.layouts.langchain.projection`);
:meth:`LangChainLayout.prepare_postgres` installs that projection, and backfill calls
it before it copies anything.

LangChain stores only messages. Tool runs, summaries, checkpoints and status changes
have no place in these keys: writing one raises :class:`NotInLayout` before anything
is sent. ``save_session`` writes nothing (there is no session record) but replies
``applied``, so that a router passes the session on to PostgreSQL.

LangChain never trims a history (``clear()`` deletes the key), so an LTRIM by other
code cannot be seen here and would shift the seqs: do not trim these lists while
migrating.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from memshift.model import Message
from memshift.stores.layouts import NotInLayout
from memshift.stores.layouts.chat_list import ID_CHECK_WINDOW, ChatListLayout
from memshift.stores.layouts.framework import MEMSHIFT_DEFAULT_PREFIX
from memshift.stores.layouts.langchain import projection
from memshift.stores.layouts.langchain.messages import LANGCHAIN_TYPES, fields_from_dict, to_json
from memshift.stores.layouts.langchain.projection import DEFAULT_TABLE
from memshift.stores.layouts.projection import Drift

__all__ = ["DEFAULT_PREFIX", "ID_CHECK_WINDOW", "LangChainLayout", "NotInLayout"]

# LangChain's default key_prefix, without its ':'; memshift's own default stands for it.
DEFAULT_PREFIX = "message_store"


class LangChainLayout(ChatListLayout):
    """Sessions as ``RedisChatMessageHistory`` keeps them: one LIST per session."""

    name = "langchain"
    keeper = "RedisChatMessageHistory"
    newest_first = True
    roles = LANGCHAIN_TYPES
    role_kind = "a LangChain message type"

    def __init__(self, prefix: str = DEFAULT_PREFIX, *, table: str = DEFAULT_TABLE) -> None:
        self.prefix = DEFAULT_PREFIX if prefix == MEMSHIFT_DEFAULT_PREFIX else prefix
        self.key_prefix = f"{self.prefix}:"
        self.table = table

    def prepare_postgres(self, conn: psycopg.Connection[Any]) -> None:
        """Install the chat history projection (into ``table``) unless one is installed."""
        if projection.installed(conn) is None:
            projection.install(conn, self.table)

    def projection_drift(self, conn: psycopg.Connection[Any],
                         session_ids: Sequence[str]) -> dict[str, Drift] | None:
        """Sessions whose chat history rows differ from the truth (parity's projection check)."""
        found = projection.installed(conn)
        return None if found is None else projection.drifted(conn, found, session_ids)

    def script_dir(self) -> Path:
        return Path(__file__).parent / "lua"

    def entry_fields(self, entry: Any, seq: int) -> dict[str, Any]:
        return fields_from_dict(entry, seq)

    def entry_json(self, message: Message) -> str:
        return to_json(message)
