"""Follow mode: PostgreSQL keeps up with a legacy application that writes Redis itself.

The writers here use plain redis-py commands on the reference layout's keys (no
memshift in their path), as a legacy application does. The shared Redis server gets
the keyspace notifications follow needs for the length of a test, and its own
setting back afterwards.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import redis
from redis.cluster import RedisCluster

from memshift.config import Settings
from memshift.migrate.follow import (
    FollowerRow,
    FollowOptions,
    NotificationsOff,
    follow,
    followers,
    missing_flags,
    required_flags,
    with_flags,
)
from memshift.migrate.parity import parity
from memshift.migrate.plan import GateRefused, Stage, check_gates, set_stage
from memshift.stores.layouts import get_layout
from memshift.stores.layouts.reference import ReferenceLayout
from tests.integration.test_cli import memshift
from tests.integration.test_redis_cluster import plain_url

SETTING = "notify-keyspace-events"
NEEDED = required_flags(ReferenceLayout())
SETTLE_TIMEOUT = 90.0


# -- fixtures and helpers --------------------------------------------------------------


def _setting(client: redis.Redis) -> str:
    value = client.config_get(SETTING)[SETTING]
    return value.decode() if isinstance(value, bytes) else str(value)


@contextmanager
def _notify_set_to(redis_url: str, value: str | None) -> Iterator[redis.Redis]:
    """The shared server with notify-keyspace-events set (None: what follow needs added),
    and the server's own setting put back afterwards."""
    client = redis.Redis.from_url(redis_url)
    before = _setting(client)
    client.config_set(SETTING, with_flags(before, NEEDED) if value is None else value)
    try:
        yield client
    finally:
        client.config_set(SETTING, before)
        client.close()


@pytest.fixture
def notifying(redis_url: str) -> Iterator[redis.Redis]:
    with _notify_set_to(redis_url, None) as client:
        yield client


@pytest.fixture
def silent(redis_url: str) -> Iterator[redis.Redis]:
    with _notify_set_to(redis_url, "") as client:
        yield client


@pytest.fixture
def config(pg_dsn: str, redis_url: str, redis_prefix: str) -> Settings:
    return Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix)


def iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Written:
    """What the writer did to one session, to check PostgreSQL against."""

    messages: list[str] = field(default_factory=list)  # message ids, in order
    attempts: dict[str, int] = field(default_factory=dict)
    summary: int = 0
    step: int = 0
    status: str = "active"
    gone: bool = False


