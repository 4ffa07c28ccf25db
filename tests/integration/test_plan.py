"""The Plan: stages one at a time through gates, slices by stable cohorts, all audited."""

from __future__ import annotations

import json
import select
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from memshift.errors import MemshiftError
from memshift.migrate.backfill import abandon_run
from memshift.migrate.plan import (
    Gate,
    GateRefused,
    IllegalMove,
    Stage,
    check_gates,
    history,
    in_cohort,
    load_plan,
    rollback,
    set_slice,
    set_stage,
)
from tests.integration.test_cli import memshift


@pytest.fixture
def conn(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_dsn, autocommit=True) as made:
        yield made


def complete_a_backfill(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "INSERT INTO memshift.backfill_runs (source, layout, prefix, batch_size, state) "
        "VALUES ('redis://test', 'reference', 'agent', 10, 'completed')"
    )


def pass_parity(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "INSERT INTO memshift.parity_results (session_id, status, checks, diffs, checked_at) "
        "VALUES ('s1', 'pass', '{}', '[]', now())"
    )


def test_a_new_plan_starts_redis_only_and_routes_everything_to_redis(
    conn: psycopg.Connection[Any],
) -> None:
    plan = load_plan(conn)
    assert (plan.stage, plan.version) == (Stage.REDIS_ONLY, 1)
    assert plan.writes() == ("redis", None)
    assert plan.read_source("resume", "s1") == "redis"


