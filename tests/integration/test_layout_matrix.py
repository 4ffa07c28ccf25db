"""Issue 8's matrix: the cells the per-layout files leave open.

- ``memshift --layout X inspect SID`` for every layout, through the CLI: both stores side
  by side, a session that was backfilled equal in both, one written after only in Redis;
- the MigratingStore over the llamaindex and a TOML layout across the stages (a 50 %
  slice, a rollback), LlamaIndex's own PostgreSQL class seeing every message at the end;
- the MigratingStore over the read-only langgraph layout: reads from the store the Plan
  names, writes refused with what to do;
- parity finding a difference in a TOML layout and in a langgraph thread.

Which test covers which cell is in docs/layouts.md ("What works with each layout").
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from memshift.config import Settings
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.migrate.parity import parity
from memshift.migrate.plan import (
    Stage,
    StaticPlan,
    in_cohort,
    load_plan,
    rollback,
    set_slice,
    set_stage,
)
from memshift.model import Checkpoint, Message, ToolRun
from memshift.stores.layouts import NotInLayout
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from tests.integration.test_cli import memshift
from tests.integration.test_layout_custom import ACME, write_acme_session
from tests.integration.test_router import session

# -- inspect, every layout ------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    """How one layout's sessions were written, and how memshift is told to read them."""

    layout: str  # the --layout argument
    prefix: str  # the --prefix argument
    write: Callable[[str], None]  # writes one session, by id, with the owner's own code
    content: str  # the field of `inspect --json` that shows the session's content


def langchain(redis_url: str, prefix: str, tmp_path: Path) -> Written:
    pytest.importorskip("langchain_community.chat_message_histories")
    from langchain_community.chat_message_histories import RedisChatMessageHistory
    from langchain_core.messages import AIMessage, HumanMessage

    def write(sid: str) -> None:
        RedisChatMessageHistory(sid, url=redis_url, key_prefix=f"{prefix}:").add_messages(
            [HumanMessage(f"où est {sid}? 🎉"), AIMessage("ici ✓")])

    return Written("langchain", prefix, write, "message_count")


def llamaindex(redis_url: str, prefix: str, tmp_path: Path) -> Written:
    pytest.importorskip("llama_index.storage.chat_store.redis")
    from llama_index.core.llms import ChatMessage
    from llama_index.storage.chat_store.redis import RedisChatStore

    def write(sid: str) -> None:
        RedisChatStore(redis_client=redis.Redis.from_url(redis_url)).set_messages(
            f"{prefix}:{sid}", [ChatMessage(role="user", content=f"où est {sid}? 🎉"),
                                ChatMessage(role="assistant", content="ici ✓")])

    return Written("llamaindex", prefix, write, "message_count")


def openai_agents(redis_url: str, prefix: str, tmp_path: Path) -> Written:
    pytest.importorskip("agents.extensions.memory.redis_session")
    from agents.extensions.memory.redis_session import RedisSession

    async def add(sid: str) -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        session = RedisSession(sid, redis_client=client, key_prefix=f"{prefix}:session")
        await session.add_items([{"role": "user", "content": f"où est {sid}? 🎉"},
                                 {"role": "assistant", "content": "ici ✓"}])
        await client.aclose()

    return Written("openai-agents", f"{prefix}.session", lambda sid: asyncio.run(add(sid)),
                   "message_count")


def langgraph(redis_url: str, prefix: str, tmp_path: Path) -> Written:
    pytest.importorskip("langgraph.checkpoint.postgres")
    from tests.fixtures.langgraph import make_fixtures

    def write(sid: str) -> None:  # RedisSaver's recorded keys, the thread renamed `sid`
        make_fixtures.load(redis.Redis.from_url(redis_url), prefix=prefix,
                           tag=sid.removesuffix("thread-done-1"))

    return Written("langgraph", prefix, write, "checkpoint")


def toml(redis_url: str, prefix: str, tmp_path: Path) -> Written:
    path = tmp_path / "acme.toml"
    path.write_text(ACME, encoding="utf-8")
    return Written(str(path), prefix,
                   lambda sid: write_acme_session(redis.Redis.from_url(redis_url), prefix, sid, 2),
                   "message_count")


LAYOUTS = {"langchain": langchain, "llamaindex": llamaindex, "openai-agents": openai_agents,
           "langgraph": langgraph, "toml": toml}


def inspect_json(config: Settings, written: Written, sid: str) -> dict[str, Any]:
    shown = cli(config, written, "inspect", sid, "--json")
    assert shown.returncode == 0, shown.stderr
    data: dict[str, Any] = json.loads(shown.stdout)
    return data


