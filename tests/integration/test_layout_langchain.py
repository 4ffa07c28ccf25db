"""The langchain layout: sessions that LangChain's RedisChatMessageHistory wrote move into
langchain-postgres' PostgresChatMessageHistory table, equal and in order, and the
drop-in MigratingChatMessageHistory keeps an application working across every stage.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import redis
from psycopg.types.json import Jsonb

pytest.importorskip("langchain_community")
pytest.importorskip("langchain_postgres")

from langchain_community.chat_message_histories import RedisChatMessageHistory
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.runnables import RunnableLambda
from langchain_core.runnables.history import RunnableWithMessageHistory
from langchain_postgres import PostgresChatMessageHistory

from memshift.adapters.langchain import ClearRefused, MigratingChatMessageHistory
from memshift.config import Settings
from memshift.errors import ConfigError, MessageConflict, SeqGap
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.migrate.parity import parity
from memshift.migrate.plan import (
    Plan,
    Stage,
    StaticPlan,
    load_plan,
    rollback,
    set_slice,
    set_stage,
)
from memshift.migrate.quarantine import entries
from memshift.migrate.repair import repair
from memshift.migrate.rule import enforce_rule, set_rule
from memshift.model import Message
from memshift.stores.layouts.langchain import (
    LangChainLayout,
    NotInLayout,
    ProjectionError,
    install,
    installed,
    session_uuid,
    uninstall,
)
from memshift.stores.layouts.langchain.messages import to_dict
from memshift.stores.layouts.langchain.projection import check
from memshift.stores.migrating import AsyncMigratingStore, MigratingStore
from memshift.stores.postgres import AsyncPostgresStore, PostgresStore
from memshift.stores.redis import AsyncRedisStore, RedisStore
from tests.integration.layouts_support import (
    LONG,
    diffs_of_a_deleted_row,
    layout_settings,
    projection_drift,
    run_in_threads,
)
from tests.integration.test_cli import memshift

TABLE = "chat_history"


@pytest.fixture
def config(pg_dsn: str, redis_url: str, redis_prefix: str) -> Settings:
    return layout_settings("langchain", pg_dsn, redis_url, redis_prefix)


def history(redis_url: str, prefix: str, sid: str, ttl: int | None = None
            ) -> RedisChatMessageHistory:
    return RedisChatMessageHistory(sid, url=redis_url, key_prefix=f"{prefix}:", ttl=ttl)


def postgres_history(conn: psycopg.Connection[Any], sid: str) -> list[BaseMessage]:
    return PostgresChatMessageHistory(TABLE, str(session_uuid(sid)),
                                      sync_connection=conn).messages


def turn(n: int, tag: str = "") -> list[BaseMessage]:
    """One agent turn: a question, a tool call, its result, an answer (with extras)."""
    call = f"call_{tag}{n}"
    return [
        HumanMessage(f"question {n} {tag}: où est le café? 🎉", name="user-ü"),
        AIMessage("", id=f"run-{tag}{n}",
                  tool_calls=[{"name": "search", "args": {"q": "café", "n": n}, "id": call}],
                  response_metadata={"model": "m", "finish_reason": "tool_calls"},
                  usage_metadata={"input_tokens": 10, "output_tokens": 3, "total_tokens": 13}),
        ToolMessage(json.dumps({"hits": ["a", "b"], "n": n}), tool_call_id=call,
                    status="success", artifact={"raw": [1, 2.5, None]}),
        AIMessage([{"type": "text", "text": f"answer {n} ✓"}], additional_kwargs={"x": {"y": []}}),
    ]


SESSION_IDS = [
    "plain-1", "sessión ünï 🎉", "3f1e0a52-2b63-4d2b-9a1e-7c1f0c0ad001", "with:colons and spaces",
    "glob*?[chars]", "user/42/thread/7", "x" * 300, "日本語のセッション",
]


def write_legacy(redis_url: str, prefix: str) -> dict[str, list[BaseMessage]]:
    """Sessions as the application wrote them with LangChain's own Redis class."""
    written: dict[str, list[BaseMessage]] = {}
    for i, sid in enumerate(SESSION_IDS):
        messages: list[BaseMessage] = [SystemMessage("You are helpful.")]
        for n in range(i % 3 + 1):
            messages += turn(n, tag=str(i))
        if i % 4 == 1:
            messages += [HumanMessage(LONG), AIMessage(LONG[::-1])]
        if i % 4 == 2:
            messages += [ChatMessage("a chat message", role="critic"), HumanMessage("")]
        lc = history(redis_url, prefix, sid, ttl=3600 if i % 3 == 0 else None)
        lc.add_messages(messages[:2])
        for message in messages[2:]:
            lc.add_message(message)
        written[sid] = lc.messages
        assert written[sid] == messages
    return written


