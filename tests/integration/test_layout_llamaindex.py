"""The llamaindex layout: chats that LlamaIndex's RedisChatStore wrote move into
PostgresChatStore's table, equal and in order, by backfill, live writes and repair.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from psycopg.types.json import Jsonb
from typer.testing import CliRunner

pytest.importorskip("llama_index.storage.chat_store.redis")
pytest.importorskip("llama_index.storage.chat_store.postgres")

from llama_index.core.base.llms.types import ImageBlock, TextBlock
from llama_index.core.llms import ChatMessage
from llama_index.storage.chat_store.postgres import PostgresChatStore
from llama_index.storage.chat_store.redis import RedisChatStore
from sqlalchemy import URL, Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import sessionmaker

from memshift.cli import app
from memshift.config import Settings
from memshift.errors import MessageConflict, SeqGap
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.migrate.parity import parity
from memshift.migrate.quarantine import entries
from memshift.model import Message
from memshift.stores.layouts.llamaindex import (
    LlamaIndexLayout,
    NotInLayout,
    ProjectionError,
    install,
    installed,
    uninstall,
)
from memshift.stores.layouts.llamaindex.messages import fields_from_dict, to_dict
from memshift.stores.layouts.llamaindex.projection import check
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from tests.integration.layouts_support import (
    LONG,
    layout_settings,
    projection_drift,
    run_in_threads,
)

TABLE = "chatstore"


@pytest.fixture
def config(pg_dsn: str, redis_url: str, redis_prefix: str) -> Settings:
    return layout_settings("llamaindex", pg_dsn, redis_url, redis_prefix)


def postgres_chat_store(pg_dsn: str, table: str = TABLE, *, use_jsonb: bool = False
                        ) -> tuple[PostgresChatStore, Engine]:
    """LlamaIndex's own PostgreSQL class, as the application would make it."""
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)

    def url(driver: str) -> URL:
        return URL.create(driver, username=params.get("user"), password=params.get("password"),
                          host=params.get("host"), port=int(params.get("port") or 5432),
                          database=params.get("dbname"))

    engine = create_engine(url("postgresql+psycopg"))
    async_engine = create_async_engine(url("postgresql+asyncpg"))
    store = PostgresChatStore(session=sessionmaker(engine),
                              async_session=sessionmaker(async_engine, class_=AsyncSession),
                              table_name=table, use_jsonb=use_jsonb)
    return store, engine


@pytest.fixture
def chat_store(pg_dsn: str) -> Iterator[PostgresChatStore]:
    store, engine = postgres_chat_store(pg_dsn)
    yield store
    engine.dispose()


def redis_chat_store(redis_url: str, ttl: int | None = None) -> RedisChatStore:
    return RedisChatStore(redis_client=redis.Redis.from_url(redis_url),
                          aredis_client=redis.asyncio.Redis.from_url(redis_url), ttl=ttl)


def turn(n: int, tag: str = "") -> list[ChatMessage]:
    """One agent turn: a question, a tool call, its result, an answer."""
    call = f"call_{tag}{n}"
    return [
        ChatMessage(role="user", content=f"question {n} {tag}: où est le café? 🎉"),
        ChatMessage(role="assistant", content=None, additional_kwargs={"tool_calls": [
            {"id": call, "type": "function",
             "function": {"name": "search", "arguments": json.dumps({"q": "café", "n": n})}}]}),
        ChatMessage(role="tool", content=json.dumps({"hits": ["a", "b"], "n": n}),
                    additional_kwargs={"tool_call_id": call, "name": "search"}),
        ChatMessage(role="assistant", blocks=[TextBlock(text=f"answer {n} ✓"),
                                              TextBlock(text="second block")]),
    ]


SESSION_IDS = [
    "plain-1", "sessión ünï 🎉", "3f1e0a52-2b63-4d2b-9a1e-7c1f0c0ad001",
    "with:colons and spaces", "glob*?[chars]", "user/42/thread/7", "x" * 300, "日本語のチャット",
]


def write_legacy(redis_url: str, prefix: str) -> dict[str, list[ChatMessage]]:
    """Chats as the application wrote them with LlamaIndex's own Redis class."""
    written: dict[str, list[ChatMessage]] = {}
    for i, sid in enumerate(SESSION_IDS):
        key = f"{prefix}:{sid}"
        messages = [ChatMessage(role="system", content="You are helpful.")]
        for n in range(i % 3 + 1):
            messages += turn(n, tag=str(i))
        if i % 4 == 1:
            messages += [ChatMessage(role="user", content=LONG),
                         ChatMessage(role="assistant", content=LONG[::-1])]
        if i % 4 == 2:
            messages += [ChatMessage(role="user", blocks=[
                TextBlock(text="what is this?"), ImageBlock(url="https://example.com/a.png")]),
                ChatMessage(role="user", content="")]
        store = redis_chat_store(redis_url, ttl=3600 if i % 3 == 0 else None)
        store.set_messages(key, messages[:2])
        for message in messages[2:]:
            store.add_message(key, message)
        written[sid] = store.get_messages(key)
        assert written[sid] == messages
    return written


