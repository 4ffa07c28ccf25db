"""The MigratingStore: every call routed by the Plan, secondaries repaired, never stale."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memshift.config import Settings
from memshift.migrate.plan import (
    AsyncPlanWatcher,
    Plan,
    PlanWatcher,
    Slice,
    Stage,
    StaticPlan,
    set_slice,
    set_stage,
)
from memshift.migrate.repair import repair
from memshift.model import Message, Session
from memshift.stores.base import Outcome
from memshift.stores.migrating import AsyncMigratingStore, MigratingStore
from memshift.stores.postgres import AsyncPostgresStore, PostgresStore
from memshift.stores.redis import AsyncRedisStore, RedisStore
from tests.integration.test_backfill import as_redis_holds
from tests.integration.test_cli import memshift

T0 = datetime(2026, 5, 19, 10, 0, tzinfo=UTC)


def plan_at(stage: str, **slices: float) -> Plan:
    return Plan(
        version=1,
        stage=Stage(stage),
        slices={path: Slice(read_path=path, percent=p) for path, p in slices.items()},
        changed_at=T0,
        changed_by="test",
    )


def session(sid: str, version: int = 1, **fields: Any) -> Session:
    return Session(session_id=sid, tenant_id="acme", version=version, created_at=T0,
                   updated_at=T0, **fields)


def message(n: int) -> Message:
    return Message(message_id=f"m{n}", role="user", content=f"hello {n}", ts=T0)


@pytest.fixture
def legacy(redis_url: str, redis_prefix: str) -> Iterator[RedisStore]:
    with RedisStore(redis_url, prefix=redis_prefix) as store:
        yield store


@pytest.fixture
def truth(pg_dsn: str) -> Iterator[PostgresStore]:
    with PostgresStore(pg_dsn) as store:
        yield store


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    return tmp_path / "repair.spool"


@pytest.fixture
def config(pg_dsn: str, redis_url: str, redis_prefix: str) -> Settings:
    return Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix)


def router(legacy: RedisStore, truth: PostgresStore, plan: Plan | StaticPlan | PlanWatcher,
           spool_path: Path) -> MigratingStore:
    source = StaticPlan(plan) if isinstance(plan, Plan) else plan
    return MigratingStore(legacy, truth, source, spool_path=spool_path)


def queued(pg_dsn: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT session_id, target, operation FROM memshift.repair_queue ORDER BY id"
        ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def assert_stores_agree(legacy: RedisStore, truth: PostgresStore, *ids: str) -> None:
    for sid in ids:
        in_redis, in_pg = legacy.load_session(sid), truth.load_session(sid)
        assert in_redis is not None and in_pg is not None, sid
        assert as_redis_holds(in_pg) == as_redis_holds(in_redis), sid


# -- writes by stage -------------------------------------------------------------------


def test_redis_only_writes_and_reads_redis_alone(
    legacy: RedisStore, truth: PostgresStore, spool_path: Path
) -> None:
    store = router(legacy, truth, plan_at("redis_only"), spool_path)

    store.save_session(session("s1"))
    store.append_message("s1", message(0))
    result = store.read("s1")

    assert (result.source, result.reason) == ("redis", "stage")
    assert result.state is not None and len(result.state.messages) == 1
    assert truth.load_session("s1") is None


@pytest.mark.parametrize("stage", ["dual_write", "shadow", "cutover"])
def test_before_pg_primary_postgres_gets_the_seq_redis_assigned(
    stage: str, legacy: RedisStore, truth: PostgresStore, spool_path: Path
) -> None:
    store = router(legacy, truth, plan_at(stage), spool_path)
    store.save_session(session("s1", messages_trimmed=3))  # the legacy app trimmed 3

    stored = store.append_message("s1", message(3))
    store.set_status("s1", "paused", at=T0)

    in_pg = truth.load_session("s1")
    assert stored.seq == 3
    assert in_pg is not None and [m.seq for m in in_pg.messages] == [3]
    assert in_pg.session.status == "paused" and in_pg.events[0].event_seq == 0
    assert store.read("s1").source == "redis"
    assert_stores_agree(legacy, truth, "s1")


def test_pg_primary_writes_postgres_first_and_redis_gets_its_seq(
    legacy: RedisStore, truth: PostgresStore, spool_path: Path
) -> None:
    store = router(legacy, truth, plan_at("pg_primary"), spool_path)
    store.save_session(session("s1"))
    for n in range(3):
        store.append_message("s1", message(n))

    run = store.upsert_tool_run("s1", {"tool_call_id": "t1", "name": "search",
                                       "status": "retrying", "attempts": 2,
                                       "updated_at": T0})
    store.put_checkpoint("s1", {"checkpoint_id": "c1", "step": 1, "created_at": T0})

    redis_copy = legacy.load_session("s1")
    assert redis_copy is not None and [m.seq for m in redis_copy.messages] == [0, 1, 2]
    assert redis_copy.tool_run("t1") == run
    assert store.read("s1").source == "postgres"
    assert_stores_agree(legacy, truth, "s1")


def test_retired_writes_and_reads_postgres_alone(
    legacy: RedisStore, truth: PostgresStore, spool_path: Path
) -> None:
    store = router(legacy, truth, plan_at("retired"), spool_path)

    store.save_session(session("s1"))
    store.append_message("s1", message(0))

    assert legacy.load_session("s1") is None
    assert (store.read("s1").source, store.load_session("s1") is not None) == ("postgres", True)
    assert store.stats.writes == {("postgres", "ok"): 2}


def test_a_write_the_primary_did_not_apply_is_not_replicated(
    legacy: RedisStore, truth: PostgresStore, spool_path: Path
) -> None:
    store = router(legacy, truth, plan_at("dual_write"), spool_path)
    legacy.save_session(session("s1", version=5))  # the legacy app is ahead

    outcome = store.save_session(session("s1", version=2))

    assert outcome is Outcome.STALE
    assert truth.load_session("s1") is None
    assert store.stats.writes[("postgres", "skipped")] == 1


def test_a_failed_primary_write_fails_the_call(
    legacy: RedisStore, truth: PostgresStore, spool_path: Path
) -> None:
    store = router(legacy, truth, plan_at("dual_write"), spool_path)

    with pytest.raises(Exception, match="does not exist"):
        store.set_status("nobody", "paused")
    assert store.stats.writes[("redis", "error")] == 1 and not queued_any(truth)


def queued_any(truth: PostgresStore) -> bool:
    with truth.pool.connection() as conn:
        row = conn.execute("SELECT count(*) FROM memshift.repair_queue").fetchone()
    return bool(row and row[0])


# -- reads -----------------------------------------------------------------------------


def test_cutover_reads_postgres_only_for_the_slices_that_cover_the_read(
    legacy: RedisStore, truth: PostgresStore, spool_path: Path
) -> None:
    store = router(legacy, truth, plan_at("cutover", resume=100, transcript=0), spool_path)
    store.save_session(session("s1"))

    resume = store.read("s1", read_path="resume", tenant_id="acme")
    transcript = store.read("s1", read_path="transcript", tenant_id="acme")

    assert (resume.source, resume.reason) == ("postgres", "slice")
    assert (transcript.source, transcript.reason) == ("redis", "stage")
    assert resume.state == transcript.state
    assert store.stats.reads == {("postgres", "resume", "slice"): 1,
                                 ("redis", "transcript", "stage"): 1}


def test_a_router_whose_plan_is_stale_reads_redis_before_pg_primary(
    legacy: RedisStore, truth: PostgresStore, spool_path: Path
) -> None:
    cutover = router(legacy, truth, StaticPlan(plan_at("cutover", resume=100), fresh=False),
                     spool_path)
    primary = router(legacy, truth, StaticPlan(plan_at("pg_primary"), fresh=False), spool_path)

    assert (cutover.read("s1", "resume").source, cutover.read("s1", "resume").reason) == (
        "redis", "stale_plan")
    assert primary.read("s1", "resume").source == "postgres"  # Redis may be behind here
    assert cutover.stats.stale_plan_reads == 2


def test_a_session_with_queued_repairs_is_read_from_the_primary_until_repaired(
    legacy: RedisStore, truth: PostgresStore, spool_path: Path, pg_dsn: str, config: Settings
) -> None:
    store = router(legacy, truth, plan_at("cutover", resume=100), spool_path)
    store.save_session(session("s1"))
    store.append_message("s1", message(0))
    # Another process's write reached Redis, and its copy to PostgreSQL failed.
    legacy.append_message("s1", message(1).model_copy(update={"seq": 1}))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO memshift.repair_queue (session_id, target, operation, error)"
                     " VALUES ('s1', 'postgres', 'append_message', 'StoreUnavailable: down')")

    before = store.read("s1", "resume")
    summary = repair(config, spool_path=spool_path)
    after = store.read("s1", "resume")

    assert (before.source, before.reason) == ("redis", "repair_pending")
    assert before.state is not None and len(before.state.messages) == 2
    assert (summary.sessions_repaired, summary.remaining) == (1, 0)
    assert (after.source, after.reason) == ("postgres", "slice")
    assert after.state is not None and after.state.messages == before.state.messages


# -- secondary failures and repair -------------------------------------------------------


def test_a_failed_secondary_write_is_queued_never_raised_and_repair_makes_them_agree(
    legacy: RedisStore, truth: PostgresStore, spool_path: Path, pg_dsn: str, config: Settings
) -> None:
    # PostgreSQL holds a session Redis lost (say it expired there): in pg_primary the
    # copy to Redis of the next message leaves a gap in Redis, so it cannot be written.
    truth.save_session(session("s1"))
    for n in range(3):
        truth.append_message("s1", message(n))
    store = router(legacy, truth, plan_at("pg_primary"), spool_path)

    stored = store.append_message("s1", message(3))
    store.put_summary("s1", {"version": 1, "text": "so far", "updated_at": T0})

    assert stored.seq == 3
    assert queued(pg_dsn)[0] == ("s1", "redis", "append_message")
    assert store.stats.repairs_enqueued >= 1 and store.stats.spool_writes == 0
    assert store.read("s1").source == "postgres"

    summary = repair(config, spool_path=spool_path)

    assert summary.sessions_repaired == 1 and summary.failed == [] and queued(pg_dsn) == []
    assert_stores_agree(legacy, truth, "s1")
    assert repair(config, spool_path=spool_path).sessions_repaired == 0  # nothing twice


def test_a_session_repair_that_cannot_converge_stays_queued_with_its_error(
    legacy: RedisStore, truth: PostgresStore, spool_path: Path, pg_dsn: str, config: Settings
) -> None:
    store = router(legacy, truth, plan_at("cutover", resume=100), spool_path)
    store.save_session(session("s1"))
    truth.append_message("s1", message(9).model_copy(update={"seq": 0}))  # differs at seq 0

    store.append_message("s1", message(0))  # Redis takes it; PostgreSQL refuses: conflict
    summary = repair(config, spool_path=spool_path)

    assert store.read("s1", "resume").source == "redis"
    assert [f.session_id for f in summary.failed] == ["s1"]
    assert "message_conflicts" in summary.failed[0].error
    assert queued(pg_dsn) == [("s1", "postgres", "append_message")]


def test_repair_moves_the_spool_into_the_queue_once_however_often_it_runs(
    legacy: RedisStore, truth: PostgresStore, spool_path: Path, pg_dsn: str, config: Settings
) -> None:
    from memshift.migrate import spool

    legacy.save_session(session("s1"))
    legacy.append_message("s1", message(0))
    entry = spool.SpoolEntry.new("s1", "postgres", "append_message", "down", T0)
    spool.append(spool_path, entry)
    saved = spool_path.read_text()
    with psycopg.connect(pg_dsn) as conn:
        spool.drain(spool_path, lambda entries: _enqueue_with(conn, entries))
    spool_path.write_text(saved)  # as if the first move crashed before emptying the file

    summary = repair(config, spool_path=spool_path)

    assert (summary.moved_from_spool, summary.sessions_repaired, summary.entries_done) == (1, 1, 1)
    assert not spool.has_entries(spool_path) and queued(pg_dsn) == []
    assert_stores_agree(legacy, truth, "s1")


def _enqueue_with(conn: psycopg.Connection[Any], entries: list[Any]) -> None:
    from memshift.migrate.repair import _enqueue

    _enqueue(conn, entries)


def test_memshift_repair_reports_as_json(config: Settings, tmp_path: Path) -> None:
    assert config.postgres_dsn and config.redis_url
    result = memshift("repair", "--json", "--spool", str(tmp_path / "none.spool"), env={
        "MEMSHIFT_POSTGRES_DSN": config.postgres_dsn, "MEMSHIFT_REDIS_URL": config.redis_url})

    assert result.returncode == 0, result.stderr
    assert '"remaining": 0' in result.stdout and '"failed": []' in result.stdout


# -- the Plan, live ----------------------------------------------------------------------


def test_a_plan_change_reaches_a_watching_router_within_a_second(
    legacy: RedisStore, truth: PostgresStore, spool_path: Path, pg_dsn: str
) -> None:
    with PlanWatcher(pg_dsn, poll_seconds=60) as watcher, psycopg.connect(
        pg_dsn, autocommit=True
    ) as conn:
        store = router(legacy, truth, watcher, spool_path)
        store.save_session(session("before"))

        set_stage(conn, "dual_write", "start dual writes")
        changed = time.monotonic()
        while watcher.current()[0].stage is not Stage.DUAL_WRITE:
            assert time.monotonic() - changed < 1.0, "the router did not see the change"
            time.sleep(0.01)
        store.save_session(session("after"))

    assert truth.load_session("before") is None and truth.load_session("after") is not None


def test_a_stage_set_in_one_process_moves_reads_in_another(
    legacy: RedisStore, truth: PostgresStore, pg_dsn: str, redis_url: str, redis_prefix: str,
    tmp_path: Path,
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for stage in ("dual_write", "shadow", "cutover"):
            set_stage(conn, stage, "rehearsal", force=True)
    router(legacy, truth, plan_at("cutover"), tmp_path / "spool").save_session(session("s1"))
    child = subprocess.Popen(
        [sys.executable, "-c", WATCHING_ROUTER, pg_dsn, redis_url, redis_prefix,
         str(tmp_path / "spool")],
        stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "redis"
        result = memshift("slice", "set", "resume", "--percent", "100", "--new-path",
                          "--reason", "go",
                          env={"MEMSHIFT_POSTGRES_DSN": pg_dsn})
        changed = time.monotonic()  # the change committed before the command exited
        assert result.returncode == 0, result.stderr
        seen = child.stdout.readline().strip()
        waited = time.monotonic() - changed
    finally:
        child.kill()
        child.wait()

    assert seen == "postgres" and waited < 1.0


# A router in its own process: print the first read's source, then the new source as
# soon as a read goes elsewhere.
WATCHING_ROUTER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from memshift.migrate.plan import PlanWatcher
    from memshift.stores.migrating import MigratingStore
    from memshift.stores.postgres import PostgresStore
    from memshift.stores.redis import RedisStore

    dsn, url, prefix, spool = sys.argv[1:]
    with PlanWatcher(dsn, poll_seconds=60) as watcher:
        store = MigratingStore(RedisStore(url, prefix=prefix), PostgresStore(dsn), watcher,
                               spool_path=Path(spool))
        first = store.read("s1", "resume").source
        print(first, flush=True)
        started = time.monotonic()
        while time.monotonic() - started < 30:
            source = store.read("s1", "resume").source
            if source != first:
                print(source, flush=True)
                break
            time.sleep(0.005)
        store.close()
""")


