"""The Redis store against a local three-node Redis Cluster (``redis_cluster_url``).

Legacy sessions are written with the plain commands a legacy application sends to a
cluster, so the six keys of a session land in different slots and on different
nodes; memshift must read them whole and list each session once. Writes need all
keys of a session in one slot: the ``reference-hashtag`` layout gives that, the
legacy layout gets a clear ConfigError.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from memshift.errors import ConfigError, StoreUnavailable
from memshift.model import SessionState
from memshift.stores.layouts.reference import ReferenceLayout
from memshift.stores.redis import AsyncRedisStore, RedisStore
from tests.integration.test_redis_store import check_filled, fill

T0 = "2026-05-19T10:00:00.000000Z"


def plain_url(cluster_url: str) -> str:
    """The URL redis-py's cluster client takes (it knows no ``redis+cluster``)."""
    return cluster_url.replace("redis+cluster://", "redis://", 1)


@pytest.fixture
def cluster(redis_cluster_url: str) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(plain_url(redis_cluster_url))
    yield client
    client.close()


@pytest.fixture
def prefix(cluster: RedisCluster) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted from every node afterwards."""
    made = f"msc{uuid.uuid4().hex[:10]}"
    yield made
    for key in list(cluster.scan_iter(match=f"{made}:*", count=1000)):
        cluster.delete(key)


def nodes_of(cluster: RedisCluster, keys: list[str]) -> set[str]:
    return {cluster.get_node_from_key(key).name for key in keys}


def spread_ids(cluster: RedisCluster, prefix: str, count: int) -> list[str]:
    """Session ids whose six legacy keys lie on all three nodes."""
    layout = ReferenceLayout(prefix)
    found = []
    for n in range(10_000):
        sid = f"sess_{n}"
        if len(nodes_of(cluster, layout.session_keys(sid))) == 3:
            found.append(sid)
            if len(found) == count:
                return found
    raise AssertionError("no session ids with keys on all three nodes")


def legacy_write(cluster: RedisCluster, prefix: str, sid: str) -> None:
    """What a legacy application writes for one session: one command per key, no script."""
    base = f"{prefix}:session:{sid}"
    cluster.hset(
        base,
        mapping={
            "tenant_id": "t1",
            "user_id": "u1",
            "status": "waiting_tool",
            "version": "2",
            "created_at": T0,
            "updated_at": "1779184804000",  # epoch ms, as some legacy writers do
            "messages_trimmed": "3",
            "metadata": json.dumps({"sid": sid}),
        },
    )
    for i, role in enumerate(("user", "assistant")):
        body = {"id": f"m{i}", "role": role, "content": f"{sid} says {i}", "ts": T0}
        cluster.rpush(f"{base}:messages", json.dumps(body))
    tool = {
        "name": "search",
        "args": {"q": sid},
        "status": "retrying",
        "attempts": 2,
        "last_error": "timeout",
        "updated_at": T0,
    }
    cluster.hset(f"{base}:tools", "c1", json.dumps(tool))
    summary = {"version": 4, "text": "so far", "covers_through": 4, "updated_at": T0}
    cluster.set(f"{base}:summary", json.dumps(summary))
    checkpoint = {
        "checkpoint_id": "k7",
        "parent_id": "k6",
        "step": 7,
        "state": {"sid": sid},
        "created_at": T0,
    }
    cluster.set(f"{base}:checkpoint", json.dumps(checkpoint))
    cluster.xadd(
        f"{base}:events",
        {"type": "status", "from": "active", "to": "waiting_tool", "at": T0, "data": "{}"},
    )


def check_legacy(state: SessionState | None, sid: str) -> None:
    assert state is not None
    assert (state.session.tenant_id, state.session.status, state.session.version) == (
        "t1",
        "waiting_tool",
        2,
    )
    assert state.session.metadata == {"sid": sid}
    assert state.session.updated_at == datetime(2026, 5, 19, 10, 0, 4, tzinfo=UTC)
    assert [(m.seq, m.message_id, m.content) for m in state.messages] == [
        (3, "m0", f"{sid} says 0"),
        (4, "m1", f"{sid} says 1"),
    ]
    assert [(t.tool_call_id, t.status, t.attempts) for t in state.tool_runs] == [
        ("c1", "retrying", 2)
    ]
    assert [(s.version, s.text) for s in state.summaries] == [(4, "so far")]
    assert [(c.checkpoint_id, c.step, c.state) for c in state.checkpoints] == [
        ("k7", 7, {"sid": sid})
    ]
    assert [(e.event_seq, e.from_status, e.to_status) for e in state.events] == [
        (0, "active", "waiting_tool")
    ]


# -- legacy sessions: read only ------------------------------------------------------------


def test_legacy_sessions_are_listed_once_each_across_all_primaries(
    redis_cluster_url: str, cluster: RedisCluster, prefix: str
) -> None:
    sids = [f"sess_{n}" for n in range(40)]
    for sid in sids:
        legacy_write(cluster, prefix, sid)
    cluster.set(f"{prefix}:session:not_a_hash", "x")
    hashes = [f"{prefix}:session:{sid}" for sid in sids]
    assert len(nodes_of(cluster, hashes)) == 3  # the sessions live on every primary

    with RedisStore(redis_cluster_url, prefix=prefix) as store:
        listed = list(store.list_sessions(batch_size=3))

    assert Counter(listed) == Counter(sids)


def test_legacy_session_with_keys_on_three_nodes_loads_whole(
    redis_cluster_url: str, cluster: RedisCluster, prefix: str
) -> None:
    sids = spread_ids(cluster, prefix, 3)
    for sid in sids:
        legacy_write(cluster, prefix, sid)

    with RedisStore(redis_cluster_url, prefix=prefix) as store:
        states = {sid: store.load_session(sid) for sid in sids}
        missing = store.load_session("nobody")

    for sid, state in states.items():
        check_legacy(state, sid)
    assert missing is None


def test_async_store_lists_and_loads_legacy_sessions_on_a_cluster(
    redis_cluster_url: str, cluster: RedisCluster, prefix: str
) -> None:
    sids = spread_ids(cluster, prefix, 4)
    for sid in sids:
        legacy_write(cluster, prefix, sid)

    async def scenario() -> tuple[list[str], dict[str, SessionState | None]]:
        async with AsyncRedisStore(redis_cluster_url, prefix=prefix) as store:
            listed = [sid async for sid in store.list_sessions(batch_size=2)]
            return listed, {sid: await store.load_session(sid) for sid in listed}

    listed, states = asyncio.run(scenario())

    assert Counter(listed) == Counter(sids)
    for sid, state in states.items():
        check_legacy(state, sid)


def test_store_takes_a_cluster_client_and_leaves_it_open(
    redis_cluster_url: str, cluster: RedisCluster, prefix: str
) -> None:
    legacy_write(cluster, prefix, "s1")

    with RedisStore(cluster, prefix=prefix) as store:
        check_legacy(store.load_session("s1"), "s1")

    assert cluster.ping()


def test_guarded_write_on_keys_in_different_slots_is_a_config_error(
    redis_cluster_url: str, cluster: RedisCluster, prefix: str
) -> None:
    (sid,) = spread_ids(cluster, prefix, 1)

    with RedisStore(redis_cluster_url, prefix=prefix) as store:
        with pytest.raises(ConfigError) as caught:
            store.append_message(sid, {"message_id": "m1", "role": "user", "content": "hi"})

    assert "hash slot" in str(caught.value) and "reference-hashtag" in str(caught.value)
    assert list(cluster.scan_iter(match=f"{prefix}:*")) == []


# -- the hash-tag layout: writes too -------------------------------------------------------


def test_hash_tag_layout_round_trips_every_write_on_a_cluster(
    redis_cluster_url: str, cluster: RedisCluster, prefix: str
) -> None:
    sids = [f"s{n}" for n in range(12)]
    layout = ReferenceLayout(prefix, hash_tag=True)

    with RedisStore(redis_cluster_url, layout="reference-hashtag", prefix=prefix) as store:
        for sid in sids:
            fill(store, sid)
        states = [store.load_session(sid) for sid in sids]
        listed = list(store.list_sessions(batch_size=2))

    for state in states:
        check_filled(state)
    assert Counter(listed) == Counter(sids)
    assert len(nodes_of(cluster, [layout.session_keys(sid)[0] for sid in sids])) == 3
    assert all(len(nodes_of(cluster, layout.session_keys(sid))) == 1 for sid in sids)


def test_async_hash_tag_layout_round_trips_on_a_cluster_client(
    redis_cluster_url: str, prefix: str
) -> None:
    async def scenario() -> list[SessionState | None]:
        client = AsyncRedisCluster.from_url(plain_url(redis_cluster_url))
        store = AsyncRedisStore(client, layout=ReferenceLayout(prefix, hash_tag=True))
        try:
            for sid in ("a", "b", "c"):
                await store.save_session({"session_id": sid, "tenant_id": "t1"})
                await store.append_message(
                    sid, {"message_id": "m1", "role": "user", "content": sid}
                )
                await store.set_status(sid, "paused")
            return [await store.load_session(sid) for sid in ("a", "b", "c")]
        finally:
            await store.close()
            await client.aclose()

    for sid, state in zip("abc", asyncio.run(scenario()), strict=True):
        assert state is not None
        assert state.session.status == "paused"
        assert [m.content for m in state.messages] == [sid]


# -- configuration ---------------------------------------------------------------------------


def test_cluster_client_that_decodes_responses_is_refused(redis_cluster_url: str) -> None:
    client = RedisCluster.from_url(plain_url(redis_cluster_url), decode_responses=True)

    with pytest.raises(ConfigError, match="decode_responses=False"):
        RedisStore(client)
    client.close()


def test_unreachable_cluster_is_store_unavailable_without_the_password() -> None:
    with pytest.raises(StoreUnavailable) as caught:
        with RedisStore("redis+cluster://:hunter2@127.0.0.1:1") as store:
            store.load_session("s1")

    assert "127.0.0.1:1" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_async_store_on_an_unreachable_cluster_is_store_unavailable() -> None:
    async def scenario() -> None:
        async with AsyncRedisStore("redis+cluster://:hunter2@127.0.0.1:1") as store:
            await store.load_session("s1")

    with pytest.raises(StoreUnavailable) as caught:
        asyncio.run(scenario())

    assert "Redis Cluster via 127.0.0.1:1" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_backfill_reads_a_legacy_cluster_whole(
    redis_cluster_url: str, cluster: RedisCluster, prefix: str, pg_dsn: str
) -> None:
    from memshift.config import Settings
    from memshift.migrate.backfill import BackfillOptions, backfill
    from memshift.stores.postgres import PostgresStore

    ids = spread_ids(cluster, prefix, 12)
    for sid in ids:
        legacy_write(cluster, prefix, sid)

    summary = backfill(
        Settings(redis_url=redis_cluster_url, postgres_dsn=pg_dsn, prefix=prefix),
        BackfillOptions(prefix=prefix, batch_size=5),
    )

    assert (summary.sessions_seen, summary.migrated, summary.quarantined) == (12, 12, 0)
    with RedisStore(redis_cluster_url, prefix=prefix) as legacy, PostgresStore(pg_dsn) as pg:
        for sid in ids:
            redis_state, pg_state = legacy.load_session(sid), pg.load_session(sid)
            assert redis_state is not None and pg_state is not None
            assert pg_state.messages == redis_state.messages
            assert pg_state.session.version == redis_state.session.version
