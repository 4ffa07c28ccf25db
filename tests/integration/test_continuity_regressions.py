"""Regressions found by the continuity model (tests/model), each named after its story."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from memshift.config import Settings
from memshift.errors import StoreUnavailable
from memshift.faults.proxy import FaultProxy
from memshift.migrate.plan import (
    IllegalMove,
    Stage,
    StaticPlan,
    check_gates,
    rollback,
    set_stage,
)
from memshift.migrate.repair import repair
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from tests.integration.test_plan import complete_a_backfill, pass_parity
from tests.integration.test_router import assert_stores_agree, message, plan_at, session


@pytest.fixture
def pg_proxy(pg_dsn: str) -> Iterator[FaultProxy]:
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    with FaultProxy(str(params.get("host") or "127.0.0.1"),
                    int(params.get("port") or 5432)) as proxy:
        yield proxy


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[FaultProxy]:
    kwargs = redis.Redis.from_url(redis_url).get_connection_kwargs()
    with FaultProxy(str(kwargs.get("host", "127.0.0.1")),
                    int(kwargs.get("port", 6379))) as proxy:
        yield proxy


def behind_proxy(proxy: FaultProxy, redis_url: str, prefix: str) -> RedisStore:
    """A RedisStore through ``proxy`` that fails at once when cut (no retries)."""
    client = redis.Redis.from_url(proxy.redis_url_for(redis_url), retry=Retry(NoBackoff(), 0))
    return RedisStore(client, prefix=prefix)


def cut_during(proxy: FaultProxy, store: RedisStore) -> None:
    proxy.refuse()
    proxy.cut()


def healed(proxy: FaultProxy, store: RedisStore) -> None:
    proxy.heal()
    store.client.connection_pool.disconnect()  # drop the connections the cut killed


def m1_misses_redis(store: MigratingStore, proxy: FaultProxy, legacy: RedisStore) -> None:
    """Session s1, written with Redis as the secondary: m0, then m1, whose copy to Redis
    fails (queued for repair)."""
    store.save_session(session("s1"))
    store.append_message("s1", message(0))
    cut_during(proxy, legacy)
    store.append_message("s1", message(1))
    healed(proxy, legacy)


def test_a_router_first_used_while_postgres_is_down_writes_postgres_once_it_is_back(
    pg_dsn: str, redis_url: str, redis_prefix: str, pg_proxy: FaultProxy, tmp_path: Path
) -> None:
    # The story: an application process starts during a PostgreSQL outage, so its
    # store's first open fails. psycopg_pool closes a pool whose first open timed
    # out for good, so every later call failed too, long after PostgreSQL was back.
    truth = PostgresStore(pg_proxy.dsn_for(pg_dsn), timeout=0.5)
    store = MigratingStore(RedisStore(redis_url, prefix=redis_prefix), truth,
                           StaticPlan(plan_at("dual_write")), spool_path=tmp_path / "spool")
    pg_proxy.refuse()
    store.save_session(session("s1"))  # PostgreSQL's copy goes to the spool
    with pytest.raises(StoreUnavailable):
        truth.load_session("s1")

    pg_proxy.heal()
    store.append_message("s1", message(0))

    with PostgresStore(pg_dsn) as direct:
        copied = direct.load_session("s1")
    assert copied is not None and [m.message_id for m in copied.messages] == ["m0"]
    assert store.stats.writes[("postgres", "ok")] == 1
    store.close()


def test_a_message_appended_after_a_rollback_from_pg_primary_keeps_its_seq_and_is_read(
    pg_dsn: str, redis_url: str, redis_prefix: str, redis_proxy: FaultProxy, tmp_path: Path
) -> None:
    # The story: in pg_primary a message's copy to Redis fails (queued for repair);
    # the operator rolls back to shadow before the repair runs; the next message goes
    # to Redis first, which lacked the queued one, so Redis gave it the same seq:
    # PostgreSQL refused it as a conflict, and no store held both messages.
    legacy = behind_proxy(redis_proxy, redis_url, redis_prefix)
    source = StaticPlan(plan_at("pg_primary"))
    with PostgresStore(pg_dsn) as truth:
        store = MigratingStore(legacy, truth, source, spool_path=tmp_path / "spool")
        m1_misses_redis(store, redis_proxy, legacy)
        source.plan = plan_at("shadow")  # `memshift rollback`

        stored = store.append_message("s1", message(2))
        read = store.read("s1")
        summary = repair(Settings(redis_url=redis_url, postgres_dsn=pg_dsn,
                                  prefix=redis_prefix), spool_path=tmp_path / "spool")

        assert store.write_route("s1") == ("redis", "postgres")  # repaired: the Plan's
        assert stored.seq == 2
        assert read.state is not None
        assert [m.message_id for m in read.state.messages] == ["m0", "m1", "m2"]
        assert summary.failed == [] and summary.remaining == 0
        assert_stores_agree(legacy, truth, "s1")


def test_after_a_rollback_a_session_awaiting_redis_repair_is_written_postgres_first(
    pg_dsn: str, redis_url: str, redis_prefix: str, redis_proxy: FaultProxy, tmp_path: Path,
) -> None:
    # The story the model shrank to: in pg_primary a tool run's copy to Redis fails;
    # the operator rolls back to shadow; a checkpoint goes to Redis first and its copy
    # to PostgreSQL fails with an error. Each store then lacked a write the other had,
    # and the read (sent to PostgreSQL, as Redis had a repair pending) missed the
    # checkpoint. Now PostgreSQL leads that session's writes until the repair, so its
    # error fails the call instead of hiding an acknowledged checkpoint.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(REFUSE_CHECKPOINT_C1)
    legacy = behind_proxy(redis_proxy, redis_url, redis_prefix)
    source = StaticPlan(plan_at("pg_primary"))
    with PostgresStore(pg_dsn) as truth:
        store = MigratingStore(legacy, truth, source, spool_path=tmp_path / "spool")
        store.save_session(session("s1"))
        store.put_checkpoint("s1", {"checkpoint_id": "c0", "step": 0})
        cut_during(redis_proxy, legacy)
        store.upsert_tool_run("s1", {"tool_call_id": "t0", "name": "search", "attempts": 1})
        healed(redis_proxy, legacy)
        source.plan = plan_at("shadow")

        route = store.write_route("s1")
        with pytest.raises(psycopg.errors.RaiseException):
            store.put_checkpoint("s1", {"checkpoint_id": "c1", "parent_id": "c0", "step": 1})
        read = store.read("s1")

    assert route == ("postgres", "redis")
    assert read.state is not None and read.state.tool_run("t0") is not None
    assert read.state.latest_checkpoint is not None
    assert read.state.latest_checkpoint.checkpoint_id == "c0"


def test_a_message_appended_after_a_move_back_to_redis_only_reaches_the_store_reads_use(
    pg_dsn: str, redis_url: str, redis_prefix: str, redis_proxy: FaultProxy, tmp_path: Path
) -> None:
    # The story (from the deep profile): in pg_primary a tool run's copy to Redis
    # fails (queued); the operator moves back, stage by stage, to redis_only; a message
    # is appended there, to Redis only. Reads of the session went to PostgreSQL (Redis
    # had a repair pending), which never got the message.
    legacy = behind_proxy(redis_proxy, redis_url, redis_prefix)
    source = StaticPlan(plan_at("pg_primary"))
    with PostgresStore(pg_dsn) as truth:
        store = MigratingStore(legacy, truth, source, spool_path=tmp_path / "spool")
        store.save_session(session("s1"))
        cut_during(redis_proxy, legacy)
        store.upsert_tool_run("s1", {"tool_call_id": "t0", "name": "search", "attempts": 1})
        healed(redis_proxy, legacy)
        source.plan = plan_at("redis_only")

        route = store.write_route("s1")
        stored = store.append_message("s1", message(0))
        read = store.read("s1")
        summary = repair(Settings(redis_url=redis_url, postgres_dsn=pg_dsn,
                                  prefix=redis_prefix), spool_path=tmp_path / "spool")
        assert_stores_agree(legacy, truth, "s1")

    assert route == ("postgres", "redis") and stored.seq == 0
    assert (read.source, read.reason) == ("postgres", "repair_pending")
    assert read.state is not None and read.state.tool_run("t0") is not None
    assert [m.message_id for m in read.state.messages] == ["m0"]
    assert summary.failed == [] and summary.remaining == 0


def test_after_retirement_a_move_back_to_pg_primary_cannot_send_reads_back_to_redis(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    # The story: a message written while retired reaches PostgreSQL only; the operator
    # moves back to pg_primary ("Redis gets writes again") and then rolls back, which
    # was allowed: reads went to Redis, which never got that message.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        complete_a_backfill(conn)
        pass_parity(conn)
        for stage in ("dual_write", "shadow", "cutover", "pg_primary", "retired"):
            set_stage(conn, stage, "forward")
        with MigratingStore(RedisStore(redis_url, prefix=redis_prefix), PostgresStore(pg_dsn),
                            StaticPlan(plan_at("retired")),
                            spool_path=tmp_path / "spool") as store:
            store.save_session(session("s1"))
            store.append_message("s1", message(0))
        set_stage(conn, "pg_primary", "back one")

        with pytest.raises(IllegalMove, match="retired"):
            rollback(conn, "everything back")
        with pytest.raises(IllegalMove, match="no writes"):
            set_stage(conn, "shadow", "back")
        forced = set_stage(conn, "shadow", "the operator accepts it", force=True)

    assert forced.stage is Stage.SHADOW


def test_a_router_whose_plan_went_stale_at_cutover_reads_what_pg_primary_wrote(
    pg_dsn: str, redis_url: str, redis_prefix: str, redis_proxy: FaultProxy, tmp_path: Path
) -> None:
    # The story: router b's watcher lost PostgreSQL while the Plan said cutover; the
    # operator moved on to pg_primary, where a message's copy to Redis failed (queued).
    # Router b, stale, fell back to Redis, which lacked the message.
    legacy = behind_proxy(redis_proxy, redis_url, redis_prefix)
    with PostgresStore(pg_dsn) as truth, RedisStore(redis_url, prefix=redis_prefix) as other:
        a = MigratingStore(legacy, truth, StaticPlan(plan_at("pg_primary")),
                           spool_path=tmp_path / "a.spool")
        b = MigratingStore(other, truth, StaticPlan(plan_at("cutover"), fresh=False),
                           spool_path=tmp_path / "b.spool")
        m1_misses_redis(a, redis_proxy, legacy)

        read = b.read("s1")

    assert (read.source, read.reason) == ("postgres", "repair_pending")
    assert read.state is not None and [m.message_id for m in read.state.messages] == ["m0", "m1"]


# PostgreSQL refuses checkpoint c1 (as a failing disk or a statement timeout would).
REFUSE_CHECKPOINT_C1 = """
CREATE FUNCTION public.refuse_c1() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.checkpoint_id = 'c1' THEN RAISE EXCEPTION 'checkpoint c1 refused'; END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_c1 BEFORE INSERT ON memshift.checkpoints
    FOR EACH ROW EXECUTE FUNCTION public.refuse_c1();