async def test_the_async_router_routes_like_the_sync_one(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with AsyncPlanWatcher(pg_dsn, poll_seconds=60) as watcher, AsyncMigratingStore(
        AsyncRedisStore(redis_url, prefix=redis_prefix), AsyncPostgresStore(pg_dsn), watcher,
        spool_path=tmp_path / "spool",
    ) as store:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            set_stage(conn, "dual_write", "go")
            set_stage(conn, "shadow", "go", force=True)
            set_stage(conn, "cutover", "go", force=True)
            final = set_slice(conn, "resume", 100, "go")
        deadline = time.monotonic() + 1.0
        while watcher.current()[0].version != final.version:
            assert time.monotonic() < deadline, "the watcher did not see the change"
            await asyncio.sleep(0.01)
        await store.save_session(session("s1"))
        stored = await store.append_message("s1", message(0))
        result = await store.read("s1", "resume")
        listed = [sid async for sid in store.list_sessions()]

    assert stored.seq == 0 and (result.source, result.reason) == ("postgres", "slice")
    assert result.state is not None and result.state.messages[0].seq == 0
    assert listed == ["s1"]


# -- cohorts -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ids=st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\x00"),
                         min_size=1, max_size=40), min_size=1, max_size=5, unique=True),
    percents=st.lists(st.floats(0, 100, allow_nan=False), min_size=2, max_size=6),
)
def test_a_session_read_from_postgres_stays_there_as_the_cohort_grows(
    legacy: RedisStore, truth: PostgresStore, spool_path: Path, ids: list[str],
    percents: list[float],
) -> None:
    moved: set[str] = set()
    for percent in sorted(percents):
        store = router(legacy, truth, plan_at("cutover", resume=percent), spool_path)
        now_in = {sid for sid in ids if store.read(sid, "resume").source == "postgres"}
        assert moved <= now_in
        moved = now_in
