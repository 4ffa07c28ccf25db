"""The langgraph layout: threads that LangGraph's RedisSaver wrote (saved fixtures of its
keys, see tests/fixtures/langgraph/make_fixtures.py) move into PostgresSaver's tables,
and PostgresSaver gives back the same latest checkpoint and pending writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from psycopg.rows import dict_row

pytest.importorskip("langgraph.checkpoint.postgres")
pytest.importorskip("langgraph.checkpoint.redis")

from langgraph.checkpoint.postgres import PostgresSaver
from langgraph.checkpoint.redis import RedisSaver
from langgraph.checkpoint.redis.base import BaseRedisSaver
from langgraph.types import Command

from memshift.config import Settings
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.migrate.parity import parity
from memshift.migrate.quarantine import entries
from memshift.stores.layouts.langgraph import (
    LangGraphLayout,
    NotInLayout,
    ProjectionError,
    install,
    installed,
    uninstall,
)
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from tests.fixtures.langgraph import make_fixtures
from tests.fixtures.langgraph.make_fixtures import THREADS, build_fan_out, build_graph, comparable
from tests.integration.layouts_support import layout_settings

FIXTURE = json.loads(make_fixtures.FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture
def loaded(redis_url: str, redis_prefix: str) -> Iterator[str]:
    """The fixture's keys under this test's prefix; yields the tag before thread ids."""
    client = redis.Redis.from_url(redis_url)
    tag = f"{redis_prefix}-"
    keys = make_fixtures.load(client, prefix=redis_prefix, tag=tag)
    yield tag
    client.delete(*keys)
    client.close()


@pytest.fixture
def config(pg_dsn: str, redis_url: str, redis_prefix: str) -> Settings:
    return layout_settings("langgraph", pg_dsn, redis_url, redis_prefix)


@pytest.fixture
def pg(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_dsn, autocommit=True, prepare_threshold=0,
                         row_factory=dict_row) as conn:
        yield conn


def options(prefix: str) -> BackfillOptions:
    return BackfillOptions(layout="langgraph", prefix=prefix, batch_size=2)


def redis_view(thread: str) -> dict[str, Any]:
    """What RedisSaver returns for the thread's latest checkpoint, decoded from the
    fixture's documents by RedisSaver's own loaders."""
    saver = RedisSaver(redis_client=redis.Redis())  # its loaders only: no command sent
    keys = {e["key"]: e for e in FIXTURE["keys"]}
    doc = keys[keys[f"checkpoint_latest:{thread}:__empty__"]["value"]]["value"]
    values = saver._deserialize_channel_values(doc["checkpoint"]["channel_values"])
    checkpoint = saver._load_checkpoint(doc["checkpoint"], values, [])
    writes = {(e["value"]["task_id"], str(e["value"]["idx"])): e["value"]
              for e in FIXTURE["keys"] if e["key"].startswith("checkpoint_write:")
              and e["value"]["checkpoint_id"] == doc["checkpoint_id"]}
    return {
        "id": checkpoint["id"],
        "channel_values": checkpoint["channel_values"],
        "channel_versions": checkpoint["channel_versions"],
        "versions_seen": checkpoint["versions_seen"],
        "metadata": json.loads(doc["metadata"]),
        "parent": doc["parent_checkpoint_id"] or None,
        "pending_writes": comparable(BaseRedisSaver._load_writes(saver.serde, writes)),
    }


def postgres_view(conn: psycopg.Connection[Any], thread: str) -> dict[str, Any]:
    found = PostgresSaver(conn).get_tuple({"configurable": {"thread_id": thread,
                                                            "checkpoint_ns": ""}})
    assert found is not None, thread
    parent = found.parent_config["configurable"]["checkpoint_id"] if found.parent_config else None
    return {
        "id": found.checkpoint["id"],
        "channel_values": found.checkpoint["channel_values"],
        "channel_versions": found.checkpoint["channel_versions"],
        "versions_seen": found.checkpoint["versions_seen"],
        "metadata": found.metadata,
        "parent": parent,
        "pending_writes": comparable(found.pending_writes or []),
    }


def test_postgres_saver_resumes_each_thread_from_the_same_latest_checkpoint_and_writes(
    config: Settings, pg: psycopg.Connection[Any], loaded: str, redis_prefix: str
) -> None:
    summary = backfill(config, options(redis_prefix))

    assert (summary.state, summary.migrated, summary.quarantined) == (
        "completed", len(THREADS), 0)
    for thread in THREADS:
        assert postgres_view(pg, loaded + thread) == redis_view(thread), thread
    interrupted = postgres_view(pg, loaded + "sessión ünï 🎉")
    assert [c for _, c, _ in interrupted["pending_writes"]] == ["__interrupt__"]
    failed = postgres_view(pg, loaded + "thread-failed-superstep")
    assert sorted(c for _, c, _ in failed["pending_writes"]) == ["__error__", "messages", "notes"]
    reports = list(parity(config, session_ids=[loaded + t for t in THREADS]))
    assert [r.parity_status for r in reports] == ["pass"] * len(THREADS)


def test_the_whole_history_moves_and_the_ttl_becomes_an_expiry(
    config: Settings, pg: psycopg.Connection[Any], loaded: str, redis_prefix: str
) -> None:
    backfill(config, options(redis_prefix))

    saver = PostgresSaver(pg)
    for thread in THREADS:
        chain = [t.checkpoint["id"] for t in saver.list(
            {"configurable": {"thread_id": loaded + thread, "checkpoint_ns": ""}})]
        in_fixture = sorted((e["parts"]["checkpoint_id"] for e in FIXTURE["keys"]
                             if e["key"].startswith(f"checkpoint:{thread}:")), reverse=True)
        assert chain == in_fixture, thread
    expiring = {row["session_id"] for row in pg.execute(
        "SELECT session_id FROM memshift.sessions WHERE expires_at > now()")}
    assert expiring == {loaded + "with:colons/and spaces"}


def test_the_graph_resumes_from_postgres_where_redis_left_it(
    config: Settings, pg: psycopg.Connection[Any], loaded: str, redis_prefix: str
) -> None:
    backfill(config, options(redis_prefix))
    saver = PostgresSaver(pg)

    reviewed = build_graph(saver).invoke(
        Command(resume="yes"), {"configurable": {"thread_id": loaded + "sessión ünï 🎉"}})
    finished = build_fan_out(saver, fail={"flaky": 0}).invoke(
        None, {"configurable": {"thread_id": loaded + "thread-failed-superstep"}})

    assert reviewed["approved"] is True
    assert reviewed["messages"][-1].content == "Reviewed: yes 🎉"
    # fast's pending writes were used, not run again: its note is there once.
    assert sorted(finished["notes"]) == ["fast done", "flaky done", "start"]


def test_a_second_backfill_and_a_second_install_change_no_row(
    config: Settings, pg: psycopg.Connection[Any], loaded: str, redis_prefix: str
) -> None:
    backfill(config, options(redis_prefix))
    tables = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")

    def snapshot() -> list[Any]:
        return [pg.execute(f"SELECT md5(string_agg(t::text, ',' ORDER BY t::text)), count(*) "  # noqa: S608
                           f"FROM {name} t").fetchone() for name in tables]

    before = snapshot()
    again = backfill(config, options(redis_prefix))
    install(pg)

    assert again.unchanged == len(THREADS)
    assert snapshot() == before
    assert before[2]["count"] > 0


def corrupt(client: redis.Redis, prefix: str, tag: str, thread: str, change: Any) -> None:
    """Apply ``change`` to the thread's latest checkpoint document in Redis."""
    key = client.get(f"{prefix}_latest:{tag}{thread}:__empty__")
    assert key is not None
    doc = json.loads(client.get(key) or b"")
    client.set(key, json.dumps(change(doc, client, key)))


