"""The Redis layout of LangGraph's ``RedisSaver`` checkpointer (langgraph-checkpoint-redis).

Keys, as RedisSaver 0.5 writes them (``{p}`` is its ``checkpoint_prefix``, default
``checkpoint``; an empty namespace is stored as ``__empty__``):

===============================================  ==========  ==========================
key                                              type        content
===============================================  ==========  ==========================
``{p}:{thread}:{ns}:{checkpoint_id}``            RedisJSON   a checkpoint, channel
                                                             values inline, its parent
``{p}_latest:{thread}:{ns}``                     string      the key of the latest
                                                             checkpoint
``checkpoint_write:{thread}:{ns}:{id}:{task}:    RedisJSON   one pending write, its
{idx}``                                                      value base64-encoded
``write_keys_zset:{thread}:{ns}:{id}``           sorted set  the write keys of a
                                                             checkpoint
===============================================  ==========  ==========================

A memshift **session** is one namespace of one thread: the thread id for the root
graph (``ns`` empty), ``{thread}:{ns}`` for a subgraph's namespace, as in the pointer
key. Sessions are found by SCAN over the latest pointers (``{p}_latest:*``). One
session is read by one Lua script (``lua/read_thread.lua``): the latest checkpoint,
then each parent, with each checkpoint's pending writes from its write registry.
Documents are read with ``JSON.GET`` where RedisJSON holds them, and with ``GET``
where they are strings (the tests load saved fixtures so, on a Redis without
modules). How documents map to the model is in
:mod:`~memshift.stores.layouts.langgraph.documents`.

What this read cannot see: checkpoints that are not ancestors of the latest (the
branch a fork left behind, after ``update_state`` from an older checkpoint), and
writes that no write registry lists (RedisSaver registers them since it has a key
registry; a checkpoint marked ``has_writes`` without one is refused, saying so).
Finding those would take RediSearch, which this layout does not use.

In PostgreSQL, memshift's tables stay the truth and langgraph-checkpoint-postgres'
tables are kept from them (:mod:`~memshift.stores.layouts.langgraph.projection`).

The layout only reads: the application writes checkpoints with LangGraph's own
saver, and a memshift write to this layout raises :class:`NotInLayout`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, NoReturn

import psycopg

from memshift.model import Checkpoint, Message, Session, SessionState, ToolRun, placeholder_session
from memshift.stores.layouts import NotInLayout, ScriptCall
from memshift.stores.layouts.framework import (
    MEMSHIFT_DEFAULT_PREFIX,
    FrameworkLayout,
    escape_glob,
    invalid,
    with_expiry,
)
from memshift.stores.layouts.langgraph import projection
from memshift.stores.layouts.langgraph.documents import (
    EMPTY_NS,
    DocumentError,
    checkpoint_from_document,
    write_from_document,
)

__all__ = ["DEFAULT_PREFIX", "REGISTRY_PREFIX", "LangGraphLayout", "NotInLayout"]

DEFAULT_PREFIX = "checkpoint"  # RedisSaver's default checkpoint_prefix
REGISTRY_PREFIX = "write_keys_zset"  # fixed in langgraph-checkpoint-redis
_PROBLEMS = {
    "ambiguous": "both {0!r} and {1!r} exist: the session id names a thread's root "
                 "namespace and another thread's subgraph namespace at once",
    "wrongtype": "key {0!r} is a Redis {1}, not what RedisSaver writes there",
    "dangling": "pointer {0!r} names checkpoint {1!r}, which does not exist",
    "notjson": "key {0!r} does not hold a checkpoint document (JSON with thread_id, "
               "checkpoint_ns and checkpoint_id)",
    "cycle": "the checkpoint chain comes back to {0!r}: a parent cycle",
    "unindexed": "checkpoint {0!r} has writes (has_writes) but no write registry lists "
                 "them; they can only be found with RediSearch",
}


@cache
def _script() -> str:
    return (Path(__file__).parent / "lua" / "read_thread.lua").read_text(encoding="utf-8")


class LangGraphLayout(FrameworkLayout):
    """Threads as LangGraph's ``RedisSaver`` keeps them: one session per namespace."""

    name = "langgraph"
    scan_type = "string"
    tool_runs = "pending writes"

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = DEFAULT_PREFIX if prefix == MEMSHIFT_DEFAULT_PREFIX else prefix
        self.pointer_prefix = f"{self.prefix}_latest:"

    def prepare_postgres(self, conn: psycopg.Connection[Any]) -> None:
        """Install the checkpoint projection unless one is installed."""
        if projection.installed(conn) is None:
            projection.install(conn)

    # -- keys -------------------------------------------------------------------------

    def script_dir(self) -> Path:
        return Path(__file__).parent / "lua"

    def session_keys(self, session_id: str) -> list[str]:
        return [f"{self.pointer_prefix}{session_id}:{EMPTY_NS}",
                f"{self.pointer_prefix}{session_id}"]

    def scan_pattern(self) -> str:
        return escape_glob(self.pointer_prefix) + "*"

    def session_id_from_key(self, key: bytes) -> str | None:
        # Invalid UTF-8 is kept (as lone surrogates) so that the caller quarantines the
        # session with its id escaped.
        text = key.decode("utf-8", "surrogateescape")
        if not text.startswith(self.pointer_prefix):
            return None
        rest = text[len(self.pointer_prefix):]
        if rest.endswith(f":{EMPTY_NS}"):
            rest = rest[: -len(EMPTY_NS) - 1]
        return rest or None

    # -- reads ------------------------------------------------------------------------

    def read_commands(self, session_id: str) -> list[tuple[Any, ...]]:
        return [("EVAL", _script(), 0, *self.session_keys(session_id), self.prefix,
                 REGISTRY_PREFIX)]

    def decode(self, session_id: str, replies: list[Any]) -> SessionState | None:
        (reply,) = replies
        status = _str(reply[0])
        if status == "missing":
            return None
        if status != "ok":
            raise invalid(session_id, f"key {_str(reply[1])!r}",
                          _PROBLEMS[status].format(*map(_str, reply[1:])))
        pttl = reply[2]
        checkpoints: list[Checkpoint] = []
        runs: list[ToolRun] = []
        for at in range(3, len(reply), 3):
            key, text, writes = _str(reply[at]), reply[at + 1], reply[at + 2]
            checkpoint = self._read(session_id, key, lambda t=text, w=f"key {key!r}":
                                    checkpoint_from_document(session_id, t, w))
            checkpoints.append(checkpoint)
            for w in range(0, len(writes), 2):
                write_key = _str(writes[w])
                runs.append(self._read(session_id, write_key,
                                       lambda t=writes[w + 1], c=checkpoint, k=write_key:
                                       write_from_document(session_id, t, c, f"key {k!r}")))
        checkpoints.reverse()  # oldest first, as every store lists them
        session = placeholder_session(session_id, [c.created_at for c in checkpoints])
        return SessionState(session=with_expiry(session, pttl), checkpoints=tuple(checkpoints),
                            tool_runs=tuple(sorted(runs, key=lambda r: r.tool_call_id)))

    @staticmethod
    def _read(session_id: str, key: str, build: Any) -> Any:
        try:
            return build()
        except DocumentError as exc:
            raise invalid(session_id, f"key {key!r}", str(exc)) from None

    def message_from_reply(self, session_id: str, seq: int, raw: bytes) -> Message:
        self.refuse(session_id, "messages")

    # -- writes: LangGraph writes these keys, memshift only reads them ------------------

    def refuse(self, session_id: str, what: str) -> NoReturn:
        raise NotInLayout(
            f"session {session_id!r}: the langgraph layout only reads RedisSaver's keys, "
            f"so memshift does not write {what} to it; nothing was written. Write with "
            "LangGraph's own saver: RedisSaver until the switch, PostgresSaver after it. "
            "A thread RedisSaver changes after its backfill reaches PostgreSQL when "
            "`memshift --layout langgraph backfill` runs again, once the graph has stopped "
            "writing Redis"
        )

    def save_session(self, session: Session, ttl_ms: int) -> ScriptCall:
        self.refuse(session.session_id, "a session record")

    def append_message(self, session_id: str, message: Message, ttl_ms: int) -> ScriptCall:
        self.refuse(session_id, "messages")


def _str(value: Any) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
