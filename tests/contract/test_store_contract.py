"""The Store contract: what every store guarantees, whatever it is built on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from memshift.errors import (
    IllegalTransition,
    MessageConflict,
    SessionNotFound,
    ValidationError,
)
from memshift.model import (
    Checkpoint,
    MemorySummary,
    Message,
    Session,
    SessionState,
    StatusChange,
    ToolRun,
)
from memshift.stores.base import AsyncStore, Outcome, Store

T0 = datetime(2026, 5, 19, 10, 0, 0, 123456, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def new_session(sid: str = "sess-1", version: int = 1, **fields: object) -> Session:
    base: dict[str, object] = {
        "session_id": sid,
        "tenant_id": "acme",
        "user_id": "u-7",
        "status": "active",
        "version": version,
        "created_at": T0,
        "updated_at": at(version),
        "metadata": {"model": "gpt-x", "tags": ["a", "b"]},
    }
    base.update(fields)
    return Session.model_validate(base)


def msg(i: int, seq: int | None = None, content: str | None = None) -> Message:
    return Message(
        seq=seq,
        message_id=f"m{i}",
        role="user" if i % 2 == 0 else "assistant",
        content=content if content is not None else f"message {i} ✓ 😀",
        ts=at(i),
    )


def run(status: str = "running", attempts: int = 1, seconds: float = 1) -> ToolRun:
    return ToolRun.model_validate(
        {
            "tool_call_id": "call-1",
            "name": "web_search",
            "args": {"q": "redis to postgres", "n": 3},
            "status": status,
            "attempts": attempts,
            "last_error": "timeout" if attempts > 1 else None,
            "updated_at": at(seconds),
        }
    )


def write_everything(store: Store, sid: str = "sess-1") -> None:
    store.save_session(new_session(sid))
    for i in range(3):
        store.append_message(sid, msg(i))
    store.upsert_tool_run(sid, run("retrying", attempts=2))
    store.put_summary(sid, MemorySummary(version=1, text="short", covers_through=1, updated_at=T0))
    store.put_checkpoint(
        sid, Checkpoint(checkpoint_id="cp-1", step=1, state={"node": "plan"}, created_at=T0)
    )
    store.set_status(sid, "waiting_tool", at=at(10), data={"tool": "web_search"})


def loaded(store: Store, sid: str = "sess-1") -> SessionState:
    state = store.load_session(sid)
    assert state is not None, f"{store.name} lost session {sid}"
    return state


def test_every_entity_round_trips(store: Store) -> None:
    write_everything(store)
    state = loaded(store)

    assert state.session.tenant_id == "acme"
    assert state.session.metadata == {"model": "gpt-x", "tags": ["a", "b"]}
    assert state.session.status == "waiting_tool"
    assert state.session.version == 2
    assert [(m.seq, m.message_id, m.content) for m in state.messages] == [
        (i, f"m{i}", f"message {i} ✓ 😀") for i in range(3)
    ]
    assert state.messages[0].ts == at(0)
    assert state.tool_runs == (run("retrying", attempts=2),)
    assert state.latest_summary == MemorySummary(
        version=1, text="short", covers_through=1, updated_at=T0
    )
    assert state.latest_checkpoint is not None
    assert state.latest_checkpoint.state == {"node": "plan"}
    assert [(e.event_seq, e.from_status, e.to_status, e.data) for e in state.events] == [
        (0, "active", "waiting_tool", {"tool": "web_search"})
    ]


def test_metadata_of_every_record_round_trips(store: Store) -> None:
    usage = {"name": "bob", "usage": {"tokens": 12}, "additional_kwargs": {}, "n": [1, 2.5]}
    message = msg(0).model_copy(update={"metadata": usage})
    tool = run("retrying", attempts=2).model_copy(update={"metadata": {"latency_ms": 41}})
    summary = MemorySummary(
        version=1, text="short", updated_at=T0, metadata={"model": "small", "ok": True}
    )
    checkpoint = Checkpoint(
        checkpoint_id="cp-1", step=1, created_at=T0, metadata={"source": "loop", "x": None}
    )
    store.save_session(new_session(metadata={"redis_fields": {"colour": "red"}, "k": 1}))
    stored = store.append_message("sess-1", message)
    store.append_message("sess-1", msg(1))
    merged = store.upsert_tool_run("sess-1", tool)
    store.put_summary("sess-1", summary)
    store.put_checkpoint("sess-1", checkpoint)

    state = loaded(store)
    assert stored == message.model_copy(update={"seq": 0})
    assert merged == tool
    assert state.session.metadata == {"redis_fields": {"colour": "red"}, "k": 1}
    assert [m.metadata for m in state.messages] == [usage, {}]
    assert state.tool_runs == (tool,)
    assert state.summaries == (summary,)
    assert state.checkpoints == (checkpoint,)


def test_a_retried_append_with_other_metadata_returns_the_stored_message(store: Store) -> None:
    store.save_session(new_session())
    first = store.append_message("sess-1", msg(0).model_copy(update={"metadata": {"a": 1}}))
    again = store.append_message("sess-1", msg(0, seq=0).model_copy(update={"metadata": {"a": 2}}))

    assert again == first
    assert [m.metadata for m in loaded(store).messages] == [{"a": 1}]


def test_a_winning_tool_write_replaces_the_metadata_too(store: Store) -> None:
    store.save_session(new_session())
    first = run("running", seconds=1).model_copy(update={"metadata": {"try": 1}})
    later = run("retrying", attempts=2, seconds=2).model_copy(update={"metadata": {"try": 2}})
    store.upsert_tool_run("sess-1", later)
    store.upsert_tool_run("sess-1", first)

    assert loaded(store).tool_runs == (later,)


def test_an_unknown_session_loads_as_none(store: Store) -> None:
    assert store.load_session("nobody") is None


def test_writing_everything_twice_equals_writing_it_once(store: Store) -> None:
    write_everything(store)
    once = loaded(store)

    store.save_session(new_session())
    for m in once.messages:
        store.append_message("sess-1", m)
    for t in once.tool_runs:
        store.upsert_tool_run("sess-1", t)
    for s in once.summaries:
        assert store.put_summary("sess-1", s) == Outcome.UNCHANGED
    for c in once.checkpoints:
        assert store.put_checkpoint("sess-1", c) == Outcome.UNCHANGED
    assert store.apply_status_change(
        StatusChange(session=once.session, event=once.events[0])
    ) == Outcome.UNCHANGED

    assert loaded(store) == once


def test_a_retried_append_with_the_same_message_id_is_not_appended_again(store: Store) -> None:
    store.save_session(new_session())
    first = store.append_message("sess-1", msg(0))
    again = store.append_message("sess-1", msg(0))
    assert first.seq == again.seq == 0
    assert len(loaded(store).messages) == 1


def test_an_older_session_version_after_a_newer_one_is_ignored(store: Store) -> None:
    assert store.save_session(new_session(version=5, user_id="new")) == Outcome.APPLIED
    assert store.save_session(new_session(version=3, user_id="old")) == Outcome.STALE
    session = loaded(store).session
    assert (session.version, session.user_id) == (5, "new")


def test_an_older_summary_after_a_newer_one_is_ignored(store: Store) -> None:
    store.save_session(new_session())
    assert store.put_summary("sess-1", MemorySummary(version=3, text="v3")) == Outcome.APPLIED
    assert store.put_summary("sess-1", MemorySummary(version=2, text="v2")) == Outcome.STALE
    latest = loaded(store).latest_summary
    assert latest is not None and (latest.version, latest.text) == (3, "v3")


def test_an_older_checkpoint_after_a_newer_one_is_ignored(store: Store) -> None:
    store.save_session(new_session())
    newer = Checkpoint(checkpoint_id="cp-5", parent_id="cp-4", step=5, state={"n": 5})
    older = Checkpoint(checkpoint_id="cp-4", parent_id="cp-3", step=4, state={"n": 4})
    assert store.put_checkpoint("sess-1", newer) == Outcome.APPLIED
    assert store.put_checkpoint("sess-1", older) == Outcome.STALE
    latest = loaded(store).latest_checkpoint
    assert latest is not None and latest.checkpoint_id == "cp-5"


def test_tool_attempts_never_decrease(store: Store) -> None:
    store.save_session(new_session())
    store.upsert_tool_run("sess-1", run("retrying", attempts=3, seconds=5))
    merged = store.upsert_tool_run("sess-1", run("retrying", attempts=1, seconds=9))
    assert merged.attempts == 3
    assert loaded(store).tool_runs[0].attempts == 3


def test_a_terminal_tool_status_is_never_replaced_by_a_running_one(store: Store) -> None:
    store.save_session(new_session())
    store.upsert_tool_run("sess-1", run("succeeded", attempts=2, seconds=5))
    merged = store.upsert_tool_run("sess-1", run("running", attempts=4, seconds=60))
    assert (merged.status, merged.attempts) == ("succeeded", 4)
    stored = loaded(store).tool_runs[0]
    assert (stored.status, stored.attempts) == ("succeeded", 4)


def test_a_newer_tool_update_replaces_an_older_one(store: Store) -> None:
    store.save_session(new_session())
    store.upsert_tool_run("sess-1", run("running", attempts=1, seconds=1))
    store.upsert_tool_run("sess-1", run("retrying", attempts=2, seconds=2))
    stored = loaded(store).tool_runs[0]
    assert (stored.status, stored.attempts, stored.last_error) == ("retrying", 2, "timeout")


@pytest.mark.parametrize(
    ("path", "illegal"),
    [(["completed"], "paused"), (["expired"], "active"), (["waiting_tool"], "completed")],
)
def test_illegal_status_transitions_are_refused_and_change_nothing(
    store: Store, path: list[str], illegal: str
) -> None:
    store.save_session(new_session())
    for status in path:
        store.set_status("sess-1", status)
    before = loaded(store)
    with pytest.raises(IllegalTransition, match=f"'{path[-1]}' -> '{illegal}'"):
        store.set_status("sess-1", illegal)
    assert loaded(store) == before


def test_a_status_change_on_an_unknown_session_is_refused(store: Store) -> None:
    with pytest.raises(SessionNotFound, match="nobody"):
        store.set_status("nobody", "paused")


def test_a_message_with_a_taken_seq_and_other_content_is_a_conflict(store: Store) -> None:
    store.save_session(new_session())
    store.append_message("sess-1", msg(0))
    with pytest.raises(MessageConflict, match="seq 0"):
        store.append_message("sess-1", msg(0, seq=0, content="rewritten history"))
    assert loaded(store).messages[0].content == msg(0).content


@pytest.mark.parametrize(
    ("session_id", "problem"),
    [
        ("bad\x00id", "NUL"),
        ("x" * 600, "600 bytes"),
        ("bad-\udcff-utf8", "not valid UTF-8"),
        ("", "empty"),
    ],
)
def test_a_bad_session_id_is_refused_before_anything_is_written(
    store: Store, session_id: str, problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem):
        store.append_message(session_id, msg(0))
    with pytest.raises(ValidationError, match=problem):
        store.save_session({"session_id": session_id})
    assert list(store.list_sessions()) == []


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"message_id": "m1", "role": "user", "content": "nul \x00 here"}, "NUL"),
        ({"message_id": "m1", "role": "user", "content": 42}, "content"),
        ({"message_id": "m1", "role": "", "content": "x"}, "role"),
        ({"message_id": "m1", "role": "user", "content": "x", "seq": -1}, "seq"),
        ({"message_id": "m1", "role": "user", "content": "x", "ts": "2026-05-19T10:00"}, "zone"),
    ],
)
def test_a_bad_message_is_refused_and_changes_nothing(
    store: Store, record: dict[str, object], problem: str
) -> None:
    store.save_session(new_session())
    before = loaded(store)
    with pytest.raises(ValidationError, match=problem) as caught:
        store.append_message("sess-1", record)
    assert "sess-1" in str(caught.value)
    assert loaded(store) == before


def test_wrong_types_in_a_tool_run_are_refused(store: Store) -> None:
    store.save_session(new_session())
    with pytest.raises(ValidationError, match="attempts"):
        store.upsert_tool_run("sess-1", {"tool_call_id": "c", "name": "n", "attempts": "many"})
    with pytest.raises(ValidationError, match="status"):
        store.upsert_tool_run("sess-1", {"tool_call_id": "c", "name": "n", "status": "done"})
    assert loaded(store).tool_runs == ()


def test_list_sessions_finds_every_session_and_nothing_else(store: Store) -> None:
    ids = {f"s-{i}" for i in range(25)} | {"with:colon", "with*star", "ünïcode"}
    for sid in ids:
        store.save_session(new_session(sid))
        store.append_message(sid, msg(0))
    assert sorted(store.list_sessions(batch_size=7)) == sorted(ids)


async def test_the_async_store_has_the_same_contract(async_store: AsyncStore) -> None:
    await async_store.save_session(new_session())
    first = await async_store.append_message("sess-1", msg(0))
    second = await async_store.append_message("sess-1", msg(1))
    merged = await async_store.upsert_tool_run("sess-1", run("succeeded", 2, seconds=3))
    stale = await async_store.upsert_tool_run("sess-1", run("running", 1, seconds=9))
    change = await async_store.set_status("sess-1", "completed")
    with pytest.raises(IllegalTransition):
        await async_store.set_status("sess-1", "paused")
    state = await async_store.load_session("sess-1")

    assert (first.seq, second.seq) == (0, 1)
    assert merged == stale
    assert change.session_version == 2 and change.event.from_status == "active"
    assert state is not None and state.session.status == "completed"
    assert [s async for s in async_store.list_sessions()] == ["sess-1"]