def cli(config: Settings, written: Written, *args: str) -> Any:
    assert config.redis_url and config.postgres_dsn
    return memshift("--redis-url", config.redis_url, "--postgres-dsn", config.postgres_dsn,
                    "--layout", written.layout, "--prefix", written.prefix, *args)


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_inspect_shows_both_stores_of_a_session_in_every_layout(
    kind: str, pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path,
) -> None:
    written = LAYOUTS[kind](redis_url, redis_prefix, tmp_path)
    config = Settings(redis_url=redis_url, postgres_dsn=pg_dsn, layout=written.layout,
                      prefix=written.prefix)
    moved, later = f"{redis_prefix}-thread-done-1", f"{redis_prefix}-later-thread-done-1"
    written.write(moved)
    summary = backfill(config, BackfillOptions(layout=written.layout, prefix=written.prefix))
    assert (summary.state, summary.quarantined) == ("completed", 0)
    written.write(later)  # after the backfill: only Redis holds it

    both = inspect_json(config, written, moved)
    one = inspect_json(config, written, later)
    text = cli(config, written, "inspect", moved)

    redis_side, pg_side = both["stores"]["redis"], both["stores"]["postgres"]
    assert redis_side["present"] and pg_side["present"]
    assert redis_side[written.content] and redis_side[written.content] == pg_side[written.content]
    assert both["comparison"]["parity_status"] == "pass", both["comparison"]
    assert one["stores"]["redis"]["present"] and not one["stores"]["postgres"]["present"]
    assert one["stores"]["redis"][written.content] == redis_side[written.content]
    assert one["comparison"]["checks"]["presence_matches"] is False
    assert text.returncode == 0 and "Redis" in text.stdout and "PostgreSQL" in text.stdout


# -- the MigratingStore over the llamaindex layout ------------------------------------


class Chats:
    """An application that writes each turn through the router and reads the chat back
    from it, checking that the store the Plan names served it and lacks nothing."""

    def __init__(self, router: MigratingStore, plan: StaticPlan, ids: list[str]) -> None:
        self.router, self.plan = router, plan
        self.expected: dict[str, list[tuple[str, str]]] = {}
        for sid in ids:  # what the owner's own code wrote before the router came in
            state = router.load_session(sid)
            self.expected[sid] = [] if state is None else [(m.role, m.content)
                                                           for m in state.messages]
        self.sources: set[str] = set()

    def turn(self, n: int) -> None:
        for sid, expected in self.expected.items():
            for role, text in (("user", f"question {n} où? 🎉"), ("assistant", f"answer {n} ✓")):
                self.router.append_message(sid, Message(message_id=f"{sid}-{n}-{role}",
                                                        role=role, content=text))
                expected.append((role, text))
            read = self.router.read(sid)
            assert read.state is not None, sid
            assert read.source == self.plan.plan.read_source("default", sid), (sid, read)
            assert [(m.role, m.content) for m in read.state.messages] == expected, sid
            self.sources.add(read.source)


IDS = [f"user-{i} ü" for i in range(8)]  # 4 written before the router, 4 new through it


def across_the_stages(
    config: Settings, layout: Any, tmp_path: Path,
    redis_kept: Callable[[str], list[tuple[str, str]]],
    begin: Callable[[MigratingStore, str], Any] | None = None,
) -> Chats:
    """Turns of every session of IDS through a router over ``layout`` at each stage,
    with a 50 % slice and a rollback; parity passes at shadow and at pg_primary, where
    ``redis_kept`` (a session's messages as the owner's code reads Redis) must still
    hold every message. ``begin`` starts each new session, where the layout keeps a
    session record (SCAN finds a session by it). Returns the application, its router
    closed, in retired."""
    assert config.redis_url and config.postgres_dsn
    assert {in_cohort(sid, 50) for sid in IDS} == {True, False}  # the slice splits them
    conn = psycopg.connect(config.postgres_dsn, autocommit=True)
    plan = StaticPlan(load_plan(conn))
    router = MigratingStore(RedisStore(config.redis_url, layout=layout),
                            PostgresStore(config.postgres_dsn), plan,
                            spool_path=tmp_path / "spool")
    chats = Chats(router, plan, IDS)
    assert all(chats.expected[sid] for sid in IDS[:4])
    for sid in IDS[4:]:
        if begin is not None:
            begin(router, sid)

    def move(stage: str) -> None:
        plan.plan = set_stage(conn, stage, f"test: {stage}")

    chats.turn(1)  # redis_only
    move("dual_write")
    chats.turn(2)
    backfill(config, BackfillOptions(layout=config.layout, prefix=config.prefix))
    move("shadow")
    chats.turn(3)
    assert {r.parity_status for r in parity(config, session_ids=IDS)} == {"pass"}
    move("cutover")
    plan.plan = set_slice(conn, "default", 50, "test: half")
    chats.turn(4)
    assert chats.sources == {"redis", "postgres"}
    plan.plan = rollback(conn, "test: drill")
    chats.sources.clear()
    chats.turn(5)
    assert chats.sources == {"redis"}  # the rollback sends every read back to Redis
    plan.plan = set_slice(conn, "default", 100, "test: all")
    move("cutover")
    chats.turn(6)
    move("pg_primary")
    chats.turn(7)
    assert {r.parity_status for r in parity(config, session_ids=IDS)} == {"pass"}
    for sid, expected in chats.expected.items():  # Redis, the secondary, stays the owner's
        assert redis_kept(sid) == expected, sid
    move("retired")
    chats.turn(8)
    router.close()
    conn.close()
    return chats


