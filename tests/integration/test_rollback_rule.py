"""The rollback rule and the live shadow compare: drift on a cutover slice sends it back."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from memshift.config import Settings
from memshift.migrate.parity import ParityReport, check_session, record
from memshift.migrate.plan import (
    Plan,
    PlanWatcher,
    Slice,
    Stage,
    StaticPlan,
    history,
    load_plan,
    set_slice,
    set_stage,
)
from memshift.migrate.rule import (
    WATCHER,
    enforce_rule,
    evaluate_rule,
    set_rule,
    slice_drift,
    watch,
)
from memshift.model import Checkpoint, Message, Session, SessionState, now
from memshift.sql.queries import query
from memshift.stores.migrating import AsyncMigratingStore, MigratingStore
from memshift.stores.postgres import AsyncPostgresStore, PostgresStore
from memshift.stores.redis import AsyncRedisStore, RedisStore
from tests.integration.test_cli import memshift

T0 = datetime(2026, 5, 19, 10, 0, tzinfo=UTC)


@pytest.fixture
def config(pg_dsn: str, redis_url: str, redis_prefix: str) -> Settings:
    return Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix)


@pytest.fixture
def conn(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
def truth(pg_dsn: str) -> Iterator[PostgresStore]:
    with PostgresStore(pg_dsn) as store:
        yield store


def cut_over(conn: psycopg.Connection[Any], *paths: str) -> Plan:
    set_stage(conn, "dual_write", "go")
    set_stage(conn, "shadow", "go", force=True)
    plan = set_stage(conn, "cutover", "go", force=True)
    for path in paths:
        plan = set_slice(conn, path, 100, "cut it over")
    return plan


def seen(watcher: PlanWatcher, plan: Plan) -> None:
    deadline = time.monotonic() + 5
    while watcher.current()[0].version < plan.version:
        assert time.monotonic() < deadline, "the watcher did not see the change"
        time.sleep(0.01)


def result(sid: str, status: str, *, failed: str | None = None) -> ParityReport:
    checks: dict[str, bool | None] = {"latest_checkpoint_matches": True,
                                      "message_count_matches": True}
    if failed:
        checks[failed] = False
    return ParityReport(sid, checks, status, (), now())  # type: ignore[arg-type]


def results(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT session_id, status, read_path, checks "
                        "FROM memshift.parity_results ORDER BY id").fetchall()


def test_drift_in_cutover_sends_the_slice_back_to_redis_with_an_audit_row(
    config: Settings, conn: psycopg.Connection[Any], truth: PostgresStore, redis_url: str,
    redis_prefix: str, pg_dsn: str, tmp_path: Path,
) -> None:
    plan = cut_over(conn, "resume")
    plan = set_rule(conn, "compare every read", shadow_sample_rate=1.0)
    with PlanWatcher(pg_dsn, poll_seconds=0.1) as watcher:
        seen(watcher, plan)
        store = MigratingStore(RedisStore(redis_url, prefix=redis_prefix), PostgresStore(pg_dsn),
                               watcher, spool_path=tmp_path / "spool",
                               compare_settle_seconds=0.01)
        store.save_session(Session(session_id="s1", tenant_id="acme", created_at=T0,
                                   updated_at=T0))
        store.append_message("s1", Message(message_id="m1", role="user", content="hi", ts=T0))
        store.put_checkpoint("s1", Checkpoint(checkpoint_id="c1", step=1))
        # Drift: PostgreSQL alone gets a newer checkpoint (a buggy writer, say).
        truth.put_checkpoint("s1", Checkpoint(checkpoint_id="c2", parent_id="c1", step=2))

        before = store.read("s1", "resume")
        store.drain_compares()
        fired = enforce_rule(conn)
        seen(watcher, load_plan(conn))
        after = store.read("s1", "resume")
        store.close()

    assert (before.source, before.reason) == ("postgres", "slice")
    assert [(sid, status, path) for sid, status, path, _ in results(conn)] == [
        ("s1", "fail", "resume")]
    assert [f.read_path for f in fired] == ["resume"]
    assert fired[0].critical_failures == {"latest_checkpoint_matches": 1}
    assert load_plan(conn).slices["resume"].percent == 0
    audit = history(conn, 1)[0]
    assert (audit.who, audit.action) == (WATCHER, "rollback")
    assert "rollback rule" in audit.why and "latest_checkpoint_matches (1)" in audit.why
    assert after.source == "redis"
    assert after.state is not None and after.state.latest_checkpoint is not None
    assert after.state.latest_checkpoint.checkpoint_id == "c1"


def test_pending_results_never_fire_the_rule(conn: psycopg.Connection[Any]) -> None:
    cut_over(conn, "resume")
    record(conn, [result(f"s{n}", "pending", failed="latest_checkpoint_matches")
                  for n in range(10)])

    assert evaluate_rule(conn) == []
    assert enforce_rule(conn) == []
    assert load_plan(conn).slices["resume"].percent == 100


def test_drift_fires_only_above_the_rate_of_the_whole_window(
    conn: psycopg.Connection[Any],
) -> None:
    cut_over(conn, "resume")
    set_rule(conn, "tighter", drift_rate=1.0, window=200, critical=[])
    record(conn, [result("a", "fail", failed="message_count_matches"),
                  result("b", "fail", failed="message_count_matches")])
    assert evaluate_rule(conn) == []  # 2 of 200 allowed, even with only 2 results so far

    record(conn, [result("c", "fail", failed="message_count_matches")])
    [firing] = evaluate_rule(conn)
    assert (firing.read_path, firing.failed, firing.judged) == ("resume", 3, 3)
    assert "above 1 % of the last 200" in firing.why()


def test_the_rule_never_re_advances_and_old_failures_do_not_undo_a_persons_re_advance(
    config: Settings, conn: psycopg.Connection[Any],
) -> None:
    cut_over(conn, "resume", "transcript")
    record(conn, [result("s1", "fail", failed="tool_retry_state_matches")])
    first = watch(config, once=True)
    assert sorted(f.read_path for f in first) == ["resume", "transcript"]  # batch: every path

    again = watch(config, once=True)
    plan = load_plan(conn)
    assert again == []
    assert plan.slices["resume"].percent == plan.slices["transcript"].percent == 0

    set_slice(conn, "resume", 50, "fixed the writer; advance again", who="alice")
    assert watch(config, once=True) == []  # the old failure predates alice's change
    assert load_plan(conn).slices["resume"].percent == 50

    conn.execute(
        "INSERT INTO memshift.parity_results (session_id, status, checks, diffs, checked_at, "
        "read_path) VALUES ('s2', 'fail', '{\"tool_retry_state_matches\": false}', '[]', "
        "now(), 'transcript')")
    assert watch(config, once=True) == []  # another path's failure: not resume's evidence
    record(conn, [result("s3", "fail", failed="tool_retry_state_matches")])
    assert [f.read_path for f in watch(config, once=True)] == ["resume"]


class Gate:
    """A compare that waits until the test lets it go: a read must not wait with it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, redis_state: SessionState | None, pg_state: SessionState | None, *,
                 checked_at: datetime) -> ParityReport:
        self.started.set()
        assert self.release.wait(10), "the test never released the compare"
        return check_session(redis_state, pg_state, checked_at=checked_at)


