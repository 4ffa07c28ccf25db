"""Declarative layouts: a team's own keys, described in TOML, migrate like the reference
layout (backfill, parity, the router), and a key that breaks the description is
quarantined with a reason that names the key and the rule."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from memshift.config import Settings
from memshift.errors import ConfigError
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.migrate.parity import parity
from memshift.migrate.plan import Stage, StaticPlan, load_plan
from memshift.migrate.quarantine import entries
from memshift.model import Checkpoint, MemorySummary, Message, ToolRun
from memshift.stores.layouts import LUA_LIBRARY, NotInLayout, get_layout, script_text
from memshift.stores.layouts.declarative import load_layout
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore

ACME = """
description = "Acme support agent: its keys since 2023"
prefix = "acme"

[session]
key = "{prefix}:conv:{id}"
timestamps = "epoch_ms"
fields.tenant_id = "org"
fields.user_id = "owner"
fields.status = "state"
fields.version = "rev"
fields.created_at = "created"
fields.updated_at = "updated"
fields.messages_trimmed = "dropped"
statuses = { open = "active", waiting = "waiting_tool", done = "completed", error = "failed" }

[messages]
key = "{prefix}:conv:{id}:log"
order = "newest_first"
fields = { message_id = "mid", role = "who", content = "text", ts = "at", tool_call_id = "call" }

[tool_runs]
key = "{prefix}:conv:{id}:calls"
fields.name = "tool"
fields.args = "input"
fields.status = "state"
fields.attempts = "tries"
fields.last_error = "err"
fields.updated_at = "at"
statuses.queued = "pending"
statuses.running = "running"
statuses.retry = "retrying"
statuses.ok = "succeeded"
statuses.error = "failed"

[summary]
key = "{prefix}:conv:{id}:memo"
fields = { version = "v", text = "body", updated_at = "at" }

[checkpoint]
key = "{prefix}:conv:{id}:snap"
fields.checkpoint_id = "id"
fields.parent_id = "parent"
fields.step = "n"
fields.state = "data"
fields.created_at = "at"
"""
T = 1716112800000  # epoch ms


@pytest.fixture
def acme(tmp_path: Path) -> Path:
    path = tmp_path / "acme.toml"
    path.write_text(ACME, encoding="utf-8")
    return path


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def config(acme: Path, pg_dsn: str, redis_url: str, redis_prefix: str) -> Settings:
    return Settings(redis_url=redis_url, postgres_dsn=pg_dsn, layout=str(acme),
                    prefix=redis_prefix)


def write_acme_session(raw: redis.Redis, p: str, sid: str, n: int, *, ttl: bool = False
                       ) -> None:
    """A session as Acme's own code writes it (not memshift)."""
    base = f"{p}:conv:{sid}"
    raw.hset(base, mapping={"org": "acme", "owner": f"u{n}", "state": "waiting",
                            "rev": str(n + 1), "created": str(T), "updated": str(T + n),
                            "dropped": "1", "channel": "web"})
    for i in range(1, n + 3):  # LPUSH: newest first; seq 0 was trimmed away
        entry: dict[str, Any] = {"mid": i if i % 2 else f"m{i}", "who": "user" if i % 2 else
                                 "assistant", "text": f"message {i} — ünï 🎉", "at": T + i}
        if i == 2:
            entry |= {"call": "c1", "model": "gpt-x"}
        raw.lpush(f"{base}:log", json.dumps(entry, ensure_ascii=False))
    raw.hset(f"{base}:calls", "c1", json.dumps({"tool": "search", "input": {"q": sid},
                                                "state": "retry", "tries": n, "err": "HTTP 429",
                                                "at": T + 5}))
    raw.set(f"{base}:memo", json.dumps({"v": n, "body": "they asked twice", "at": T + 6}))
    raw.set(f"{base}:snap", json.dumps({"id": f"k{n}", "parent": None, "n": n,
                                        "data": {"plan": ["a", "b"]}, "at": T + 7}))
    if ttl:
        for key in raw.scan_iter(f"{base}*"):
            raw.expire(key, 3600)


def test_a_described_layout_reads_every_part_of_a_session(
    acme: Path, raw: redis.Redis, redis_url: str, redis_prefix: str
) -> None:
    write_acme_session(raw, redis_prefix, "7", 2)

    with RedisStore(redis_url, layout=load_layout(acme, redis_prefix)) as store:
        state = store.load_session("7")
        listed = list(store.list_sessions())

    assert listed == ["7"]  # the :calls hash matches the session pattern too: not a session
    assert state is not None
    s = state.session
    assert (s.tenant_id, s.user_id, s.status, s.version, s.messages_trimmed) == (
        "acme", "u2", "waiting_tool", 3, 1)
    assert s.metadata == {"channel": "web"}  # an unmapped field is kept, not dropped
    assert [(m.seq, m.message_id, m.role) for m in state.messages] == [
        (1, "1", "user"), (2, "m2", "assistant"), (3, "3", "user"), (4, "m4", "assistant")]
    assert state.messages[1].tool_call_id == "c1"
    assert state.messages[1].metadata == {"model": "gpt-x"}
    (run,) = state.tool_runs
    assert (run.name, run.args, run.status, run.attempts, run.last_error) == (
        "search", {"q": "7"}, "retrying", 2, "HTTP 429")
    assert state.latest_summary is not None and state.latest_summary.version == 2
    assert state.latest_checkpoint is not None and state.latest_checkpoint.step == 2