def test_an_application_on_the_router_keeps_every_llama_index_message_across_the_stages(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path,
) -> None:
    pytest.importorskip("llama_index.storage.chat_store.postgres")
    from llama_index.core.llms import ChatMessage
    from llama_index.storage.chat_store.redis import RedisChatStore

    from memshift.stores.layouts.llamaindex import LlamaIndexLayout
    from tests.integration.test_layout_llamaindex import postgres_chat_store

    config = Settings(redis_url=redis_url, postgres_dsn=pg_dsn, layout="llamaindex",
                      prefix=redis_prefix)
    llama_redis = RedisChatStore(redis_client=redis.Redis.from_url(redis_url))
    for sid in IDS[:4]:
        llama_redis.set_messages(f"{redis_prefix}:{sid}", [
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content=f"hello from {sid}")])

    def in_redis(sid: str) -> list[tuple[str, str]]:
        got = llama_redis.get_messages(f"{redis_prefix}:{sid}")
        return [(m.role.value, m.content or "") for m in got]

    chats = across_the_stages(config, LlamaIndexLayout(redis_prefix), tmp_path, in_redis)

    store, engine = postgres_chat_store(pg_dsn)
    for sid, expected in chats.expected.items():  # LlamaIndex's own PostgreSQL class
        got = store.get_messages(f"{redis_prefix}:{sid}")
        assert [(m.role.value, m.content) for m in got] == expected, sid
    engine.dispose()


def test_an_application_on_the_router_keeps_every_message_of_a_toml_layout_across_the_stages(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path,
) -> None:
    from memshift.stores.layouts.declarative import load_layout

    acme = tmp_path / "acme.toml"
    acme.write_text(ACME, encoding="utf-8")
    config = Settings(redis_url=redis_url, postgres_dsn=pg_dsn, layout=str(acme),
                      prefix=redis_prefix)
    raw = redis.Redis.from_url(redis_url)
    for n, sid in enumerate(IDS[:4]):
        write_acme_session(raw, redis_prefix, sid, n + 1)

    def in_redis(sid: str) -> list[tuple[str, str]]:  # Acme's log: newest first
        log = raw.lrange(f"{redis_prefix}:conv:{sid}:log", 0, -1)
        return [(e["who"], e["text"]) for e in map(json.loads, reversed(log))]

    chats = across_the_stages(config, load_layout(acme, redis_prefix), tmp_path, in_redis,
                              lambda router, sid: router.save_session(session(sid)))

    with PostgresStore(pg_dsn) as truth:
        for sid, expected in chats.expected.items():
            state = truth.load_session(sid)
            assert state is not None, sid
            assert [(m.role, m.content) for m in state.messages] == expected, sid
    raw.close()


# -- the MigratingStore over the langgraph layout --------------------------------------


READS = {  # stage -> the store that serves a read (cutover: with the 100 % slice)
    Stage.REDIS_ONLY: "redis", Stage.DUAL_WRITE: "redis", Stage.SHADOW: "redis",
    Stage.CUTOVER: "postgres", Stage.PG_PRIMARY: "postgres", Stage.RETIRED: "postgres",
}
WRITES: list[tuple[str, Callable[[MigratingStore, str], Any]]] = [
    ("checkpoints", lambda r, sid: r.put_checkpoint(sid, Checkpoint(checkpoint_id="c", step=1))),
    ("messages", lambda r, sid: r.append_message(sid, Message(message_id="m", role="user",
                                                              content="hi"))),
    ("pending writes", lambda r, sid: r.upsert_tool_run(sid, ToolRun(tool_call_id="t",
                                                                     name="x"))),
]