def _cycle(doc: dict[str, Any], client: redis.Redis, key: bytes) -> dict[str, Any]:
    parent_key = key.decode().rsplit(":", 1)[0] + ":" + doc["parent_checkpoint_id"]
    parent = json.loads(client.get(parent_key) or b"")
    parent["parent_checkpoint_id"] = doc["checkpoint_id"]
    client.set(parent_key, json.dumps(parent))
    return doc


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (_cycle, "a parent cycle"),
        (lambda d, c, k: {**d, "checkpoint": {**d["checkpoint"], "channel_values": {
            "x": {"__bytes__": "AAE="}}}}, "holds bytes (RedisSaver's '__bytes__' marker)"),
        (lambda d, c, k: {**d, "checkpoint": {**d["checkpoint"], "ts": "soon"}},
         "member 'checkpoint.ts'"),
        (lambda d, c, k: {**d, "metadata": "{not json"}, "member 'metadata' is not JSON"),
        (lambda d, c, k: {**d, "thread_id": "someone-else"}, "belongs to thread 'someone-else'"),
        (lambda d, c, k: [d], "does not hold a checkpoint document"),
    ],
)
def test_a_thread_that_cannot_be_read_is_quarantined_with_its_key_and_the_others_move(
    config: Settings, pg: psycopg.Connection[Any], loaded: str, redis_prefix: str,
    redis_url: str, change: Any, problem: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    corrupt(client, redis_prefix, loaded, "thread-done-1", change)

    summary = backfill(config, options(redis_prefix))

    assert (summary.migrated, summary.quarantined) == (len(THREADS) - 1, 1)
    (entry,) = entries(pg)
    assert problem in entry.reason
    assert f"session '{loaded}thread-done-1', key '{redis_prefix}" in entry.reason
    assert PostgresSaver(pg).get_tuple(
        {"configurable": {"thread_id": loaded + "thread-done-1"}}) is None


def test_a_write_registry_of_the_wrong_type_and_a_dangling_pointer_are_named(
    redis_url: str, redis_prefix: str, loaded: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    pointer = f"{redis_prefix}_latest:{loaded}thread-done-1:__empty__"
    client.set(pointer, f"{redis_prefix}:gone")
    layout = LangGraphLayout(redis_prefix)
    with RedisStore(redis_url, layout=layout) as store:
        (dangling,) = store.read_sessions([loaded + "thread-done-1"])
        (missing,) = store.read_sessions([loaded + "nobody"])

    assert dangling.error is not None and "names checkpoint" in dangling.error
    assert missing.state is None and missing.error is None


def test_install_needs_postgres_saver_tables_and_uninstall_stops_projecting(
    pg_dsn: str, pg: psycopg.Connection[Any]
) -> None:
    pg.execute("CREATE SCHEMA elsewhere")
    with pytest.raises(ProjectionError, match="lacks PostgresSaver's tables"):
        install(pg, schema="elsewhere")
    install(pg)
    assert installed(pg) is not None
    uninstall(pg)

    with PostgresStore(pg_dsn) as store:
        store.put_checkpoint("t", {"checkpoint_id": "1f000000-0000-6000-8000-000000000001",
                                   "step": 1, "metadata": {"langgraph": {
                                       "thread_id": "t", "checkpoint_ns": "",
                                       "metadata": {}}}})
    assert installed(pg) is None
    assert pg.execute("SELECT count(*) AS n FROM checkpoints").fetchone() == {"n": 0}


def test_memshift_does_not_write_to_the_checkpointer_keys(redis_url: str, redis_prefix: str
                                                          ) -> None:
    with RedisStore(redis_url, layout=LangGraphLayout(redis_prefix)) as store:
        with pytest.raises(NotInLayout, match="only reads RedisSaver's keys"):
            store.put_checkpoint("t", {"checkpoint_id": "c", "step": 1})
        with pytest.raises(NotInLayout, match="does not write messages"):
            store.append_message("t", {"message_id": "m", "role": "user", "content": "x"})
    assert not list(redis.Redis.from_url(redis_url).scan_iter(match=f"{redis_prefix}*"))
