"""The Redis layout of LlamaIndex's ``RedisChatStore`` (llama-index-storage-chat-store-redis).

=====================  ======  =====================================================
key                    type    content
=====================  ======  =====================================================
``{key_prefix}{sid}``  LIST    ``ChatMessage.model_dump_json()`` per message,
                               RPUSHed: oldest first. ``EXPIRE key ttl`` after
                               every push when the store has a ``ttl``.
=====================  ======  =====================================================

RedisChatStore adds no prefix: the key is the ``chat_store_key`` the application
chose. memshift's ``prefix`` is the part every such key starts with, followed by
``:`` (``--prefix chat`` reads ``chat:*``); memshift's default prefix ``agent``, or
an empty one, stands for no prefix at all, and then every LIST of the database is
taken for a chat (a list that is not one is quarantined, saying why). A message's
seq is its index in the list; how its fields map to the model is in
:mod:`~memshift.stores.layouts.llamaindex.messages`. The session record is the
placeholder every store reports for a session it holds only parts of, with the
key's TTL as its expiry.

In PostgreSQL, memshift's tables stay the truth and llama-index-storage-chat-store-
postgres' table is kept from them
(:mod:`~memshift.stores.layouts.llamaindex.projection`);
:meth:`LlamaIndexLayout.prepare_postgres` installs that projection, and backfill
calls it before it copies anything.

LlamaIndex stores only messages: writing a tool run, summary, checkpoint or status
raises :class:`NotInLayout` before anything is sent. ``save_session`` writes nothing
(there is no session record) but replies ``applied``, so that a router passes the
session on to PostgreSQL.

``delete_message``, ``delete_last_message`` and ``add_message(idx=...)`` rewrite the
list and shift the seqs of the messages after the change: do not call them on a
session while it is being migrated.
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
from memshift.stores.layouts.llamaindex import projection
from memshift.stores.layouts.llamaindex.messages import ROLES, fields_from_dict, to_json
from memshift.stores.layouts.llamaindex.projection import DEFAULT_TABLE
from memshift.stores.layouts.projection import Drift

__all__ = ["ID_CHECK_WINDOW", "LlamaIndexLayout", "NotInLayout"]


class LlamaIndexLayout(ChatListLayout):
    """Sessions as ``RedisChatStore`` keeps them: one LIST per chat_store_key."""

    name = "llamaindex"
    keeper = "RedisChatStore"
    newest_first = False
    roles = ROLES
    role_kind = "a LlamaIndex MessageRole"

    def __init__(self, prefix: str = "", *, table: str = DEFAULT_TABLE) -> None:
        self.prefix = "" if prefix == MEMSHIFT_DEFAULT_PREFIX else prefix
        self.key_prefix = f"{self.prefix}:" if self.prefix else ""
        self.table = table

    def prepare_postgres(self, conn: psycopg.Connection[Any]) -> None:
        """Install the chat store projection (into ``table``) unless one is installed.

        An installed projection must use this layout's key prefix: its keys would not
        be the ones the application gives PostgresChatStore otherwise.
        """
        found = projection.installed(conn)
        if found is None:
            projection.install(conn, self.table, key_prefix=self.key_prefix)
        elif found.key_prefix != self.key_prefix:
            raise projection.ProjectionError(
                f"the llamaindex projection writes keys with prefix {found.key_prefix!r}, "
                f"but this layout reads keys with prefix {self.key_prefix!r}; use the same "
                "--prefix, or run uninstall() first"
            )

    def projection_drift(self, conn: psycopg.Connection[Any],
                         session_ids: Sequence[str]) -> dict[str, Drift] | None:
        """Sessions whose chat store rows differ from the truth (parity's projection check)."""
        found = projection.installed(conn)
        return None if found is None else projection.drifted(conn, found, session_ids)

    def script_dir(self) -> Path:
        return Path(__file__).parent / "lua"

    def entry_fields(self, entry: Any, seq: int) -> dict[str, Any]:
        return fields_from_dict(entry, seq)

    def entry_json(self, message: Message) -> str:
        return to_json(message)