def test_a_sampled_read_returns_before_its_live_compare_finishes_and_the_result_is_kept(
    conn: psycopg.Connection[Any], redis_url: str, redis_prefix: str, pg_dsn: str,
    tmp_path: Path,
) -> None:
    plan = Plan(version=1, stage=Stage.SHADOW, rules={"shadow_sample_rate": 1.0},
                slices={"inspect": Slice(read_path="inspect", percent=100)},
                changed_at=T0, changed_by="test")
    gate = Gate()
    store = MigratingStore(RedisStore(redis_url, prefix=redis_prefix), PostgresStore(pg_dsn),
                           StaticPlan(plan), spool_path=tmp_path / "spool", compare=gate,
                           compare_queue_size=1)
    store.save_session(Session(session_id="s1", tenant_id="acme", created_at=T0, updated_at=T0))

    served = store.read("s1", "inspect")
    assert gate.started.wait(5)
    recorded_while_comparing = results(conn)
    store.read("s1", "inspect")  # queued behind the one under way
    store.read("s1", "inspect")  # the queue (1) is full: dropped, not waited for
    gate.release.set()
    store.drain_compares()
    store.close()

    assert served.source == "redis" and served.state is not None
    assert recorded_while_comparing == []
    rows = results(conn)
    assert [(sid, status, path) for sid, status, path, _ in rows] == [
        ("s1", "pass", "inspect"), ("s1", "pass", "inspect")]
    assert store.stats.shadow == {"sampled": 3, "dropped": 1, "pass": 2}