def test_backfill_moves_langchain_histories_into_postgres_chat_history_equal_and_in_order(
    config: Settings, pg_dsn: str, pg: psycopg.Connection[Any], redis_url: str,
    redis_prefix: str,
) -> None:
    written = write_legacy(redis_url, redis_prefix)

    result = memshift("--layout", "langchain", "--prefix", redis_prefix, "backfill",
                      "--batch-size", "3", "--json",
                      env={"MEMSHIFT_REDIS_URL": redis_url, "MEMSHIFT_POSTGRES_DSN": pg_dsn})

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["state"], summary["migrated"], summary["quarantined"]) == (
        "completed", len(SESSION_IDS), 0)
    for sid, messages in written.items():
        assert postgres_history(pg, sid) == messages, sid
    reports = list(parity(config, session_ids=list(written)))
    assert [r.parity_status for r in reports] == ["pass"] * len(written)
    mapping = dict(pg.execute("SELECT session_id, session_uuid FROM memshift.langchain_sessions"))
    assert mapping == {sid: session_uuid(sid) for sid in written}
    expiring = {row[0] for row in pg.execute(
        "SELECT session_id FROM memshift.sessions WHERE expires_at > now()")}
    assert expiring == {sid for i, sid in enumerate(SESSION_IDS) if i % 3 == 0}


def test_a_second_backfill_and_a_second_install_add_no_row(
    config: Settings, pg: psycopg.Connection[Any], redis_url: str, redis_prefix: str
) -> None:
    written = write_legacy(redis_url, redis_prefix)
    options = BackfillOptions(layout="langchain", prefix=redis_prefix)
    backfill(config, options)
    rows = pg.execute("SELECT count(*) FROM chat_history").fetchone()

    again = backfill(config, options)
    install(pg, TABLE)

    assert again.unchanged == len(written)
    assert pg.execute("SELECT count(*) FROM chat_history").fetchone() == rows
    projection = installed(pg)
    assert projection is not None and check(pg, projection, list(written)) == {}


def test_parity_fails_projection_matches_when_a_chat_history_row_is_deleted_by_hand(
    config: Settings, pg: psycopg.Connection[Any], redis_url: str, redis_prefix: str
) -> None:
    written = write_legacy(redis_url, redis_prefix)
    backfill(config, BackfillOptions(layout="langchain", prefix=redis_prefix))
    sid = SESSION_IDS[1]
    rows = [r[0] for r in pg.execute(
        "SELECT message FROM chat_history WHERE session_id = %s ORDER BY id", [session_uuid(sid)])]
    pg.execute("DELETE FROM chat_history WHERE session_id = %s AND message = %s",
               [session_uuid(sid), Jsonb(rows[1])])

    diffs = projection_drift(config, list(written), sid)

    assert diffs == diffs_of_a_deleted_row("public.chat_history", rows, 1)