def test_backfill_moves_redis_chat_stores_into_postgres_chat_store_equal_and_in_order(
    config: Settings, pg: psycopg.Connection[Any], chat_store: PostgresChatStore,
    redis_url: str, redis_prefix: str,
) -> None:
    written = write_legacy(redis_url, redis_prefix)

    summary = backfill(config, BackfillOptions(layout="llamaindex", prefix=redis_prefix,
                                               batch_size=3))

    assert (summary.state, summary.migrated, summary.quarantined) == (
        "completed", len(SESSION_IDS), 0)
    for sid, messages in written.items():
        assert chat_store.get_messages(f"{redis_prefix}:{sid}") == messages, sid
    reports = list(parity(config, session_ids=list(written)))
    assert [r.parity_status for r in reports] == ["pass"] * len(written)
    expiring = {row[0] for row in pg.execute(
        "SELECT session_id FROM memshift.sessions WHERE expires_at > now()")}
    assert expiring == {sid for i, sid in enumerate(SESSION_IDS) if i % 3 == 0}


def test_parity_fails_projection_matches_when_a_chat_store_message_is_changed_by_hand(
    config: Settings, pg: psycopg.Connection[Any], redis_url: str, redis_prefix: str,
) -> None:
    written = write_legacy(redis_url, redis_prefix)
    backfill(config, BackfillOptions(layout="llamaindex", prefix=redis_prefix))
    key = f"{redis_prefix}:{SESSION_IDS[3]}"
    (held,) = pg.execute("SELECT value[2]::jsonb FROM chatstore WHERE key = %s",
                         [key]).fetchone() or (None,)
    tampered = {"role": "user", "content": "tampered"}
    pg.execute("UPDATE chatstore SET value[2] = %s::json WHERE key = %s",
               [json.dumps(tampered), key])

    diffs = projection_drift(config, list(written), SESSION_IDS[3])

    assert diffs == [{"check": "projection_matches", "field": "public.chatstore[seq=1]",
                      "redis": held, "postgres": tampered}]


def test_the_cli_backfills_the_layout_and_a_second_run_adds_nothing(
    config: Settings, pg: psycopg.Connection[Any], chat_store: PostgresChatStore,
    redis_url: str, redis_prefix: str,
) -> None:
    written = write_legacy(redis_url, redis_prefix)
    args = ["--redis-url", redis_url, "--postgres-dsn", str(config.postgres_dsn),
            "--layout", "llamaindex", "--prefix", redis_prefix]

    first = CliRunner().invoke(app, [*args, "backfill", "--json"])
    rows = pg.execute("SELECT key, value::text[] FROM chatstore ORDER BY key").fetchall()
    again = CliRunner().invoke(app, [*args, "backfill", "--json"])
    checked = CliRunner().invoke(app, [*args, "parity", "--all", "--json"])

    assert first.exit_code == 0, first.output
    assert json.loads(first.output.splitlines()[-1])["migrated"] == len(written)
    assert json.loads(again.output.splitlines()[-1])["unchanged"] == len(written)
    assert pg.execute("SELECT key, value::text[] FROM chatstore ORDER BY key").fetchall() == rows
    assert checked.exit_code == 0, checked.output
    statuses = [json.loads(line)["parity_status"] for line in checked.output.splitlines()]
    assert statuses == ["pass"] * len(written)
    projection = installed(pg)
    assert projection is not None and check(pg, projection, list(written)) == {}
    assert chat_store.get_messages(f"{redis_prefix}:plain-1") == written["plain-1"]


def test_chats_written_by_llama_index_before_0_12_migrate_too(
    config: Settings, chat_store: PostgresChatStore, redis_url: str, redis_prefix: str
) -> None:
    # llama-index-core before 0.12 dumped ChatMessage with "content", not "blocks";
    # ChatMessage still reads it. Written raw, as that version left it in Redis.
    client = redis.Redis.from_url(redis_url)
    key = f"{redis_prefix}:old"
    client.rpush(key, json.dumps({"role": "user", "content": "old ü",
                                  "additional_kwargs": {}}).encode())
    client.rpush(key, json.dumps({"role": "assistant", "content": None,
                                  "additional_kwargs": {"tool_calls": []}}).encode())
    before = redis_chat_store(redis_url).get_messages(key)

    summary = backfill(config, BackfillOptions(layout="llamaindex", prefix=redis_prefix))

    assert (summary.migrated, summary.quarantined) == (1, 0)
    assert chat_store.get_messages(key) == before
    assert [r.parity_status for r in parity(config, session_ids=["old"])] == ["pass"]