class Legacy:
    """A legacy application: one plain redis-py command (or MULTI) per change."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.r = client
        self.layout = get_layout("reference", prefix)
        self.sessions: dict[str, Written] = {}
        self.lock = threading.Lock()  # a session is deleted between two writes, not amid one

    def keys(self, sid: str) -> list[str]:
        return self.layout.session_keys(sid)

    def create(self, sid: str) -> None:
        at = iso()
        self.r.hset(self.keys(sid)[0], mapping={
            "tenant_id": "acme", "user_id": "u1", "status": "active", "version": "1",
            "created_at": at, "updated_at": at, "messages_trimmed": "0", "metadata": "{}"})
        self.sessions[sid] = Written()

    def append(self, sid: str) -> None:
        written = self.sessions[sid]
        mid = f"{sid}-m{len(written.messages)}"
        role = "user" if len(written.messages) % 2 == 0 else "assistant"
        self.r.rpush(self.keys(sid)[1], json.dumps(
            {"id": mid, "role": role, "content": f"message {mid} ✓", "ts": iso()}))
        written.messages.append(mid)

    def trim(self, sid: str, keep: int, over: int) -> None:
        """Keep the last ``keep`` messages once more than ``over`` are held."""
        base, messages = self.keys(sid)[:2]
        held = int(self.r.llen(messages))
        if held > over:
            with self.r.pipeline(transaction=True) as pipe:
                pipe.ltrim(messages, held - keep, -1)
                pipe.hincrby(base, "messages_trimmed", held - keep)
                pipe.execute()

    def bump(self, sid: str) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hincrby(self.keys(sid)[0], "version", 1)
            pipe.hset(self.keys(sid)[0], "updated_at", iso())
            pipe.execute()

    def retry(self, sid: str, call: str, *, done: bool = False) -> None:
        written = self.sessions[sid]
        attempts = written.attempts.get(call, 0) + (0 if done else 1)
        written.attempts[call] = attempts
        self.r.hset(self.keys(sid)[2], call, json.dumps({
            "name": "web_search", "args": {"q": call},
            "status": "succeeded" if done else "retrying", "attempts": attempts,
            "last_error": None if done else "HTTP 429", "updated_at": iso()}))

    def summarise(self, sid: str) -> None:
        written = self.sessions[sid]
        written.summary += 1
        self.r.set(self.keys(sid)[3], json.dumps({
            "version": written.summary, "text": f"summary {written.summary}",
            "covers_through": len(written.messages) - 1, "updated_at": iso()}))

    def checkpoint(self, sid: str) -> None:
        written = self.sessions[sid]
        written.step += 1
        parent = f"cp{written.step - 1}" if written.step > 1 else None
        self.r.set(self.keys(sid)[4], json.dumps({
            "checkpoint_id": f"cp{written.step}", "parent_id": parent, "step": written.step,
            "state": {"step": written.step}, "created_at": iso()}))

    def move(self, sid: str, to: str) -> None:
        written = self.sessions[sid]
        base, events = self.keys(sid)[0], self.keys(sid)[5]
        at = iso()
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(base, mapping={"status": to, "updated_at": at})
            pipe.hincrby(base, "version", 1)
            pipe.xadd(events, {"type": "status", "from": written.status, "to": to, "at": at,
                               "data": "{}"})
            pipe.execute()
        written.status = to

    def delete(self, sid: str) -> None:
        with self.lock:
            self.r.delete(*self.keys(sid))
            self.sessions[sid].gone = True

    def expire(self, sid: str, ms: int) -> None:
        with self.lock:
            for key in self.keys(sid):
                self.r.pexpire(key, ms)
            self.sessions[sid].gone = True

    def touch(self, sid: str) -> None:
        """Read the session's keys, as the application would (an expired key goes)."""
        with self.lock:
            self.r.exists(*self.keys(sid))

    def step(self, sid: str, rng: random.Random, *, trims: bool) -> None:
        """One change of the kinds a live agent makes, picked at random."""
        roll = rng.random()
        written = self.sessions[sid]
        if roll < 0.45:
            self.append(sid)
        elif roll < 0.55 and trims:
            # A message lives in Redis for 10 or more appends (here, a second or more):
            # one appended and trimmed away faster than follow's lag never reaches it.
            self.trim(sid, keep=20, over=30)
        elif roll < 0.65:
            self.bump(sid)
        elif roll < 0.78:
            self.retry(sid, f"call{rng.randrange(3)}")
        elif roll < 0.85:
            self.summarise(sid)
        elif roll < 0.93:
            self.checkpoint(sid)
        else:
            self.move(sid, "waiting_tool" if written.status == "active" else "active")


def write_for(legacy: Legacy, ids: list[str], stop: threading.Event, seed: int,
              *, trims: bool, pause: float = 0.005) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        sid = rng.choice(ids)
        with legacy.lock:
            if not legacy.sessions[sid].gone:
                legacy.step(sid, rng, trims=trims)
        time.sleep(pause)


@contextmanager
def writers(redis_url: str, prefix: str, groups: list[list[str]], *, trims: bool,
            seed: int = 0) -> Iterator[list[Legacy]]:
    """One writer thread per group of sessions (a session has one writer, as in an app)."""
    stop = threading.Event()
    apps = [Legacy(redis.Redis.from_url(redis_url), prefix) for _ in groups]
    for app, ids in zip(apps, groups, strict=True):
        for sid in ids:
            app.create(sid)
    threads = [threading.Thread(target=write_for, args=(app, ids, stop, seed + n),
                                kwargs={"trims": trims})
               for n, (app, ids) in enumerate(zip(apps, groups, strict=True))]
    for thread in threads:
        thread.start()
    try:
        yield apps
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for app in apps:
            app.r.close()


def pg_now(pg_dsn: str) -> datetime:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]


def the_follower(pg_dsn: str) -> FollowerRow | None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        rows = followers(conn)
    return rows[0] if rows else None


