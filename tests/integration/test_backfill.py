"""Backfill: every Redis session arrives in PostgreSQL whole, once, whatever happens."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from memshift.config import Settings
from memshift.generate import generate_sessions
from memshift.migrate.backfill import BackfillOptions, _start_method, backfill, runs
from memshift.model import MemorySummary, Message, SessionState, ToolRun
from memshift.stores.base import Outcome
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore


def settings(pg_dsn: str, redis_url: str, prefix: str) -> Settings:
    return Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=prefix)


@pytest.fixture
def legacy(redis_url: str, redis_prefix: str) -> Iterator[RedisStore]:
    with RedisStore(redis_url, prefix=redis_prefix) as store:
        yield store


@pytest.fixture
def truth(pg_dsn: str) -> Iterator[PostgresStore]:
    with PostgresStore(pg_dsn) as store:
        yield store


def fill(legacy: RedisStore, count: int, seed: int = 1) -> list[str]:
    ids = []
    for generated in generate_sessions(count, seed=seed):
        generated.play(legacy)
        ids.append(generated.session_id)
    return ids


def as_redis_holds(state: SessionState) -> dict[str, Any]:
    """What Redis can hold of a session: PostgreSQL's copy must contain exactly this."""
    summary, checkpoint = state.latest_summary, state.latest_checkpoint
    session = state.session.model_dump()
    session.pop("expires_at")
    return {
        "session": session,
        "messages": [m.model_dump() for m in state.messages],
        "tool_runs": sorted((t.model_dump() for t in state.tool_runs),
                            key=lambda t: t["tool_call_id"]),
        "summary": summary.model_dump() if summary else None,
        "checkpoint": checkpoint.model_dump() if checkpoint else None,
        "events": [e.model_dump() for e in state.events],
    }


def assert_same(legacy: RedisStore, truth: PostgresStore, ids: list[str]) -> None:
    for sid in ids:
        redis_state, pg_state = legacy.load_session(sid), truth.load_session(sid)
        assert redis_state is not None and pg_state is not None, sid
        assert as_redis_holds(pg_state) == as_redis_holds(redis_state), sid


def row_counts(pg_dsn: str) -> dict[str, int]:
    with psycopg.connect(pg_dsn) as conn:
        return {
            table: conn.execute(
                psycopg.sql.SQL("SELECT count(*) FROM memshift.{}").format(
                    psycopg.sql.Identifier(table)
                )
            ).fetchone()[0]  # type: ignore[index]
            for table in ("sessions", "messages", "tool_runs", "summaries", "checkpoints",
                          "events", "message_conflicts")
        }


def test_backfill_copies_every_session_whole(
    pg_dsn: str, redis_url: str, redis_prefix: str, legacy: RedisStore, truth: PostgresStore
) -> None:
    ids = fill(legacy, 120)

    summary = backfill(settings(pg_dsn, redis_url, redis_prefix),
                       BackfillOptions(prefix=redis_prefix, batch_size=25))

    assert summary.state == "completed"
    assert (summary.sessions_seen, summary.migrated, summary.quarantined) == (120, 120, 0)
    assert_same(legacy, truth, ids)


def test_a_second_run_finds_everything_unchanged_and_writes_nothing(
    pg_dsn: str, redis_url: str, redis_prefix: str, legacy: RedisStore
) -> None:
    fill(legacy, 40)
    config = settings(pg_dsn, redis_url, redis_prefix)
    options = BackfillOptions(prefix=redis_prefix, batch_size=15)
    backfill(config, options)
    before = row_counts(pg_dsn)

    again = backfill(config, options)

    assert (again.migrated, again.unchanged) == (0, 40)
    assert row_counts(pg_dsn) == before