def test_postgres_builds_the_same_llama_index_object_as_python(
    pg: psycopg.Connection[Any],
) -> None:
    generic = [Message(message_id="g1", role="user", content="plain"),
               Message(message_id="g2", role="tool", content="42", tool_call_id="c9")]
    stored = [*turn(1), ChatMessage(role="user", blocks=[]),
              ChatMessage(role="user", blocks=[ImageBlock(url="https://example.com/i.png")])]
    from_llama_index = [
        Message.model_validate(fields_from_dict(json.loads(m.model_dump_json()), seq))
        for seq, m in enumerate(stored)
    ]
    legacy = [Message.model_validate(fields_from_dict(d, 0)) for d in (
        {"role": "user", "content": "old", "additional_kwargs": {}},
        {"role": "user", "content": None, "additional_kwargs": {}})]
    install(pg, TABLE)
    for record in [*generic, *from_llama_index, *legacy]:
        row = pg.execute(
            "SELECT memshift.llamaindex_message(%s, %s, %s, %s)",
            (record.role, record.content, record.tool_call_id, Jsonb(record.metadata)),
        ).fetchone()
        assert row is not None and row[0] == to_dict(record)
    for record, message in zip(from_llama_index, stored, strict=True):
        assert ChatMessage.model_validate(to_dict(record)) == message


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\xff\xfe not utf-8", "is not valid UTF-8"),
        (b'{"role": "user", "blocks": [{"block_type": "text", "te', "is not valid JSON"),
        (b'["user", "hi"]', "is JSON list, expected a ChatMessage object"),
        (b'{"role": "robot", "blocks": []}', "member 'role' is 'robot'"),
        (b'{"role": "user", "blocks": {"text": "x"}}', "member 'blocks' is dict"),
        (b'{"role": "user", "content": 12}', "member 'content' is int"),
        (b'{"role": "user", "additional_kwargs": [], "blocks": []}',
         "member 'additional_kwargs' is list"),
        (b'{"role": "user", "content": "nul \\u0000 here"}', "NUL"),
        (b'{"role": "user", "blocks": [], "memshift": {"id": 1}}', "member 'memshift'"),
    ],
)
def test_an_unreadable_entry_quarantines_its_session_with_the_key_and_seq(
    config: Settings, pg: psycopg.Connection[Any], chat_store: PostgresChatStore,
    redis_url: str, redis_prefix: str, raw: bytes, problem: str,
) -> None:
    store = redis_chat_store(redis_url)
    store.set_messages(f"{redis_prefix}:good", turn(1))
    store.set_messages(f"{redis_prefix}:bad", turn(1))
    redis.Redis.from_url(redis_url).rpush(f"{redis_prefix}:bad", raw)  # seq 4

    summary = backfill(config, BackfillOptions(layout="llamaindex", prefix=redis_prefix))

    assert (summary.migrated, summary.quarantined) == (1, 1)
    (entry,) = entries(pg)
    assert f"key '{redis_prefix}:bad' message seq 4 (LINDEX 4)" in entry.reason
    assert problem in entry.reason
    assert chat_store.get_messages(f"{redis_prefix}:good") == turn(1)
    assert chat_store.get_messages(f"{redis_prefix}:bad") == []


def message(sid: str, seq: int) -> Message:
    return Message(seq=seq, message_id=f"{sid}-{seq}", role="user", content=f"{sid} {seq}",
                   metadata={"sid": sid})


def test_live_writes_arriving_out_of_order_and_twice_are_appended_once_in_seq_order(
    pg_dsn: str, pg: psycopg.Connection[Any], chat_store: PostgresChatStore
) -> None:
    install(pg, TABLE, key_prefix="chat:")
    sessions = {f"s{i}": [message(f"s{i}", seq) for seq in range(12)] for i in range(6)}
    deliveries = [m for ms in sessions.values() for m in ms for _ in range(2)]
    random.Random(7).shuffle(deliveries)
    held_back = [m for m in deliveries if m.seq == 0]

    def deliver(part: list[Message]) -> None:
        with PostgresStore(pg_dsn, max_size=1) as store:
            for msg in part:
                store.append_message(msg.metadata["sid"], msg)

    run_in_threads(deliver, [m for m in deliveries if m.seq != 0], threads=4)
    for sid in sessions:  # nothing after a missing seq 0 is appended yet
        assert chat_store.get_messages(f"chat:{sid}") == []
    run_in_threads(deliver, held_back, threads=3)

    for sid, msgs in sessions.items():
        assert chat_store.get_messages(f"chat:{sid}") == [
            ChatMessage(role="user", content=f"{sid} {m.seq}") for m in msgs], sid