def wait_for(what: str, ready: Any, timeout: float = SETTLE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(0.1)


def caught_up(pg_dsn: str, since: datetime) -> bool:
    """The follower has applied every change Redis made before ``since``."""
    row = the_follower(pg_dsn)
    return row is not None and row.applied_through >= since


def has_swept(pg_dsn: str) -> bool:
    row = the_follower(pg_dsn)
    return row is not None and row.last_sweep_finished_at is not None


@contextmanager
def following(config: Settings, **options: Any) -> Iterator[threading.Event]:
    """``follow`` in a thread until the block ends; its error, if any, fails the test."""
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            follow(config, FollowOptions(layout=config.layout, prefix=config.prefix, **options),
                   stop=stop)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="follow")
    thread.start()
    assert config.postgres_dsn
    try:
        wait_for("the follower's first sweep",
                 lambda: failure or has_swept(config.postgres_dsn or ""), 30)
        yield stop
    finally:
        stop.set()
        thread.join(timeout=60)
    if failure:
        raise failure[0]


def parity_of(config: Settings, ids: list[str]) -> dict[str, str]:
    """Each session's parity status, with the diffs of those that do not pass."""
    return {r.session_id: r.parity_status if r.parity_status == "pass"
            else f"{r.parity_status}: {[d.as_json() for d in r.diffs]}"
            for r in parity(config, session_ids=ids)}


def pg_rows(pg_dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg_dsn) as conn:
        return conn.execute(sql.encode(), params).fetchall()


# -- the notification flags ------------------------------------------------------------


def test_the_flags_are_those_of_the_key_types_the_layout_reads() -> None:
    assert NEEDED == "Kg$lhxt"  # keyspace, generic, string, list, hash, expired, stream
    assert missing_flags("AKE", NEEDED) == ""
    assert missing_flags("Elg", NEEDED) == "K$hxt"
    assert with_flags("Elg", NEEDED) == "KEg$lhxt"
    assert with_flags("Kszed", NEEDED) == "KA"  # every class: Redis's own short form


# -- following live writers ------------------------------------------------------------


def test_postgres_keeps_up_with_plain_redis_writers_and_parity_passes(
    config: Settings, pg_dsn: str, redis_url: str, redis_prefix: str, notifying: redis.Redis
) -> None:
    early = Legacy(notifying, redis_prefix)
    for n in range(4):  # written before the follower starts: its first sweep finds them
        sid = f"early{n}"
        early.create(sid)
        for _ in range(5):
            early.append(sid)
    # One sweep at start only: everything after it must come through notifications.
    with following(config, sweep_seconds=3600):
        with writers(redis_url, redis_prefix,
                     [[f"s{w}_{n}" for n in range(6)] for w in range(4)], trims=True) as apps:
            time.sleep(3.0)
            for sid in ("early0", "early1", "early2", "early3"):
                early.append(sid)
            early.delete("early0")
            early.expire("early1", 300)
            apps[0].delete("s0_0")
            time.sleep(1.5)
            # Redis deletes an expired key (and only then notifies `expired`) when it is
            # next touched or when its sampling finds it, which on a Redis holding many
            # volatile keys can take long: an application's read stands in for either.
            early.touch("early1")
        stopped = pg_now(pg_dsn)
        wait_for("the follower to catch up", lambda: caught_up(pg_dsn, stopped))
    gone = ["early0", "early1", "s0_0"]
    ids = [sid for app in (early, *apps) for sid in app.sessions]

    reports = parity_of(config, ids)
    assert reports == dict.fromkeys(ids, "pass")
    expired = pg_rows(pg_dsn, "SELECT s.session_id, e.from_status FROM memshift.sessions s "
                              "JOIN memshift.events e ON e.session_id = s.session_id AND "
                              "e.to_status = 'expired' WHERE s.expires_at <= now() "
                              "ORDER BY 1")
    assert [sid for sid, _ in expired] == sorted(gone)
    assert pg_rows(pg_dsn, "SELECT count(*) FROM memshift.message_conflicts") == [(0,)]
    assert pg_rows(pg_dsn, "SELECT count(*) FROM memshift.quarantine") == [(0,)]
    trimmed = pg_rows(pg_dsn, "SELECT count(*) FROM memshift.sessions WHERE messages_trimmed > 0")
    assert trimmed[0][0] > 0  # the writers did trim, and PostgreSQL kept what was trimmed
    row = the_follower(pg_dsn)
    assert row is not None and row.events > 0 and row.sessions_applied > 0


