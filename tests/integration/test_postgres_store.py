"""PostgreSQL store behaviour beyond the shared contract."""

from __future__ import annotations

import threading

import psycopg
import pytest

from memshift.errors import StoreUnavailable, ValidationError
from memshift.generate import generate_sessions
from memshift.model import Message, Session
from memshift.stores.base import AsyncStore, Store
from memshift.stores.postgres import AsyncPostgresStore, PostgresStore


def test_both_postgres_stores_satisfy_the_protocols(pg_dsn: str) -> None:
    sync_store = PostgresStore(pg_dsn)
    async_store = AsyncPostgresStore(pg_dsn)
    assert isinstance(sync_store, Store)
    assert isinstance(async_store, AsyncStore)
    sync_store.close()


def test_an_unreachable_postgres_is_named_without_its_password() -> None:
    store = PostgresStore("postgresql://app:s3cr3t-pw@127.0.0.1:1/app")
    with pytest.raises(StoreUnavailable) as caught:
        store.load_session("s1")
    assert "127.0.0.1" in str(caught.value)
    assert "s3cr3t-pw" not in str(caught.value) and "s3cr3t-pw" not in repr(store)


def test_a_negative_version_is_refused_and_writes_nothing(pg_dsn: str) -> None:
    with PostgresStore(pg_dsn) as store:
        with pytest.raises(ValidationError, match="version"):
            store.save_session({"session_id": "s1", "version": -3})
        assert store.load_session("s1") is None


def test_concurrent_appends_get_distinct_consecutive_seqs(pg_dsn: str) -> None:
    with PostgresStore(pg_dsn, max_size=8) as store:
        store.save_session(Session(session_id="s1"))
        seqs: list[int] = []

        def writer(n: int) -> None:
            for i in range(25):
                m = store.append_message(
                    "s1", Message(message_id=f"w{n}-{i}", role="user", content=f"{n}/{i}")
                )
                assert m.seq is not None
                seqs.append(m.seq)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        state = store.load_session("s1")

    assert sorted(seqs) == list(range(150))
    assert state is not None and [m.seq for m in state.messages] == list(range(150))


def test_a_primary_append_after_replicated_ones_continues_after_them(pg_dsn: str) -> None:
    with PostgresStore(pg_dsn) as store:
        store.save_session(Session(session_id="s1", messages_trimmed=10))
        for seq in (10, 11, 12):
            store.append_message("s1", Message(seq=seq, message_id=f"m{seq}", role="user",
                                               content="x"))
        appended = store.append_message("s1", Message(message_id="new", role="user",
                                                      content="y"))
    assert appended.seq == 13


def test_a_conflict_is_recorded_with_both_sides(pg_dsn: str) -> None:
    with PostgresStore(pg_dsn) as store:
        store.save_session(Session(session_id="s1"))
        store.append_message("s1", Message(seq=0, message_id="m0", role="user", content="a"))
        with pytest.raises(Exception, match="conflict"):
            store.append_message("s1", Message(seq=0, message_id="m0", role="user",
                                               content="b"))
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT existing->>'content', incoming->>'content' FROM memshift.message_conflicts"
        ).fetchone()
    assert row == ("a", "b")


def _states_one_by_one(store: PostgresStore, ids: list[str]) -> dict[str, object]:
    return {sid: store.load_session(sid) for sid in ids}


def test_load_sessions_equals_load_session_for_every_id(pg_dsn: str) -> None:
    with PostgresStore(pg_dsn) as store:
        ids = []
        for generated in generate_sessions(8, seed=11):
            generated.play(store)
            ids.append(generated.session_id)
        # Parts without a session row: a placeholder, as a replicated write leaves one.
        store.append_message("placeholder", Message(message_id="m1", role="user",
                                                    content="hello", seq=0))
        wanted = ["unknown", *reversed(ids), "placeholder", ids[0]]

        batch = store.load_sessions(wanted)

        assert list(batch) == list(dict.fromkeys(wanted))
        assert batch == _states_one_by_one(store, list(batch))
        assert batch["unknown"] is None and batch["placeholder"] is not None
        assert store.load_sessions([]) == {}


async def test_the_async_load_sessions_equals_its_load_session(pg_dsn: str) -> None:
    with PostgresStore(pg_dsn) as sync_store:
        ids = []
        for generated in generate_sessions(3, seed=12):
            generated.play(sync_store)
            ids.append(generated.session_id)
    async with AsyncPostgresStore(pg_dsn) as store:
        batch = await store.load_sessions(ids)
        assert batch == {sid: await store.load_session(sid) for sid in ids}


def test_load_sessions_refuses_a_bad_id_before_reading(pg_dsn: str) -> None:
    with PostgresStore(pg_dsn) as store, pytest.raises(ValidationError):
        store.load_sessions(["good", ""])
