"""Malformed legacy sessions are quarantined whole, with a reason; the rest arrive intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis

from memshift.config import Settings
from memshift.generate import generate_sessions
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.migrate.quarantine import entries
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from tests.integration.test_backfill import assert_same

TS = "2026-05-19T10:00:00.000000Z"


def message(i: int, **change: Any) -> bytes:
    body: dict[str, Any] = {"id": f"m{i}", "role": "user", "content": f"hello {i}", "ts": TS}
    body.update(change)
    return json.dumps(body).encode()


class Legacy:
    """Writes sessions the way a legacy app (or a bug in one) leaves them in Redis."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def key(self, sid: bytes, child: str = "") -> bytes:
        return self.prefix.encode() + b":session:" + sid + (f":{child}".encode() if child else b"")

    def session(self, sid: bytes, fields: dict[str, Any] | None = None,
                messages: list[bytes] | None = None) -> None:
        base = {"tenant_id": "t", "user_id": "u", "status": "active", "version": "1",
                "created_at": TS, "updated_at": TS, "messages_trimmed": "0", "metadata": "{}"}
        base.update(fields or {})
        self.client.hset(self.key(sid), mapping=base)
        for raw in messages if messages is not None else [message(0), message(1)]:
            self.client.rpush(self.key(sid, "messages"), raw)


# Each shape: (session id, what to write, words the quarantine reason must contain).
Shape = tuple[bytes, Callable[[Legacy, bytes], None], list[str]]
SHAPES: list[Shape] = [
    (b"bad-utf8-content", lambda r, s: r.session(s, messages=[
        b'{"id":"m0","role":"user","content":"\xff\xfe","ts":"' + TS.encode() + b'"}']),
     ["messages", "UTF-8"]),
    (b"nul-content", lambda r, s: r.session(s, messages=[message(0, content="a\u0000b")]),
     ["messages", "NUL"]),
    (b"truncated-json", lambda r, s: r.session(s, messages=[message(0)[:-7]]),
     ["messages"]),
    (b"json-not-object", lambda r, s: r.session(s, messages=[b"[1, 2, 3]"]),
     ["messages", "object"]),
    (b"wrong-type-attempts", lambda r, s: (r.session(s), r.client.hset(
        r.key(s, "tools"), "call-1", json.dumps({"name": "x", "args": {}, "status": "running",
                                                  "attempts": "many", "last_error": None,
                                                  "updated_at": TS}))),
     ["tools", "attempts"]),
    (b"missing-role", lambda r, s: r.session(s, messages=[
        json.dumps({"id": "m0", "content": "x", "ts": TS}).encode()]),
     ["messages", "role"]),
    (b"wrong-redis-type", lambda r, s: (r.session(s, messages=[]),
                                        r.client.set(r.key(s, "messages"), b"not a list")),
     ["messages", "type"]),
    (b"duplicate-message-ids", lambda r, s: r.session(s, messages=[message(0), message(0)]),
     ["message id 'm0'", "seq 0", "seq 1"]),
    (b"checkpoint-self-parent", lambda r, s: (r.session(s), r.client.set(
        r.key(s, "checkpoint"), json.dumps({"checkpoint_id": "c1", "parent_id": "c1",
                                            "step": 1, "state": {}, "created_at": TS}))),
     ["checkpoint", "parent"]),
    (b"unknown-tool-status", lambda r, s: (r.session(s), r.client.hset(
        r.key(s, "tools"), "call-1", json.dumps({"name": "x", "args": {}, "status": "exploded",
                                                  "attempts": 1, "last_error": None,
                                                  "updated_at": TS}))),
     ["tools", "status"]),
    (b"oversize-value", lambda r, s: r.session(s, messages=[message(0, content="x" * 300_000)]),
     ["messages", "over the limit"]),
    (b"bad-utf8-\xff-id", lambda r, s: r.session(s), ["UTF-8"]),
    (b"nul-\x00-id", lambda r, s: r.session(s), ["NUL"]),
    (b"negative-version", lambda r, s: r.session(s, {"version": "-3"}), ["version"]),
    (b"bad-timestamp", lambda r, s: r.session(s, {"updated_at": "yesterday"}),
     ["updated_at"]),
    (b"summary-bad-version", lambda r, s: (r.session(s), r.client.set(
        r.key(s, "summary"), json.dumps({"version": "x", "text": "t", "covers_through": 1,
                                         "updated_at": TS}))),
     ["summary", "version"]),
    (b"event-bad-data", lambda r, s: (r.session(s), r.client.xadd(
        r.key(s, "events"), {"type": "status", "from": "active", "to": "paused", "at": TS,
                             "data": "{not json"})),
     ["events", "data"]),
    (b"x" * 600, lambda r, s: r.session(s), ["600 bytes"]),
]