"""


def test_a_cutover_read_whose_postgres_is_unreachable_does_not_fall_back_to_a_redis_awaiting_repair(
    pg_dsn: str, redis_url: str, redis_prefix: str, pg_proxy: FaultProxy,
    redis_proxy: FaultProxy, tmp_path: Path,
) -> None:
    # The story: in pg_primary a message's copy to Redis fails (queued for repair); the
    # operator moves back to cutover, whose slice reads PostgreSQL; then this router
    # cannot reach PostgreSQL for a read. It fell back to Redis, the Plan's primary,
    # which lacked the message. Now the read fails: continuity holds.
    legacy = behind_proxy(redis_proxy, redis_url, redis_prefix)
    source = StaticPlan(plan_at("pg_primary"))
    with PostgresStore(pg_proxy.dsn_for(pg_dsn), timeout=0.5) as truth:
        store = MigratingStore(legacy, truth, source, spool_path=tmp_path / "spool")
        m1_misses_redis(store, redis_proxy, legacy)
        source.plan = plan_at("cutover", resume=100)  # `memshift stage set cutover`
        served = store.read("s1", "resume")

        pg_proxy.refuse()
        pg_proxy.cut()
        with pytest.raises(StoreUnavailable, match="'s1' cannot be read: postgres could not"):
            store.read("s1", "resume")
        pg_proxy.heal()

    assert (served.source, served.reason) == ("postgres", "slice")
    assert served.state is not None
    assert [m.message_id for m in served.state.messages] == ["m0", "m1"]


def test_a_cutover_read_whose_postgres_is_unreachable_falls_back_to_a_redis_holding_every_write(
    pg_dsn: str, redis_url: str, redis_prefix: str, pg_proxy: FaultProxy, tmp_path: Path,
) -> None:
    # The other side of the story above: with no repair queued for Redis, Redis holds
    # every acknowledged write of the session, and serves the read.
    with PostgresStore(pg_proxy.dsn_for(pg_dsn), timeout=0.5) as truth:
        store = MigratingStore(RedisStore(redis_url, prefix=redis_prefix), truth,
                               StaticPlan(plan_at("cutover", resume=100)),
                               spool_path=tmp_path / "spool")
        store.save_session(session("s1"))
        store.append_message("s1", message(0))
        pg_proxy.refuse()
        pg_proxy.cut()
        read = store.read("s1", "resume")
        pg_proxy.heal()

    assert (read.source, read.reason) == ("redis", "secondary_unavailable")
    assert read.state is not None and [m.message_id for m in read.state.messages] == ["m0"]


def test_after_a_move_back_to_redis_only_the_backfill_gate_wants_a_new_backfill(
    pg_dsn: str,
) -> None:
    # The story (from the deep profile): a backfill completed in dual_write; the
    # operator moved back to redis_only, where a new session was written to Redis
    # alone; then forward again, through the backfill gate, which the old run still
    # passed, as far as pg_primary: PostgreSQL lacked the session's record.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        set_stage(conn, "dual_write", "start")
        complete_a_backfill(conn)
        before = check_gates(conn, Stage.SHADOW)
        set_stage(conn, "redis_only", "back")
        set_stage(conn, "dual_write", "again")
        after_the_move_back = check_gates(conn, Stage.SHADOW)
        complete_a_backfill(conn)
        after_a_new_run = check_gates(conn, Stage.SHADOW)

    assert [g.passed for g in before] == [True]
    assert [g.passed for g in after_the_move_back] == [False]
    assert "move back to redis_only" in after_the_move_back[0].detail
    assert [g.passed for g in after_a_new_run] == [True]
