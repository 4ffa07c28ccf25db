"""The Redis store against a real Redis, in the reference layout.

Each test has its own key prefix (``redis_prefix``), so tests never see each other.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memshift.errors import (
    IllegalTransition,
    MemshiftError,
    MessageConflict,
    SeqGap,
    SessionNotFound,
    StoreUnavailable,
    ValidationError,
)
from memshift.model import (
    Checkpoint,
    MemorySummary,
    Message,
    Session,
    SessionState,
    ToolRun,
    merge_tool_runs,
)
from memshift.stores.base import AsyncStore, Outcome, Store
from memshift.stores.layouts import LUA_LIBRARY
from memshift.stores.layouts.reference import ReferenceLayout
from memshift.stores.layouts.timestamps import format_timestamp, parse_timestamp
from memshift.stores.redis import AsyncRedisStore, RedisStore

T0 = datetime(2026, 5, 19, 10, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def store(redis_url: str, redis_prefix: str) -> Iterator[RedisStore]:
    made = RedisStore(redis_url, prefix=redis_prefix)
    yield made
    made.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def session(sid: str = "s1", version: int = 1, updated: float = 0, **fields: Any) -> Session:
    return Session(
        session_id=sid,
        tenant_id="t1",
        version=version,
        created_at=T0,
        updated_at=at(updated),
        **fields,
    )


def message(mid: str, content: str = "hello", seq: int | None = None) -> Message:
    return Message(seq=seq, message_id=mid, role="user", content=content, ts=T0)


def tool(status: str = "running", attempts: int = 1, updated: float = 0, **fields: Any) -> ToolRun:
    return ToolRun(
        tool_call_id="c1",
        name="search",
        args={"q": "x"},
        status=status,
        attempts=attempts,
        updated_at=at(updated),
        **fields,
    )


def fill(store: Store, sid: str = "s1") -> None:
    store.save_session(session(sid, metadata={"plan": "pro", "n": [1, 2.5]}))
    store.append_message(sid, message("m1", "hi ✓"))
    store.append_message(
        sid, Message(message_id="m2", role="tool", content="42", ts=at(1), tool_call_id="c1")
    )
    store.upsert_tool_run(sid, tool(last_error="timeout"))
    store.put_summary(
        sid, MemorySummary(version=2, text="so far", covers_through=1, updated_at=at(2))
    )
    store.put_checkpoint(
        sid, Checkpoint(checkpoint_id="k1", step=1, state={"a": 1}, created_at=at(3))
    )
    store.set_status(sid, "waiting_tool", at=at(4), data={"why": "tool"})


def check_filled(state: SessionState | None) -> None:
    assert state is not None
    assert state.session.tenant_id == "t1"
    assert state.session.status == "waiting_tool"
    assert state.session.version == 2
    assert state.session.metadata == {"plan": "pro", "n": [1, 2.5]}
    assert [(m.seq, m.message_id, m.content) for m in state.messages] == [
        (0, "m1", "hi ✓"),
        (1, "m2", "42"),
    ]
    assert state.messages[1].tool_call_id == "c1"
    assert state.tool_runs == (tool(last_error="timeout"),)
    assert state.summaries == (
        MemorySummary(version=2, text="so far", covers_through=1, updated_at=at(2)),
    )
    assert state.checkpoints == (
        Checkpoint(checkpoint_id="k1", step=1, state={"a": 1}, created_at=at(3)),
    )
    assert [(e.event_seq, e.from_status, e.to_status, e.data) for e in state.events] == [
        (0, "active", "waiting_tool", {"why": "tool"})
    ]


# -- round trips ------------------------------------------------------------------------


def test_sync_store_round_trips_every_entity(store: RedisStore) -> None:
    fill(store)

    check_filled(store.load_session("s1"))


def test_async_store_round_trips_every_entity(redis_url: str, redis_prefix: str) -> None:
    async def scenario() -> SessionState | None:
        async with AsyncRedisStore(redis_url, prefix=redis_prefix) as s:
            await s.save_session(session(metadata={"plan": "pro", "n": [1, 2.5]}))
            await s.append_message("s1", message("m1", "hi ✓"))
            await s.append_message(
                "s1",
                Message(message_id="m2", role="tool", content="42", ts=at(1), tool_call_id="c1"),
            )
            await s.upsert_tool_run("s1", tool(last_error="timeout"))
            await s.put_summary(
                "s1", MemorySummary(version=2, text="so far", covers_through=1, updated_at=at(2))
            )
            await s.put_checkpoint(
                "s1", Checkpoint(checkpoint_id="k1", step=1, state={"a": 1}, created_at=at(3))
            )
            await s.set_status("s1", "waiting_tool", at=at(4), data={"why": "tool"})
            return await s.load_session("s1")

    check_filled(asyncio.run(scenario()))


def test_both_stores_satisfy_the_protocols(redis_url: str, redis_prefix: str) -> None:
    sync = RedisStore(redis_url, prefix=redis_prefix)
    made = AsyncRedisStore(redis_url, prefix=redis_prefix)

    assert isinstance(sync, Store)
    assert isinstance(made, AsyncStore)
    sync.close()
    asyncio.run(made.close())


def test_missing_session_loads_as_none(store: RedisStore) -> None:
    assert store.load_session("nobody") is None


def test_writes_accept_mappings(store: RedisStore) -> None:
    store.save_session({"session_id": "s1", "updated_at": T0, "created_at": T0})
    stored = store.append_message("s1", {"message_id": "m1", "role": "user", "content": "x"})

    assert stored.seq == 0


# -- idempotence and monotonic rules -----------------------------------------------------


def test_every_write_twice_is_the_same_as_once(store: RedisStore, raw: redis.Redis) -> None:
    fill(store)
    once = store.load_session("s1")
    dump_once = {k: raw.dump(k) for k in ReferenceLayout(store.layout.prefix).session_keys("s1")}

    assert store.save_session(session(metadata={"plan": "pro", "n": [1, 2.5]})) in (
        Outcome.STALE,  # set_status made a newer version since
        Outcome.UNCHANGED,
    )
    assert store.append_message("s1", message("m1", "hi ✓")).seq == 0
    assert store.append_message("s1", message("m1", "hi ✓", seq=0)).seq == 0
    assert store.upsert_tool_run("s1", tool(last_error="timeout")) == tool(last_error="timeout")
    assert (
        store.put_summary(
            "s1", MemorySummary(version=2, text="so far", covers_through=1, updated_at=at(2))
        )
        == Outcome.UNCHANGED
    )
    assert (
        store.put_checkpoint(
            "s1", Checkpoint(checkpoint_id="k1", step=1, state={"a": 1}, created_at=at(3))
        )
        == Outcome.UNCHANGED
    )

    assert store.load_session("s1") == once
    assert {k: raw.dump(k) for k in dump_once} == dump_once


def test_older_session_summary_and_checkpoint_are_ignored(store: RedisStore) -> None:
    store.save_session(session(version=5, updated=10, user_id="new"))
    store.put_summary("s1", MemorySummary(version=3, text="new", updated_at=T0))
    store.put_checkpoint("s1", Checkpoint(checkpoint_id="k3", step=3, created_at=T0))

    assert store.save_session(session(version=4, updated=20, user_id="old")) == Outcome.STALE
    assert store.save_session(session(version=5, updated=5, user_id="old")) == Outcome.STALE
    assert store.put_summary("s1", MemorySummary(version=2, text="old")) == Outcome.STALE
    assert store.put_checkpoint("s1", Checkpoint(checkpoint_id="k2", step=2)) == Outcome.STALE
    assert store.put_checkpoint("s1", Checkpoint(checkpoint_id="kx", step=3)) == Outcome.STALE

    state = store.load_session("s1")
    assert state is not None
    assert (state.session.version, state.session.user_id) == (5, "new")
    assert state.latest_summary is not None and state.latest_summary.text == "new"
    assert state.latest_checkpoint is not None and state.latest_checkpoint.checkpoint_id == "k3"


def test_newer_session_write_keeps_the_later_updated_at_and_earlier_created_at(
    store: RedisStore,
) -> None:
    store.save_session(session(version=1, updated=50))
    later = Session(session_id="s1", version=2, created_at=at(10), updated_at=at(20))

    assert store.save_session(later) == Outcome.APPLIED

    state = store.load_session("s1")
    assert state is not None
    assert (state.session.version, state.session.created_at, state.session.updated_at) == (
        2,
        T0,
        at(50),
    )


def test_messages_trimmed_only_grows(store: RedisStore) -> None:
    store.save_session(session(version=2, messages_trimmed=7))

    assert store.save_session(session(version=3, messages_trimmed=4)) == Outcome.APPLIED
    assert store.save_session(session(version=1, messages_trimmed=9)) == Outcome.APPLIED

    state = store.load_session("s1")
    assert state is not None
    assert (state.session.version, state.session.messages_trimmed) == (3, 9)


def test_tool_attempts_never_decrease_and_terminal_status_sticks(store: RedisStore) -> None:
    store.upsert_tool_run("s1", tool("retrying", attempts=3, updated=5))

    older_more = store.upsert_tool_run("s1", tool("running", attempts=4, updated=1))
    done = store.upsert_tool_run("s1", tool("succeeded", attempts=2, updated=6))
    late = store.upsert_tool_run("s1", tool("retrying", attempts=5, updated=60))

    assert (older_more.status, older_more.attempts) == ("retrying", 4)
    assert (done.status, done.attempts) == ("succeeded", 4)
    assert (late.status, late.attempts, late.updated_at) == ("succeeded", 5, at(6))
    state = store.load_session("s1")
    assert state is not None and state.tool_runs == (late,)


_TOOL_WRITES = st.lists(
    st.builds(
        tool,
        status=st.sampled_from(["pending", "running", "retrying", "succeeded", "failed"]),
        attempts=st.integers(0, 3),
        updated=st.integers(0, 2),
        last_error=st.sampled_from([None, "boom", "timeout"]),
        metadata=st.sampled_from([{}, {"a": 1}, {"a": 2}, {"b": {"c": [1]}}]),
    ),
    min_size=1,
    max_size=5,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(writes=_TOOL_WRITES, order=st.randoms(use_true_random=False))
def test_tool_runs_converge_to_the_model_merge_in_any_order(
    store: RedisStore, raw: redis.Redis, writes: list[ToolRun], order: Any
) -> None:
    raw.delete(*ReferenceLayout(store.layout.prefix).session_keys("conv"))
    expected = functools.reduce(merge_tool_runs, writes)
    shuffled = list(writes)
    order.shuffle(shuffled)

    for write in shuffled + shuffled[:2]:
        store.upsert_tool_run("conv", write)

    state = store.load_session("conv")
    assert state is not None and state.tool_runs == (expected,)


def test_legacy_tool_record_with_epoch_ms_is_merged_in_lua_and_python_alike(
    store: RedisStore, raw: redis.Redis
) -> None:
    key = ReferenceLayout(store.layout.prefix).session_keys("s1")[2]
    legacy = (
        b'{"name": "search", "args": {"q": "x"}, "status": "running", "attempts": 2, '
        b'"last_error": null, "updated_at": 1779184805000}'
    )
    raw.hset(key, "c1", legacy)

    older = store.upsert_tool_run("s1", tool("running", attempts=1, updated=4))
    tie = store.upsert_tool_run("s1", tool("running", attempts=1, updated=5, last_error="e"))

    assert (older.updated_at, older.attempts) == (at(5), 2)
    old = tool("running", attempts=2, updated=5)
    assert tie == merge_tool_runs(old, tool("running", attempts=1, updated=5, last_error="e"))


# -- messages ----------------------------------------------------------------------------


def test_messages_get_seq_after_the_trimmed_ones(store: RedisStore) -> None:
    store.save_session(session(messages_trimmed=10))

    assert store.append_message("s1", message("m1")).seq == 10
    assert store.append_message("s1", message("m2", seq=11)).seq == 11
    assert store.append_message("s1", message("m0", seq=3)).seq == 3  # trimmed: cannot check


def test_same_seq_with_other_content_is_a_conflict_and_keeps_the_stored(
    store: RedisStore,
) -> None:
    store.append_message("s1", message("m1", "first"))

    with pytest.raises(MessageConflict) as caught:
        store.append_message("s1", message("m1", "second", seq=0))

    assert caught.value.seq == 0 and "content" in str(caught.value)
    state = store.load_session("s1")
    assert state is not None and [m.content for m in state.messages] == ["first"]


def test_known_message_id_at_another_seq_is_a_conflict(store: RedisStore) -> None:
    store.append_message("s1", message("m1"))

    with pytest.raises(MessageConflict) as caught:
        store.append_message("s1", message("m1", seq=1))

    assert "already stored at seq 0" in str(caught.value)


def test_seq_beyond_the_next_is_a_gap(store: RedisStore) -> None:
    store.append_message("s1", message("m1"))

    with pytest.raises(SeqGap) as caught:
        store.append_message("s1", message("m9", seq=5))

    assert (caught.value.seq, caught.value.next_seq) == (5, 1)
    state = store.load_session("s1")
    assert state is not None and len(state.messages) == 1


# -- status -----------------------------------------------------------------------------


def test_illegal_transition_is_refused_and_changes_nothing(
    store: RedisStore, raw: redis.Redis
) -> None:
    store.save_session(session())
    store.set_status("s1", "expired")
    keys = ReferenceLayout(store.layout.prefix).session_keys("s1")
    before = {k: raw.dump(k) for k in keys}

    with pytest.raises(IllegalTransition) as caught:
        store.set_status("s1", "active")

    assert "'expired' -> 'active'" in str(caught.value)
    assert {k: raw.dump(k) for k in keys} == before


def test_status_of_a_missing_session_is_not_found(store: RedisStore) -> None:
    with pytest.raises(SessionNotFound):
        store.set_status("nobody", "paused")


def test_status_change_replicates_to_a_secondary_once_and_in_any_order(
    redis_url: str, redis_prefix: str, store: RedisStore
) -> None:
    secondary = RedisStore(redis_url, prefix=f"{redis_prefix}b")
    store.save_session(session())
    secondary.save_session(session())
    first = store.set_status("s1", "paused", at=at(1))
    second = store.set_status("s1", "active", at=at(2))

    with pytest.raises(MemshiftError, match="gap"):
        secondary.apply_status_change(second)
    assert secondary.apply_status_change(first) == Outcome.APPLIED
    assert secondary.apply_status_change(second) == Outcome.APPLIED
    assert secondary.apply_status_change(first) == Outcome.STALE

    mine, theirs = store.load_session("s1"), secondary.load_session("s1")
    secondary.close()
    assert mine is not None and theirs is not None
    assert theirs.events == mine.events
    assert theirs.session.model_copy(update={"expires_at": None}) == mine.session.model_copy(
        update={"expires_at": None}
    )


# -- TTL and discovery --------------------------------------------------------------------


def test_ttl_is_set_on_every_key_of_the_session(
    redis_url: str, redis_prefix: str, raw: redis.Redis
) -> None:
    with RedisStore(redis_url, prefix=redis_prefix, ttl_seconds=300) as s:
        fill(s)
        state = s.load_session("s1")

    ttls = [raw.pttl(k) for k in ReferenceLayout(redis_prefix).session_keys("s1")]
    assert all(290_000 < t <= 300_000 for t in ttls), ttls
    assert state is not None and state.session.expires_at is not None


def test_keys_created_later_inherit_the_session_ttl(store: RedisStore, raw: redis.Redis) -> None:
    keys = ReferenceLayout(store.layout.prefix).session_keys("s1")
    store.save_session(session())
    raw.pexpire(keys[0], 100_000)

    store.put_summary("s1", MemorySummary(version=1, text="x"))

    assert 90_000 < raw.pttl(keys[3]) <= 100_000


def test_list_sessions_finds_exactly_the_sessions(
    store: RedisStore, raw: redis.Redis, redis_prefix: str
) -> None:
    for sid in ("a", "b:c", "d"):
        store.save_session(session(sid))
    store.append_message("a", message("m1"))
    store.upsert_tool_run("d", tool())
    raw.set(f"{redis_prefix}:session:zz", "not a hash")
    raw.hset(f"{redis_prefix}x:session:other", "status", "active")

    assert sorted(set(store.list_sessions(batch_size=2))) == ["a", "b:c", "d"]


def test_async_list_sessions_finds_exactly_the_sessions(
    redis_url: str, redis_prefix: str, store: RedisStore
) -> None:
    for sid in ("a", "b"):
        store.save_session(session(sid))

    async def listed() -> list[str]:
        async with AsyncRedisStore(redis_url, prefix=redis_prefix) as s:
            return [sid async for sid in s.list_sessions(batch_size=1)]

    assert sorted(set(asyncio.run(listed()))) == ["a", "b"]


def test_prefix_with_glob_characters_matches_only_itself(
    redis_url: str, redis_prefix: str, raw: redis.Redis
) -> None:
    star, plain = f"{redis_prefix}*", f"{redis_prefix}abc"
    with RedisStore(redis_url, prefix=star) as s1, RedisStore(redis_url, prefix=plain) as s2:
        s1.save_session(session("mine"))
        s2.save_session(session("theirs"))

        assert list(s1.list_sessions()) == ["mine"]
        assert list(s2.list_sessions()) == ["theirs"]
    for key in raw.scan_iter(match=f"{redis_prefix}*"):
        raw.delete(key)


# -- bad input and bad stored data ---------------------------------------------------------


def test_bad_input_is_refused_before_any_write(store: RedisStore, raw: redis.Redis) -> None:
    with pytest.raises(ValidationError):
        store.append_message("bad\x00id", message("m1"))
    with pytest.raises(ValidationError):
        store.append_message("s1", {"message_id": "m1", "role": "", "content": "x"})
    with pytest.raises(ValidationError):
        store.set_status("s1", "sleeping")

    assert list(raw.scan_iter(match=f"{store.layout.prefix}:*")) == []


def test_unknown_legacy_fields_are_kept_through_reads_and_writes(
    store: RedisStore, raw: redis.Redis
) -> None:
    keys = ReferenceLayout(store.layout.prefix).session_keys("s1")
    raw.hset(keys[0], mapping={"status": "active", "version": "1", "updated_at": "0",
                               "metadata": '{"plan": "pro"}', "colour": "red"})
    raw.rpush(keys[1], '{"id": "m1", "role": "user", "content": "hi", "ts": 0, "name": "bob"}')
    raw.hset(keys[2], "c1", '{"name": "f", "args": {}, "status": "running", "attempts": 1, '
                            '"last_error": null, "updated_at": 0, "latency": 4}')

    first = store.load_session("s1")
    assert first is not None
    assert first.session.metadata == {"plan": "pro", "redis_fields": {"colour": "red"}}
    assert first.messages[0].metadata == {"name": "bob"}
    assert first.tool_runs[0].metadata == {"latency": 4}
    # A retried append and a tool write of the same record change nothing.
    assert store.append_message("s1", first.messages[0]) == first.messages[0]
    assert store.upsert_tool_run("s1", first.tool_runs[0]) == first.tool_runs[0]
    change = store.set_status("s1", "paused")
    assert change.session.metadata == first.session.metadata

    newer = change.session.model_copy(
        update={"version": 9, "metadata": {"plan": "pro", "redis_fields": {"colour": "blue"}}}
    )
    assert store.save_session(newer) == Outcome.APPLIED
    assert raw.hget(keys[0], "colour") == b"blue"
    assert json.loads(raw.hget(keys[0], "metadata") or b"") == {"plan": "pro"}
    again = store.load_session("s1")
    assert again is not None and again.session.metadata == newer.metadata


def test_unreadable_stored_value_is_a_validation_error_naming_the_key(
    store: RedisStore, raw: redis.Redis
) -> None:
    keys = ReferenceLayout(store.layout.prefix).session_keys("s1")
    raw.hset(keys[0], mapping={"version": "x1"})

    with pytest.raises(ValidationError, match=f"'{keys[0]}' field 'version'"):
        store.save_session(session())
    with pytest.raises(ValidationError, match=f"'{keys[0]}' field 'version'"):
        store.load_session("s1")


def test_key_of_the_wrong_type_is_a_validation_error(store: RedisStore, raw: redis.Redis) -> None:
    keys = ReferenceLayout(store.layout.prefix).session_keys("s1")
    raw.set(keys[1], "not a list")

    with pytest.raises(ValidationError, match=keys[1]):
        store.load_session("s1")


def test_unreachable_redis_names_the_server_but_not_the_password() -> None:
    s = RedisStore("redis://:hunter2@127.0.0.1:1/0")

    with pytest.raises(StoreUnavailable) as caught:
        s.load_session("s1")

    assert "127.0.0.1:1" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    s.close()


# -- the Lua side reads timestamps as Python does -------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "2026-05-19T10:00:00Z",
        "2026-05-19T10:00:00.123Z",
        "2026-05-19T10:00:00.1234567+00:00",
        "2026-05-19 12:30:00+02:30",
        "2026-05-19T00:10:00-0130",
        "2026-05-19T10:00",
        "2024-02-29T23:59:59.999999Z",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999Z",
        "1779184800000",
        "1779184800123.456789",
        "0",
        "2025-02-29T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-05-19T24:00:00Z",
        "0001-01-01T00:30:00+01:00",
        "2026-05-19T10:00:00z",
        "yesterday",
    ],
)
def test_lua_reads_timestamps_exactly_as_python(raw: redis.Redis, value: str) -> None:
    common = LUA_LIBRARY.read_text()
    lua = raw.eval(f"{common}\nreturn norm_ts(ARGV[1])", 0, value)

    try:
        python: str | None = format_timestamp(parse_timestamp(value))
    except ValueError:
        python = None
    # Lua may decline a form Python reads (Python then decides), never disagree.
    assert lua is None or lua.decode() == python
    if value.endswith("Z") or value.isdigit():
        assert (lua.decode() if lua else None) == python
