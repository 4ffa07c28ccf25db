"""The openai-agents layout: sessions that the OpenAI Agents SDK's RedisSession wrote move
into its SQLAlchemySession tables, equal and in order, and the drop-in
MigratingSession keeps an application working across every stage."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

pytest.importorskip("agents.extensions.memory.redis_session")
pytest.importorskip("agents.extensions.memory.sqlalchemy_session")

from agents.extensions.memory.redis_session import RedisSession
from agents.extensions.memory.sqlalchemy_session import SQLAlchemySession

from memshift.adapters.openai_agents import HistoryRewriteRefused, MigratingSession
from memshift.config import Settings
from memshift.errors import ValidationError
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.migrate.parity import parity
from memshift.migrate.plan import (
    Stage,
    StaticPlan,
    load_plan,
    rollback,
    set_slice,
    set_stage,
)
from memshift.migrate.repair import repair
from memshift.model import Message
from memshift.stores.layouts import NotInLayout
from memshift.stores.layouts.openai_agents import OpenAIAgentsLayout, install, installed
from memshift.stores.layouts.openai_agents.items import fields_from_item, to_item
from memshift.stores.layouts.openai_agents.projection import check
from memshift.stores.migrating import AsyncMigratingStore
from memshift.stores.postgres import AsyncPostgresStore, PostgresStore
from memshift.stores.redis import AsyncRedisStore, RedisStore
from tests.integration.layouts_support import (
    diffs_of_a_deleted_row,
    layout_settings,
    projection_drift,
)

LONG = "Réponse détaillée ✓ " * 12000  # ~230 kB


@pytest.fixture
def key_prefix(redis_prefix: str) -> str:
    return f"{redis_prefix}:session"  # memshift prefix "<p>.session"


@pytest.fixture
def config(pg_dsn: str, redis_url: str, redis_prefix: str) -> Settings:
    return layout_settings("openai-agents", pg_dsn, redis_url, f"{redis_prefix}.session")


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    made = aioredis.Redis.from_url(redis_url)
    yield made
    await made.aclose()


def sqlalchemy_url(dsn: str) -> str:
    parts = conninfo_to_dict(dsn)
    return (f"postgresql+psycopg://{parts.get('user', 'postgres')}@{parts.get('host')}:"
            f"{parts.get('port', 5432)}/{parts['dbname']}")


async def sqlalchemy_items(dsn: str, sid: str) -> list[Any]:
    session = SQLAlchemySession.from_url(sid, url=sqlalchemy_url(dsn))
    try:
        return await session.get_items()
    finally:
        await session.engine.dispose()


def turn(n: int, tag: str = "") -> list[dict[str, Any]]:
    """One agent turn as the SDK stores it: input, a tool call, its output, an answer."""
    call = f"call_{tag}{n}"
    return [
        {"role": "user", "content": f"question {n} {tag}: où est le café? 🎉"},
        {"type": "reasoning", "id": f"rs_{tag}{n}", "summary": [
            {"type": "summary_text", "text": "look it up"}]},
        {"type": "function_call", "call_id": call, "name": "search", "id": f"fc_{tag}{n}",
         "arguments": json.dumps({"q": "café", "n": n}), "status": "completed"},
        {"type": "function_call_output", "call_id": call, "output": f"{n} results"},
        {"type": "message", "role": "assistant", "id": f"msg_{tag}{n}", "status": "completed",
         "content": [{"type": "output_text", "text": f"answer {n} ✓", "annotations": []}]},
    ]


SESSION_IDS = ["plain-1", "sessión ünï 🎉", "with:colons and spaces", "glob*?[chars]",
               "x" * 300, "日本語"]


async def write_legacy(client: aioredis.Redis, key_prefix: str) -> dict[str, list[Any]]:
    """Sessions as the application wrote them with the SDK's own RedisSession."""
    written: dict[str, list[Any]] = {}
    for i, sid in enumerate(SESSION_IDS):
        session = RedisSession(sid, redis_client=client, key_prefix=key_prefix,
                               ttl=3600 if i % 3 == 0 else None)
        items: list[Any] = [{"role": "system", "content": "Be brief."}]
        for n in range(i % 3 + 1):
            items += turn(n, tag=str(i))
        if i % 2:
            items += [{"role": "user", "content": LONG}]
        await session.add_items(items[:3])
        await session.add_items(items[3:])
        written[sid] = await session.get_items()
        assert written[sid] == items
    return written