def test_a_chat_history_table_dropped_by_hand_fails_every_session_saying_why(
    config: Settings, pg: psycopg.Connection[Any], redis_url: str, redis_prefix: str
) -> None:
    written = write_legacy(redis_url, redis_prefix)
    backfill(config, BackfillOptions(layout="langchain", prefix=redis_prefix))
    pg.execute("DROP TABLE chat_history")

    reports = list(parity(config, session_ids=list(written)))

    assert {r.parity_status for r in reports} == {"fail"}
    for report in reports:
        assert report.failed_checks == ["projection_matches"]
        (diff,) = report.as_json()["diffs"]
        assert diff["postgres"].startswith("public.chat_history cannot be compared with "
                                           "memshift's truth: relation")
        assert "install() again" in diff["postgres"]


def test_a_drifted_projection_fires_the_rollback_rule_when_its_check_is_critical(
    config: Settings, pg: psycopg.Connection[Any], redis_url: str, redis_prefix: str
) -> None:
    written = write_legacy(redis_url, redis_prefix)
    backfill(config, BackfillOptions(layout="langchain", prefix=redis_prefix))
    set_stage(pg, "dual_write", "go")
    set_stage(pg, "shadow", "go", force=True)
    set_stage(pg, "cutover", "go", force=True)
    set_slice(pg, "history", 100, "cut it over")
    set_rule(pg, "the application will read the chat history table", window=1000,
             critical=["projection_matches"])
    pg.execute("DELETE FROM chat_history WHERE session_id = %s",
               [session_uuid(SESSION_IDS[0])])

    reports = list(parity(config, session_ids=list(written)))
    fired = enforce_rule(pg)

    assert [r.failed_checks for r in reports if r.parity_status != "pass"] == [
        ["projection_matches"]]
    assert [(f.read_path, f.critical_failures) for f in fired] == [
        ("history", {"projection_matches": 1})]
    assert load_plan(pg).slices["history"].percent == 0


def test_messages_arriving_out_of_order_and_twice_are_projected_once_in_seq_order(
    pg_dsn: str, pg: psycopg.Connection[Any]
) -> None:
    install(pg, TABLE)
    sessions = {f"s{i}": [message(f"s{i}", seq) for seq in range(12)] for i in range(6)}
    deliveries = [m for ms in sessions.values() for m in ms for _ in range(2)]
    random.Random(7).shuffle(deliveries)
    held_back = [m for m in deliveries if m.seq == 0]

    def deliver(part: list[Message]) -> None:
        with PostgresStore(pg_dsn, max_size=1) as store:
            for msg in part:
                store.append_message(msg.metadata["sid"], msg)

    run_in_threads(deliver, [m for m in deliveries if m.seq != 0], threads=4)
    for sid in sessions:  # nothing after a missing seq 0 is projected yet
        assert postgres_history(pg, sid) == []
    run_in_threads(deliver, held_back, threads=3)

    for sid, msgs in sessions.items():
        assert postgres_history(pg, sid) == [HumanMessage(f"{sid} {m.seq}") for m in msgs], sid


def message(sid: str, seq: int) -> Message:
    return Message(seq=seq, message_id=f"{sid}-{seq}", role="human", content=f"{sid} {seq}",
                   metadata={"sid": sid})


def test_postgres_builds_the_same_langchain_dict_as_python(pg: psycopg.Connection[Any]) -> None:
    generic = [Message(message_id="g1", role="human", content="plain"),
               Message(message_id="g2", role="tool", content="42", tool_call_id="c9")]
    from_langchain = [
        Message.model_validate(f) for f in (
            _fields(m, seq) for seq, m in enumerate([*turn(1), ChatMessage("c", role="r")]))
    ]
    install(pg, TABLE)
    for record in [*generic, *from_langchain]:
        row = pg.execute(
            "SELECT memshift.langchain_message(%s, %s, %s, %s)",
            (record.role, record.content, record.tool_call_id, Jsonb(record.metadata)),
        ).fetchone()
        assert row is not None and row[0] == to_dict(record)


