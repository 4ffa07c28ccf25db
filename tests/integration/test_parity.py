"""Parity: each check catches its own drift, redacted; in-flight writes are never a fail."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from psycopg import sql

from memshift.config import Settings
from memshift.generate import generate_sessions
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.migrate.parity import (
    PROJECTION,
    SEED_CHECKS,
    ParityOptions,
    check_batch,
    check_session,
    invariant_diffs,
    parity,
)
from memshift.migrate.plan import GateRefused, Stage, set_stage
from memshift.model import MemorySummary, Message, SessionState, ToolRun, now
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from tests.integration.test_cli import memshift

SECRET = "the-launch-code-is-0000"


@pytest.fixture
def config(pg_dsn: str, redis_url: str, redis_prefix: str) -> Settings:
    return Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix)


@pytest.fixture
def legacy(redis_url: str, redis_prefix: str) -> Iterator[RedisStore]:
    with RedisStore(redis_url, prefix=redis_prefix) as store:
        yield store


@pytest.fixture
def truth(pg_dsn: str) -> Iterator[PostgresStore]:
    with PostgresStore(pg_dsn) as store:
        yield store


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def migrated(config: Settings, legacy: RedisStore, count: int = 6) -> list[str]:
    """Sessions written to Redis by the legacy app, then backfilled: identical twins."""
    ids = []
    for generated in generate_sessions(count, seed=7):
        generated.play(legacy)
        ids.append(generated.session_id)
    backfill(config, BackfillOptions(prefix=config.prefix))
    return ids


def full_session(legacy: RedisStore, ids: list[str]) -> SessionState:
    """A session holding every part a check compares."""
    for sid in ids:
        state = legacy.load_session(sid)
        if state and state.messages and state.checkpoints and state.summaries \
                and state.tool_runs:
            return state
    raise AssertionError("no generated session has every part")


def check(config: Settings, *ids: str, show_values: bool = False) -> dict[str, Any]:
    reports = list(parity(config, session_ids=list(ids)))
    return {r.session_id: r.as_json(show_values=show_values) for r in reports}


def failed(report: dict[str, Any]) -> list[str]:
    return [name for name, ok in report["checks"].items() if ok is False]


def test_identical_sessions_pass_every_check_and_are_recorded(
    config: Settings, legacy: RedisStore, pg_dsn: str
) -> None:
    ids = migrated(config, legacy)

    reports = [r.as_json() for r in parity(config)]

    assert sorted(r["session_id"] for r in reports) == sorted(ids)
    for report in reports:
        assert list(report) == ["session_id", "checks", "parity_status", "diffs", "checked_at"]
        assert report["parity_status"] == "pass" and report["diffs"] == []
        assert all(report["checks"][name] is True for name in SEED_CHECKS)
        assert PROJECTION not in report["checks"]  # the reference layout keeps no other table
        assert report["checked_at"].endswith("Z")
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT session_id, status FROM memshift.parity_results ORDER BY session_id"
        ).fetchall()
    assert rows == [(sid, "pass") for sid in sorted(ids)]


def _seed_message_count(state: SessionState, legacy: RedisStore, truth: PostgresStore,
                        raw: redis.Redis, pg_dsn: str) -> None:
    message = {"id": "extra", "role": "user", "content": "one more", "ts": "2026-05-19T10:00:00Z"}
    raw.rpush(legacy.layout.session_keys(state.session_id)[1], json.dumps(message))


def _seed_message_order(state: SessionState, legacy: RedisStore, truth: PostgresStore,
                        raw: redis.Redis, pg_dsn: str) -> None:
    first = state.messages[0]
    message = {"id": first.message_id, "role": first.role, "content": SECRET,
               "ts": first.ts.isoformat()}
    raw.lset(legacy.layout.session_keys(state.session_id)[1], 0, json.dumps(message))


def _seed_checkpoint(state: SessionState, legacy: RedisStore, truth: PostgresStore,
                     raw: redis.Redis, pg_dsn: str) -> None:
    latest = state.latest_checkpoint
    assert latest is not None
    truth.put_checkpoint(state.session_id, latest.model_copy(update={
        "checkpoint_id": "newer", "parent_id": latest.checkpoint_id, "step": latest.step + 1}))


def _seed_tool_run(state: SessionState, legacy: RedisStore, truth: PostgresStore,
                   raw: redis.Redis, pg_dsn: str) -> None:
    run = state.tool_runs[0]
    truth.upsert_tool_run(state.session_id, run.model_copy(
        update={"attempts": run.attempts + 1}))


def _seed_summary(state: SessionState, legacy: RedisStore, truth: PostgresStore,
                  raw: redis.Redis, pg_dsn: str) -> None:
    latest = state.latest_summary
    assert latest is not None
    truth.put_summary(state.session_id, MemorySummary(version=latest.version + 1,
                                                      text="newer", updated_at=now()))


def _seed_status(state: SessionState, legacy: RedisStore, truth: PostgresStore,
                 raw: redis.Redis, pg_dsn: str) -> None:
    other = "paused" if state.session.status != "paused" else "active"
    raw.hset(legacy.layout.session_keys(state.session_id)[0], "status", other)


def _seed_illegal_event(state: SessionState, legacy: RedisStore, truth: PostgresStore,
                        raw: redis.Redis, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO memshift.events (session_id, event_seq, type, from_status, to_status, "
            "at, data) VALUES (%s, 9999, 'status', 'expired', 'active', now(), '{}')",
            (state.session_id,),
        )


SEEDS = {
    "message_count_matches": _seed_message_count,
    "message_order_matches": _seed_message_order,
    "latest_checkpoint_matches": _seed_checkpoint,
    "tool_retry_state_matches": _seed_tool_run,
    "memory_summary_version_matches": _seed_summary,
    "session_status_matches": _seed_status,
    "pg_invariants_hold": _seed_illegal_event,
}


@pytest.mark.parametrize("check_name", list(SEEDS))
def test_each_check_catches_its_own_divergence_and_only_that_one(
    check_name: str, config: Settings, legacy: RedisStore, truth: PostgresStore,
    raw: redis.Redis, pg_dsn: str,
) -> None:
    ids = migrated(config, legacy)
    state = full_session(legacy, ids)
    bystander = next(sid for sid in ids if sid != state.session_id)
    SEEDS[check_name](state, legacy, truth, raw, pg_dsn)

    reports = check(config, state.session_id, bystander)

    drifted = reports[state.session_id]
    assert drifted["parity_status"] == "fail"
    assert failed(drifted) == [check_name]
    assert drifted["diffs"] and {d["check"] for d in drifted["diffs"]} == {check_name}
    assert reports[bystander]["parity_status"] == "pass"


def test_a_diff_names_field_and_both_sides_and_redacts_content_unless_asked(
    config: Settings, legacy: RedisStore, truth: PostgresStore, raw: redis.Redis, pg_dsn: str
) -> None:
    ids = migrated(config, legacy)
    state = full_session(legacy, ids)
    _seed_message_order(state, legacy, truth, raw, pg_dsn)

    (diff,) = check(config, state.session_id)[state.session_id]["diffs"]
    (shown,) = check(config, state.session_id, show_values=True)[state.session_id]["diffs"]

    assert diff["field"] == f"messages[seq={state.messages[0].seq}].content"
    assert diff["redis"] == {"length": len(SECRET), "sha256": diff["redis"]["sha256"]}
    assert diff["postgres"]["length"] == len(state.messages[0].content)
    assert (shown["redis"], shown["postgres"]) == (SECRET, state.messages[0].content)


def test_the_cli_hides_message_content_by_default_and_exits_1_on_drift(
    config: Settings, legacy: RedisStore, truth: PostgresStore, raw: redis.Redis, pg_dsn: str
) -> None:
    ids = migrated(config, legacy)
    state = full_session(legacy, ids)
    _seed_message_order(state, legacy, truth, raw, pg_dsn)
    env = {"MEMSHIFT_POSTGRES_DSN": pg_dsn, "MEMSHIFT_REDIS_URL": config.redis_url or "",
           "MEMSHIFT_PREFIX": config.prefix}

    table = memshift("parity", "--all", env=env)
    lines = memshift("parity", "--session", state.session_id, "--json", env=env)
    revealed = memshift("parity", "--session", state.session_id, "--json", "--show-values",
                        env=env)

    assert table.returncode == 1, table.stderr
    assert "message_order_matches" in table.stdout
    assert f"{len(ids)} session(s) checked: {len(ids) - 1} pass, 1 fail" in table.stdout
    assert lines.returncode == 1
    assert SECRET not in table.stdout + table.stderr + lines.stdout + lines.stderr
    (report,) = [json.loads(line) for line in lines.stdout.splitlines()]
    assert report["parity_status"] == "fail"
    assert SECRET in revealed.stdout


def test_a_session_written_during_the_check_is_pending_or_pass_never_fail(
    config: Settings, legacy: RedisStore, truth: PostgresStore
) -> None:
    ids = migrated(config, legacy)
    sid = ids[0]
    stop = threading.Event()

    def writer() -> None:  # the router in dual_write: Redis first, then PostgreSQL
        n = 0
        while not stop.is_set():
            written = legacy.append_message(sid, Message(
                message_id=f"live-{n}", role="user", content=f"live {n}"))
            truth.append_message(sid, written)
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = [r.parity_status for _ in range(15)
                for r in check_batch(legacy, truth, [sid], settle_seconds=0.05)]
    finally:
        stop.set()
        thread.join()
    settled = list(parity(config, session_ids=[sid]))

    assert "fail" not in seen and set(seen) <= {"pass", "pending"}
    assert [r.parity_status for r in settled] == ["pass"]


def test_an_unreadable_redis_session_is_an_error_with_its_reason(
    config: Settings, legacy: RedisStore, raw: redis.Redis
) -> None:
    ids = migrated(config, legacy)
    summary_key = legacy.layout.session_keys(ids[0])[3]
    raw.set(summary_key, b"{not json")

    report = check(config, ids[0])[ids[0]]

    assert report["parity_status"] == "error"
    assert report["checks"]["stores_readable"] is False
    assert summary_key in report["diffs"][0]["redis"]


def test_a_session_expired_in_redis_is_not_drift_but_a_lost_one_is(
    config: Settings, legacy: RedisStore, raw: redis.Redis, pg_dsn: str
) -> None:
    ids = migrated(config, legacy)
    expired, lost = ids[0], ids[1]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE memshift.sessions SET expires_at = now() - interval '1 minute' "
                     "WHERE session_id = %s", (expired,))
    for sid in (expired, lost):
        raw.delete(*legacy.layout.session_keys(sid))

    reports = check(config, expired, lost)

    assert reports[expired]["parity_status"] == "pass"
    assert reports[expired]["checks"]["presence_matches"] is True
    assert "expired" in reports[expired]["diffs"][0]["redis"]
    assert reports[lost]["parity_status"] == "fail"
    assert failed(reports[lost]) == ["presence_matches"]


def test_cutover_waits_for_a_parity_pass_rate_and_says_how_to_get_one(
    config: Settings, legacy: RedisStore, truth: PostgresStore, pg_dsn: str
) -> None:
    ids = migrated(config, legacy)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        set_stage(conn, "dual_write", "start")
        set_stage(conn, "shadow", "backfilled")
        with pytest.raises(GateRefused, match=r"no parity results yet.*memshift parity --all"):
            set_stage(conn, "cutover", "too early")
        truth.upsert_tool_run(ids[0], ToolRun(tool_call_id="drift", name="probe"))
        list(parity(config, options=ParityOptions(settle_seconds=0)))
        with pytest.raises(GateRefused, match=r"parity pass rate"):
            set_stage(conn, "cutover", "one in six drifted")
        truth_fixed = legacy.upsert_tool_run(ids[0], ToolRun(tool_call_id="drift", name="probe"))
        assert truth_fixed.tool_call_id == "drift"
        # Each session's latest result counts: one new pass supersedes the old fail.
        list(parity(config, session_ids=[ids[0]]))
        assert set_stage(conn, "cutover", "parity holds").stage is Stage.CUTOVER


def test_a_failed_session_deleted_from_both_stores_stops_holding_the_gate(
    config: Settings, legacy: RedisStore, truth: PostgresStore, raw: redis.Redis, pg_dsn: str
) -> None:
    ids = migrated(config, legacy)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        set_stage(conn, "dual_write", "start")
        set_stage(conn, "shadow", "backfilled")
        truth.upsert_tool_run(ids[0], ToolRun(tool_call_id="drift", name="probe"))
        list(parity(config, options=ParityOptions(settle_seconds=0)))
        with pytest.raises(GateRefused, match=r"1 of 6 sessions fail"):
            set_stage(conn, "cutover", "one drifted")
        # The application deletes the session everywhere (say, a user's erasure request).
        raw.delete(*raw.keys(f"{config.prefix}:session:{ids[0]}*"))
        for table in ("sessions", "messages", "tool_runs", "summaries", "checkpoints",
                      "events"):
            conn.execute(sql.SQL("DELETE FROM memshift.{} WHERE session_id = %s")
                         .format(sql.Identifier(table)), (ids[0],))

        reports = {r.session_id: r for r in parity(config)}

        assert reports[ids[0]].in_neither, reports[ids[0]].diffs
        assert reports[ids[0]].parity_status == "pass"
        assert set_stage(conn, "cutover", "parity holds").stage is Stage.CUTOVER


def test_parity_of_an_id_no_store_holds_exits_4_and_records_nothing(
    config: Settings, legacy: RedisStore, pg_dsn: str
) -> None:
    ids = migrated(config, legacy, count=2)
    env = {"MEMSHIFT_POSTGRES_DSN": pg_dsn, "MEMSHIFT_REDIS_URL": config.redis_url or "",
           "MEMSHIFT_PREFIX": config.prefix}

    typo = memshift("parity", "--session", "no-such-session", env=env)
    mixed = memshift("parity", "--session", ids[0], "--session", "no-such-session", "--json",
                     env=env)

    assert typo.returncode == 4, typo.stderr
    assert "'no-such-session': neither Redis" in " ".join(typo.stderr.split())
    assert mixed.returncode == 4
    assert [json.loads(line)["session_id"] for line in mixed.stdout.splitlines()] == [ids[0]]
    with psycopg.connect(pg_dsn) as conn:
        recorded = conn.execute("SELECT DISTINCT session_id FROM memshift.parity_results"
                                ).fetchall()
    assert recorded == [(ids[0],)]


def _state(messages: range, trimmed: int = 0, **parts: Any) -> SessionState:
    return SessionState.model_validate({
        "session": {"session_id": "s1", "messages_trimmed": trimmed},
        "messages": [{"seq": n, "message_id": f"m{n}", "role": "user", "content": f"c{n}"}
                     for n in messages], **parts})


def test_message_order_compares_only_the_seqs_redis_still_holds() -> None:
    redis_tail = _state(range(2, 5), trimmed=2)  # Redis trimmed seqs 0 and 1
    pg_whole = _state(range(0, 5), trimmed=2)
    changed = pg_whole.model_copy(update={"messages": tuple(
        m.model_copy(update={"content": "other"}) if m.seq == 3 else m
        for m in pg_whole.messages)})

    same = check_session(redis_tail, pg_whole, checked_at=now())
    differs = check_session(redis_tail, changed, checked_at=now())

    assert same.parity_status == "pass"
    assert [(d.check, d.field) for d in differs.diffs] == [
        ("message_order_matches", "messages[seq=3].content")]


def test_the_invariants_name_a_seq_gap_and_a_checkpoint_cycle() -> None:
    cycle = [{"checkpoint_id": "a", "parent_id": "c", "step": 1},
             {"checkpoint_id": "b", "parent_id": "a", "step": 2},
             {"checkpoint_id": "c", "parent_id": "b", "step": 3}]
    chain = [{"checkpoint_id": "a", "step": 1},
             {"checkpoint_id": "b", "parent_id": "a", "step": 2}]

    gapped = invariant_diffs(_state(range(0, 2)).model_copy(update={"messages": tuple(
        m.model_copy(update={"seq": m.seq + 1}) if m.seq == 1 else m
        for m in _state(range(0, 2)).messages)}))
    looped = invariant_diffs(_state(range(0, 2), checkpoints=cycle))

    assert [(d.field, d.postgres) for d in gapped] == [("messages.seq", "seq 2 follows seq 0")]
    assert [d.field for d in looped] == ["checkpoints[a].step", "checkpoints.parent_id"]
    assert "cycle" in looped[1].postgres
    assert invariant_diffs(_state(range(0, 2), checkpoints=chain)) == []