async def test_backfill_moves_sdk_sessions_into_its_sqlalchemy_tables_equal_and_in_order(
    config: Settings, pg_dsn: str, pg: psycopg.Connection[Any], client: aioredis.Redis,
    key_prefix: str,
) -> None:
    written = await write_legacy(client, key_prefix)

    summary = backfill(config, BackfillOptions(layout="openai-agents",
                                               prefix=config.prefix, batch_size=4))

    assert (summary.state, summary.migrated, summary.quarantined) == (
        "completed", len(SESSION_IDS), 0)
    for sid, items in written.items():
        assert await sqlalchemy_items(pg_dsn, sid) == items, sid
    assert {r.parity_status for r in parity(config, session_ids=list(written))} == {"pass"}
    expiring = {row[0] for row in pg.execute(
        "SELECT session_id FROM memshift.sessions WHERE expires_at > now()")}
    assert expiring == {sid for i, sid in enumerate(SESSION_IDS) if i % 3 == 0}
    tables = installed(pg)
    assert tables is not None and check(pg, tables, list(written)) == {}


async def test_parity_fails_projection_matches_when_an_sdk_row_is_deleted_by_hand(
    config: Settings, pg: psycopg.Connection[Any], client: aioredis.Redis, key_prefix: str,
) -> None:
    written = await write_legacy(client, key_prefix)
    backfill(config, BackfillOptions(layout="openai-agents", prefix=config.prefix))
    sid = SESSION_IDS[2]
    rows = [r[0] for r in pg.execute("SELECT message_data::jsonb FROM agent_messages "
                                     "WHERE session_id = %s ORDER BY created_at, id", [sid])]
    pg.execute("DELETE FROM agent_messages WHERE id = "
               "(SELECT min(id) FROM agent_messages WHERE session_id = %s)", [sid])

    diffs = projection_drift(config, list(written), sid)

    assert diffs == diffs_of_a_deleted_row("public.agent_messages", rows, 0)


async def test_items_arriving_out_of_order_are_read_back_in_seq_order(
    pg_dsn: str, pg: psycopg.Connection[Any]
) -> None:
    install(pg)
    items = {f"s{i}": [{"role": "user", "content": f"s{i} {seq}"} for seq in range(10)]
             for i in range(4)}
    deliveries = [(sid, seq) for sid in items for seq in range(10)] * 2
    random.Random(3).shuffle(deliveries)

    async with AsyncPostgresStore(pg_dsn) as store:
        for sid, seq in deliveries:
            await store.append_message(sid, record(items[sid][seq], seq))

    for sid, wanted in items.items():
        assert await sqlalchemy_items(pg_dsn, sid) == wanted, sid


def record(item: dict[str, Any], seq: int) -> Message:
    return Message.model_validate(fields_from_item(item, seq))


def test_postgres_builds_the_same_item_as_python(pg: psycopg.Connection[Any]) -> None:
    install(pg)
    generic = Message(message_id="g", role="user", content="plain")
    for message in [generic, *(record(item, seq) for seq, item in enumerate(turn(1)))]:
        row = pg.execute("SELECT memshift.openai_agents_item(%s, %s, %s)",
                         (message.role, message.content, Jsonb(message.metadata))).fetchone()
        assert row is not None and row[0] == to_item(message)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\xff not utf-8", "is not valid UTF-8"),
        (b'{"role": "user", "content": "cut', "is not valid JSON"),
        (b'"just text"', "is JSON str, expected an item object"),
        (b'{"content": "no role or type"}', "has neither a 'role' nor a 'type'"),
        (b'{"role": "user", "content": "nul \\u0000"}', "NUL"),
    ],
)
async def test_an_unreadable_item_quarantines_its_session_with_the_key_and_index(
    config: Settings, pg: psycopg.Connection[Any], client: aioredis.Redis, key_prefix: str,
    raw: bytes, problem: str,
) -> None:
    for sid in ("good", "bad"):
        await RedisSession(sid, redis_client=client, key_prefix=key_prefix).add_items(turn(1))
    await client.rpush(f"{key_prefix}:bad:messages", raw)

    summary = backfill(config, BackfillOptions(layout="openai-agents", prefix=config.prefix))

    assert (summary.migrated, summary.quarantined) == (1, 1)
    from memshift.migrate.quarantine import entries

    (entry,) = entries(pg)
    assert f"key '{key_prefix}:bad:messages' item 5" in entry.reason
    assert problem in entry.reason


def test_state_the_sdk_cannot_hold_and_ids_it_cannot_keep_are_refused(
    redis_url: str, config: Settings
) -> None:
    with RedisStore(redis_url, layout=OpenAIAgentsLayout(config.prefix)) as store:
        with pytest.raises(NotInLayout, match="no place for checkpoints"):
            store.put_checkpoint("s", {"checkpoint_id": "k", "step": 1})
        with pytest.raises(ValidationError, match="whose id is its place"):
            store.append_message("s", {"message_id": "m1", "role": "user", "content": "hi"})
        assert store.load_session("s") is None


# -- the drop-in adapter across the stages --------------------------------------------


