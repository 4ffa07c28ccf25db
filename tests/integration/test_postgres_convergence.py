"""Property: any permutation of a write log, with duplicates, converges in PostgreSQL.

Dual-writes, the backfill, repairs and retries deliver the same writes in any order
and any number of times; the monotonic guards must make the end state the same as
applying the log once, in order.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memshift.errors import MessageConflict
from memshift.model import (
    Checkpoint,
    Event,
    MemorySummary,
    Message,
    Session,
    SessionState,
    StatusChange,
    ToolRun,
)
from memshift.stores.postgres import PostgresStore
from tests.conftest import create_database, drop_database

T0 = datetime(2026, 5, 19, 10, 0, tzinfo=UTC)
Write = Callable[[PostgresStore, str], object]


def _at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


@st.composite
def write_logs(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """A realistic log of replicated writes for one session, in the order they happened.

    Fields that the primary assigns (seq, version, event_seq) are unique, as a primary
    makes them; everything else (tool-run states, timestamps) varies freely.
    """
    log: list[tuple[str, Any]] = []
    session: dict[str, Any] = {"version": 0, "status": "active", "user_id": None,
                               "updated_at": T0, "messages_trimmed": 0, "metadata": {}}
    for kind in draw(
        st.lists(
            st.sampled_from(["session", "message", "tool", "summary", "checkpoint", "status"]),
            min_size=1,
            max_size=25,
        )
    ):
        if kind == "session":
            version = session["version"] + 1
            session = session | {
                "version": version,
                "user_id": f"user-{version}",
                "updated_at": _at(version),
                "messages_trimmed": draw(st.integers(0, 3)),
                "metadata": {"v": version},
            }
            log.append(("session", session))
        elif kind == "message":
            seq = sum(1 for k, _ in log if k == "message")
            log.append(("message", Message(seq=seq, message_id=f"m{seq}", role="user",
                                           content=f"text {seq}", ts=_at(seq),
                                           metadata={"name": f"n{seq}"} if seq % 2 else {})))
        elif kind == "tool":
            log.append(
                (
                    "tool",
                    ToolRun(
                        tool_call_id=draw(st.sampled_from(["c1", "c2"])),
                        name=draw(st.sampled_from(["search", "fetch"])),
                        status=draw(
                            st.sampled_from(["pending", "running", "retrying", "succeeded",
                                             "failed"])
                        ),
                        attempts=draw(st.integers(0, 5)),
                        last_error=draw(st.sampled_from([None, "timeout", "429"])),
                        updated_at=_at(draw(st.integers(0, 4))),
                        metadata=draw(st.sampled_from([{}, {"a": 1}, {"a": 2}])),
                    ),
                )
            )
        elif kind == "summary":
            v = draw(st.integers(1, 6))
            log.append(("summary", MemorySummary(version=v, text=f"summary {v}",
                                                 covers_through=v, updated_at=_at(v),
                                                 metadata={"v": v})))
        elif kind == "checkpoint":
            step = draw(st.integers(0, 6))
            log.append(("checkpoint", Checkpoint(checkpoint_id=f"cp{step}",
                                                 parent_id=f"cp{step - 1}" if step else None,
                                                 step=step, state={"step": step},
                                                 created_at=_at(step),
                                                 metadata={"step": step})))
        else:
            target = draw(st.sampled_from(["active", "paused", "waiting_tool", "completed"]))
            version = session["version"] + 1
            event = Event(event_seq=sum(1 for k, _ in log if k == "status"),
                          from_status=session["status"], to_status=target, at=_at(version))
            session = session | {"version": version, "status": target, "updated_at": _at(version)}
            log.append(("status", (session, event)))
    return log


def apply(store: PostgresStore, sid: str, write: tuple[str, Any]) -> None:
    kind, value = write
    if kind == "session":
        store.save_session(Session(session_id=sid, tenant_id="t", created_at=T0, **value))
    elif kind == "message":
        try:
            store.append_message(sid, value)
        except MessageConflict:
            pytest.fail(f"a replayed message was taken for a conflict: {value}")
    elif kind == "tool":
        store.upsert_tool_run(sid, value)
    elif kind == "summary":
        store.put_summary(sid, value)
    elif kind == "checkpoint":
        store.put_checkpoint(sid, value)
    else:
        snapshot, event = value
        store.apply_status_change(
            StatusChange(session=Session(session_id=sid, tenant_id="t", created_at=T0, **snapshot),
                         event=event)
        )


def without_id(state: SessionState | None) -> dict[str, Any]:
    assert state is not None
    data = state.model_dump()
    data["session"].pop("session_id")
    return data


@pytest.fixture(scope="module")
def shared_store(pg_admin_dsn: str, pg_template: str) -> Iterator[PostgresStore]:
    # Hypothesis runs many examples per test; one database serves them all, each
    # example writing to session ids of its own.
    name = f"memshift_conv_{uuid.uuid4().hex[:10]}"
    store = PostgresStore(create_database(pg_admin_dsn, name, pg_template))
    yield store
    store.close()
    drop_database(pg_admin_dsn, name)


_counter = iter(range(10**9))


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(log=write_logs(), data=st.data())
def test_any_order_with_duplicates_converges_to_the_ordered_log(
    shared_store: PostgresStore, log: list[tuple[str, Any]], data: st.DataObject
) -> None:
    n = next(_counter)
    in_order, shuffled = f"ordered-{n}", f"shuffled-{n}"
    replayed = data.draw(
        st.permutations(log + data.draw(st.lists(st.sampled_from(log), max_size=len(log))))
    )

    for write in log:
        apply(shared_store, in_order, write)
    for write in replayed:
        apply(shared_store, shuffled, write)

    assert without_id(shared_store.load_session(shuffled)) == without_id(
        shared_store.load_session(in_order)
    )
