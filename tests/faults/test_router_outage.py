"""The router through outages: PostgreSQL cut away mid dual-write, a Plan gone stale."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from memshift.config import Settings
from memshift.faults.proxy import FaultProxy
from memshift.migrate import spool
from memshift.migrate.plan import PlanWatcher, Stage, StaticPlan, set_slice, set_stage
from memshift.migrate.repair import repair
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from tests.integration.test_router import assert_stores_agree, message, plan_at, session

pytestmark = pytest.mark.faults


@pytest.fixture
def proxy(pg_dsn: str) -> Iterator[FaultProxy]:
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    host, port = str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)
    with FaultProxy(host, port) as made:
        yield made


def test_writes_succeed_while_postgres_is_down_and_repair_makes_the_stores_agree(
    pg_dsn: str, redis_url: str, redis_prefix: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    spool_path = tmp_path / "repair.spool"
    legacy = RedisStore(redis_url, prefix=redis_prefix)
    behind_proxy = PostgresStore(proxy.dsn_for(pg_dsn), timeout=0.5)
    store = MigratingStore(legacy, behind_proxy, StaticPlan(plan_at("dual_write")),
                           spool_path=spool_path)
    store.save_session(session("before"))
    store.append_message("before", message(0))

    proxy.refuse()
    proxy.cut()
    store.append_message("before", message(1))
    store.set_status("before", "paused")
    store.save_session(session("during"))
    store.append_message("during", message(0))
    store.put_checkpoint("during", {"checkpoint_id": "c1", "step": 1})
    spooled = spool_path.read_text().splitlines()
    proxy.heal()

    summary = repair(Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix),
                     spool_path=spool_path)

    assert store.stats.spool_writes == len(spooled) == 5
    assert store.stats.writes[("redis", "ok")] == 7
    assert (summary.moved_from_spool, summary.sessions_repaired, summary.remaining) == (5, 2, 0)
    assert not spool.has_entries(spool_path)
    with PostgresStore(pg_dsn) as truth:
        assert_stores_agree(legacy, truth, "before", "during")
    store.close()


def test_a_watcher_cut_off_goes_stale_reads_redis_and_recovers(
    pg_dsn: str, redis_url: str, redis_prefix: str, proxy: FaultProxy, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for stage in ("dual_write", "shadow", "cutover"):
            set_stage(conn, stage, "rehearsal", force=True)
        set_slice(conn, "resume", 100, "all of resume")
    watcher = PlanWatcher(proxy.dsn_for(pg_dsn), poll_seconds=0.2, max_staleness=0.5)
    store = MigratingStore(RedisStore(redis_url, prefix=redis_prefix), PostgresStore(pg_dsn),
                           watcher, spool_path=tmp_path / "spool")
    caplog.set_level(logging.WARNING, logger="memshift.plan")
    try:
        assert store.read("s1", "resume").source == "postgres"

        proxy.refuse()
        proxy.cut()
        time.sleep(1.0)
        stale = [store.read("s1", "resume") for _ in range(3)]
        proxy.heal()
        deadline = time.monotonic() + 5
        while not watcher.current()[1]:
            assert time.monotonic() < deadline, "the watcher did not recover"
            time.sleep(0.05)
        fresh = store.read("s1", "resume")
    finally:
        store.close()
        watcher.close()

    assert {(r.source, r.reason) for r in stale} == {("redis", "stale_plan")}
    assert (fresh.source, fresh.reason) == ("postgres", "slice")
    assert watcher.current()[0].stage is Stage.CUTOVER
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("has not been refreshed" in w for w in warnings) == 1
    assert sum("fresh again" in w for w in warnings) == 1


def test_reads_served_by_redis_do_not_wait_for_an_unreachable_postgres(
    pg_dsn: str, redis_url: str, redis_prefix: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        set_stage(conn, "dual_write", "start")
    with PlanWatcher(pg_dsn) as watcher:
        store = MigratingStore(RedisStore(redis_url, prefix=redis_prefix),
                               PostgresStore(proxy.dsn_for(pg_dsn), timeout=5), watcher,
                               spool_path=tmp_path / "spool")
        store.save_session(session("s1"))
        proxy.refuse()
        proxy.cut()
        started = time.monotonic()
        results = [store.read("s1") for _ in range(20)]
        elapsed = time.monotonic() - started
        store.close()

    assert {(r.source, r.reason) for r in results} == {("redis", "stage")}
    assert elapsed < 1.0