@pytest.fixture
def threads(pg_dsn: str, redis_url: str, redis_prefix: str) -> tuple[Settings, str, str]:
    """RedisSaver's recorded threads, backfilled; then one more thread only Redis holds.
    Returns the settings, a backfilled thread and the later one."""
    pytest.importorskip("langgraph.checkpoint.postgres")
    from tests.fixtures.langgraph import make_fixtures

    client = redis.Redis.from_url(redis_url)
    make_fixtures.load(client, prefix=redis_prefix, tag=f"{redis_prefix}-")
    config = Settings(redis_url=redis_url, postgres_dsn=pg_dsn, layout="langgraph",
                      prefix=redis_prefix)
    summary = backfill(config, BackfillOptions(layout="langgraph", prefix=redis_prefix))
    assert (summary.state, summary.quarantined) == ("completed", 0)
    make_fixtures.load(client, prefix=redis_prefix, tag=f"{redis_prefix}-later-")
    client.close()
    return config, f"{redis_prefix}-thread-done-1", f"{redis_prefix}-later-thread-done-1"


def langgraph_router(config: Settings, plan: StaticPlan, spool: Path) -> MigratingStore:
    from memshift.stores.layouts.langgraph import LangGraphLayout

    assert config.redis_url and config.postgres_dsn
    return MigratingStore(RedisStore(config.redis_url, layout=LangGraphLayout(config.prefix)),
                          PostgresStore(config.postgres_dsn), plan, spool_path=spool)


def latest_in_postgres_saver(pg_dsn: str, thread: str) -> str:
    from langgraph.checkpoint.postgres import PostgresSaver

    with psycopg.connect(pg_dsn, autocommit=True, prepare_threshold=0,
                         row_factory=psycopg.rows.dict_row) as conn:
        found = PostgresSaver(conn).get_tuple({"configurable": {"thread_id": thread,
                                                                "checkpoint_ns": ""}})
    assert found is not None, thread
    return str(found.checkpoint["id"])


def test_a_router_over_langgraph_reads_each_thread_from_the_store_the_plan_names(
    threads: tuple[Settings, str, str], pg_dsn: str, tmp_path: Path,
) -> None:
    config, moved, later = threads
    conn = psycopg.connect(pg_dsn, autocommit=True)
    assert {r.parity_status for r in parity(config, session_ids=[moved])} == {"pass"}
    plan = StaticPlan(load_plan(conn))
    router = langgraph_router(config, plan, tmp_path / "spool")
    with RedisStore(config.redis_url or "", layout="langgraph", prefix=config.prefix) as legacy:
        in_redis = legacy.load_session(moved)
    assert in_redis is not None and in_redis.latest_checkpoint is not None
    latest = in_redis.latest_checkpoint.checkpoint_id
    assert latest_in_postgres_saver(pg_dsn, moved) == latest

    for stage, source in READS.items():
        if stage is Stage.CUTOVER:
            plan.plan = set_slice(conn, "default", 100, "test: all")
        if stage is not plan.plan.stage:
            plan.plan = set_stage(conn, stage, f"test: {stage}")
        read, only_redis = router.read(moved), router.read(later)
        assert (read.source, only_redis.source) == (source, source), stage
        assert read.state is not None and read.state.latest_checkpoint is not None, stage
        assert read.state.latest_checkpoint.checkpoint_id == latest, stage
        # The thread RedisSaver wrote after the backfill: there until PostgreSQL serves.
        assert (only_redis.state is not None) is (source == "redis"), stage
    router.close()
    conn.close()


@pytest.mark.parametrize("stage", [Stage.REDIS_ONLY, Stage.DUAL_WRITE, Stage.SHADOW,
                                   Stage.CUTOVER])
