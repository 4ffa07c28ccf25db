"""A hung or refusing PostgreSQL: calls are bounded, never held for as long as it lasts.

As the secondary (dual_write), a write to PostgreSQL that gets no answer counts as
failed after the router's ``secondary_timeout`` and goes to the spool; as the primary
(pg_primary), the store's ``query_timeout`` turns the hang into StoreUnavailable. The
proxy still hangs when each call is judged: a call that returned, returned without
PostgreSQL's answer.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from memshift.config import Settings
from memshift.errors import StoreUnavailable
from memshift.faults.proxy import FaultProxy
from memshift.migrate import spool
from memshift.migrate.plan import StaticPlan
from memshift.migrate.repair import repair
from memshift.model import Message
from memshift.stores.migrating import AsyncMigratingStore, MigratingStore
from memshift.stores.postgres import AsyncPostgresStore, PostgresStore
from memshift.stores.redis import AsyncRedisStore, RedisStore
from tests.integration.test_router import assert_stores_agree, message, plan_at, session

pytestmark = pytest.mark.faults

# Far longer than any bound under test, so that a call still running then is one that
# waits for PostgreSQL's answer; the proxy keeps hanging until the call is judged.
PATIENCE = 60.0


@pytest.fixture
def proxy(pg_dsn: str) -> Iterator[FaultProxy]:
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    host, port = str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)
    with FaultProxy(host, port) as made:
        yield made


def while_hung(proxy: FaultProxy, call: Callable[[], Any]) -> Any:
    """Hang the proxy, make the call, and return its result (or raise its error), or
    fail if it was still waiting for PostgreSQL after PATIENCE seconds."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("returned", call()))
        except Exception as exc:  # judged below, on the test's thread
            outcome.append(("raised", exc))

    proxy.hang()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(PATIENCE)
    try:
        assert outcome, f"the call was still waiting for a hung PostgreSQL after {PATIENCE} s"
    finally:
        proxy.heal()
    kind, value = outcome[0]
    if kind == "raised":
        raise value
    return value


def test_a_secondary_write_to_a_hung_postgres_is_spooled_after_the_timeout(
    pg_dsn: str, redis_url: str, redis_prefix: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    spool_path = tmp_path / "repair.spool"
    legacy = RedisStore(redis_url, prefix=redis_prefix)
    store = MigratingStore(legacy, PostgresStore(proxy.dsn_for(pg_dsn)),
                           StaticPlan(plan_at("dual_write")), spool_path=spool_path,
                           secondary_timeout=0.5)
    store.save_session(session("s1"))  # both stores, connections open

    stored = while_hung(proxy, lambda: [store.append_message("s1", message(n))
                                        for n in range(2)])
    entries = spool_path.read_text().splitlines()
    summary = repair(Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix),
                     spool_path=spool_path)

    # The user's calls succeeded: Redis, the primary, took them.
    assert [m.seq for m in stored] == [0, 1]
    assert store.stats.writes[("postgres", "failed")] == 2
    assert len(entries) == 2
    assert "did not answer within 0.5 s" in entries[0]
    # The next write did not try a connection that would hang longer than its bound.
    assert "not trying a new one" in entries[1]
    assert (summary.moved_from_spool, summary.sessions_repaired) == (2, 1)
    assert not spool.has_entries(spool_path)
    with PostgresStore(pg_dsn) as truth:
        assert_stores_agree(legacy, truth, "s1")
    store.close()


def test_the_async_router_bounds_a_hung_secondary_write_too(
    pg_dsn: str, redis_url: str, redis_prefix: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    spool_path = tmp_path / "repair.spool"

    async def scenario() -> tuple[Message, int]:
        async with AsyncMigratingStore(
            AsyncRedisStore(redis_url, prefix=redis_prefix),
            AsyncPostgresStore(proxy.dsn_for(pg_dsn)), StaticPlan(plan_at("dual_write")),
            spool_path=spool_path, secondary_timeout=0.5,
        ) as store:
            await store.save_session(session("s1"))
            stored = await asyncio.to_thread(
                while_hung, proxy,
                lambda: asyncio.run_coroutine_threadsafe(
                    store.append_message("s1", message(0)), loop).result())
            return stored, store.stats.writes[("postgres", "failed")]

    loop = asyncio.new_event_loop()
    try:
        stored, failed = loop.run_until_complete(scenario())
    finally:
        loop.close()

    assert stored.seq == 0 and failed == 1
    assert "did not answer within 0.5 s" in spool_path.read_text()


def test_a_hung_primary_postgres_fails_the_call_with_store_unavailable(
    pg_dsn: str, redis_url: str, redis_prefix: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    store = MigratingStore(RedisStore(redis_url, prefix=redis_prefix),
                           PostgresStore(proxy.dsn_for(pg_dsn), query_timeout=0.5),
                           StaticPlan(plan_at("pg_primary")), spool_path=tmp_path / "spool")
    store.save_session(session("s1"))

    with pytest.raises(StoreUnavailable) as failed:
        while_hung(proxy, lambda: store.append_message("s1", message(0)))
    after = store.append_message("s1", message(1))  # healed: a new connection serves it
    store.close()

    text = str(failed.value)
    assert "did not answer within 0.5 s (append_message_assign)" in text
    assert "may or may not have been applied" in text
    assert f"port={proxy.port}" in text  # names the server it waited for
    assert after.seq in (0, 1)  # seq 0 if the hung statement never reached the server


def test_while_postgres_refuses_calls_fail_at_their_own_attempt_and_recover_at_once(
    pg_dsn: str, proxy: FaultProxy
) -> None:
    store = PostgresStore(proxy.dsn_for(pg_dsn))  # the defaults
    store.save_session(session("s1"))
    proxy.refuse()
    proxy.cut()

    errors = []
    for _ in range(3):
        with pytest.raises(StoreUnavailable) as failed:
            store.load_session("s1")
        errors.append(str(failed.value))
    proxy.heal()
    state = store.load_session("s1")  # at once: not after the pool's reconnection backoff
    store.close()

    # The first call found its connection cut. The next ones did not wait the 5 s
    # default for a pooled connection that could not come: each made its own
    # connection attempt, refused at once.
    assert "server closed the connection unexpectedly" in errors[0]
    for error in errors[1:]:
        assert "connection failed: connection to server at" in error, error
        assert "couldn't get a connection" not in error, error
    assert state is not None and state.session_id == "s1"
