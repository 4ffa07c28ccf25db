"""The retired stage's cache when a writer cannot reach Redis to invalidate it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memshift.faults.proxy import FaultProxy
from memshift.migrate.plan import StaticPlan
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from tests.integration.test_router import message, plan_at, session

pytestmark = pytest.mark.faults


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", int(redis_url.rsplit(":", 1)[1].split("/")[0])) as made:
        yield made


def retired(redis_url: str, redis_prefix: str, pg_dsn: str, tmp_path: Path) -> MigratingStore:
    return MigratingStore(RedisStore(redis_url, prefix=redis_prefix), PostgresStore(pg_dsn),
                          StaticPlan(plan_at("retired")), spool_path=tmp_path / "spool")


def test_a_write_that_cannot_invalidate_succeeds_is_recorded_and_the_entry_dropped_later(
    redis_url: str, redis_prefix: str, pg_dsn: str, tmp_path: Path, redis_proxy: FaultProxy
) -> None:
    reader = retired(redis_url, redis_prefix, pg_dsn, tmp_path)
    writer = retired(redis_proxy.redis_url_for(redis_url), redis_prefix, pg_dsn, tmp_path)
    writer.save_session(session("s1"))
    assert reader.read("s1").source == "postgres" and reader.read("s1").source == "cache"

    redis_proxy.refuse()
    redis_proxy.cut()
    writer.append_message("s1", message(0))  # PostgreSQL took it; Redis heard nothing
    own = writer.read("s1")
    elsewhere = reader.read("s1")
    redis_proxy.heal()
    retried = writer.read("s1")  # drops the entry first, then reads and fills
    healed = reader.read("s1")

    assert writer.stats.cache["invalidation_failed"] >= 2  # begin and end
    assert own.source == "postgres" and own.state is not None and len(own.state.messages) == 1
    # The documented window: another process may serve the old entry until it expires
    # or an invalidation gets through.
    assert elsewhere.source == "cache"
    assert retried.source == "postgres" and not writer._cache.pending
    assert healed.source == "cache" and healed.state is not None
    assert len(healed.state.messages) == 1
    reader.close()
    writer.close()


def test_a_write_whose_end_cannot_reach_redis_leaves_fills_refused(
    redis_url: str, redis_prefix: str, pg_dsn: str, tmp_path: Path, redis_proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reader = retired(redis_url, redis_prefix, pg_dsn, tmp_path)
    writer = retired(redis_proxy.redis_url_for(redis_url), redis_prefix, pg_dsn, tmp_path)
    writer.save_session(session("s1"))
    reader.read("s1")  # cached
    write = writer._postgres.append_message

    def write_then_lose_redis(session_id: str, msg: Any) -> Any:
        stored = write(session_id, msg)
        redis_proxy.refuse()
        redis_proxy.cut()
        return stored

    monkeypatch.setattr(writer._postgres, "append_message", write_then_lose_redis)
    writer.append_message("s1", message(0))  # began (entry dropped), ended nowhere
    reads = [reader.read("s1") for _ in range(3)]

    assert writer.stats.cache["invalidation_failed"] == 1
    assert [r.source for r in reads] == ["postgres"] * 3  # the write's lease refuses fills
    assert all(r.state is not None and len(r.state.messages) == 1 for r in reads)
    assert reader.stats.cache["fill"] == 1  # only the first, before the write
    reader.close()
    redis_proxy.heal()
    writer.close()
