"""A migration mid-cutover, for the dashboard's tests: real sessions in both stores,
a Plan at cutover with a slice, parity results with one failing session, a
quarantined session and a queued repair."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

from memshift.config import Settings
from memshift.generate import generate_sessions
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.migrate.parity import parity
from memshift.migrate.plan import StaticPlan, load_plan, set_slice, set_stage
from memshift.model import Message, Session
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore

SLICE = "resume"
BROKEN = "sess_broken_json"
LEAKED = "sk_live_seeded_secret_0451"  # in the unreadable record: the pages must not show it


@dataclass(frozen=True)
class Seeded:
    settings: Settings
    session_ids: list[str]
    failing: str  # its PostgreSQL copy was altered, then parity failed it
    conflicted: str  # a secondary write to PostgreSQL failed: queued for repair
    quarantined: str  # Redis holds a record the backfill cannot read


def seed_cutover(pg_dsn: str, redis_url: str, prefix: str, spool: Path) -> Seeded:
    settings = Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=prefix)
    ids = []
    with RedisStore(redis_url, prefix=prefix) as legacy:
        for generated in generate_sessions(6, seed=11):
            generated.play(legacy)
            ids.append(generated.session_id)
    backfill(settings, BackfillOptions(prefix=prefix))
    list(parity(settings))  # every session passes: the gates to cutover open
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for stage in ("dual_write", "shadow", "cutover"):
            set_stage(conn, stage, f"on to {stage}", who="alice@ops")
        set_slice(conn, SLICE, 50, "half of the resume reads", who="alice@ops")
    failing, conflicted = ids[0], ids[1]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE memshift.messages SET content = content || ' (edited in PostgreSQL)' "
            "WHERE session_id = %s AND seq = (SELECT max(seq) FROM memshift.messages "
            "WHERE session_id = %s)", (failing, failing))
    list(parity(settings, session_ids=[failing]))
    _quarantine(settings, redis_url, prefix)
    _conflict(pg_dsn, redis_url, prefix, conflicted, spool)
    return Seeded(settings, ids, failing, conflicted, BROKEN)


def _quarantine(settings: Settings, redis_url: str, prefix: str) -> None:
    """A session with a message that is not JSON, found by a second backfill run."""
    with RedisStore(redis_url, prefix=prefix) as legacy:
        legacy.save_session(Session(session_id=BROKEN, tenant_id="tenant-1", version=1))
        client = redis.Redis.from_url(redis_url)
        client.rpush(legacy.layout.session_keys(BROKEN)[1],
                     b'{"id": "m0", "role": "user", "content": "' + LEAKED.encode() + b'", "ts')
        client.close()
    backfill(settings, BackfillOptions(prefix=prefix))


def _conflict(pg_dsn: str, redis_url: str, prefix: str, sid: str, spool: Path) -> None:
    """PostgreSQL already holds other content at the seq the next message gets, so the
    router's secondary write of it fails and is queued for repair."""
    with PostgresStore(pg_dsn) as truth, psycopg.connect(pg_dsn) as conn:
        state = truth.load_session(sid)
        assert state is not None
        truth.append_message(sid, Message(seq=state.message_count, message_id="rogue",
                                          role="assistant", content="written by hand"))
        plan = load_plan(conn)
    store = MigratingStore(RedisStore(redis_url, prefix=prefix), PostgresStore(pg_dsn),
                           StaticPlan(plan), spool_path=spool)
    try:
        store.append_message(sid, Message(message_id="next", role="user", content="and then?"))
    finally:
        store.close()
