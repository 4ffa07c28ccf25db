"""The retired stage's cache across a Redis restart: no process serves an entry that a
write could not invalidate while Redis was down (the `outage-redis` drill's finding).

A durable Redis (append-only file, fsync always: the drill's private server) is
killed, a writer writes sessions that other processes have cached, and Redis comes
back with the old entries. Each router here has stores and a Plan watcher of its own,
as separate processes would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from memshift.drills.context import DrillSkipped
from memshift.drills.private_redis import PrivateRedis
from memshift.migrate.plan import AsyncPlanWatcher, PlanWatcher, Stage, StaticPlan, set_stage
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from memshift.stores.routing import ReadResult
from tests.integration.test_router import message, plan_at, session

pytestmark = pytest.mark.faults

SESSIONS = [f"probe-{n}" for n in range(8)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    try:
        with PrivateRedis(tmp_path / "redis") as started:
            yield started
    except DrillSkipped as exc:
        pytest.skip(str(exc))


@pytest.fixture
def retired(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for stage in list(Stage)[1:]:
            set_stage(conn, stage, "test", force=True)


@pytest.fixture
def process(
    pg_dsn: str, redis_prefix: str, server: PrivateRedis, tmp_path: Path, retired: None
) -> Iterator[Callable[[], MigratingStore]]:
    """A router as an application process has it: its own stores and Plan watcher."""
    made: list[tuple[MigratingStore, PlanWatcher]] = []

    def make() -> MigratingStore:
        watcher = PlanWatcher(pg_dsn, poll_seconds=0.2)
        router = MigratingStore(RedisStore(server.url, prefix=redis_prefix),
                                PostgresStore(pg_dsn), watcher,
                                spool_path=tmp_path / f"spool-{len(made)}")
        made.append((router, watcher))
        return router

    yield make
    for router, watcher in made:
        router.close()
        watcher.close()


def cache_epoch(pg_dsn: str) -> int:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT epoch FROM memshift.cache_epoch").fetchone()
    assert row is not None
    return int(row[0])


def heard(router: MigratingStore, epoch: int) -> None:
    """Wait until the router's watcher has heard the epoch announced (a NOTIFY travels
    in milliseconds: while Redis restarts, in practice; waited for here so that the
    test judges the protocol, not the scheduler)."""
    watcher = router._plan
    assert isinstance(watcher, PlanWatcher)
    deadline = time.monotonic() + 10
    while (watcher.cache_epoch() or 0) < epoch:
        assert time.monotonic() < deadline, "the bump was not announced to the watcher"
        time.sleep(0.01)


def cached_then_written_while_redis_was_down(
    writer: MigratingStore, readers: list[MigratingStore], server: PrivateRedis
) -> None:
    for sid in SESSIONS:
        writer.save_session(session(sid))
        writer.append_message(sid, message(0))
        for reader in readers:
            assert [reader.read(sid).source for _ in range(2)][-1] == "cache"
    server.kill()
    for sid in SESSIONS:
        writer.append_message(sid, message(1))  # acknowledged: PostgreSQL took it


def messages(result: ReadResult) -> int:
    assert result.state is not None
    return len(result.state.messages)


def test_after_a_redis_restart_no_process_serves_an_entry_a_write_could_not_invalidate(
    process: Callable[[], MigratingStore], server: PrivateRedis, pg_dsn: str
) -> None:
    writer, reader = process(), process()
    before = cache_epoch(pg_dsn)
    cached_then_written_while_redis_was_down(writer, [reader], server)
    bumped = cache_epoch(pg_dsn)  # as the writes returned
    heard(reader, bumped)
    server.start()  # from its append-only file: the old entries are back

    right_after = [reader.read(sid) for sid in SESSIONS]
    newcomer = [process().read(sid) for sid in SESSIONS]
    again = [reader.read(sid) for sid in SESSIONS]

    assert bumped > before
    assert [messages(r) for r in right_after] == [2] * len(SESSIONS)
    assert {r.source for r in right_after} == {"postgres"}
    assert [messages(r) for r in newcomer] == [2] * len(SESSIONS)
    # The cache serves again, what PostgreSQL holds now.
    assert {r.source for r in again} == {"cache"}
    assert [messages(r) for r in again] == [2] * len(SESSIONS)
    assert writer.stats.cache["epoch_bumped"] >= len(SESSIONS)


def test_a_router_with_a_stale_plan_reads_postgres_not_the_cache(
    process: Callable[[], MigratingStore], server: PrivateRedis, pg_dsn: str,
    redis_prefix: str, tmp_path: Path,
) -> None:
    # A process whose watcher could not refresh may have missed the bump: whatever
    # its cache epoch says, it must not trust the cache.
    writer = process()
    stale = MigratingStore(RedisStore(server.url, prefix=redis_prefix),
                           PostgresStore(pg_dsn), StaticPlan(plan_at("retired"), fresh=False),
                           spool_path=tmp_path / "stale-spool")
    cached_then_written_while_redis_was_down(writer, [], server)
    server.start()

    results = [stale.read(sid) for sid in SESSIONS]
    stale.close()

    assert {(r.source, r.reason) for r in results} == {("postgres", "stale_plan")}
    assert [messages(r) for r in results] == [2] * len(SESSIONS)


def test_a_router_without_a_watcher_asks_postgres_for_the_epoch(
    process: Callable[[], MigratingStore], server: PrivateRedis, pg_dsn: str,
    redis_prefix: str, tmp_path: Path,
) -> None:
    writer = process()
    cached_then_written_while_redis_was_down(writer, [process()], server)
    server.start()
    # A script's router over a fixed Plan, started after the restart.
    static = MigratingStore(RedisStore(server.url, prefix=redis_prefix),
                            PostgresStore(pg_dsn), StaticPlan(plan_at("retired")),
                            spool_path=tmp_path / "static-spool")

    results = [static.read(sid) for sid in SESSIONS]
    static.close()

    assert [messages(r) for r in results] == [2] * len(SESSIONS)


def test_the_async_watcher_hears_a_bump_announced(pg_dsn: str, retired: None) -> None:
    async def scenario() -> tuple[int | None, int | None]:
        async with AsyncPlanWatcher(pg_dsn, poll_seconds=60) as watcher:
            first = watcher.cache_epoch()
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute("UPDATE memshift.cache_epoch SET epoch = epoch + 5")
            deadline = time.monotonic() + 10
            while watcher.cache_epoch() == first and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return first, watcher.cache_epoch()

    first, then = asyncio.run(scenario())

    assert first is not None and then == first + 5  # heard, not polled (a minute away)