def _fields(message: BaseMessage, seq: int) -> dict[str, Any]:
    from langchain_core.messages import message_to_dict

    from memshift.stores.layouts.langchain.messages import fields_from_dict

    return fields_from_dict(json.loads(json.dumps(message_to_dict(message))), seq)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\xff\xfe not utf-8", "is not valid UTF-8"),
        (b'{"type": "human", "data": {"content": "cut', "is not valid JSON"),
        (b'["human", "hi"]', "is JSON list, expected an object"),
        (b'{"type": "human", "data": {"text": "no content"}}', "has no 'content'"),
        (b'{"type": 7, "data": {"content": "x"}}', "member 'type' is 7"),
        (b'{"type": "human", "data": {"content": 12}}', "'data.content' is int"),
        (b'{"type": "human", "data": {"content": "nul \\u0000 here"}}', "NUL"),
        (b'{"type": "human", "data": {"content": "x"}, "memshift": {"id": 1}}',
         "member 'memshift'"),
    ],
)
def test_an_unreadable_entry_quarantines_its_session_with_the_key_and_seq(
    config: Settings, pg: psycopg.Connection[Any], redis_url: str, redis_prefix: str,
    raw: bytes, problem: str,
) -> None:
    good = history(redis_url, redis_prefix, "good")
    good.add_messages(turn(1))
    bad = history(redis_url, redis_prefix, "bad")
    bad.add_messages(turn(1))
    client = redis.Redis.from_url(redis_url)
    client.rpush(f"{redis_prefix}:bad", raw)  # RPUSH: the oldest message, seq 0

    summary = backfill(config, BackfillOptions(layout="langchain", prefix=redis_prefix))

    assert (summary.migrated, summary.quarantined) == (1, 1)
    (entry,) = entries(pg)
    assert f"key '{redis_prefix}:bad' message seq 0 (LINDEX 4)" in entry.reason
    assert problem in entry.reason
    assert postgres_history(pg, "good") == good.messages
    assert postgres_history(pg, "bad") == []


def test_install_refuses_a_table_it_did_not_fill_or_of_another_shape(
    pg: psycopg.Connection[Any],
) -> None:
    PostgresChatMessageHistory.create_tables(pg, "theirs")
    PostgresChatMessageHistory("theirs", str(session_uuid("x")),
                               sync_connection=pg).add_messages([HumanMessage("mine")])
    pg.execute("CREATE TABLE odd (id int, session_id text, message jsonb)")

    with pytest.raises(ProjectionError, match="already holds 1 rows that memshift did not"):
        install(pg, "theirs")
    with pytest.raises(ProjectionError, match="needs session_id uuid, created_at"):
        install(pg, "odd")
    with pytest.raises(ProjectionError, match="letters, digits and '_'"):
        install(pg, "chat-history")
    assert installed(pg) is None


def test_after_uninstall_the_truth_no_longer_projects(
    pg_dsn: str, pg: psycopg.Connection[Any]
) -> None:
    install(pg, TABLE)
    with PostgresStore(pg_dsn) as store:
        store.append_message("s", message("s", 0))
        uninstall(pg)
        store.append_message("s", message("s", 1))

    assert postgres_history(pg, "s") == [HumanMessage("s 0")]
    assert installed(pg) is None


def test_the_redis_store_writes_langchain_entries_and_recognises_repeats(
    redis_url: str, redis_prefix: str
) -> None:
    lc = history(redis_url, redis_prefix, "s")
    lc.add_messages([HumanMessage("legacy 0"), AIMessage("legacy 1")])
    with RedisStore(redis_url, layout=LangChainLayout(redis_prefix), ttl_seconds=60) as store:
        state = store.load_session("s")
        assert state is not None
        legacy = state.messages[1]
        new = Message(message_id="m-new", role="human", content="hi")

        replayed = store.append_message("s", legacy)  # a repair re-sends what LangChain wrote
        sent = store.append_message("s", new)
        retried = store.append_message("s", new)
        with pytest.raises(MessageConflict, match="seq 1"):
            store.append_message("s", new.model_copy(update={"seq": 1}))
        with pytest.raises(MessageConflict, match="already stored at seq 2"):
            store.append_message("s", new.model_copy(update={"content": "other"}))
        with pytest.raises(SeqGap, match="next free seq is 3"):
            store.append_message("s", Message(seq=9, message_id="m9", role="ai", content="x"))

    assert (replayed, sent.seq, retried.seq) == (legacy, 2, 2)
    assert lc.messages == [HumanMessage("legacy 0"), AIMessage("legacy 1"), HumanMessage("hi")]
    assert 0 < redis.Redis.from_url(redis_url).ttl(f"{redis_prefix}:s") <= 60