def test_stages_move_forward_one_at_a_time(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(IllegalMove, match="next is dual_write"):
        set_stage(conn, "shadow", "skip ahead")
    assert set_stage(conn, "dual_write", "start").stage is Stage.DUAL_WRITE
    assert load_plan(conn).writes() == ("redis", "postgres")


def test_a_gate_refuses_until_its_condition_holds_and_says_how(
    conn: psycopg.Connection[Any],
) -> None:
    set_stage(conn, "dual_write", "start")
    with pytest.raises(GateRefused, match=r"backfill complete.*memshift backfill"):
        set_stage(conn, "shadow", "too early")
    assert load_plan(conn).stage is Stage.DUAL_WRITE

    complete_a_backfill(conn)
    assert set_stage(conn, "shadow", "backfill done").stage is Stage.SHADOW


def test_force_passes_a_failing_gate_and_the_audit_says_so(
    conn: psycopg.Connection[Any],
) -> None:
    set_stage(conn, "dual_write", "start", who="alice")
    set_stage(conn, "shadow", "incident 42: backfill verified by hand", force=True, who="bob")

    latest = history(conn)[0]
    assert (latest.who, latest.why, latest.forced, latest.action) == (
        "bob", "incident 42: backfill verified by hand", True, "stage")
    assert (latest.before["stage"], latest.after["stage"]) == ("dual_write", "shadow")
    assert latest.version == load_plan(conn).version == 3


def test_moving_back_is_allowed_at_once(conn: psycopg.Connection[Any]) -> None:
    complete_a_backfill(conn)
    pass_parity(conn)
    for stage in ("dual_write", "shadow", "cutover", "pg_primary"):
        set_stage(conn, stage, "forward")
    assert set_stage(conn, "dual_write", "back at once").stage is Stage.DUAL_WRITE


def test_reads_cannot_go_back_to_redis_after_retirement_without_force(
    conn: psycopg.Connection[Any],
) -> None:
    complete_a_backfill(conn)
    pass_parity(conn)
    for stage in ("dual_write", "shadow", "cutover", "pg_primary", "retired"):
        set_stage(conn, stage, "forward")
    with pytest.raises(IllegalMove, match="no writes"):
        set_stage(conn, "shadow", "back")
    with pytest.raises(IllegalMove, match="pg_primary"):
        rollback(conn, "everything back")
    assert set_stage(conn, "pg_primary", "back one").stage is Stage.PG_PRIMARY


def test_a_change_without_a_reason_is_refused(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(ValueError, match="reason"):
        set_stage(conn, "dual_write", "  ")
    assert load_plan(conn).version == 1


def test_slices_route_reads_by_cohort_and_tenant_only_in_cutover(
    conn: psycopg.Connection[Any],
) -> None:
    complete_a_backfill(conn)
    pass_parity(conn)
    for stage in ("dual_write", "shadow"):
        set_stage(conn, stage, "forward")
    set_slice(conn, "resume", 100, "all of resume", tenant_deny=("vip",))
    assert load_plan(conn).read_source("resume", "s1", "acme") == "redis"  # not cutover yet

    plan = set_stage(conn, "cutover", "go")
    assert plan.read_source("resume", "s1", "acme") == "postgres"
    assert plan.read_source("resume", "s1", "vip") == "redis"
    assert plan.read_source("transcript", "s1", "acme") == "redis"

    after = rollback(conn, "drift on resume", read_path="resume")
    assert after.read_source("resume", "s1", "acme") == "redis"
    assert after.stage is Stage.CUTOVER


def test_a_full_rollback_sends_every_read_back_to_redis(conn: psycopg.Connection[Any]) -> None:
    complete_a_backfill(conn)
    pass_parity(conn)
    for stage in ("dual_write", "shadow", "cutover", "pg_primary"):
        set_stage(conn, stage, "forward")
    set_slice(conn, "resume", 50, "half")

    plan = rollback(conn, "pager went off")

    assert plan.stage is Stage.SHADOW and plan.slices["resume"].percent == 0
    assert plan.read_source("resume", "any", None) == "redis"
    assert plan.writes() == ("redis", "postgres")


@given(session_id=st.text(min_size=1, max_size=40),
       percents=st.tuples(st.floats(0, 100), st.floats(0, 100)))
def test_a_session_in_a_cohort_stays_in_as_the_percentage_grows(
    session_id: str, percents: tuple[float, float]
) -> None:
    low, high = sorted(percents)
    if in_cohort(session_id, low):
        assert in_cohort(session_id, high)


def test_cohorts_take_about_the_share_they_say() -> None:
    ids = [f"sess_{i}" for i in range(20_000)]
    share = sum(in_cohort(sid, 25) for sid in ids) / len(ids)
    assert 0.24 < share < 0.26
    assert not any(in_cohort(sid, 0) for sid in ids)
    assert all(in_cohort(sid, 100) for sid in ids)


def test_every_change_is_announced_to_listeners(
    conn: psycopg.Connection[Any], pg_dsn: str
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as listener:
        listener.execute("LISTEN memshift_plan")
        set_stage(conn, "dual_write", "start")
        ready = select.select([listener.fileno()], [], [], 5)[0]
        assert ready
        notices = list(listener.notifies(timeout=1, stop_after=1))
    assert [(n.channel, n.payload) for n in notices] == [("memshift_plan", "2")]


def test_the_cli_moves_the_plan_and_shows_its_history(pg_dsn: str) -> None:
    env = {"MEMSHIFT_POSTGRES_DSN": pg_dsn, "MEMSHIFT_OPERATOR": "carol"}
    refused = memshift("stage", "set", "shadow", "--reason", "skip", env=env)
    moved = memshift("stage", "set", "dual_write", "--reason", "begin", "--json", env=env)
    shown = memshift("stage", "show", "--json", env=env)
    audit = memshift("plan", "history", "--json", env=env)

    assert refused.returncode == 10 and "one at a time" in refused.stderr
    assert moved.returncode == 0 and json.loads(moved.stdout)["stage"] == "dual_write"
    gates = json.loads(shown.stdout)["next_stage_gates"]
    assert [(g["name"], g["passed"]) for g in gates] == [("backfill complete", False)]
    entries = json.loads(audit.stdout)
    assert [(e["who"], e["why"]) for e in entries] == [("carol", "begin")]


# -- the parity gate: each session's latest check ----------------------------------------


def record_parity(conn: psycopg.Connection[Any], sessions: range, status: str,
                  prefix: str = "s") -> None:
    """One parity result per session, one after the other (as `parity --all` records)."""
    conn.execute(
        "INSERT INTO memshift.parity_results (session_id, status, checks, diffs, checked_at) "
        "SELECT %s || n, %s, '{}', '[]', clock_timestamp() "
        "FROM generate_series(%s::int, %s::int) n",
        (prefix, status, sessions.start, sessions.stop - 1),
    )


def backfilled_into_shadow(conn: psycopg.Connection[Any]) -> None:
    set_stage(conn, "dual_write", "start")
    complete_a_backfill(conn)
    set_stage(conn, "shadow", "backfilled")


def parity_gate(conn: psycopg.Connection[Any]) -> Gate:
    [gate] = [g for g in check_gates(conn, Stage.CUTOVER) if g.name.startswith("parity")]
    return gate


def test_the_parity_gate_counts_every_session_that_fails_its_latest_check(
    conn: psycopg.Connection[Any],
) -> None:
    # The review's story: 30 of 2,012 sessions fail, and `parity --all` records them
    # first; the newest 500 results all pass, which the gate used to read alone.
    backfilled_into_shadow(conn)
    record_parity(conn, range(30), "fail")
    record_parity(conn, range(30, 2012), "pass")

    with pytest.raises(GateRefused) as refused:
        set_stage(conn, "cutover", "go")
    # Sessions repaired and checked again: their older failures no longer count.
    record_parity(conn, range(30), "pass")
    after_repair = parity_gate(conn)
    # A session that cannot be read fails the gate too.
    record_parity(conn, range(0, 11), "error")
    unreadable = parity_gate(conn)
    # A pending check (writes in flight) does not hide the session's latest verdict.
    record_parity(conn, range(0, 11), "pending")
    still_unreadable = parity_gate(conn)

    assert ("gate 'parity pass rate (each session's latest check)' fails (30 of 2,012 "
            "sessions fail their latest parity check (98.51 % pass; need 99.5 %))"
            in str(refused.value))
    assert "`memshift repair --from-parity`, then `memshift parity --all`" in str(refused.value)
    assert after_repair.passed
    assert after_repair.detail == ("0 of 2,012 sessions fail their latest parity check "
                                   "(100.00 % pass; need 99.5 %)")
    assert not unreadable.passed
    assert unreadable.detail == ("11 of 2,012 sessions fail their latest parity check (11 "
                                 "could not be read) (99.45 % pass; need 99.5 %)")
    assert still_unreadable == unreadable


def test_parity_checked_before_a_move_back_to_redis_only_does_not_count(
    conn: psycopg.Connection[Any],
) -> None:
    # Writes made in redis_only reach Redis alone: a pass from before says nothing of
    # PostgreSQL now.
    backfilled_into_shadow(conn)
    record_parity(conn, range(100), "pass")
    before = parity_gate(conn)
    set_stage(conn, "redis_only", "back")
    backfilled_into_shadow(conn)
    after_the_move_back = parity_gate(conn)
    record_parity(conn, range(3), "pass")
    checked_again = parity_gate(conn)

    assert before.passed and "0 of 100 sessions" in before.detail
    assert not after_the_move_back.passed
    assert after_the_move_back.detail.startswith("no parity results yet")
    assert "move back to redis_only" in after_the_move_back.detail
    assert checked_again.passed and "0 of 3 sessions" in checked_again.detail


# -- the backfill gate: unfinished runs, and abandoning one ------------------------------


def leave_a_stuck_run(
    conn: psycopg.Connection[Any], *, idle: str = "1 hour", prefix: str = "agent"
) -> int:
    """What a backfill against a wrong (down) Redis leaves: a run that stays
    "discovering", its source stored with the password removed."""
    row = conn.execute(
        "INSERT INTO memshift.backfill_runs (source, layout, prefix, batch_size, started_at,"
        " updated_at) VALUES ('redis://:***@wrong-host:6379/0', 'reference', %s, 200,"
        " now() - %s::interval, now() - %s::interval) RETURNING run_id", (prefix, idle, idle),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_the_backfill_gate_names_each_unfinished_run_and_how_to_abandon_it(
    conn: psycopg.Connection[Any], pg_dsn: str
) -> None:
    set_stage(conn, "dual_write", "start")
    stuck = leave_a_stuck_run(conn)
    complete_a_backfill(conn)  # the right source, completed since
    env = {"MEMSHIFT_POSTGRES_DSN": pg_dsn, "MEMSHIFT_OPERATOR": "dave"}

    with pytest.raises(GateRefused) as refused:
        set_stage(conn, "shadow", "go")
    unexplained = memshift("backfill", "--abandon", str(stuck), "--reason", " ", env=env)
    abandoned = memshift("backfill", "--abandon", str(stuck), "--reason",
                         "started against the wrong Redis URL", "--json", env=env)
    again = memshift("backfill", "--abandon", str(stuck), "--reason", "twice", env=env)
    unknown = memshift("backfill", "--abandon", "999", "--reason", "typo", env=env)
    status = memshift("backfill", "--status", "--json", env=env)
    shown = memshift("backfill", "--status", env=env)
    row = conn.execute("SELECT state, abandoned_by, abandoned_reason, finished_at IS NOT NULL"
                       " FROM memshift.backfill_runs WHERE run_id = %s", (stuck,)).fetchone()

    message = str(refused.value)
    assert (f"1 unfinished; run {stuck} discovering since " in message
            and "redis://:***@wrong-host:6379/0, prefix 'agent', layout reference" in message)
    assert "`memshift backfill --abandon RUN_ID --reason ...`" in message
    assert unexplained.returncode == 3 and "needs a reason" in unexplained.stderr
    assert abandoned.returncode == 0, abandoned.stderr
    assert json.loads(abandoned.stdout)["state"] == "abandoned"
    assert row == ("abandoned", "dave", "started against the wrong Redis URL", True)
    assert again.returncode == 1 and "abandoned already" in again.stderr
    assert unknown.returncode == 1 and "no backfill run 999" in unknown.stderr
    listed = {r["run_id"]: r for r in json.loads(status.stdout)}
    assert (listed[stuck]["abandoned_by"], listed[stuck]["abandoned_reason"]) == (
        "dave", "started against the wrong Redis URL")
    assert f"run {stuck} was abandoned by dave: started against the wrong Redis URL" in (
        shown.stdout.replace("\n", " "))
    assert set_stage(conn, "shadow", "the stuck run is abandoned").stage is Stage.SHADOW


def test_a_run_that_looks_alive_cannot_be_abandoned(conn: psycopg.Connection[Any]) -> None:
    # A live backfill would go on working on a run marked abandoned.
    discovering = leave_a_stuck_run(conn, idle="2 seconds")
    copying = leave_a_stuck_run(conn, prefix="app")
    conn.execute("UPDATE memshift.backfill_runs SET state = 'copying' WHERE run_id = %s",
                 (copying,))
    conn.execute("INSERT INTO memshift.backfill_batches (run_id, batch_no, session_ids, "
                 "claimed_by, lease_until) VALUES (%s, 0, '{s1}', 'host:1', "
                 "now() + interval '30 seconds')", (copying,))

    with pytest.raises(MemshiftError, match=r"looks alive \(it moved \d+ s ago\)"):
        abandon_run(conn, discovering, "wrong URL", who="dave")
    with pytest.raises(MemshiftError, match=r"looks alive \(a worker holds one of its batches"):
        abandon_run(conn, copying, "wrong URL", who="dave")
    conn.execute("UPDATE memshift.backfill_batches SET lease_until = now() - interval '1 s'")
    assert abandon_run(conn, copying, "its worker died", who="dave").state == "abandoned"
    states = conn.execute("SELECT run_id, state FROM memshift.backfill_runs ORDER BY run_id")
    assert states.fetchall() == [(discovering, "discovering"), (copying, "abandoned")]
