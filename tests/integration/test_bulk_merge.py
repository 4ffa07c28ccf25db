"""The backfill's bulk merge and the live writes converge, whichever lands first."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memshift.migrate.bulk import merge_states
from memshift.model import SessionState
from memshift.stores.postgres import PostgresStore
from tests.conftest import create_database, drop_database
from tests.integration.test_postgres_convergence import apply, without_id, write_logs


@pytest.fixture(scope="module")
def dsn(pg_admin_dsn: str, pg_template: str) -> Iterator[str]:
    name = f"memshift_bulk_{uuid.uuid4().hex[:10]}"
    yield create_database(pg_admin_dsn, name, pg_template)
    drop_database(pg_admin_dsn, name)


@pytest.fixture(scope="module")
def store(dsn: str) -> Iterator[PostgresStore]:
    with PostgresStore(dsn) as made:
        yield made


def renamed(state: SessionState, sid: str) -> SessionState:
    return state.model_copy(
        update={"session": state.session.model_copy(update={"session_id": sid})}
    )


def bulk(dsn: str, *states: SessionState) -> Any:
    with psycopg.connect(dsn) as conn, conn.transaction():
        return merge_states(conn, list(states))


_counter = iter(range(10**9))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(log=write_logs(), data=st.data())
def test_a_backfilled_session_and_live_writes_converge_in_any_order(
    store: PostgresStore, dsn: str, log: list[tuple[str, Any]], data: st.DataObject
) -> None:
    n = next(_counter)
    truth_id, bulk_first, live_first = f"truth-{n}", f"bulk-first-{n}", f"live-first-{n}"
    for write in log:
        apply(store, truth_id, write)
    truth = store.load_session(truth_id)
    assert truth is not None
    live = data.draw(st.lists(st.sampled_from(log), max_size=len(log)))

    bulk(dsn, renamed(truth, bulk_first))
    for write in live:
        apply(store, bulk_first, write)
    for write in live:
        apply(store, live_first, write)
    bulk(dsn, renamed(truth, live_first))

    assert without_id(store.load_session(bulk_first)) == without_id(truth)
    assert without_id(store.load_session(live_first)) == without_id(truth)


def test_merging_a_batch_twice_changes_nothing_the_second_time(
    store: PostgresStore, dsn: str
) -> None:
    from memshift.generate import generate_sessions

    for generated in generate_sessions(5, seed=3, namespace="twice"):
        generated.play(store)
    states = [s for s in (store.load_session(g.session_id)
                          for g in generate_sessions(5, seed=3, namespace="twice")) if s]
    renamed_states = [renamed(s, "copy-" + s.session_id) for s in states]

    first = bulk(dsn, *renamed_states)
    second = bulk(dsn, *renamed_states)

    assert first.changed == {s.session_id for s in renamed_states}
    assert second.changed == set() and second.unchanged(renamed_states) == 5
    for original, copy in zip(states, renamed_states, strict=True):
        assert without_id(store.load_session(copy.session_id)) == without_id(original)


def test_a_bulk_merge_records_conflicts_and_keeps_what_was_there(
    store: PostgresStore, dsn: str
) -> None:
    from memshift.model import Message, Session

    store.save_session(Session(session_id="clash"))
    store.append_message("clash", Message(seq=0, message_id="m0", role="user", content="kept"))
    store.append_message("clash", Message(seq=1, message_id="m1", role="user", content="one"))
    incoming = SessionState(
        session=Session(session_id="clash"),
        messages=(
            Message(seq=0, message_id="m0", role="user", content="rewritten"),
            Message(seq=1, message_id="m1", role="user", content="one"),
            Message(seq=2, message_id="m1", role="user", content="one again"),
            Message(seq=3, message_id="m3", role="user", content="new"),
        ),
    )

    result = bulk(dsn, incoming)

    state = store.load_session("clash")
    assert state is not None
    assert [(m.seq, m.content) for m in state.messages] == [(0, "kept"), (1, "one"), (3, "new")]
    assert result.conflicted == {"clash"}
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT seq, incoming->>'content' FROM memshift.message_conflicts "
            "WHERE session_id = 'clash' ORDER BY seq"
        ).fetchall()
    assert rows == [(0, "rewritten"), (2, "one again")]


def test_a_live_write_landing_after_the_check_sends_the_batch_through_the_guards(
    store: PostgresStore, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New sessions are COPYed straight into the tables; when a live write lands
    between the check that found none of them and the COPY, the COPY fails on a unique
    key and the guarded merge decides for every session of the batch."""
    from memshift.migrate import bulk as bulk_module
    from memshift.model import Message, Session

    store.save_session(Session(session_id="landed", version=5, status="paused"))
    store.append_message("landed", Message(seq=0, message_id="m0", role="user", content="live"))
    late = SessionState(
        session=Session(session_id="landed", version=1),
        messages=(Message(seq=0, message_id="m0", role="user", content="stale"),
                  Message(seq=1, message_id="m1", role="user", content="new")),
    )
    new = SessionState(
        session=Session(session_id="brand-new"),
        messages=(Message(seq=0, message_id="n0", role="user", content="hello"),),
    )
    # The check ran before the live write: it found neither session.
    monkeypatch.setattr(bulk_module, "_fresh", lambda conn, ids: set(ids))

    result = bulk(dsn, late, new)

    landed = store.load_session("landed")
    assert landed is not None
    assert (landed.session.version, landed.session.status) == (5, "paused")
    assert [(m.seq, m.content) for m in landed.messages] == [(0, "live"), (1, "new")]
    assert result.conflicted == {"landed"}
    assert result.changed == {"landed", "brand-new"}
    assert without_id(store.load_session("brand-new")) == without_id(new)