def test_a_follower_killed_mid_stream_catches_up_through_the_sweeper(
    config: Settings, pg_dsn: str, redis_url: str, redis_prefix: str, notifying: redis.Redis
) -> None:
    env = {"MEMSHIFT_POSTGRES_DSN": pg_dsn, "MEMSHIFT_REDIS_URL": redis_url,
           "MEMSHIFT_PREFIX": redis_prefix}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMSHIFT_")} | env

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "memshift", "follow", "--sweep-seconds", "3600", "--json"],
            env=clean, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    groups = [[f"k{w}_{n}" for n in range(8)] for w in range(3)]
    # No trims: a message appended and trimmed away while no follower runs is gone
    # from Redis itself, and nobody could copy it.
    with writers(redis_url, redis_prefix, groups, trims=False, seed=5) as apps:
        first = start()
        try:
            wait_for("the first follower's sweep", lambda: has_swept(pg_dsn), 30)
            time.sleep(1.5)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        killed_at = pg_now(pg_dsn)
        time.sleep(1.5)  # writes nobody is notified of, and the last ones
    stopped = pg_now(pg_dsn)
    dead = the_follower(pg_dsn)
    second = start()  # only its sweep can bring what was written since the kill
    try:
        wait_for("the restarted follower to catch up", lambda: caught_up(pg_dsn, stopped))
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0, second.stderr.read() if second.stderr else ""

    assert dead is not None and dead.state == "running"  # died: not stopped on purpose
    assert dead.applied_through < killed_at
    ids = [sid for app in apps for sid in app.sessions]
    assert parity_of(config, ids) == dict.fromkeys(ids, "pass")
    held = dict(pg_rows(pg_dsn, "SELECT session_id, array_agg(message_id ORDER BY seq) "
                                "FROM memshift.messages GROUP BY session_id"))
    for app in apps:
        for sid, written in app.sessions.items():
            assert held.get(sid, []) == written.messages, sid  # none lost, none twice
    assert pg_rows(pg_dsn, "SELECT count(*) FROM memshift.message_conflicts") == [(0,)]
    row = the_follower(pg_dsn)
    assert row is not None and row.state == "stopped"
    assert row.sweeps == 2 and (row.last_sweep_applied or 0) > 0  # the catch-up found them


# -- Redis without notifications -------------------------------------------------------


def test_without_notifications_follow_says_exactly_what_to_set(
    pg_dsn: str, redis_url: str, redis_prefix: str, silent: redis.Redis
) -> None:
    result = memshift("follow", env={"MEMSHIFT_POSTGRES_DSN": pg_dsn,
                                     "MEMSHIFT_REDIS_URL": redis_url,
                                     "MEMSHIFT_PREFIX": redis_prefix})

    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "notify-keyspace-events is ''" in message
    assert "CONFIG SET notify-keyspace-events Kg$lhxt" in message
    assert "--configure-redis" in message
    assert _setting(silent) == ""  # nothing changed without being asked


def test_configure_redis_turns_notifications_on_and_follows(
    config: Settings, pg_dsn: str, redis_prefix: str, silent: redis.Redis
) -> None:
    with pytest.raises(NotificationsOff):
        follow(config, FollowOptions(prefix=redis_prefix))

    with following(config, configure_redis=True, sweep_seconds=3600):
        assert missing_flags(_setting(silent), NEEDED) == ""
        app = Legacy(silent, redis_prefix)
        app.create("fresh")
        app.append("fresh")
        written = pg_now(pg_dsn)
        wait_for("the follower to apply the new session",
                 lambda: caught_up(pg_dsn, written))

    assert pg_rows(pg_dsn, "SELECT message_id FROM memshift.messages") == [("fresh-m0",)]


# -- the Plan's gate -------------------------------------------------------------------


