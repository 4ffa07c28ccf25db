"""The retired stage's cache when a writer cannot reach Redis to invalidate it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memshift.faults.proxy import FaultProxy
from memshift.migrate.plan import StaticPlan
from memshift.stores._sync import migrating as sync_migrating
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


def test_a_write_that_cannot_invalidate_succeeds_and_its_epoch_bump_ends_the_old_entry(
    redis_url: str, redis_prefix: str, pg_dsn: str, tmp_path: Path, redis_proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With no Plan watcher to announce epoch bumps, a router asks PostgreSQL for the
    # cache epoch at most every CACHE_EPOCH_TTL seconds: the reader is held to the
    # epoch it knows until the test lets it ask again, whatever the machine's speed.
    monkeypatch.setattr(sync_migrating, "CACHE_EPOCH_TTL", 3600.0)
    reader = retired(redis_url, redis_prefix, pg_dsn, tmp_path)
    writer = retired(redis_proxy.redis_url_for(redis_url), redis_prefix, pg_dsn, tmp_path)
    writer.save_session(session("s1"))
    assert reader.read("s1").source == "postgres" and reader.read("s1").source == "cache"

    redis_proxy.refuse()
    redis_proxy.cut()
    writer.append_message("s1", message(0))  # PostgreSQL took it; Redis heard nothing
    own = writer.read("s1")  # Redis unreachable: PostgreSQL
    elsewhere = reader.read("s1")  # it has not asked for the epoch since the bump
    monkeypatch.setattr(sync_migrating, "CACHE_EPOCH_TTL", 0.0)
    asked = reader.read("s1")  # asks, learns the bump: the old entry is a miss; refills
    redis_proxy.heal()
    healed = writer.read("s1")

    assert writer.stats.cache["invalidation_failed"] >= 2  # begin and end
    assert writer.stats.cache["epoch_bumped"] >= 1 and not writer._cache.pending
    assert own.source == "postgres" and own.state is not None and len(own.state.messages) == 1
    # The window: another process serves the entry filled before the write until it
    # learns of the epoch the write bumped in PostgreSQL (at once through a Plan
    # watcher, else when it next asks, at most CACHE_EPOCH_TTL later).
    assert elsewhere.source == "cache" and elsewhere.state is not None
    assert len(elsewhere.state.messages) == 0
    assert asked.source == "postgres" and asked.state is not None
    assert len(asked.state.messages) == 1
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
