"""Rehearsal: a session resumes the same from both stores, or the difference is named."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from memshift.config import Settings
from memshift.migrate.rehearse import rehearse
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