def test_state_that_langchain_cannot_hold_is_refused_before_any_write(
    redis_url: str, redis_prefix: str
) -> None:
    with RedisStore(redis_url, layout=LangChainLayout(redis_prefix)) as store:
        with pytest.raises(NotInLayout, match="no place for tool runs"):
            store.upsert_tool_run("s", {"tool_call_id": "c", "name": "search"})
        with pytest.raises(NotInLayout, match="no place for a session status"):
            store.set_status("s", "paused")
        with pytest.raises(ValueError, match="role 'user' is not a LangChain message type"):
            store.append_message("s", Message(message_id="m", role="user", content="hi"))
    assert not redis.Redis.from_url(redis_url).exists(f"{redis_prefix}:s")


# -- the drop-in adapter across the stages --------------------------------------------


class App:
    """An application's loop: each turn adds messages through the adapter, then resumes
    the session from its history and checks that nothing it wrote is missing."""

    def __init__(self, router: MigratingStore) -> None:
        self.router = router
        self.expected: dict[str, list[BaseMessage]] = {}

    def start(self, sid: str, messages: list[BaseMessage]) -> None:
        self.expected[sid] = list(messages)

    def turn(self, sid: str, n: int) -> None:
        chat = MigratingChatMessageHistory(sid, self.router)
        new = turn(n, tag=f"{sid}-")
        chat.add_messages(new[:2])
        chat.add_message(new[2])
        chat.add_messages(new[3:])
        self.expected.setdefault(sid, []).extend(new)
        assert chat.messages == self.expected[sid], sid

    def all_turns(self, n: int) -> None:
        for sid in self.expected:
            self.turn(sid, n)


def test_an_application_on_the_adapter_keeps_every_message_across_the_stages(
    config: Settings, pg_dsn: str, pg: psycopg.Connection[Any], redis_url: str,
    redis_prefix: str, tmp_path: Any,
) -> None:
    legacy = {sid: history(redis_url, redis_prefix, sid) for sid in ("a", "b ü", "c")}
    plan = StaticPlan(load_plan(pg))
    router = MigratingStore(RedisStore(redis_url, layout=LangChainLayout(redis_prefix)),
                            PostgresStore(pg_dsn), plan, spool_path=tmp_path / "spool")
    app = App(router)
    for sid, lc in legacy.items():
        lc.add_messages([SystemMessage("Be brief."), *turn(0, tag=sid)])
        app.start(sid, lc.messages)

    def move(stage: str) -> None:
        plan.plan = set_stage(pg, stage, f"test: {stage}")

    app.all_turns(1)  # redis_only: the application has switched to the adapter
    app.turn("new in redis_only", 1)
    move("dual_write")
    app.all_turns(2)
    backfill(config, BackfillOptions(layout="langchain", prefix=redis_prefix))
    for sid in app.expected:  # Redis stays LangChain's: the old class still reads it
        assert history(redis_url, redis_prefix, sid).messages == app.expected[sid]
    move("shadow")
    app.all_turns(3)
    assert all(r.parity_status == "pass" for r in parity(config, session_ids=list(app.expected)))
    move("cutover")
    plan.plan = set_slice(pg, "history", 50, "test: half")
    app.all_turns(4)
    plan.plan = set_slice(pg, "history", 100, "test: all")
    app.all_turns(5)
    plan.plan = rollback(pg, "test: drill")
    app.all_turns(6)
    plan.plan = set_slice(pg, "history", 100, "test: all again")
    move("cutover")
    assert all(r.parity_status == "pass" for r in parity(config, session_ids=list(app.expected)))
    move("pg_primary")
    app.all_turns(7)
    app.turn("new in pg_primary", 7)
    move("retired")
    app.all_turns(8)
    router.close()

    for sid, messages in app.expected.items():
        assert postgres_history(pg, sid) == messages, sid
    projection = installed(pg)
    assert projection is not None and check(pg, projection, list(app.expected)) == {}


