"""Each store operation through memshift against the same operation done by hand.

For PostgresStore and RedisStore (sync), every operation is timed three ways, in the
same run, on the same connections, interleaved round by round (the order flips each
round, so drift in the machine's speed cancels out):

- ``memshift``: the store's method, given the plain data an application has.
- ``by hand``: the same work with no memshift code: the exact named SQL statement of
  ``queries.sql`` with hand-built parameters, or the same Lua script (``layouts/lua/common.lua``
  in front, called by EVALSHA) with hand-built arguments, or the same pipelined read
  commands. ``memshift / by hand`` is memshift's own overhead (validation, records,
  JSON); the goal is at most 1.10x.
- ``naive``: what a legacy application does with no guards (RPUSH, HSET, SET,
  HGETALL + LRANGE; a plain INSERT or UPDATE). Shown for information.

Figures are medians over the rounds. It makes its own scratch database (dropped at
the end) and its own Redis key prefix (deleted at the end). See bench/README.md.

    .venv/bin/python bench/store_ops.py [--ops 1000] [--rounds 5] [--only OP] [--json]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import redis
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from rich.console import Console
from rich.table import Table

from memshift.model import legal_sources
from memshift.sql.migrations import upgrade
from memshift.sql.queries import query
from memshift.stores.layouts import LUA_LIBRARY
from memshift.stores.layouts.reference import ID_CHECK_WINDOW, ReferenceLayout
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore

GOAL = 1.10
POOL_SIZE = 2
OPERATIONS = (
    "load_session",
    "save_session",
    "append_message",
    "upsert_tool_run",
    "put_summary",
    "put_checkpoint",
    "set_status",
)
VARIANTS = ("memshift", "by_hand", "naive")
T0 = datetime(2026, 5, 19, 9, 0, tzinfo=UTC)
# set_status alternates between these two; the legal sources are what the by-hand
# code would hard-code.
STATUS_CYCLE = ("paused", "active")
LEGAL_FROM = {status: legal_sources(status) for status in STATUS_CYCLE}
TOOL_RANK = {"pending": 0, "running": 1, "retrying": 2, "succeeded": 3, "failed": 3}

Op = Callable[[int], object]
Maker = Callable[[str], Op]  # given a fresh session id, set up untimed and return the op


# -- the data an application hands over ---------------------------------------------


def _at(i: int) -> datetime:
    return T0 + timedelta(milliseconds=i)


def _iso(t: datetime) -> str:
    """Fixed-width ISO 8601 UTC, the form the reference layout stores (t is in UTC)."""
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def session_input(i: int) -> dict[str, Any]:
    return {
        "tenant_id": "tenant-3",
        "user_id": "user-417",
        "status": "active",
        "version": i + 1,
        "created_at": T0,
        "updated_at": _at(i),
        "metadata": {"model": "claude-x", "channel": "web", "locale": "de-DE"},
    }


def message_input(i: int) -> dict[str, Any]:
    words = "the agent looked up the order, checked the refund policy and replied — Grüße"
    return {
        "message_id": f"msg-{i:06d}",
        "role": ("user", "assistant")[i % 2],
        "content": f"Turn {i}: " + " ".join([words] * 4),
        "ts": _at(i),
    }


def tool_run_input(i: int) -> dict[str, Any]:
    return {
        "tool_call_id": f"call_{i % 5}",
        "name": "web_search",
        "args": {"query": f"refund for order #{i}", "limit": 10, "lang": "en"},
        "status": "running",
        "attempts": i // 5 + 1,
        "last_error": None,
        "updated_at": _at(i),
    }


def summary_input(i: int) -> dict[str, Any]:
    text = "The user asked for a refund; the agent checked the policy and the order. " * 8
    return {"version": i + 1, "text": text, "covers_through": i, "updated_at": _at(i)}


def checkpoint_input(i: int) -> dict[str, Any]:
    return {
        "checkpoint_id": f"ck-{i:06d}",
        "parent_id": f"ck-{i - 1:06d}" if i else None,
        "step": i,
        "state": {
            "plan": ["look up order", "check policy", "reply", "close"],
            "cursor": i % 4,
            "scratch": {"order": f"#{i}", "amount": 42.5, "currency": "EUR"},
        },
        "created_at": _at(i),
    }


INPUTS: dict[str, Callable[[int], dict[str, Any]]] = {
    "save_session": session_input,
    "append_message": message_input,
    "upsert_tool_run": tool_run_input,
    "put_summary": summary_input,
    "put_checkpoint": checkpoint_input,
}


NO_METADATA = Jsonb({})  # records without metadata, as memshift sends them


def content_hash(run: dict[str, Any]) -> str:
    body = json.dumps(
        [run["name"], run["args"], run["status"], run["last_error"]],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha1(body.encode("utf-8")).hexdigest()


def fill_session(store: PostgresStore | RedisStore, sid: str) -> None:
    """The session that load_session reads: 50 messages, 5 tool runs, summary,
    checkpoint and 10 status events."""
    store.save_session({"session_id": sid, **session_input(0)})
    for i in range(50):
        message = message_input(i)
        if i % 10 == 1:
            message["tool_call_id"] = f"call_{i // 10}"
        store.append_message(sid, message)
    for i in range(5):
        store.upsert_tool_run(sid, tool_run_input(i))
    store.put_summary(sid, summary_input(0))
    store.put_checkpoint(sid, checkpoint_input(0))
    for i in range(10):
        store.set_status(sid, STATUS_CYCLE[i % 2], at=_at(100 + i))


# -- PostgreSQL -----------------------------------------------------------------------

NAIVE_PG = {
    "load_session": [
        "SELECT * FROM memshift.sessions WHERE session_id = %(sid)s",
        "SELECT * FROM memshift.messages WHERE session_id = %(sid)s ORDER BY seq",
        "SELECT * FROM memshift.tool_runs WHERE session_id = %(sid)s",
        "SELECT * FROM memshift.summaries WHERE session_id = %(sid)s ORDER BY version",
        "SELECT * FROM memshift.checkpoints WHERE session_id = %(sid)s ORDER BY step",
        "SELECT * FROM memshift.events WHERE session_id = %(sid)s ORDER BY event_seq",
    ],
    "save_session": """
        INSERT INTO memshift.sessions
            (session_id, tenant_id, user_id, status, version, created_at, updated_at, metadata)
        VALUES (%(session_id)s, %(tenant_id)s, %(user_id)s, %(status)s, %(version)s,
                %(created_at)s, %(updated_at)s, %(metadata)s)
        ON CONFLICT (session_id) DO UPDATE SET
            tenant_id = excluded.tenant_id, user_id = excluded.user_id,
            status = excluded.status, version = excluded.version,
            updated_at = excluded.updated_at, metadata = excluded.metadata""",
    "append_message": """
        INSERT INTO memshift.messages (session_id, seq, message_id, role, content, ts)
        VALUES (%(session_id)s, %(seq)s, %(message_id)s, %(role)s, %(content)s, %(ts)s)""",
    "upsert_tool_run": """
        INSERT INTO memshift.tool_runs
            (session_id, tool_call_id, name, args, status, attempts, last_error, updated_at,
             content_hash)
        VALUES (%(session_id)s, %(tool_call_id)s, %(name)s, %(args)s, %(status)s,
                %(attempts)s, %(last_error)s, %(updated_at)s, '')
        ON CONFLICT (session_id, tool_call_id) DO UPDATE SET
            name = excluded.name, args = excluded.args, status = excluded.status,
            attempts = excluded.attempts, last_error = excluded.last_error,
            updated_at = excluded.updated_at""",
    "put_summary": """
        INSERT INTO memshift.summaries (session_id, version, text, covers_through, updated_at)
        VALUES (%(session_id)s, %(version)s, %(text)s, %(covers_through)s, %(updated_at)s)""",
    "put_checkpoint": """
        INSERT INTO memshift.checkpoints
            (session_id, checkpoint_id, parent_id, step, state, created_at)
        VALUES (%(session_id)s, %(checkpoint_id)s, %(parent_id)s, %(step)s, %(state)s,
                %(created_at)s)""",
    "set_status": """
        UPDATE memshift.sessions SET status = %(status)s, updated_at = %(at)s
         WHERE session_id = %(session_id)s""",
}


class PostgresCases:
    """The three variants of every operation against one PostgreSQL database."""

    def __init__(self, pool: ConnectionPool, store: PostgresStore, load_sid: str) -> None:
        self.pool = pool
        self.store = store
        self.load_sid = load_sid

    def _execute(self, statement: str | bytes, params: dict[str, Any]) -> list[Any]:
        with self.pool.connection() as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description is not None else []

    def _new_session(self, sid: str) -> None:
        self.store.save_session({"session_id": sid, **session_input(0), "version": 0})

    def makers(self, op: str) -> dict[str, Maker]:
        return {v: getattr(self, f"{v}_{op}") for v in VARIANTS}

    # load_session: every variant reads the same filled session.

    def memshift_load_session(self, sid: str) -> Op:
        return lambda i: self.store.load_session(self.load_sid)

    def by_hand_load_session(self, sid: str) -> Op:
        statement = query("load_session")

        def op(i: int) -> object:
            # The same statement, and the JSON it returns decoded, as any client must.
            session, *parts = self._execute(statement, {"session_id": self.load_sid})[0]
            return session, [json.loads(part) for part in parts]

        return op

    def naive_load_session(self, sid: str) -> Op:
        params = {"sid": self.load_sid}

        def op(i: int) -> object:
            with self.pool.connection() as conn:
                return [conn.execute(q, params).fetchall() for q in NAIVE_PG["load_session"]]

        return op

    # save_session: a newer version each time, so every write applies.

    def memshift_save_session(self, sid: str) -> Op:
        return lambda i: self.store.save_session({"session_id": sid, **session_input(i)})

    def by_hand_save_session(self, sid: str) -> Op:
        statement = query("save_session")

        def op(i: int) -> object:
            data = session_input(i)
            params = {
                **data,
                "session_id": sid,
                "metadata": Jsonb(data["metadata"]),
                "messages_trimmed": 0,
                "expires_at": None,
            }
            return self._execute(statement, params)

        return op

    def naive_save_session(self, sid: str) -> Op:
        def op(i: int) -> object:
            data = session_input(i)
            params = {**data, "session_id": sid, "metadata": Jsonb(data["metadata"])}
            return self._execute(NAIVE_PG["save_session"], params)

        return op

    # append_message: PostgreSQL assigns the seq (the primary's form).

    def memshift_append_message(self, sid: str) -> Op:
        self._new_session(sid)
        return lambda i: self.store.append_message(sid, message_input(i))

    def by_hand_append_message(self, sid: str) -> Op:
        self._new_session(sid)
        statement = query("append_message_assign")

        def op(i: int) -> object:
            params = {**message_input(i), "session_id": sid, "tool_call_id": None,
                      "metadata": NO_METADATA}
            return self._execute(statement, params)

        return op

    def naive_append_message(self, sid: str) -> Op:
        self._new_session(sid)

        def op(i: int) -> object:
            params = {**message_input(i), "session_id": sid, "seq": i}
            return self._execute(NAIVE_PG["append_message"], params)

        return op

    # upsert_tool_run: five runs, each write one attempt more, so each applies.

    def memshift_upsert_tool_run(self, sid: str) -> Op:
        return lambda i: self.store.upsert_tool_run(sid, tool_run_input(i))

    def by_hand_upsert_tool_run(self, sid: str) -> Op:
        statement = query("upsert_tool_run")

        def op(i: int) -> object:
            run = tool_run_input(i)
            params = {
                **run,
                "session_id": sid,
                "args": Jsonb(run["args"]),
                "content_hash": content_hash(run),
                "metadata": NO_METADATA,
            }
            return self._execute(statement, params)

        return op

    def naive_upsert_tool_run(self, sid: str) -> Op:
        def op(i: int) -> object:
            run = tool_run_input(i)
            params = {**run, "session_id": sid, "args": Jsonb(run["args"])}
            return self._execute(NAIVE_PG["upsert_tool_run"], params)

        return op

    # put_summary / put_checkpoint: a higher version / step each time.

    def memshift_put_summary(self, sid: str) -> Op:
        return lambda i: self.store.put_summary(sid, summary_input(i))

    def by_hand_put_summary(self, sid: str) -> Op:
        statement = query("put_summary")
        return lambda i: self._execute(
            statement, {**summary_input(i), "session_id": sid, "metadata": NO_METADATA}
        )

    def naive_put_summary(self, sid: str) -> Op:
        statement = NAIVE_PG["put_summary"]
        return lambda i: self._execute(statement, {**summary_input(i), "session_id": sid})

    def memshift_put_checkpoint(self, sid: str) -> Op:
        return lambda i: self.store.put_checkpoint(sid, checkpoint_input(i))

    def by_hand_put_checkpoint(self, sid: str) -> Op:
        return self._checkpoint_op(sid, query("put_checkpoint"))

    def naive_put_checkpoint(self, sid: str) -> Op:
        return self._checkpoint_op(sid, NAIVE_PG["put_checkpoint"])

    def _checkpoint_op(self, sid: str, statement: str | bytes) -> Op:
        def op(i: int) -> object:
            checkpoint = checkpoint_input(i)
            params = {**checkpoint, "session_id": sid, "state": Jsonb(checkpoint["state"]),
                      "metadata": NO_METADATA}
            return self._execute(statement, params)

        return op

    # set_status: active -> paused -> active ...

    def memshift_set_status(self, sid: str) -> Op:
        self._new_session(sid)
        return lambda i: self.store.set_status(sid, STATUS_CYCLE[i % 2], at=_at(i))

    def by_hand_set_status(self, sid: str) -> Op:
        self._new_session(sid)
        statement = query("set_status_assign")

        def op(i: int) -> object:
            status = STATUS_CYCLE[i % 2]
            params = {
                "session_id": sid,
                "to_status": status,
                "at": _at(i),
                "data": Jsonb({}),
                "legal_from": LEGAL_FROM[status],
            }
            return self._execute(statement, params)

        return op

    def naive_set_status(self, sid: str) -> Op:
        self._new_session(sid)
        statement = NAIVE_PG["set_status"]
        return lambda i: self._execute(
            statement, {"session_id": sid, "status": STATUS_CYCLE[i % 2], "at": _at(i)}
        )


# -- Redis ----------------------------------------------------------------------------


class RedisCases:
    """The three variants of every operation against one Redis key prefix."""

    def __init__(self, client: redis.Redis, store: RedisStore, prefix: str, load_sid: str) -> None:
        self.client = client
        self.store = store
        self.prefix = prefix
        self.load_sid = load_sid
        folder = ReferenceLayout(prefix).script_dir()
        common = LUA_LIBRARY.read_text(encoding="utf-8")
        self.scripts = {
            name: client.register_script(
                f"{common}\n{(folder / f'{name}.lua').read_text(encoding='utf-8')}"
            )
            for name in (
                "save_session",
                "append_message",
                "upsert_tool_run",
                "put_summary",
                "put_checkpoint",
                "set_status",
            )
        }

    def keys(self, sid: str) -> list[str]:
        base = f"{self.prefix}:session:{sid}"
        return [
            base,
            *(f"{base}:{c}" for c in ("messages", "tools", "summary", "checkpoint", "events")),
        ]

    def _new_session(self, sid: str) -> None:
        self.store.save_session({"session_id": sid, **session_input(0), "version": 0})

    def makers(self, op: str) -> dict[str, Maker]:
        return {v: getattr(self, f"{v}_{op}") for v in VARIANTS}

    # load_session

    def memshift_load_session(self, sid: str) -> Op:
        return lambda i: self.store.load_session(self.load_sid)

    def by_hand_load_session(self, sid: str) -> Op:
        h, messages, tools, summary, checkpoint, events = self.keys(self.load_sid)

        def op(i: int) -> object:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(h)
            pipe.lrange(messages, 0, -1)
            pipe.hgetall(tools)
            pipe.get(summary)
            pipe.get(checkpoint)
            pipe.xrange(events, "-", "+")
            pipe.pttl(h)
            fields, msgs, runs, summ, ckpt, evs, ttl = pipe.execute()
            # The same reads, and the JSON they return decoded, as any client must.
            return (
                fields,
                [json.loads(m) for m in msgs],
                {k: json.loads(v) for k, v in runs.items()},
                json.loads(summ),
                json.loads(ckpt),
                [(i, {k: v for k, v in e.items()}, json.loads(e[b"data"])) for i, e in evs],
                ttl,
            )

        return op

    def naive_load_session(self, sid: str) -> Op:
        h, messages, tools, summary, checkpoint, events = self.keys(self.load_sid)

        def op(i: int) -> object:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(h)
            pipe.lrange(messages, 0, -1)
            pipe.hgetall(tools)
            pipe.get(summary)
            pipe.get(checkpoint)
            pipe.xrange(events, "-", "+")
            fields, msgs, runs, summ, ckpt, evs = pipe.execute()
            # A legacy app needs the values as dicts.
            return (
                fields,
                [json.loads(m) for m in msgs],
                {k: json.loads(v) for k, v in runs.items()},
                json.loads(summ),
                json.loads(ckpt),
                evs,
            )

        return op

    # save_session

    def memshift_save_session(self, sid: str) -> Op:
        return lambda i: self.store.save_session({"session_id": sid, **session_input(i)})

    def by_hand_save_session(self, sid: str) -> Op:
        keys, script = self.keys(sid), self.scripts["save_session"]

        def op(i: int) -> object:
            data = session_input(i)
            version, updated, created = str(data["version"]), _iso(data["updated_at"]), _iso(T0)
            fields = [
                "tenant_id",
                data["tenant_id"],
                "user_id",
                data["user_id"],
                "status",
                data["status"],
                "version",
                version,
                "created_at",
                created,
                "updated_at",
                updated,
                "metadata",
                _dumps(data["metadata"]),
            ]
            args = [0, version, updated, created, "0", 7, *fields, "expires_at"]
            return script(keys=keys, args=args)

        return op

    def naive_save_session(self, sid: str) -> Op:
        h = self.keys(sid)[0]

        def op(i: int) -> object:
            data = session_input(i)
            mapping = {
                **data,
                "created_at": _iso(data["created_at"]),
                "updated_at": _iso(data["updated_at"]),
                "metadata": _dumps(data["metadata"]),
            }
            return self.client.hset(h, mapping=mapping)

        return op

    # append_message

    def memshift_append_message(self, sid: str) -> Op:
        self._new_session(sid)
        return lambda i: self.store.append_message(sid, message_input(i))

    def by_hand_append_message(self, sid: str) -> Op:
        self._new_session(sid)
        keys, script = self.keys(sid), self.scripts["append_message"]

        def op(i: int) -> object:
            m = message_input(i)
            body = {
                "id": m["message_id"],
                "role": m["role"],
                "content": m["content"],
                "ts": _iso(m["ts"]),
            }
            args = [0, _dumps(body), -1, m["message_id"], ID_CHECK_WINDOW]
            return script(keys=keys, args=args)

        return op

    def naive_append_message(self, sid: str) -> Op:
        self._new_session(sid)
        key = self.keys(sid)[1]

        def op(i: int) -> object:
            m = message_input(i)
            body = {
                "id": m["message_id"],
                "role": m["role"],
                "content": m["content"],
                "ts": _iso(m["ts"]),
            }
            return self.client.rpush(key, _dumps(body))

        return op

    # upsert_tool_run

    def memshift_upsert_tool_run(self, sid: str) -> Op:
        return lambda i: self.store.upsert_tool_run(sid, tool_run_input(i))

    def by_hand_upsert_tool_run(self, sid: str) -> Op:
        keys, script = self.keys(sid), self.scripts["upsert_tool_run"]

        def op(i: int) -> object:
            run = tool_run_input(i)
            updated = _iso(run["updated_at"])
            head = _dumps({"name": run["name"], "args": run["args"], "status": run["status"]})
            tail = _dumps({"last_error": run["last_error"], "updated_at": updated})
            args = [
                0,
                run["tool_call_id"],
                f'{head[:-1]},"attempts":',
                f",{tail[1:]}",
                run["attempts"],
                0,
                updated,
                TOOL_RANK[run["status"]],
                "",
                "",
            ]
            return script(keys=keys, args=args)

        return op

    def naive_upsert_tool_run(self, sid: str) -> Op:
        key = self.keys(sid)[2]

        def op(i: int) -> object:
            run = tool_run_input(i)
            body = {k: v for k, v in run.items() if k != "tool_call_id"}
            body["updated_at"] = _iso(run["updated_at"])
            return self.client.hset(key, run["tool_call_id"], _dumps(body))

        return op

    # put_summary / put_checkpoint

    def memshift_put_summary(self, sid: str) -> Op:
        return lambda i: self.store.put_summary(sid, summary_input(i))

    def by_hand_put_summary(self, sid: str) -> Op:
        keys, script = self.keys(sid), self.scripts["put_summary"]

        def op(i: int) -> object:
            s = summary_input(i)
            raw = _dumps({**s, "updated_at": _iso(s["updated_at"])})
            return script(keys=keys, args=[0, raw, str(s["version"])])

        return op

    def naive_put_summary(self, sid: str) -> Op:
        key = self.keys(sid)[3]

        def op(i: int) -> object:
            s = summary_input(i)
            return self.client.set(key, _dumps({**s, "updated_at": _iso(s["updated_at"])}))

        return op

    def memshift_put_checkpoint(self, sid: str) -> Op:
        return lambda i: self.store.put_checkpoint(sid, checkpoint_input(i))

    def by_hand_put_checkpoint(self, sid: str) -> Op:
        keys, script = self.keys(sid), self.scripts["put_checkpoint"]

        def op(i: int) -> object:
            c = checkpoint_input(i)
            raw = _dumps({**c, "created_at": _iso(c["created_at"])})
            return script(keys=keys, args=[0, raw, str(c["step"]), c["checkpoint_id"]])

        return op

    def naive_put_checkpoint(self, sid: str) -> Op:
        key = self.keys(sid)[4]

        def op(i: int) -> object:
            c = checkpoint_input(i)
            return self.client.set(key, _dumps({**c, "created_at": _iso(c["created_at"])}))

        return op

    # set_status

    def memshift_set_status(self, sid: str) -> Op:
        self._new_session(sid)
        return lambda i: self.store.set_status(sid, STATUS_CYCLE[i % 2], at=_at(i))

    def by_hand_set_status(self, sid: str) -> Op:
        self._new_session(sid)
        keys, script = self.keys(sid), self.scripts["set_status"]
        legal = {status: ",".join(sources) for status, sources in LEGAL_FROM.items()}

        def op(i: int) -> object:
            status = STATUS_CYCLE[i % 2]
            return script(keys=keys, args=[0, status, _iso(_at(i)), "{}", legal[status]])

        return op

    def naive_set_status(self, sid: str) -> Op:
        self._new_session(sid)
        h = self.keys(sid)[0]
        return lambda i: self.client.hset(
            h, mapping={"status": STATUS_CYCLE[i % 2], "updated_at": _iso(_at(i))}
        )


# -- measuring ------------------------------------------------------------------------


@dataclass
class Result:
    operation: str
    store: str
    memshift_us: float
    by_hand_us: float
    ratio_by_hand: float
    naive_us: float
    ratio_naive: float
    ratios_by_hand: list[float]  # one per round, to judge the spread

    @property
    def meets_goal(self) -> bool:
        return self.ratio_by_hand <= GOAL


def _time_us(op: Op, count: int) -> float:
    gc.collect()
    start = time.perf_counter_ns()
    for i in range(count):
        op(i)
    return (time.perf_counter_ns() - start) / count / 1000


def measure(
    store: str, operation: str, makers: dict[str, Maker], ops: int, rounds: int, warmup: int
) -> Result:
    """Median µs/op of each variant over ``rounds`` rounds, each on a fresh session.

    The variants take turns within a round, in reverse order every other round; the
    ratios are medians of the per-round ratios, so a slow patch hits all of them.
    """
    tag = f"{operation}-{secrets.token_hex(3)}"
    for variant, make in makers.items():
        _time_us(make(f"{tag}-{variant}-warmup"), warmup)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            times[variant].append(_time_us(makers[variant](f"{tag}-{variant}-r{r}"), ops))
    per_round = list(zip(times["memshift"], times["by_hand"], times["naive"], strict=True))
    return Result(
        operation=operation,
        store=store,
        memshift_us=statistics.median(times["memshift"]),
        by_hand_us=statistics.median(times["by_hand"]),
        ratio_by_hand=statistics.median(m / h for m, h, _ in per_round),
        naive_us=statistics.median(times["naive"]),
        ratio_naive=statistics.median(m / n for m, _, n in per_round),
        ratios_by_hand=[round(m / h, 3) for m, h, _ in per_round],
    )


# -- scratch resources ----------------------------------------------------------------


@contextmanager
def scratch_database(admin_dsn: str) -> Iterator[str]:
    name = f"memshift_bench_{secrets.token_hex(4)}"
    ident = sql.Identifier(name)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    try:
        dsn = make_conninfo(admin_dsn, dbname=name)
        upgrade(dsn)
        yield dsn
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


@contextmanager
def scratch_prefix(client: redis.Redis) -> Iterator[str]:
    prefix = f"memshift_bench_{secrets.token_hex(4)}"
    try:
        yield prefix
    finally:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)


# -- running and reporting ------------------------------------------------------------


def run(args: argparse.Namespace, progress: Console) -> list[Result]:
    warmup = min(args.ops, 200)
    stores: list[tuple[str, Callable[[str], dict[str, Maker]]]] = []
    results: list[Result] = []
    client = redis.Redis.from_url(args.redis_url, decode_responses=False)
    with (
        scratch_database(args.postgres_dsn) as dsn,
        ConnectionPool(
            dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, kwargs={"autocommit": True}, open=True
        ) as pool,
        scratch_prefix(client) as prefix,
    ):
        pool.wait(timeout=15)
        pg_store = PostgresStore(pool)
        redis_store = RedisStore(client, prefix=prefix)
        load_sid = "load-fixture"
        fill_session(pg_store, load_sid)
        fill_session(redis_store, load_sid)
        stores.append(("postgres", PostgresCases(pool, pg_store, load_sid).makers))
        stores.append(("redis", RedisCases(client, redis_store, prefix, load_sid).makers))
        for operation in args.operations:
            for store, makers in stores:
                started = time.perf_counter()
                result = measure(store, operation, makers(operation), args.ops, args.rounds, warmup)
                results.append(result)
                progress.print(
                    f"{operation:16} {store:8} {result.ratio_by_hand:5.2f}x by hand "
                    f"({time.perf_counter() - started:.1f}s)"
                )
        pg_store.close()
        redis_store.close()
    client.close()
    return results


def render(results: list[Result], args: argparse.Namespace, console: Console) -> None:
    table = Table(
        title=f"memshift store operations: median of {args.rounds} rounds x {args.ops} ops",
        caption="ratio = memshift time / baseline time, median of per-round ratios",
    )
    table.add_column("operation", no_wrap=True)
    table.add_column("store", no_wrap=True)
    for label in (
        "memshift µs/op",
        "by-hand µs/op",
        "ratio vs by-hand",
        "naive µs/op",
        "ratio vs naive",
    ):
        table.add_column(label, justify="right")
    for r in results:
        mark = "green" if r.meets_goal else "red"
        table.add_row(
            r.operation,
            r.store,
            f"{r.memshift_us:.1f}",
            f"{r.by_hand_us:.1f}",
            f"[{mark}]{r.ratio_by_hand:.2f}x[/{mark}]",
            f"{r.naive_us:.1f}",
            f"{r.ratio_naive:.2f}x",
        )
    console.print(table)
    met = [f"{r.operation}/{r.store}" for r in results if r.meets_goal]
    missed = [
        f"{r.operation}/{r.store} ({r.ratio_by_hand:.2f}x)" for r in results if not r.meets_goal
    ]
    console.print(
        f"goal <= {GOAL:.2f}x vs by-hand: met by {len(met)} of {len(results)}"
        + (f": {', '.join(met)}" if met else "")
        + (f"; missed by {', '.join(missed)}" if missed else "")
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--postgres-dsn",
        default=os.environ.get(
            "MEMSHIFT_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="server to make the scratch database on (default: $MEMSHIFT_POSTGRES_DSN "
        "or postgresql://postgres@127.0.0.1:5432/postgres)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("MEMSHIFT_REDIS_URL", "redis://127.0.0.1:6379/15"),
        help="Redis to use under a scratch key prefix (default: $MEMSHIFT_REDIS_URL "
        "or redis://127.0.0.1:6379/15)",
    )
    parser.add_argument(
        "--ops", type=int, default=1000, help="operations per variant per round (default 1000)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument(
        "--only",
        dest="operations",
        action="append",
        choices=OPERATIONS,
        help="run only this operation (repeatable; default: all)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.ops < 1 or args.rounds < 1:
        parser.error("--ops and --rounds must be at least 1")
    args.operations = args.operations or list(OPERATIONS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Console(stderr=True)
    results = run(args, progress)
    if args.json:
        payload = {
            "goal": GOAL,
            "ops": args.ops,
            "rounds": args.rounds,
            "results": [{**asdict(r), "meets_goal": r.meets_goal} for r in results],
        }
        print(json.dumps(payload, indent=2))
    else:
        console = Console()
        render(results, args, console if console.width >= 110 else Console(width=110))
    return 0


if __name__ == "__main__":
    sys.exit(main())
