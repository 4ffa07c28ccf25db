"""The retired stage: Redis as a cache-aside in front of PostgreSQL, never stale after a
write returns; and the router's background repair."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from memshift.migrate.plan import StaticPlan
from memshift.model import SessionState, ToolRun
from memshift.stores.migrating import AsyncMigratingStore, MigratingStore
from memshift.stores.postgres import AsyncPostgresStore, PostgresStore
from memshift.stores.redis import AsyncRedisStore, RedisStore
from tests.integration.test_router import (
    T0,
    assert_stores_agree,
    message,
    plan_at,
    queued,
    session,
)


@pytest.fixture
def routers(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> Iterator[Callable[..., MigratingStore]]:
    """Routers in `retired`, each over stores of its own, as in separate processes."""
    made: list[MigratingStore] = []

    def make(stage: str = "retired", version: int = 1, **options: Any) -> MigratingStore:
        store = MigratingStore(
            RedisStore(redis_url, prefix=redis_prefix), PostgresStore(pg_dsn),
            StaticPlan(plan_at(stage).model_copy(update={"version": version})),
            spool_path=tmp_path / "repair.spool", **options,
        )
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def tool_run(attempts: int) -> ToolRun:
    return ToolRun(tool_call_id="t1", name="search", status="retrying", attempts=attempts,
                   updated_at=T0 + timedelta(seconds=attempts))


def attempts(state: SessionState | None) -> int:
    assert state is not None
    run = state.tool_run("t1")
    return run.attempts if run is not None else 0


def test_a_read_misses_then_hits_and_a_write_sends_the_next_read_to_postgres(
    routers: Callable[..., MigratingStore],
) -> None:
    store = routers()
    store.save_session(session("s1"))
    store.append_message("s1", message(0))

    first, second = store.read("s1", "resume"), store.read("s1", "resume")
    store.append_message("s1", message(1))
    third, fourth = store.read("s1", "resume"), store.read("s1", "resume")

    assert [r.source for r in (first, second, third, fourth)] == [
        "postgres", "cache", "postgres", "cache"]
    assert first.state == second.state and first.state is not None
    assert third.state == fourth.state and third.state is not None
    assert len(third.state.messages) == 2 and third.state.messages[1].seq == 1
    assert store.stats.reads == {("postgres", "resume", "stage"): 2,
                                 ("cache", "resume", "stage"): 2}
    assert store.stats.cache == {"miss": 2, "fill": 2, "hit": 2}


def test_a_fill_of_a_state_read_before_a_write_is_refused(
    routers: Callable[..., MigratingStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = routers(), routers()
    writer.save_session(session("s1"))
    writer.append_message("s1", message(0))
    load = reader._postgres.load_session

    def load_then_let_a_write_through(session_id: str) -> SessionState | None:
        state = load(session_id)  # the old state, read before the write below
        writer.append_message(session_id, message(1))  # begins, writes, ends, returns
        return state

    monkeypatch.setattr(reader._postgres, "load_session", load_then_let_a_write_through)
    raced = reader.read("s1")
    counted = dict(reader.stats.cache)
    monkeypatch.undo()
    after = reader.read("s1")

    assert raced.state is not None and len(raced.state.messages) == 1
    assert counted == {"miss": 1, "fill_refused": 1}
    assert (after.source, after.state is not None and len(after.state.messages)) == (
        "postgres", 2)
    assert reader.read("s1").source == "cache"


def test_a_read_during_a_write_does_not_fill_the_cache(
    routers: Callable[..., MigratingStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = routers(), routers()
    writer.save_session(session("s1"))
    write = writer._postgres.append_message
    during: list[str] = []

    def write_then_let_a_read_through(session_id: str, msg: Any) -> Any:
        stored = write(session_id, msg)  # committed; the writer has not invalidated again
        during.append(reader.read(session_id).source)
        during.append(str(reader.stats.cache["fill"]))
        return stored

    monkeypatch.setattr(writer._postgres, "append_message", write_then_let_a_read_through)
    writer.append_message("s1", message(0))
    after = reader.read("s1")

    assert during == ["postgres", "0"]  # read, but not cached: a write is in flight
    assert after.source == "postgres" and after.state is not None
    assert len(after.state.messages) == 1


def test_retired_reads_never_return_a_state_older_than_a_write_that_returned(
    routers: Callable[..., MigratingStore],
) -> None:
    sessions = [f"s{n}" for n in range(4)]
    writers = {sid: routers() for sid in sessions}  # one writer per session: seqs in order
    readers = [routers(), routers(), routers()]
    for sid in sessions:
        writers[sid].save_session(session(sid))
    lock = threading.Lock()
    returned = {sid: (0, 0) for sid in sessions}  # messages, attempts the last write returned
    stop = threading.Event()
    stale: list[str] = []
    errors: list[BaseException] = []

    def write(sid: str) -> None:
        store = writers[sid]
        for n in range(100):
            store.append_message(sid, message(n))
            with lock:
                returned[sid] = (n + 1, returned[sid][1])
            store.upsert_tool_run(sid, tool_run(n + 1))
            with lock:
                returned[sid] = (returned[sid][0], n + 1)

    def read(store: MigratingStore) -> None:
        while not stop.is_set():
            for sid in sessions:
                with lock:
                    floor = returned[sid]
                state = store.read(sid).state
                assert state is not None
                seen = (len(state.messages), attempts(state))
                if seen[0] < floor[0] or seen[1] < floor[1]:
                    stale.append(f"{sid}: read {seen}, after writes that returned {floor}")

    def guarded(target: Callable[..., None], *args: Any) -> Callable[[], None]:
        def run() -> None:
            try:
                target(*args)
            except BaseException as exc:  # surfaced below, on the test's thread
                errors.append(exc)
        return run

    writing = [threading.Thread(target=guarded(write, sid)) for sid in sessions]
    reading = [threading.Thread(target=guarded(read, store)) for store in readers]
    for thread in writing + reading:
        thread.start()
    for thread in writing:
        thread.join()
    stop.set()
    for thread in reading:
        thread.join()

    assert errors == [] and stale == []
    hits = sum(store.stats.cache["hit"] for store in readers)
    fills = sum(store.stats.cache["fill"] for store in readers)
    assert hits > 0 and fills > 0  # the cache was in play, not bypassed
    for sid in sessions:
        final = readers[0].read(sid).state
        assert final is not None and (len(final.messages), attempts(final)) == (100, 100)


def test_entries_cached_under_another_plan_version_are_not_served(
    routers: Callable[..., MigratingStore],
) -> None:
    store = routers()
    store.save_session(session("s1"))
    store.read("s1")
    later = routers(version=2)

    assert store.read("s1").source == "cache"
    assert later.read("s1").source == "postgres"


def test_writes_in_pg_primary_invalidate_the_cache_too(
    routers: Callable[..., MigratingStore],
) -> None:
    retired, primary = routers(), routers("pg_primary")
    primary.save_session(session("s1"))
    retired.read("s1")  # cached

    primary.append_message("s1", message(0))  # a process that has not seen `retired` yet
    result = retired.read("s1")

    assert result.source == "postgres" and result.state is not None
    assert len(result.state.messages) == 1


async def test_the_async_router_caches_like_the_sync_one(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with AsyncMigratingStore(
        AsyncRedisStore(redis_url, prefix=redis_prefix), AsyncPostgresStore(pg_dsn),
        StaticPlan(plan_at("retired")), spool_path=tmp_path / "spool",
    ) as store:
        await store.save_session(session("s1"))
        sources = [(await store.read("s1")).source for _ in range(2)]
        await store.append_message("s1", message(0))
        fresh = await store.read("s1")

    assert sources == ["postgres", "cache"]
    assert fresh.source == "postgres" and fresh.state is not None
    assert len(fresh.state.messages) == 1


# -- the background repair ---------------------------------------------------------------


def test_the_background_repair_drains_a_queued_repair_by_itself(
    routers: Callable[..., MigratingStore], pg_dsn: str
) -> None:
    # PostgreSQL holds a session Redis lost: in pg_primary the copy of the next message
    # to Redis would leave a gap there, so it is queued for repair.
    with PostgresStore(pg_dsn) as truth:
        truth.save_session(session("s1"))
        for n in range(3):
            truth.append_message("s1", message(n))
    store = routers("pg_primary", repair_interval=0.1)

    store.append_message("s1", message(3))
    queued_at_first = queued(pg_dsn)
    deadline = time.monotonic() + 10
    while queued(pg_dsn):
        assert time.monotonic() < deadline, "the background repair did not drain the queue"
        time.sleep(0.05)
    store.close()

    assert queued_at_first == [("s1", "redis", "append_message")]
    assert store.stats.background_repair["sessions_repaired"] == 1
    with PostgresStore(pg_dsn) as truth:
        assert_stores_agree(store._redis, truth, "s1")
    assert not any(t.name == "memshift-repair" for t in threading.enumerate())


def test_a_failing_background_repair_is_logged_never_raised(
    redis_url: str, redis_prefix: str, pg_dsn: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE memshift.repair_queue")  # every pass fails
    store = MigratingStore(RedisStore(redis_url, prefix=redis_prefix), PostgresStore(pg_dsn),
                           StaticPlan(plan_at("retired")), spool_path=tmp_path / "spool",
                           repair_interval=0.05)
    deadline = time.monotonic() + 10
    while store.stats.background_repair["failed_runs"] < 2:
        assert time.monotonic() < deadline, "the background repair did not run"
        time.sleep(0.02)
    store.save_session(session("s1"))  # the application carries on
    store.close()

    assert "background repair failed" in caplog.text


async def test_the_async_background_repair_is_a_task_stopped_by_close(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    store = AsyncMigratingStore(
        AsyncRedisStore(redis_url, prefix=redis_prefix), AsyncPostgresStore(pg_dsn),
        StaticPlan(plan_at("retired")), spool_path=tmp_path / "spool", repair_interval=0.05,
    )
    deadline = time.monotonic() + 10
    while store.stats.background_repair["runs"] < 2:
        assert time.monotonic() < deadline, "the background repair did not run"
        await asyncio.sleep(0.02)
    await store.close()

    assert not [t for t in asyncio.all_tasks() if t.get_name() == "memshift-repair"]
    assert store.stats.background_repair["failed_runs"] == 0