@pytest.mark.parametrize(("what", "write"), WRITES, ids=[w for w, _ in WRITES])
def test_a_write_through_a_router_over_langgraph_is_refused_saying_what_to_do(
    threads: tuple[Settings, str, str], pg_dsn: str, tmp_path: Path, stage: Stage, what: str,
    write: Callable[[MigratingStore, str], Any],
) -> None:
    config, moved, _ = threads
    conn = psycopg.connect(pg_dsn, autocommit=True)
    plan = StaticPlan(load_plan(conn).model_copy(update={"stage": stage}))
    router = langgraph_router(config, plan, tmp_path / "spool")
    before = router.read(moved).state
    assert before is not None and before.latest_checkpoint is not None

    with pytest.raises(NotInLayout) as refused:
        write(router, moved)

    message = str(refused.value)
    assert message.startswith(f"session {moved!r}: the langgraph layout only reads RedisSaver")
    assert f"does not write {what}" in message and "nothing was written" in message
    assert "memshift --layout langgraph backfill" in message and "PostgresSaver" in message
    assert router.read(moved).state == before
    assert conn.execute("SELECT count(*) FROM memshift.repair_queue").fetchone() == (0,)
    assert latest_in_postgres_saver(pg_dsn, moved) == before.latest_checkpoint.checkpoint_id
    router.close()
    conn.close()


def test_a_write_through_a_router_over_langgraph_is_refused_in_pg_primary_before_postgres(
    threads: tuple[Settings, str, str], pg_dsn: str, tmp_path: Path,
) -> None:
    """PostgreSQL leads writes in pg_primary: the router must refuse what Redis can never
    hold before PostgreSQL takes it (else a repair into Redis fails on every run)."""
    config, moved, _ = threads
    conn = psycopg.connect(pg_dsn, autocommit=True)
    plan = StaticPlan(load_plan(conn).model_copy(update={"stage": Stage.PG_PRIMARY}))
    router = langgraph_router(config, plan, tmp_path / "spool")
    try:
        before = latest_in_postgres_saver(pg_dsn, moved)
        with pytest.raises(NotInLayout, match="only reads RedisSaver's keys"):
            router.put_checkpoint(moved, Checkpoint(checkpoint_id="c", step=99))
        assert latest_in_postgres_saver(pg_dsn, moved) == before
        assert conn.execute("SELECT count(*) FROM memshift.checkpoints WHERE session_id = %s "
                            "AND checkpoint_id = 'c'", (moved,)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM memshift.repair_queue").fetchone() == (0,)
    finally:
        router.close()
        conn.close()


# -- parity finds a difference: a TOML layout, langgraph --------------------------------


def test_parity_names_a_message_the_owner_changed_in_a_toml_layout_after_the_backfill(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path,
) -> None:
    written = toml(redis_url, redis_prefix, tmp_path)
    config = Settings(redis_url=redis_url, postgres_dsn=pg_dsn, layout=written.layout,
                      prefix=redis_prefix)
    for sid in ("kept", "changed"):
        written.write(sid)
    backfill(config, BackfillOptions(layout=written.layout, prefix=redis_prefix))
    raw = redis.Redis.from_url(redis_url)
    log = f"{redis_prefix}:conv:changed:log"
    newest = json.loads(raw.lindex(log, 0) or b"")
    raw.lset(log, 0, json.dumps(newest | {"text": "edited by hand"}))
    raw.close()

    by_id = {r.session_id: r for r in parity(config, session_ids=["kept", "changed"])}

    assert by_id["kept"].parity_status == "pass"
    assert (by_id["changed"].parity_status, by_id["changed"].failed_checks) == (
        "fail", ["message_order_matches"])
    (diff,) = by_id["changed"].as_json(show_values=True)["diffs"]
    assert diff["field"].endswith(".content") and diff["redis"] == "edited by hand"


def test_parity_names_a_thread_whose_latest_checkpoint_moved_after_the_backfill(
    threads: tuple[Settings, str, str], redis_url: str, redis_prefix: str,
) -> None:
    config, moved, _ = threads
    other = f"{redis_prefix}-with:colons/and spaces"
    client = redis.Redis.from_url(redis_url)
    pointer = f"{redis_prefix}_latest:{moved}:__empty__"
    found = client.get(pointer)
    assert isinstance(found, bytes), pointer
    latest_key = found.decode()
    parent = json.loads(client.get(latest_key) or b"")["parent_checkpoint_id"]
    # As RedisSaver leaves it when the graph goes back to the parent (update_state on it).
    client.set(pointer, latest_key.rsplit(":", 1)[0] + f":{parent}")
    client.close()

    by_id = {r.session_id: r for r in parity(config, session_ids=[moved, other])}

    assert by_id[other].parity_status == "pass"
    assert by_id[moved].parity_status == "fail"
    assert "latest_checkpoint_matches" in by_id[moved].failed_checks
    assert parent in json.dumps(by_id[moved].as_json(show_values=True)["diffs"])