class App:
    """An application's loop over the SDK's Session protocol: each turn adds items,
    then reads the session back and checks that nothing it wrote is missing."""

    def __init__(self, router: AsyncMigratingStore) -> None:
        self.router = router
        self.expected: dict[str, list[Any]] = {}

    async def turn(self, sid: str, n: int) -> None:
        session = MigratingSession(sid, self.router)
        new = turn(n, tag=f"{sid}-")
        await session.add_items(new[:1])
        await session.add_items(new[1:])
        self.expected.setdefault(sid, []).extend(new)
        assert await session.get_items() == self.expected[sid], sid
        assert await session.get_items(limit=2) == self.expected[sid][-2:]

    async def all_turns(self, n: int) -> None:
        for sid in list(self.expected):
            await self.turn(sid, n)


async def test_an_application_on_the_adapter_keeps_every_item_across_the_stages(
    config: Settings, pg_dsn: str, pg: psycopg.Connection[Any], client: aioredis.Redis,
    redis_url: str, key_prefix: str, tmp_path: Any,
) -> None:
    plan = StaticPlan(load_plan(pg))
    router = AsyncMigratingStore(
        AsyncRedisStore(redis_url, layout=OpenAIAgentsLayout(config.prefix)),
        AsyncPostgresStore(pg_dsn), plan, spool_path=tmp_path / "spool")
    app = App(router)
    for sid in ("a", "b ü", "c"):
        legacy = RedisSession(sid, redis_client=client, key_prefix=key_prefix)
        await legacy.add_items([{"role": "system", "content": "Be brief."}, *turn(0, sid)])
        app.expected[sid] = await legacy.get_items()

    def move(stage: str) -> None:
        plan.plan = set_stage(pg, stage, f"test: {stage}")

    async def parity_passes() -> bool:
        return {r.parity_status for r in parity(config, session_ids=list(app.expected))} \
            == {"pass"}

    await app.all_turns(1)  # redis_only: the application has switched to the adapter
    await app.turn("new in redis_only", 1)
    move("dual_write")
    await app.all_turns(2)
    backfill(config, BackfillOptions(layout="openai-agents", prefix=config.prefix))
    for sid in app.expected:  # Redis stays the SDK's: the old class still reads it
        legacy = RedisSession(sid, redis_client=client, key_prefix=key_prefix)
        assert await legacy.get_items() == app.expected[sid]
    move("shadow")
    await app.all_turns(3)
    assert await parity_passes()
    move("cutover")
    plan.plan = set_slice(pg, "history", 50, "test: half")
    await app.all_turns(4)
    plan.plan = rollback(pg, "test: drill")
    await app.all_turns(5)
    plan.plan = set_slice(pg, "history", 100, "test: all")
    move("cutover")
    assert await parity_passes()
    move("pg_primary")
    await app.all_turns(6)
    await app.turn("new in pg_primary", 6)
    move("retired")
    await app.all_turns(7)
    with pytest.raises(HistoryRewriteRefused):
        await MigratingSession("a", router).pop_item()
    await router.close()

    for sid, items in app.expected.items():
        assert await sqlalchemy_items(pg_dsn, sid) == items, sid
    tables = installed(pg)
    assert tables is not None and check(pg, tables, list(app.expected)) == {}


async def test_items_that_missed_redis_in_pg_primary_are_repaired_in_the_sdk_format(
    config: Settings, pg_dsn: str, pg: psycopg.Connection[Any], client: aioredis.Redis,
    key_prefix: str, tmp_path: Any,
) -> None:
    await RedisSession("s", redis_client=client, key_prefix=key_prefix).add_items(turn(0))
    backfill(config, BackfillOptions(layout="openai-agents", prefix=config.prefix))
    plan = StaticPlan(load_plan(pg).model_copy(update={"stage": Stage.PG_PRIMARY}))
    router = AsyncMigratingStore(
        AsyncRedisStore("redis://127.0.0.1:1/0", layout=OpenAIAgentsLayout(config.prefix)),
        AsyncPostgresStore(pg_dsn), plan, spool_path=tmp_path / "spool")
    await MigratingSession("s", router).add_items(turn(1))
    await MigratingSession("t", router).add_items(turn(2))
    await router.close()

    summary = repair(config, spool_path=tmp_path / "spool")

    assert (summary.sessions_repaired, summary.failed) == (2, [])
    for sid, items in (("s", turn(0) + turn(1)), ("t", turn(2))):
        legacy = RedisSession(sid, redis_client=client, key_prefix=key_prefix)
        assert await legacy.get_items() == items
        assert await sqlalchemy_items(pg_dsn, sid) == items
    with PostgresStore(pg_dsn) as truth:
        state = truth.load_session("s")
    assert state is not None and [m.message_id for m in state.messages][-1] == "oa-9"