def test_backfill_and_parity_work_on_a_described_layout(
    config: Settings, pg_dsn: str, raw: redis.Redis, redis_url: str, redis_prefix: str,
    acme: Path,
) -> None:
    ids = [f"conv-{i}" for i in range(12)]
    for i, sid in enumerate(ids):
        write_acme_session(raw, redis_prefix, sid, i % 4 + 1, ttl=i % 3 == 0)

    summary = backfill(config, BackfillOptions(layout=str(acme), prefix=redis_prefix,
                                               batch_size=5))

    assert (summary.state, summary.migrated, summary.quarantined) == ("completed", 12, 0)
    with RedisStore(redis_url, layout=load_layout(acme, redis_prefix)) as legacy, \
            PostgresStore(pg_dsn) as truth:
        for sid in ids:
            mine, theirs = legacy.load_session(sid), truth.load_session(sid)
            assert mine is not None and theirs is not None
            assert theirs.messages == mine.messages and theirs.tool_runs == mine.tool_runs
            assert theirs.session.model_dump(exclude={"expires_at"}) == \
                mine.session.model_dump(exclude={"expires_at"})
    assert {r.parity_status for r in parity(config, session_ids=ids)} == {"pass"}


def test_the_router_writes_the_described_keys_in_their_own_format(
    acme: Path, pg_dsn: str, raw: redis.Redis, redis_url: str, redis_prefix: str,
    tmp_path: Path, config: Settings,
) -> None:
    write_acme_session(raw, redis_prefix, "7", 3)  # seqs 1..5 (seq 0 trimmed), 3 tries
    backfill(config, BackfillOptions(layout=str(acme), prefix=redis_prefix))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        plan = StaticPlan(load_plan(conn).model_copy(update={"stage": Stage.DUAL_WRITE}))
    router = MigratingStore(RedisStore(redis_url, layout=load_layout(acme, redis_prefix)),
                            PostgresStore(pg_dsn), plan, spool_path=tmp_path / "spool")

    sent = router.append_message("7", Message(message_id="m9", role="assistant",
                                              content="done ✓", tool_call_id="c1"))
    again = router.append_message("7", Message(message_id="m9", role="assistant",
                                               content="done ✓", tool_call_id="c1"))
    merged = router.upsert_tool_run("7", ToolRun(tool_call_id="c1", name="search",
                                                 status="succeeded", attempts=1))
    summary = router.put_summary("7", MemorySummary(version=5, text="resolved"))
    stale = router.put_checkpoint("7", Checkpoint(checkpoint_id="old", step=0))
    state = router.load_session("7")
    assert state is not None
    saved = router.save_session(state.session.model_copy(update={"version": 9,
                                                                 "status": "completed"}))
    router.close()

    base = f"{redis_prefix}:conv:7"
    assert (sent.seq, again.seq) == (6, 6)
    assert (merged.status, merged.attempts) == ("succeeded", 3)  # attempts never go back
    assert (summary, stale, saved) == ("applied", "stale", "applied")
    assert json.loads(raw.lindex(f"{base}:log", 0)) == {  # type: ignore[arg-type]
        "mid": "m9", "who": "assistant", "text": "done ✓", "call": "c1",
        "at": state.messages[-1].ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    assert json.loads(raw.hget(f"{base}:calls", "c1"))["state"] == "ok"  # type: ignore[arg-type]
    assert raw.hget(base, "state") == b"done" and raw.hget(base, "rev") == b"9"
    assert {r.parity_status for r in parity(config, session_ids=["7"])} == {"pass"}


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda r, b: (r.delete(f"{b}:log"), r.hset(f"{b}:log", "x", "y")),
         r"key '.*:conv:bad:log': Redis refused LRANGE"),
        (lambda r, b: r.lpush(f"{b}:log", json.dumps({"mid": "z", "text": "no role"})),
         r"key '.*:conv:bad:log' index 0 \(seq 4\): member 'who' is missing "
         r"\(\[messages\] fields.role = 'who' in acme.toml\)"),
        (lambda r, b: r.hset(b, "rev", "three"),
         r"key '.*:conv:bad' field 'rev': is 'three', expected a whole number of 0 or more "
         r"\(\[session\] fields.version = 'rev' in acme.toml\)"),
        (lambda r, b: r.hset(b, "state", "archived"),
         r"key '.*:conv:bad' field 'state': is 'archived', not a status the description maps "
         r"\(open, waiting, done, error, active, .*\); add it to \[session\] statuses "
         r"\(\[session\] fields.status = 'state' in acme.toml\)"),
        (lambda r, b: r.hset(f"{b}:calls", "c2", json.dumps({"tool": "x", "at": "yesterday"})),
         r"key '.*:conv:bad:calls' field 'c2' member 'at': 'yesterday' is neither ISO 8601 "
         r".*\(\[tool_runs\] fields.updated_at = 'at' in acme.toml\)"),
        (lambda r, b: r.set(f"{b}:memo", b"{not json"),
         r"key '.*:conv:bad:memo' value: is not valid JSON"),
        (lambda r, b: r.lpush(f"{b}:log", b'{"mid": "z", "who": "user", "text": "\xff"}'),
         r"key '.*:conv:bad:log' index 0 \(seq 4\): is not valid UTF-8 at byte"),
    ],
)
def test_a_key_that_breaks_the_description_quarantines_its_session_naming_key_and_rule(
    config: Settings, pg_dsn: str, raw: redis.Redis, redis_prefix: str, acme: Path,
    damage: Any, reason: str,
) -> None:
    write_acme_session(raw, redis_prefix, "good", 1)
    write_acme_session(raw, redis_prefix, "bad", 1)
    damage(raw, f"{redis_prefix}:conv:bad")

    summary = backfill(config, BackfillOptions(layout=str(acme), prefix=redis_prefix))

    assert (summary.migrated, summary.quarantined) == (1, 1)
    with psycopg.connect(pg_dsn) as conn:
        (entry,) = entries(conn)
    assert entry.session_id == "bad"
    assert re.search(reason, entry.reason), entry.reason


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("[summary]", "[summaries]"), r"top level summaries: unknown"),
        (('key = "{prefix}:conv:{id}:log"', 'key = "{prefix}:conv:log"'),
         r"\[messages\] key: '\{prefix\}:conv:log' must hold \{id\} exactly once"),
        (('key = "{prefix}:conv:{id}:memo"', 'key = "{prefix}:{user}:{id}"'),
         r"\[summary\] key: .* has \{user\}; only \{prefix\} and \{id\} can be used"),
        (('order = "newest_first"', 'order = "by_time"'),
         r"\[messages\] order: 'by_time'; use oldest_first \(RPUSH\) or newest_first"),
        (('content = "text"', 'body = "text"'),
         r"\[messages\] fields.body: is not a field of \[messages\]"),
        (('role = "who", ', ""), r"\[messages\] fields.role: missing"),
        (('done = "completed"', 'done = "closed"'),
         r"\[session\] statuses: done = 'closed': 'closed' is not a memshift status"),
        (('key = "{prefix}:conv:{id}:snap"', 'key = "{prefix}:conv:{id}:memo"'),
         r"\[summary\] key: .* is the key of another table too"),
        (('key = "{prefix}:conv:{id}:memo"', 'key = "{prefix}:conv:{id}:memo"\ntype = "zset"'),
         r"\[summary\] type: 'zset' is not supported here; \[summary\] is read from a Redis "
         "string"),
        (("[session]", "[session\n"), r"is not valid TOML"),
    ],
)
def test_a_description_that_cannot_work_is_refused_with_the_line_to_fix(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    assert edit[0] in ACME
    text = ACME.replace(*edit)
    path = tmp_path / "acme.toml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError, match=message):
        get_layout(str(path), "p")


def test_writes_the_description_has_no_place_for_are_refused_before_any_write(
    tmp_path: Path, redis_url: str, redis_prefix: str, raw: redis.Redis
) -> None:
    path = tmp_path / "log_only.toml"
    path.write_text('[messages]\nkey = "{prefix}:log:{id}"\n'
                    'fields = { role = "r", content = "c" }\n', encoding="utf-8")
    with RedisStore(redis_url, layout=load_layout(path, redis_prefix)) as store:
        with pytest.raises(NotInLayout, match=r"has no place for tool runs \(it has no "):
            store.upsert_tool_run("s", {"tool_call_id": "c", "name": "x"})
        with pytest.raises(NotInLayout, match="maps no message_id"):
            store.append_message("s", {"message_id": "m1", "role": "user", "content": "hi"})
        with pytest.raises(NotInLayout, match="status changes"):
            store.set_status("s", "paused")
    assert raw.exists(f"{redis_prefix}:log:s") == 0


def test_every_script_of_every_layout_compiles_with_the_shared_lua_library(
    acme: Path, raw: redis.Redis
) -> None:
    loaded = 0
    for name in ("reference", "langchain", "llamaindex", "openai-agents", "langgraph",
                 str(acme)):
        folder = get_layout(name, "p").script_dir()
        for script in sorted(folder.glob("*.lua")):
            text = script_text(folder, script.stem)
            assert text.startswith(LUA_LIBRARY.read_text()), script
            raw.script_load(text)  # a syntax error or too many locals fails here
            loaded += 1
    assert loaded >= 10
