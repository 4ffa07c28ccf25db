"""Malformed legacy sessions are quarantined whole, with a reason; the rest arrive intact."""

from __future__ import annotations

import base64
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
from memshift.errors import MemshiftError
from memshift.generate import generate_sessions
from memshift.migrate.backfill import BackfillOptions, backfill, retry_quarantine
from memshift.migrate.parity import ParityOptions, parity
from memshift.migrate.plan import Gate, GateRefused, Stage, check_gates, set_stage
from memshift.migrate.quarantine import dismiss, entries
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from tests.integration.test_backfill import assert_same
from tests.integration.test_plan import parity_gate

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
    assert json.loads(still.stdout) == {"migrated": 0, "still_bad": 1, "vanished": 0,
                                        "already_resolved": []}
    assert json.loads(fixed.stdout) == {"migrated": 1, "still_bad": 0, "vanished": 0,
                                        "already_resolved": []}
    assert json.loads(after.stdout) == []
    with PostgresStore(pg_dsn) as truth:
        restored = truth.load_session("fixable")
    assert restored is not None and restored.messages[0].role == "user"


def test_sessions_with_parts_but_no_hash_are_quarantined_as_orphans(
    pg_dsn: str, redis_url: str, redis_prefix: str, legacy: Legacy
) -> None:
    legacy.session(b"whole")
    legacy.client.rpush(legacy.key(b"only-messages", "messages"), message(0), message(1))
    legacy.client.hset(legacy.key(b"only-tools", "tools"), "call-1", json.dumps(
        {"name": "x", "args": {}, "status": "running", "attempts": 1, "last_error": None,
         "updated_at": TS}))
    legacy.client.set(legacy.key(b"only-summary", "summary"), json.dumps(
        {"version": 1, "text": "t", "covers_through": 0, "updated_at": TS}))
    legacy.client.rpush(legacy.key(b"orphan-\xff", "messages"), message(0))
    config = Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix)
    options = BackfillOptions(prefix=redis_prefix, batch_size=2)

    summary = backfill(config, options)

    assert (summary.sessions_seen, summary.migrated, summary.quarantined) == (5, 1, 4)
    with psycopg.connect(pg_dsn) as conn:
        found = {e.session_id: e.reason for e in entries(conn)}
        migrated = [r[0] for r in conn.execute("SELECT session_id FROM memshift.sessions")]
        parts = conn.execute("SELECT count(*) FROM memshift.messages WHERE session_id <> 'whole'")
        assert parts.fetchone() == (0,)
    assert migrated == ["whole"]
    for sid, child in (("only-messages", "messages"), ("only-tools", "tools"),
                       ("only-summary", "summary"), ("orphan-\\xff", "messages")):
        key = f"{redis_prefix}:session:{sid}"
        assert f"key {key + ':' + child!r} has no session hash {key!r}" in found[sid]
    assert "UTF-8" in found["orphan-\\xff"]

    # Run again: the orphans are quarantined once each, and nothing else happens.
    again = backfill(config, options)
    assert (again.migrated, again.unchanged, again.quarantined) == (0, 1, 4)
    with psycopg.connect(pg_dsn) as conn:
        assert len(entries(conn)) == 4

    # Retried, an orphan whose hash was written since migrates with it; the others
    # as they are, with a placeholder record (but the one whose id PostgreSQL
    # cannot hold).
    legacy.client.hset(legacy.key(b"only-messages"), mapping={
        "status": "paused", "version": "2", "created_at": TS, "updated_at": TS})
    assert retry_quarantine(config) == {"migrated": 3, "still_bad": 1, "vanished": 0}
    with PostgresStore(pg_dsn) as truth:
        fixed, placeholder = truth.load_session("only-messages"), truth.load_session("only-tools")
    assert fixed is not None and (fixed.session.status, fixed.session.version) == ("paused", 2)
    assert len(fixed.messages) == 2
    assert placeholder is not None and placeholder.session.version == 0
    assert placeholder.tool_runs[0].tool_call_id == "call-1"