FORKED_BACKFILL = """
import json, sys, threading
from memshift.config import Settings
from memshift.migrate.backfill import BackfillOptions, _start_method, backfill
dsn, url, prefix = sys.argv[1:]
method = _start_method()
summary = backfill(Settings(redis_url=url, postgres_dsn=dsn, prefix=prefix),
                   BackfillOptions(prefix=prefix, batch_size=10, workers=2))
print(json.dumps({"method": method, "threads": threading.active_count(), **summary.as_json()}))
"""


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_two_workers_copy_every_session_once(
    pg_dsn: str, redis_url: str, redis_prefix: str, legacy: RedisStore, start: str
) -> None:
    """Workers are forked by a process that runs one thread (here a fresh one, as the
    CLI is), spawned by one that runs more (a forked child would inherit the locks
    other threads hold, here a thread of this test): both ways copy everything."""
    ids = fill(legacy, 150, seed=2)
    if start == "fork":
        done = subprocess.run([sys.executable, "-c", FORKED_BACKFILL, pg_dsn, redis_url,
                               redis_prefix], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["method"] == "fork"
        migrated, batches_done, batches_total = (
            report["migrated"], report["batches_done"], report["batches_total"])
    else:
        other = threading.Event()
        threading.Thread(target=other.wait, daemon=True).start()
        try:
            assert _start_method() == "spawn"
            summary = backfill(settings(pg_dsn, redis_url, redis_prefix),
                               BackfillOptions(prefix=redis_prefix, batch_size=10, workers=2))
        finally:
            other.set()
        migrated, batches_done, batches_total = (
            summary.migrated, summary.batches_done, summary.batches_total)

    # 15 batches or a few more: the first is small, and a SCAN page (which other keys
    # of the server shape) may end with a short batch.
    assert migrated == 150 and batches_done == batches_total >= 15
    with PostgresStore(pg_dsn) as truth:
        assert_same(legacy, truth, ids)



def test_a_new_run_starts_with_a_small_batch(
    pg_dsn: str, redis_url: str, redis_prefix: str, legacy: RedisStore
) -> None:
    """The first batch of a new run is an eighth of --batch-size, so that the workers
    start at once; the batches after it are whole (but where a SCAN page ends)."""
    fill(legacy, 60, seed=4)

    summary = backfill(settings(pg_dsn, redis_url, redis_prefix),
                       BackfillOptions(prefix=redis_prefix, batch_size=16, scan_count=5000))

    assert summary.migrated == 60
    with psycopg.connect(pg_dsn) as conn:
        sizes = [n for (n,) in conn.execute(
            "SELECT cardinality(session_ids) FROM memshift.backfill_batches "
            "WHERE run_id = %s ORDER BY batch_no", (summary.run_id,))]
    # (Where a SCAN page ends, which the server's other keys shape, a batch may be
    # short: a page is batched whole.)
    assert sizes[0] == 2 and sum(sizes) == 60 and max(sizes[1:]) == 16


def test_the_ttl_becomes_an_expiry_and_a_vanished_session_is_no_error(
    pg_dsn: str, redis_url: str, redis_prefix: str, legacy: RedisStore, truth: PostgresStore
) -> None:
    ids = fill(legacy, 3)
    raw = redis.Redis.from_url(redis_url)
    for key in legacy.layout.session_keys(ids[0]):
        raw.expire(key, 3600)
    config = settings(pg_dsn, redis_url, redis_prefix)
    from memshift.migrate import backfill as job

    with job.connect(pg_dsn) as conn:
        run = job.start_or_join(conn, redis_url, BackfillOptions(prefix=redis_prefix))
        job.discover(conn, legacy, run, BackfillOptions(prefix=redis_prefix))
    raw.delete(*legacy.layout.session_keys(ids[2]))  # expires between discovery and copy
    summary = backfill(config, BackfillOptions(prefix=redis_prefix))

    assert (summary.migrated, summary.vanished, summary.quarantined) == (2, 1, 0)
    expiring = truth.load_session(ids[0])
    assert expiring is not None and expiring.session.expires_at is not None
    assert 3500 < (expiring.session.expires_at - time_now()).total_seconds() <= 3600


def time_now() -> Any:
    from memshift.model import now

    return now()


def test_backfill_beside_live_writers_converges_exactly(
    pg_dsn: str, redis_url: str, redis_prefix: str, legacy: RedisStore, truth: PostgresStore
) -> None:
    ids = fill(legacy, 60, seed=4)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        # The application in dual_write: Redis first, then PostgreSQL with Redis' seq.
        rng = random.Random(n)
        with RedisStore(redis_url, prefix=redis_prefix) as primary, PostgresStore(pg_dsn) as pg:
            i = 0
            while not stop.is_set():
                sid = rng.choice(ids)
                try:
                    roll = rng.random()
                    if roll < 0.2:
                        state = primary.load_session(sid)
                        assert state is not None
                        latest = state.latest_summary
                        version = (latest.version if latest else 0) + 1
                        summary = MemorySummary(version=version, text=f"v{version} by {n}")
                        # Replicate what the primary accepted (a racing writer's
                        # same version was refused there, so it must not reach PG).
                        if primary.put_summary(sid, summary) == Outcome.APPLIED:
                            pg.put_summary(sid, summary)
                    elif roll < 0.6:
                        sent = primary.append_message(sid, Message(
                            message_id=f"live-{n}-{i}", role="user", content=f"live {n}/{i}"))
                        pg.append_message(sid, sent)
                    else:
                        state = primary.load_session(sid)
                        assert state is not None
                        run = state.tool_runs[0] if state.tool_runs else ToolRun(
                            tool_call_id=f"live-{n}", name="probe")
                        bumped = run.model_copy(update={
                            "attempts": run.attempts + 1, "updated_at": time_now()})
                        stored = primary.upsert_tool_run(sid, bumped)
                        pg.upsert_tool_run(sid, stored)
                except BaseException as exc:
                    errors.append(exc)
                    return
                i += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        summary = backfill(settings(pg_dsn, redis_url, redis_prefix),
                           BackfillOptions(prefix=redis_prefix, batch_size=7))
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert errors == []
    assert summary.state == "completed"
    assert_same(legacy, truth, ids)


def test_a_backfill_killed_again_and_again_finishes_with_nothing_lost_or_doubled(
    pg_dsn: str, redis_url: str, redis_prefix: str, legacy: RedisStore, truth: PostgresStore
) -> None:
    ids = fill(legacy, 1500, seed=5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSHIFT_")}
    env.update(MEMSHIFT_POSTGRES_DSN=pg_dsn, MEMSHIFT_REDIS_URL=redis_url,
               MEMSHIFT_PREFIX=redis_prefix)
    command = [sys.executable, "-m", "memshift", "backfill", "--batch-size", "5",
               "--lease-seconds", "0.5", "--json"]
    rng = random.Random(7)

    def batches_done() -> int:
        with psycopg.connect(pg_dsn) as conn:
            found = runs(conn, limit=1)
        return found[0].batches_done if found else 0

    kills = 0
    for _ in range(15):
        # Killed once it has copied a random 1 to 8 more batches, at once: a point in
        # the middle of the run however fast the backfill is.
        target = batches_done() + rng.randint(1, 8)
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, start_new_session=True)
        while child.poll() is None and batches_done() < target:
            time.sleep(0.005)
        if child.poll() is not None:
            break
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        kills += 1
    time.sleep(0.6)  # the killed runs' leases run out
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    assert kills >= 5, "the run finished before it could be killed five times"
    assert final.returncode == 0, final.stderr
    report = json.loads(final.stdout)
    assert report["state"] == "completed"
    assert report["sessions_done"] == report["sessions_seen"] == 1500
    assert_same(legacy, truth, ids)
    counts = row_counts(pg_dsn)
    assert counts["sessions"] == 1500 and counts["message_conflicts"] == 0