AWKWARD_TEXT = ["tab\there", "new\nline\r\n", "back\\slash \\N \\.", "ü 𝄞 \u2028", '"{q}"', ""]


def awkward_state(sid: str) -> SessionState:
    """A session with COPY text's special characters in every field that takes text
    or JSON, NULLs where a field may be NULL, and a JSON integer past 64 bits."""
    from datetime import UTC, datetime, timedelta

    from memshift.model import Checkpoint, Event, MemorySummary, Message, Session, ToolRun

    at = datetime(2026, 5, 19, 10, 0, 0, 123456, tzinfo=UTC)
    nested = {"k\t1": AWKWARD_TEXT, "big": 2**70, "f": 0.25, "n": None, "e": {}}
    return SessionState(
        session=Session(session_id=sid, tenant_id="t\\1", user_id=None, status="paused",
                        version=7, created_at=at, updated_at=at + timedelta(seconds=1),
                        messages_trimmed=2, metadata=nested,
                        expires_at=at + timedelta(days=1)),
        messages=tuple(
            Message(seq=2 + i, message_id=f"m\t{i}\\", role="us\ner", content=text,
                    ts=at + timedelta(microseconds=i), tool_call_id="c\\1" if i == 1 else None,
                    metadata={"why": text} if i % 2 else {})
            for i, text in enumerate(AWKWARD_TEXT)
        ),
        tool_runs=(ToolRun(tool_call_id="c\\1", name="na\tme", args=["x\n", {"y": 2**70}],
                           status="failed", attempts=3, last_error="boom\r\n", updated_at=at,
                           metadata=nested),),
        summaries=(MemorySummary(version=2, text="sum\\mary\t", covers_through=3,
                                 updated_at=at, metadata={"x": "\\"}),),
        checkpoints=(Checkpoint(checkpoint_id="ck\n1", parent_id=None, step=4, state=nested,
                                created_at=at),),
        events=(Event(event_seq=0, type="st\tatus", from_status="active",
                      to_status=None, at=at, data=nested),),
    )


@pytest.mark.parametrize("path", ["fresh", "staged"])
def test_awkward_values_arrive_exactly_by_either_path(
    store: PostgresStore, dsn: str, path: str
) -> None:
    """The rows travel as COPY text: tabs, newlines, backslashes (``\\N``, ``\\.``),
    NULLs and JSON of every kind arrive as they were, whether the session is new (COPY
    straight into the tables) or PostgreSQL holds part of it (staging and merges)."""
    from memshift.model import Session

    sid = f"awk\t{path}\\{uuid.uuid4().hex[:6]}"
    state = awkward_state(sid)
    if path == "staged":
        store.save_session(Session(session_id=sid, version=1, created_at=state.session.created_at,
                                   updated_at=state.session.created_at))

    result = bulk(dsn, state)

    assert result.changed == {sid} and result.messages == len(AWKWARD_TEXT)
    loaded = store.load_session(sid)
    assert loaded is not None
    assert loaded.model_dump() == state.model_dump()