def test_a_fault_in_the_session_hash_keeps_every_field_and_every_reply_of_that_key(
    pg_dsn: str, redis_url: str, redis_prefix: str, legacy: Legacy
) -> None:
    # The session hash is read twice (HGETALL, then PTTL): both replies are kept.
    legacy.session(b"neg", {"version": "-3"})
    legacy.client.pexpire(legacy.key(b"neg"), 3_600_000)
    env = {"MEMSHIFT_POSTGRES_DSN": pg_dsn, "MEMSHIFT_REDIS_URL": redis_url,
           "MEMSHIFT_PREFIX": redis_prefix}

    backfill(Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix),
             BackfillOptions(prefix=redis_prefix))
    [found] = json.loads(memshift("quarantine", "list", "--json", env=env).stdout)
    shown = json.loads(memshift("quarantine", "show", str(found["id"]), "--json",
                                env=env).stdout)
    values = json.loads(memshift("quarantine", "show", str(found["id"]), "--json",
                                 "--show-values", env=env).stdout)

    key = f"{redis_prefix}:session:neg"
    assert "'version'" in shown["reason"]
    reads = {read["command"]: read["reply"] for read in shown["raw"][key]}
    assert set(reads) == {"HGETALL", "PTTL"}
    assert 0 < reads["PTTL"] <= 3_600_000
    # Field names are shown; their values as length and hash (--show-values: as held).
    fields = dict(reads["HGETALL"])
    assert set(fields) == {"tenant_id", "user_id", "status", "version", "created_at",
                           "updated_at", "messages_trimmed", "metadata"}
    assert fields["version"]["length"] == 2 and "-3" not in json.dumps(fields)
    held = {read["command"]: read["reply"] for read in values["raw"][key]}["HGETALL"]
    assert [base64.b64decode(v["b64"]) for k, v in held
            if base64.b64decode(k["b64"]) == b"version"] == [b"-3"]
    assert any(read["command"] == "LRANGE 0 -1" for read in shown["raw"][key + ":messages"])