class AsyncApp:
    """The same loop on LangChain's async path: RunnableWithMessageHistory.ainvoke over
    a model that answers how many messages it was given (history and input)."""

    def __init__(self, router: AsyncMigratingStore) -> None:
        self.router = router
        self.expected: dict[str, list[BaseMessage]] = {}

        async def model(messages: list[BaseMessage]) -> AIMessage:
            return AIMessage(f"{len(messages)} messages seen")

        self.chain = RunnableWithMessageHistory(
            RunnableLambda(model), lambda sid: MigratingChatMessageHistory(sid, router))

    async def turn(self, sid: str, n: int) -> None:
        chat = MigratingChatMessageHistory(sid, self.router)
        new = turn(n, tag=f"{sid}-")
        await chat.aadd_messages(new)
        question = HumanMessage(f"{sid}: turn {n}")
        answer = await self.chain.ainvoke([question], {"configurable": {"session_id": sid}})
        expected = self.expected.setdefault(sid, [])
        assert answer.content == f"{len(expected) + len(new) + 1} messages seen", sid
        expected += [*new, question, answer]
        assert await chat.aget_messages() == expected, sid

    async def all_turns(self, n: int) -> None:
        for sid in list(self.expected):
            await self.turn(sid, n)


# LangChain 1.x deprecates it for LangGraph's persistence, but applications still run on it.
@pytest.mark.filterwarnings("ignore:RunnableWithMessageHistory is deprecated")
async def test_an_async_application_on_the_adapter_keeps_every_message_across_the_stages(
    config: Settings, pg_dsn: str, pg: psycopg.Connection[Any], redis_url: str,
    redis_prefix: str, tmp_path: Any,
) -> None:
    plan = StaticPlan(load_plan(pg))
    router = AsyncMigratingStore(
        AsyncRedisStore(redis_url, layout=LangChainLayout(redis_prefix)),
        AsyncPostgresStore(pg_dsn), plan, spool_path=tmp_path / "spool")
    app = AsyncApp(router)
    for sid in ("a", "b ü"):
        history(redis_url, redis_prefix, sid).add_messages(turn(0, tag=sid))
        app.expected[sid] = turn(0, tag=sid)

    def backfill_then_shadow() -> Plan:
        backfill(config, BackfillOptions(layout="langchain", prefix=redis_prefix))
        return set_stage(pg, "shadow", "test: shadow")

    def cutover_once_parity_passes() -> Plan:
        reports = parity(config, session_ids=list(app.expected))
        assert {r.parity_status for r in reports} == {"pass"}
        return set_stage(pg, "cutover", "test: cutover")

    steps: list[Callable[[], Plan]] = [
        lambda: set_stage(pg, "dual_write", "test: dual_write"),
        backfill_then_shadow,
        cutover_once_parity_passes,
        lambda: set_slice(pg, "history", 50, "test: half"),
        lambda: rollback(pg, "test: drill"),
        lambda: set_slice(pg, "history", 100, "test: all"),
        cutover_once_parity_passes,
        lambda: set_stage(pg, "pg_primary", "test: pg_primary"),
        lambda: set_stage(pg, "retired", "test: retired"),
    ]
    await app.turn("new in redis_only", 1)
    for n, step in enumerate(steps, start=2):
        plan.plan = step()
        if plan.plan.stage is Stage.PG_PRIMARY:
            app.expected.setdefault("new in pg_primary", [])
        await app.all_turns(n)
    await router.close()

    # Retired, Redis is only a cache: what matters is the table the application will read.
    reports = list(parity(config, session_ids=list(app.expected)))
    assert [r.checks["projection_matches"] for r in reports] == [True] * len(app.expected)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        for sid, messages in app.expected.items():
            chat = PostgresChatMessageHistory(TABLE, str(session_uuid(sid)),
                                              async_connection=conn)
            assert await chat.aget_messages() == messages, sid