def test_reads_are_not_compared_outside_shadow_and_cutover_or_at_a_zero_rate(
    conn: psycopg.Connection[Any], redis_url: str, redis_prefix: str, pg_dsn: str,
    tmp_path: Path,
) -> None:
    for stage, rate in (("dual_write", 1.0), ("shadow", 0.0)):
        plan = Plan(version=1, stage=Stage(stage), rules={"shadow_sample_rate": rate},
                    changed_at=T0, changed_by="test")
        store = MigratingStore(RedisStore(redis_url, prefix=redis_prefix),
                               PostgresStore(pg_dsn), StaticPlan(plan),
                               spool_path=tmp_path / "spool")
        store.read("s1", "inspect")
        store.drain_compares()
        store.close()
        assert store.stats.shadow == {}
    assert results(conn) == []


async def test_the_async_router_compares_sampled_reads_off_the_request_path(
    conn: psycopg.Connection[Any], redis_url: str, redis_prefix: str, pg_dsn: str,
    tmp_path: Path,
) -> None:
    plan = Plan(version=1, stage=Stage.SHADOW, rules={"shadow_sample_rate": 1.0},
                changed_at=T0, changed_by="test")

    def compare(redis_state: SessionState | None, pg_state: SessionState | None, *,
             checked_at: datetime) -> ParityReport:
        return check_session(redis_state, pg_state, checked_at=checked_at)

    async with AsyncMigratingStore(
        AsyncRedisStore(redis_url, prefix=redis_prefix), AsyncPostgresStore(pg_dsn),
        StaticPlan(plan), spool_path=tmp_path / "spool", compare=compare,
    ) as store:
        await store.save_session(Session(session_id="s1", tenant_id="acme", created_at=T0,
                                         updated_at=T0))
        await store.read("s1", "transcript")
        await store.drain_compares()

    assert [(sid, status, path) for sid, status, path, _ in results(conn)] == [
        ("s1", "pass", "transcript")]