@pytest.fixture
def legacy(redis_url: str, redis_prefix: str) -> Iterator[Legacy]:
    client = redis.Redis.from_url(redis_url)
    yield Legacy(client, redis_prefix)
    client.close()


def test_each_malformed_shape_is_quarantined_with_a_reason_and_the_rest_arrive(
    pg_dsn: str, redis_url: str, redis_prefix: str, legacy: Legacy
) -> None:
    for sid, write, _ in SHAPES:
        write(legacy, sid)
    with RedisStore(redis_url, prefix=redis_prefix) as store:
        good = []
        for generated in generate_sessions(30, seed=9):
            generated.play(store)
            good.append(generated.session_id)

        summary = backfill(
            Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix),
            BackfillOptions(prefix=redis_prefix, batch_size=8, max_value_bytes=200_000),
        )

        with PostgresStore(pg_dsn) as truth:
            assert_same(store, truth, good)
    assert (summary.migrated, summary.quarantined) == (30, len(SHAPES))
    with psycopg.connect(pg_dsn) as conn:
        found = {e.session_id: e.reason for e in entries(conn)}
        migrated = {r[0] for r in conn.execute("SELECT session_id FROM memshift.sessions")}
    assert migrated == set(good)
    for sid, _, words in SHAPES:
        shown = sid.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
        assert shown in found, f"{shown!r} was not quarantined"
        for word in words:
            assert word in found[shown], f"{shown!r}: {found[shown]!r} lacks {word!r}"


def memshift(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMSHIFT_")}
    clean.update(env, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "memshift", *args], env=clean,
                          capture_output=True, text=True, timeout=120, check=False)


def test_unknown_extra_fields_are_kept_in_metadata_not_rejected(
    pg_dsn: str, redis_url: str, redis_prefix: str, legacy: Legacy
) -> None:
    legacy.session(b"extra", {"locale": "de-AT"},
                   messages=[message(0, model="gpt-x", tokens=42), message(1)])

    summary = backfill(Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix),
                       BackfillOptions(prefix=redis_prefix))

    assert (summary.migrated, summary.quarantined) == (1, 0)
    with PostgresStore(pg_dsn) as truth:
        state = truth.load_session("extra")
    assert state is not None
    assert state.session.metadata["redis_fields"] == {"locale": "de-AT"}
    assert state.messages[0].metadata == {"model": "gpt-x", "tokens": 42}
    assert state.messages[1].metadata == {}


def test_quarantine_can_be_listed_shown_and_retried_once_fixed(
    pg_dsn: str, redis_url: str, redis_prefix: str, legacy: Legacy
) -> None:
    legacy.session(b"fixable", messages=[message(0, role=None)])
    legacy.session(b"healthy")
    env = {"MEMSHIFT_POSTGRES_DSN": pg_dsn, "MEMSHIFT_REDIS_URL": redis_url,
           "MEMSHIFT_PREFIX": redis_prefix}

    run = memshift("backfill", "--fail-on-quarantine", "--json", env=env)
    listed = memshift("quarantine", "list", "--json", env=env)
    entry = json.loads(listed.stdout)[0]
    shown = memshift("quarantine", "show", str(entry["id"]), "--json", env=env)
    still = memshift("quarantine", "retry", "--json", env=env)
    legacy.client.lset(legacy.key(b"fixable", "messages"), 0, message(0))
    fixed = memshift("quarantine", "retry", "--json", env=env)
    after = memshift("quarantine", "list", "--json", env=env)

    assert run.returncode == 9 and json.loads(run.stdout)["quarantined"] == 1
    assert entry["session_id"] == "fixable" and "role" in entry["reason"]
    raw = json.loads(shown.stdout)["raw"]
    assert any(key.endswith(":messages") for key in raw)
    assert json.loads(still.stdout) == {"migrated": 0, "still_bad": 1, "vanished": 0}
    assert json.loads(fixed.stdout) == {"migrated": 1, "still_bad": 0, "vanished": 0}
    assert json.loads(after.stdout) == []
    with PostgresStore(pg_dsn) as truth:
        restored = truth.load_session("fixable")
    assert restored is not None and restored.messages[0].role == "user"
