"""Rehearsal: a session resumes the same from both stores, or the difference is named."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from memshift.config import Settings
from memshift.migrate import repair as repair_module
from memshift.migrate.plan import load_plan
from memshift.migrate.rehearse import _Acked, drill_pg_outage, rehearse
from memshift.migrate.repair import RepairSummary
from memshift.model import SessionState, ToolRun
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from tests.integration.test_cli import memshift
from tests.integration.test_parity import (
    SECRET,
    _seed_checkpoint,
    _seed_message_order,
    full_session,
    migrated,
)


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


def _seed_tool_retry(state: SessionState, legacy: RedisStore, truth: PostgresStore,
                     raw: redis.Redis, pg_dsn: str) -> None:
    run = ToolRun(tool_call_id="retry-me", name="web_search", status="retrying", attempts=2)
    legacy.upsert_tool_run(state.session_id, run)
    truth.upsert_tool_run(state.session_id, run.model_copy(update={"attempts": 3}))


SEEDS = {
    "transcript": _seed_message_order,
    "latest_checkpoint": _seed_checkpoint,
    "pending_tool_retries": _seed_tool_retry,
}


def test_identical_sessions_resume_the_same(config: Settings, legacy: RedisStore) -> None:
    ids = migrated(config, legacy)

    results = list(rehearse(config, sample=len(ids)))

    assert sorted(r.session_id for r in results) == sorted(ids)
    assert {r.verdict for r in results} == {"same"}
    assert all(r.resumes is not None and r.diffs == () for r in results)


@pytest.mark.parametrize("area", list(SEEDS))
def test_a_divergence_is_reported_with_its_session_and_only_its_area(
    area: str, config: Settings, legacy: RedisStore, truth: PostgresStore, raw: redis.Redis,
    pg_dsn: str,
) -> None:
    ids = migrated(config, legacy)
    state = full_session(legacy, ids)
    SEEDS[area](state, legacy, truth, raw, pg_dsn)

    results = {r.session_id: r for r in rehearse(config, session_ids=ids)}

    drifted = results.pop(state.session_id)
    assert drifted.verdict == "differs"
    assert {d.check for d in drifted.diffs} == {area}
    assert {r.verdict for r in results.values()} == {"same"}


def test_the_cli_gives_a_verdict_per_session_hides_values_and_exits_1_on_a_difference(
    config: Settings, legacy: RedisStore, truth: PostgresStore, raw: redis.Redis, pg_dsn: str
) -> None:
    ids = migrated(config, legacy)
    state = full_session(legacy, ids)
    env = {"MEMSHIFT_POSTGRES_DSN": pg_dsn, "MEMSHIFT_REDIS_URL": config.redis_url or "",
           "MEMSHIFT_PREFIX": config.prefix}
    clean = memshift("rehearse", "--sample", str(len(ids)), env=env)
    _seed_message_order(state, legacy, truth, raw, pg_dsn)

    table = memshift("rehearse", "--sample", str(len(ids)), env=env)
    lines = memshift("rehearse", "--session", state.session_id, "--json", env=env)
    revealed = memshift("rehearse", "--session", state.session_id, "--json", "--show-values",
                        env=env)

    assert clean.returncode == 0, clean.stderr
    assert f"{len(ids)} session(s) rehearsed: {len(ids)} same" in clean.stdout
    assert table.returncode == 1 and lines.returncode == 1
    assert state.session_id in table.stdout and "overall differs" in table.stdout
    assert SECRET not in table.stdout + table.stderr + lines.stdout + lines.stderr
    verdict, overall = [json.loads(line) for line in lines.stdout.splitlines()]
    assert verdict["session_id"] == state.session_id and verdict["verdict"] == "differs"
    (diff,) = verdict["diffs"]
    assert diff["redis"] == {"length": len(SECRET), "sha256": diff["redis"]["sha256"]}
    assert overall == {"overall": "differs", "same": 0, "differs": 1, "error": 0}
    assert SECRET in revealed.stdout


def test_the_kill_backfill_drill_finds_the_truth_intact(
    config: Settings, redis_url: str, redis_prefix: str, truth: PostgresStore
) -> None:
    from memshift.migrate.rehearse import drill_kill_backfill

    report = drill_kill_backfill(config, sessions=120, kills=3, seed=11)

    figures = {f.name: f.value for f in report.figures}
    assert report.verdict == "pass", [f for f in report.figures if not f.ok]
    assert report.prefix.startswith(f"{redis_prefix}-drill-")
    assert figures["kills"] == 3 and figures["sessions"] == 120
    assert figures["messages in Redis"] == figures["messages in PostgreSQL"] > 0
    assert (figures["parity pass"], figures["parity fail"], figures["parity pending"],
            figures["parity error"]) == (120, 0, 0, 0)
    assert figures["backfill run state"] == "completed" and figures["backfill runs"] == 1
    assert figures["backfill sessions done"] == 120 and figures["backfill quarantined"] == 0
    assert figures["plan stage"] == "redis_only" and figures["plan version"] >= 1
    # Both stores are left clean: synthetic sessions must not read as drift later.
    client = redis.Redis.from_url(redis_url)
    assert list(client.scan_iter(match=f"{report.prefix}:*")) == []
    client.close()
    assert truth.load_sessions(report.session_ids) == dict.fromkeys(report.session_ids)


def test_the_drill_from_the_command_line(pg_dsn: str, redis_url: str, redis_prefix: str) -> None:
    result = memshift("rehearse", "--drill", "kill-backfill", "--sessions", "40", "--kills",
                      "1", "--json", env={"MEMSHIFT_POSTGRES_DSN": pg_dsn,
                                          "MEMSHIFT_REDIS_URL": redis_url,
                                          "MEMSHIFT_PREFIX": redis_prefix})

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["verdict"] == "pass" and data["sessions"] == 40
    assert {f["figure"] for f in data["figures"]} >= {"kills", "parity pass", "plan stage"}


def _figures(report: Any) -> dict[str, Any]:
    return {f.name: f.value for f in report.figures}


def _scratch_left(pg_dsn: str, prefix: str) -> list[str]:
    token = prefix.rsplit("-", 1)[1]
    with psycopg.connect(pg_dsn) as conn:
        return [row[0] for row in conn.execute(
            "SELECT datname FROM pg_database WHERE datname = %s", (f"memshift_drill_{token}",))]


def test_the_pg_outage_drill_loses_no_write_and_leaves_the_truth_intact(
    config: Settings, pg_dsn: str, redis_url: str, redis_prefix: str,
) -> None:
    with psycopg.connect(pg_dsn) as conn:
        plan_before = load_plan(conn)

    report = drill_pg_outage(config, sessions=12, outage=1.5, workers=3, seed=5)

    figures = _figures(report)
    assert report.verdict == "pass", [f for f in report.figures if not f.ok]
    assert figures["outage"] == "hang 0.5 s, refuse 0.5 s, cut 0.5 s"
    assert figures["failed user writes"] == 0 and figures["writes attempted"] > 0
    assert figures["PostgreSQL writes failed (secondary)"] > 0  # the outage was real
    assert figures["repair queue depth at peak (spool + queue)"] > 0
    assert figures["left in the repair queue and spool"] == figures["repair failures"] == 0
    assert isinstance(figures["time to drain after the heal (s)"], float)
    assert (figures["messages acknowledged"] == figures["messages in Redis"]
            == figures["messages in PostgreSQL"] > 0)
    assert figures["reads older than an acknowledged write"] == 0
    assert (figures["parity pass"], figures["parity fail"], figures["parity pending"],
            figures["parity error"]) == (12, 0, 0, 0)
    assert figures["sessions that resume the same from both stores"] == 12
    assert (figures["plan stage"], figures["plan watcher fresh again, at that version"],
            figures["rollback rule firings"]) == ("dual_write", True, 0)
    # Nothing left behind: no keys, no scratch database, and the real database untouched.
    client = redis.Redis.from_url(redis_url)
    assert list(client.scan_iter(match=f"{report.prefix}:*")) == []
    client.close()
    assert _scratch_left(pg_dsn, report.prefix) == []
    with psycopg.connect(pg_dsn) as conn:
        assert load_plan(conn).version == plan_before.version
        assert conn.execute(
            "SELECT (SELECT count(*) FROM memshift.sessions), "
            "(SELECT count(*) FROM memshift.repair_queue), "
            "(SELECT count(*) FROM memshift.parity_results)").fetchone() == (0, 0, 0)


def test_the_pg_outage_drill_says_so_when_repair_does_not_drain(
    config: Settings, pg_dsn: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A repair that never copies anything: the drill must not report a pass.
    monkeypatch.setattr(repair_module, "repair", lambda settings, **_: RepairSummary())

    report = drill_pg_outage(config, sessions=8, outage=1.0, workers=2, faults=["refuse"],
                             seed=7)

    figures = _figures(report)
    off = {f.name for f in report.figures if not f.ok}
    assert report.verdict == "fail"
    assert figures["time to drain after the heal (s)"] == "not drained"
    assert figures["left in the repair queue and spool"] > 0
    assert {"time to drain after the heal (s)", "left in the repair queue and spool"} <= off
    assert figures["failed user writes"] == 0  # Redis, the primary, took every write
    assert _scratch_left(pg_dsn, report.prefix) == []


def test_the_pg_outage_drill_in_cutover_from_the_command_line(
    pg_dsn: str, redis_url: str, redis_prefix: str,
) -> None:
    result = memshift("rehearse", "--drill", "pg-outage", "--stage", "cutover", "--outage",
                      "1.5", "--sessions", "10", "--workers", "2", "--json",
                      env={"MEMSHIFT_POSTGRES_DSN": pg_dsn, "MEMSHIFT_REDIS_URL": redis_url,
                           "MEMSHIFT_PREFIX": redis_prefix})

    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    figures = {f["figure"]: f["value"] for f in data["figures"]}
    assert data["verdict"] == "pass" and data["sessions"] == 10
    assert figures["plan stage"] == "cutover"
    assert "postgres/slice" in figures["reads served by (store/reason)"]
    assert figures["reads older than an acknowledged write"] == 0
    assert figures["failed reads"] == figures["failed user writes"] == 0


def test_a_read_older_than_an_acknowledged_write_is_named() -> None:
    acked = _Acked(messages=3, step=2, summary=1, attempts={"call_1": 2})
    state = SessionState.model_validate({
        "session": {"session_id": "s1"},
        "messages": [{"seq": n, "message_id": f"m{n}", "role": "user", "content": "x"}
                     for n in range(3)],
        "checkpoints": [{"checkpoint_id": "c2", "step": 2}],
        "summaries": [{"version": 1, "text": "t"}],
        "tool_runs": [{"tool_call_id": "call_1", "name": "web_search", "attempts": 1}],
    })

    assert acked.behind(state) == "tool run call_1 at 1 attempts, 2 acknowledged"
    assert acked.behind(state.model_copy(update={"messages": state.messages[:2]})) == (
        "2 messages, 3 acknowledged")
    assert _Acked(messages=3, step=2, summary=1, attempts={"call_1": 1}).behind(state) is None
    assert acked.behind(None) == "the session is missing"