def test_shadow_waits_for_a_follower_that_lags_and_not_for_one_stopped(
    config: Settings, pg_dsn: str, notifying: redis.Redis
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO memshift.backfill_runs (source, layout, prefix, batch_size,"
                     " state) VALUES ('r', 'reference', 'p', 1, 'completed')")
        set_stage(conn, "dual_write", "start")
        alone = [g.name for g in check_gates(conn, Stage.SHADOW)]
        with following(config, sweep_seconds=3600):
            began = pg_now(pg_dsn)
            wait_for("a heartbeat", lambda: caught_up(pg_dsn, began), 10)
            running = {g.name: g.passed for g in check_gates(conn, Stage.SHADOW)}
        stopped = [g.name for g in check_gates(conn, Stage.SHADOW)]
        # What a follower killed a minute ago leaves behind: running, its position old.
        conn.execute("UPDATE memshift.followers "
                     "SET state = 'running', applied_through = now() - interval '60 seconds'")
        dead = [g for g in check_gates(conn, Stage.SHADOW) if g.name == "follower lag"]
        with pytest.raises(GateRefused, match="follower lag"):
            set_stage(conn, "shadow", "go")

    assert alone == stopped == ["backfill complete"]  # no follow mode, no gate
    # In follow mode parity must vouch for PostgreSQL before shadow too (none run here).
    assert running == {"backfill complete": True, "follower lag": True,
                       "parity pass rate (each session's latest check)": False}
    assert dead and not dead[0].passed and "lags 60" in dead[0].detail


# -- Redis Cluster ---------------------------------------------------------------------


def test_follows_a_redis_cluster_through_every_primary(
    redis_cluster_url: str, pg_dsn: str
) -> None:
    cluster = RedisCluster.from_url(plain_url(redis_cluster_url))
    prefix = f"msf{uuid.uuid4().hex[:10]}"
    config = Settings(redis_url=redis_cluster_url, postgres_dsn=pg_dsn, prefix=prefix)
    app = Legacy(cluster, prefix)  # one command per key: the keys lie in other slots
    ids = [f"c{n}" for n in range(12)]
    try:
        app.create(ids[0])  # before the follower: its first sweep finds it
        with following(config, configure_redis=True, sweep_seconds=3600):
            for sid in ids[1:]:
                app.create(sid)
            for _ in range(4):
                for sid in ids:
                    app.append(sid)
                    app.retry(sid, "call0")
                    app.summarise(sid)
                    app.checkpoint(sid)
            written = pg_now(pg_dsn)
            wait_for("the follower to catch up", lambda: caught_up(pg_dsn, written))
            app.delete(ids[1])
            wait_for("the deleted session to be recorded", lambda: pg_rows(
                pg_dsn, "SELECT status FROM memshift.sessions WHERE session_id = 'c1'"
            ) == [("expired",)], 10)
        nodes = {cluster.get_node_from_key(key).name for sid in ids for key in app.keys(sid)}
        reports = parity_of(config, ids)
        settings = {node.name: _setting(node.redis_connection)
                    for node in cluster.get_primaries()}
    finally:
        for sid in ids:
            cluster.delete(*app.keys(sid))
        cluster.close()

    assert len(nodes) == 3  # the sessions' keys are spread over every primary
    assert all(missing_flags(value, NEEDED) == "" for value in settings.values()), settings
    assert reports == dict.fromkeys(ids, "pass")
    messages = pg_rows(pg_dsn, "SELECT count(*) FROM memshift.messages")
    assert messages == [(4 * len(ids),)]


# -- another layout --------------------------------------------------------------------


def test_follows_langchain_histories_into_langchain_postgres(
    pg_dsn: str, redis_url: str, redis_prefix: str, notifying: redis.Redis
) -> None:
    pytest.importorskip("langchain_community")
    pytest.importorskip("langchain_postgres")
    from langchain_community.chat_message_histories import RedisChatMessageHistory
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_postgres import PostgresChatMessageHistory

    from memshift.stores.layouts.langchain import session_uuid

    config = Settings(redis_url=redis_url, postgres_dsn=pg_dsn, layout="langchain",
                      prefix=redis_prefix)
    ids = ["chat-1", "chat ü 2", "chat-3"]
    histories = {sid: RedisChatMessageHistory(sid, url=redis_url, key_prefix=f"{redis_prefix}:")
                 for sid in ids}
    histories["chat-1"].add_message(HumanMessage("before the follower"))
    with following(config, sweep_seconds=3600):
        for n in range(5):
            for sid, chat in histories.items():
                chat.add_message(HumanMessage(f"{sid} question {n}"))
                chat.add_message(AIMessage(f"{sid} answer {n} ✓"))
        written = pg_now(pg_dsn)
        wait_for("the follower to catch up", lambda: caught_up(pg_dsn, written))
        histories["chat-3"].clear()  # LangChain deletes the key
        wait_for("the cleared history to be recorded", lambda: pg_rows(
            pg_dsn, "SELECT status FROM memshift.sessions WHERE session_id = 'chat-3'"
        ) == [("expired",)], 10)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        in_postgres = {sid: PostgresChatMessageHistory(
            "chat_history", str(session_uuid(sid)), sync_connection=conn).messages
            for sid in ids[:2]}

    for sid in ids[:2]:
        assert [(m.type, m.content) for m in in_postgres[sid]] == \
            [(m.type, m.content) for m in histories[sid].messages], sid
    assert parity_of(config, ids) == dict.fromkeys(ids, "pass")