def test_install_refuses_a_table_it_did_not_fill_or_of_another_shape(
    pg: psycopg.Connection[Any], chat_store: PostgresChatStore
) -> None:
    chat_store.add_message("theirs-key", ChatMessage(role="user", content="mine"))
    pg.execute("CREATE TABLE odd (id int, key text, value jsonb)")

    with pytest.raises(ProjectionError, match="already holds 1 chats that memshift did not"):
        install(pg, TABLE)
    with pytest.raises(ProjectionError, match="is not a PostgresChatStore table"):
        install(pg, "odd")
    with pytest.raises(ProjectionError, match="lower-case letters"):
        install(pg, "Chat-Store")
    assert installed(pg) is None


def test_only_one_message_projection_per_database(pg: psycopg.Connection[Any]) -> None:
    from memshift.stores.layouts.langchain import install as install_langchain

    install_langchain(pg, "chat_history")

    with pytest.raises(ProjectionError, match="the langchain projection is installed"):
        install(pg, TABLE)
    assert installed(pg) is None


def test_a_jsonb_chat_store_is_kept_as_jsonb_and_uninstall_stops_projecting(
    pg_dsn: str, pg: psycopg.Connection[Any]
) -> None:
    projection = install(pg, "chats_b", use_jsonb=True)
    with PostgresStore(pg_dsn) as store:
        store.append_message("s", message("s", 0))
        uninstall(pg)
        store.append_message("s", message("s", 1))

    jsonb_store, engine = postgres_chat_store(pg_dsn, "chats_b", use_jsonb=True)
    assert projection.element == "jsonb"
    assert jsonb_store.get_messages("s") == [ChatMessage(role="user", content="s 0")]
    assert installed(pg) is None
    engine.dispose()


def test_a_backfill_with_another_prefix_than_the_installed_projection_is_refused(
    config: Settings, pg: psycopg.Connection[Any], redis_url: str, redis_prefix: str
) -> None:
    install(pg, TABLE, key_prefix="other:")
    redis_chat_store(redis_url).set_messages(f"{redis_prefix}:s", turn(1))

    with pytest.raises(ProjectionError, match="keys with prefix 'other:'"):
        backfill(config, BackfillOptions(layout="llamaindex", prefix=redis_prefix))


def test_the_redis_store_writes_llama_index_entries_and_recognises_repeats(
    redis_url: str, redis_prefix: str
) -> None:
    key = f"{redis_prefix}:s"
    llama = redis_chat_store(redis_url)
    llama.set_messages(key, [ChatMessage(role="user", content="legacy 0"),
                             ChatMessage(role="assistant", content="legacy 1")])
    with RedisStore(redis_url, layout=LlamaIndexLayout(redis_prefix), ttl_seconds=60) as store:
        state = store.load_session("s")
        assert state is not None
        legacy = state.messages[1]
        new = Message(message_id="m-new", role="user", content="hi")

        replayed = store.append_message("s", legacy)  # a repair re-sends what LlamaIndex wrote
        sent = store.append_message("s", new)
        retried = store.append_message("s", new)
        with pytest.raises(MessageConflict, match="seq 1"):
            store.append_message("s", new.model_copy(update={"seq": 1}))
        with pytest.raises(MessageConflict, match="already stored at seq 2"):
            store.append_message("s", new.model_copy(update={"content": "other"}))
        with pytest.raises(SeqGap, match="next free seq is 3"):
            store.append_message("s", Message(seq=9, message_id="m9", role="user", content="x"))

    assert (replayed, sent.seq, retried.seq) == (legacy, 2, 2)
    assert llama.get_messages(key) == [ChatMessage(role="user", content="legacy 0"),
                                       ChatMessage(role="assistant", content="legacy 1"),
                                       ChatMessage(role="user", content="hi")]
    assert 0 < redis.Redis.from_url(redis_url).ttl(key) <= 60


def test_state_that_llama_index_cannot_hold_is_refused_before_any_write(
    redis_url: str, redis_prefix: str
) -> None:
    with RedisStore(redis_url, layout=LlamaIndexLayout(redis_prefix)) as store:
        with pytest.raises(NotInLayout, match="no place for tool runs"):
            store.upsert_tool_run("s", {"tool_call_id": "c", "name": "search"})
        with pytest.raises(NotInLayout, match="no place for a session status"):
            store.set_status("s", "paused")
        with pytest.raises(ValueError, match="role 'human' is not a LlamaIndex MessageRole"):
            store.append_message("s", Message(message_id="m", role="human", content="hi"))
    assert not redis.Redis.from_url(redis_url).exists(f"{redis_prefix}:s")