async def test_an_async_router_refuses_sync_calls_saying_what_to_await_and_a_sync_one_serves_both(
    pg_dsn: str, pg: psycopg.Connection[Any], redis_url: str, redis_prefix: str, tmp_path: Any
) -> None:
    layout = LangChainLayout(redis_prefix)
    on_async = MigratingChatMessageHistory("s", AsyncMigratingStore(
        AsyncRedisStore(redis_url, layout=layout), AsyncPostgresStore(pg_dsn),
        StaticPlan(load_plan(pg)), spool_path=tmp_path / "async-spool"))
    sync_router = MigratingStore(RedisStore(redis_url, layout=layout), PostgresStore(pg_dsn),
                                 StaticPlan(load_plan(pg)), spool_path=tmp_path / "spool")
    on_sync = MigratingChatMessageHistory("t", sync_router)

    with pytest.raises(ConfigError, match=r"await aget_messages\(\) instead"):
        _ = on_async.messages
    with pytest.raises(ConfigError, match=r"await aadd_messages\(\) instead"):
        on_async.add_messages(turn(1))
    with pytest.raises(ClearRefused):
        await on_async.aclear()
    await on_sync.aadd_messages(turn(2))

    assert await on_async.aget_messages() == []
    assert await on_sync.aget_messages() == turn(2)
    assert history(redis_url, redis_prefix, "t").messages == turn(2)
    sync_router.close()


def test_writes_that_missed_redis_in_pg_primary_are_repaired_in_langchain_format(
    config: Settings, pg_dsn: str, pg: psycopg.Connection[Any], redis_url: str,
    redis_prefix: str, tmp_path: Any,
) -> None:
    history(redis_url, redis_prefix, "s").add_messages(turn(0))
    backfill(config, BackfillOptions(layout="langchain", prefix=redis_prefix))
    plan = StaticPlan(load_plan(pg).model_copy(update={"stage": Stage.PG_PRIMARY}))
    redis_down = RedisStore("redis://127.0.0.1:1/0", layout=LangChainLayout(redis_prefix))
    router = MigratingStore(redis_down, PostgresStore(pg_dsn), plan,
                            spool_path=tmp_path / "spool")
    MigratingChatMessageHistory("s", router).add_messages(turn(1))
    MigratingChatMessageHistory("t", router).add_messages(turn(2))  # new while Redis is down
    router.close()
    assert history(redis_url, redis_prefix, "s").messages == turn(0)

    summary = repair(config, spool_path=tmp_path / "spool")

    assert (summary.sessions_repaired, summary.failed) == (2, [])
    assert history(redis_url, redis_prefix, "s").messages == turn(0) + turn(1)
    assert history(redis_url, redis_prefix, "t").messages == turn(2)
    assert postgres_history(pg, "s") == turn(0) + turn(1)
    assert postgres_history(pg, "t") == turn(2)


def test_clear_is_refused_and_the_history_stays(
    pg_dsn: str, pg: psycopg.Connection[Any], redis_url: str, redis_prefix: str, tmp_path: Any
) -> None:
    router = MigratingStore(RedisStore(redis_url, layout=LangChainLayout(redis_prefix)),
                            PostgresStore(pg_dsn), StaticPlan(load_plan(pg)),
                            spool_path=tmp_path / "spool")
    chat = MigratingChatMessageHistory("s", router)
    chat.add_messages(turn(1))

    with pytest.raises(ClearRefused, match="start a new session id instead"):
        chat.clear()

    assert chat.messages == turn(1)
    router.close()