def test_open_quarantine_holds_the_gates_until_each_entry_is_retried_or_dismissed(
    pg_dsn: str, redis_url: str, redis_prefix: str, legacy: Legacy
) -> None:
    # A quarantined session is missing from PostgreSQL: reading it there (cutover,
    # pg_primary) or retiring Redis would lose it, so the gates wait for the operator.
    legacy.session(b"fixable", messages=[message(0, role=None)])
    legacy.session(b"lost", {"version": "-3"})
    legacy.session(b"healthy")
    config = Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix)
    env = {"MEMSHIFT_POSTGRES_DSN": pg_dsn, "MEMSHIFT_REDIS_URL": redis_url,
           "MEMSHIFT_PREFIX": redis_prefix, "MEMSHIFT_OPERATOR": "alice"}

    def quarantine_gates() -> list[Gate]:
        return [g for stage in (Stage.CUTOVER, Stage.PG_PRIMARY, Stage.RETIRED)
                for g in check_gates(conn, stage) if g.name == "no open quarantine"]

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        set_stage(conn, "dual_write", "start")
        backfill(config, BackfillOptions(prefix=redis_prefix))
        set_stage(conn, "shadow", "backfilled")
        with pytest.raises(GateRefused, match=r"gate 'no open quarantine' fails \(2 open "
                           r"quarantine entries \(2 from reference:.*quarantine retry.*"
                           r"quarantine dismiss ID"):
            set_stage(conn, "cutover", "go")
        both_open = quarantine_gates()

        legacy.client.lset(legacy.key(b"fixable", "messages"), 0, message(0))
        retried = retry_quarantine(config)
        one_open = quarantine_gates()
        [lost] = entries(conn)
        list(parity(config, options=ParityOptions(settle_seconds=0)))
        parity_with_the_loss = parity_gate(conn)

        unexplained = memshift("quarantine", "dismiss", str(lost.id), env=env)
        blank = memshift("quarantine", "dismiss", str(lost.id), "--reason", " ", env=env)
        unknown = memshift("quarantine", "dismiss", str(lost.id), "999", "--reason", "x",
                           env=env)
        still_open = quarantine_gates()
        dismissed = memshift("quarantine", "dismiss", str(lost.id), "--reason",
                             "ticket 7: the user deleted this session", env=env)
        none_open = quarantine_gates()
        parity_with_the_loss_accepted = parity_gate(conn)
        audit = json.loads(memshift("quarantine", "list", "--all", "--json", env=env).stdout)
        # A later backfill finds it bad in the same way: it stays dismissed.
        backfill(config, BackfillOptions(prefix=redis_prefix))
        after_another_run = quarantine_gates()

    assert [(g.passed, g.detail) for g in both_open] == [
        (False, f"2 open quarantine entries (2 from reference:{redis_prefix})")] * 3
    assert retried == {"migrated": 1, "still_bad": 1, "vanished": 0}
    assert [(g.passed, g.detail) for g in one_open] == [
        (False, f"1 open quarantine entry (1 from reference:{redis_prefix})")] * 3
    assert unexplained.returncode == 2 and "--reason" in unexplained.stderr
    assert blank.returncode == 3 and "needs a reason" in blank.stderr
    assert unknown.returncode == 1 and "no quarantine entry 999" in unknown.stderr
    assert "nothing was dismissed" in unknown.stderr
    assert [g.passed for g in still_open] == [False] * 3
    assert dismissed.returncode == 0, dismissed.stderr
    assert [(g.passed, g.detail) for g in none_open] == [(True, "0 open quarantine entries")] * 3
    # Its parity result counts until then; once its loss is accepted, no longer.
    assert parity_with_the_loss.detail.startswith("1 of 3 sessions fail")
    assert parity_with_the_loss_accepted.detail.startswith("0 of 2 sessions fail")
    by_session = {e["session_id"]: e for e in audit}
    assert by_session["fixable"]["state"] == "resolved"
    assert by_session["lost"]["state"] == "dismissed"
    assert by_session["lost"]["dismissed_by"] == "alice"
    assert by_session["lost"]["dismissed_reason"] == "ticket 7: the user deleted this session"
    assert by_session["lost"]["dismissed_at"] is not None
    assert [g.passed for g in after_another_run] == [True] * 3


def test_a_dismissed_session_found_bad_in_another_way_is_open_again_and_can_still_migrate(
    pg_dsn: str, redis_url: str, redis_prefix: str, legacy: Legacy
) -> None:
    legacy.session(b"s", {"version": "-3"})
    config = Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix)
    backfill(config, BackfillOptions(prefix=redis_prefix))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        [entry] = entries(conn)
        assert dismiss(conn, [entry.id], "accepted", who="bob") == [entry.id]
        with pytest.raises(MemshiftError, match=f"entry {entry.id} is dismissed, not open"):
            dismiss(conn, [entry.id], "twice", who="bob")

        legacy.client.hset(legacy.key(b"s"), mapping={"version": "2",  # bad in another way
                                                      "updated_at": "yesterday"})
        backfill(config, BackfillOptions(prefix=redis_prefix))
        reopened = entries(conn, state=None)
        legacy.client.hset(legacy.key(b"s"), "updated_at", TS)
        retried = retry_quarantine(config, [entry.id])
        resolved = entries(conn, state=None)

    assert [(e.state, e.seen) for e in reopened] == [("open", 2)]
    assert retried == {"migrated": 1, "still_bad": 0, "vanished": 0}
    assert [e.state for e in resolved] == ["resolved"]
    with PostgresStore(pg_dsn) as truth:
        state = truth.load_session("s")
    assert state is not None and state.session.version == 2