def test_the_cli_sets_the_rule_and_watch_once_reports_as_json(
    pg_dsn: str, conn: psycopg.Connection[Any],
) -> None:
    env = {"MEMSHIFT_POSTGRES_DSN": pg_dsn}
    cut_over(conn, "resume")
    shown = memshift("rule", "set", "--drift-rate", "0.5", "--window", "500", "--critical",
                     "latest_checkpoint_matches,tool_retry_state_matches",
                     "--shadow-sample-rate", "0.05", "--reason", "per DESIGN §5", "--json",
                     env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["shadow_sample_rate"] == 0.05
    bad = memshift("rule", "set", "--critical", "no_such_check", "--reason", "x", env=env)
    assert bad.returncode == 3 and "no_such_check" in bad.stderr

    record(conn, [result("s1", "fail", failed="latest_checkpoint_matches")])
    watched = memshift("watch", "--once", "--json", env=env)

    assert watched.returncode == 0, watched.stderr
    [line] = [json.loads(text) for text in watched.stdout.splitlines()]
    assert [f["read_path"] for f in line["fired"]] == ["resume"]
    assert load_plan(conn).slices["resume"].percent == 0


def live(conn: psycopg.Connection[Any], sid: str, status: str, read_path: str,
         failed: str | None = None) -> None:
    """Record a result as the router's live compare of ``read_path`` does."""
    report = result(sid, status, failed=failed)
    conn.execute(query("parity_record_live"), {
        "session_id": sid, "status": status, "checks": Jsonb(report.checks),
        "diffs": Jsonb([]), "checked_at": report.checked_at, "read_path": read_path})


def test_drift_is_shown_per_read_path_over_the_rules_window(
    conn: psycopg.Connection[Any],
) -> None:
    cut_over(conn, "resume", "transcript")
    set_rule(conn, "a window of 3", window=3, drift_rate=50, critical=[])
    live(conn, "s1", "fail", "resume", failed="message_count_matches")
    live(conn, "s2", "pass", "inspect")  # a path with no slice: shown, never acted on
    live(conn, "s3", "pending", "resume", failed="message_count_matches")  # not judged
    record(conn, [result("s4", "pass")])  # batch: counts for every path
    for n in range(4):
        live(conn, f"t{n}", "pass", "transcript")  # only the latest 3 are in the window

    drift = {d.read_path: d for d in slice_drift(conn)}

    assert sorted(drift) == ["inspect", "resume", "transcript"]
    resume, transcript, inspect = drift["resume"], drift["transcript"], drift["inspect"]
    assert (resume.percent, resume.judged, resume.live, resume.failed) == (100, 2, 1, 1)
    assert resume.drift_rate == 50.0 and not resume.over_rule  # 1 is not above 50 % of 3
    assert (transcript.judged, transcript.live, transcript.failed) == (3, 3, 0)
    assert (inspect.percent, inspect.judged, inspect.live) == (None, 2, 1)
    assert evaluate_rule(conn) == []

    live(conn, "s5", "fail", "resume", failed="message_count_matches")
    [firing] = evaluate_rule(conn)
    [again] = [d for d in slice_drift(conn) if d.read_path == "resume"]
    assert firing.read_path == "resume" and again.over_rule
    assert (again.judged, again.failed, round(again.drift_rate, 2)) == (3, 2, 66.67)

    enforce_rule(conn)  # the rollback is a change of the slice: its window starts afresh
    [after] = [d for d in slice_drift(conn) if d.read_path == "resume"]
    assert (after.percent, after.judged, after.failed) == (0, 0, 0)


def test_rule_show_prints_the_drift_of_each_read_path(
    pg_dsn: str, conn: psycopg.Connection[Any],
) -> None:
    cut_over(conn, "resume")
    live(conn, "s1", "fail", "resume", failed="latest_checkpoint_matches")
    live(conn, "s2", "pass", "resume")

    shown = memshift("rule", "show", "--json", env={"MEMSHIFT_POSTGRES_DSN": pg_dsn})
    table = memshift("rule", "show", env={"MEMSHIFT_POSTGRES_DSN": pg_dsn})

    assert shown.returncode == 0 and table.returncode == 0, shown.stderr + table.stderr
    [resume] = json.loads(shown.stdout)["slices"]
    assert resume | {"since": None} == {
        "read_path": "resume", "percent": 100.0, "judged": 2, "failed": 1, "live": 2,
        "batch": 0, "drift_rate": 50.0, "critical_failures": {"latest_checkpoint_matches": 1},
        "since": None, "over_rule": True}
    assert "drift per read path" in table.stdout and "resume" in table.stdout
    assert "50.00 %" in table.stdout and "fires" in table.stdout
