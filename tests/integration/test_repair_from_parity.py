"""`memshift repair --from-parity`: the sessions parity last judged `fail` are queued for
a whole-session repair from the Plan's primary, then drained like any repair."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.types.json import Jsonb

from memshift.config import Settings
from memshift.migrate.parity import ParityOptions, parity
from memshift.migrate.plan import Stage, load_plan, set_stage
from memshift.migrate.repair import RepairRefused, queue_parity_failures, repair
from memshift.model import now
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from tests.integration.test_cli import memshift
from tests.integration.test_router import assert_stores_agree, message, queued, session


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


def move_to(pg_dsn: str, stage: Stage) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for step in list(Stage)[load_plan(conn).stage.order + 1: stage.order + 1]:
            set_stage(conn, step, "test", force=True)


def both(legacy: RedisStore, truth: PostgresStore, sid: str, messages: int) -> None:
    """A session with ``messages`` messages in each store: twins."""
    for store in (legacy, truth):
        store.save_session(session(sid))
        for n in range(messages):
            store.append_message(sid, message(n).model_copy(update={"seq": n}))


def judge(config: Settings, *ids: str) -> dict[str, str]:
    reports = parity(config, session_ids=list(ids), options=ParityOptions(settle_seconds=0))
    return {r.session_id: r.parity_status for r in reports}


def record(pg_dsn: str, sid: str, status: str) -> None:
    """A parity result as a run would leave it (for statuses a test cannot provoke)."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO memshift.parity_results (session_id, status, checks, diffs,"
                     " checked_at) VALUES (%s, %s, %s, %s, %s)",
                     (sid, status, Jsonb({}), Jsonb([]), now()))


def test_sessions_whose_latest_parity_result_fails_are_queued_and_repaired_from_the_primary(
    config: Settings, pg_dsn: str, legacy: RedisStore, truth: PostgresStore
) -> None:
    move_to(pg_dsn, Stage.DUAL_WRITE)
    for sid in ("lost", "healed", "errored", "settling", "fine"):
        both(legacy, truth, sid, 2)
    for sid in ("lost", "healed"):  # Redis (the primary) acknowledged a third message
        legacy.append_message(sid, message(2))
    first = judge(config, "lost", "healed", "errored", "settling", "fine")
    truth.append_message("healed", message(2).model_copy(update={"seq": 2}))
    second = judge(config, "healed")
    record(pg_dsn, "errored", "fail")
    record(pg_dsn, "errored", "error")  # its latest result is not a failure
    record(pg_dsn, "settling", "pending")

    summary = repair(config, from_parity=True)

    assert first == {"lost": "fail", "healed": "fail", "errored": "pass", "settling": "pass",
                     "fine": "pass"}
    assert second == {"healed": "pass"}
    assert summary.from_parity is not None
    assert summary.from_parity.as_json() == {"failing": 1, "queued": 1, "already_queued": 0,
                                             "source": "redis", "target": "postgres"}
    assert (summary.sessions_repaired, summary.failed, summary.remaining) == (1, [], 0)
    assert_stores_agree(legacy, truth, "lost")
    assert judge(config, "lost") == {"lost": "pass"}


def test_queueing_twice_queues_a_session_once(
    config: Settings, pg_dsn: str, legacy: RedisStore, truth: PostgresStore
) -> None:
    move_to(pg_dsn, Stage.DUAL_WRITE)
    both(legacy, truth, "lost", 1)
    legacy.append_message("lost", message(1))
    judge(config, "lost")

    first, second = queue_parity_failures(config), queue_parity_failures(config)

    assert (first.queued, first.already_queued) == (1, 0)
    assert (second.queued, second.already_queued) == (0, 1)
    assert [row[:2] for row in queued(pg_dsn)] == [("lost", "postgres")]


def test_in_pg_primary_redis_is_repaired_from_postgresql(
    config: Settings, pg_dsn: str, legacy: RedisStore, truth: PostgresStore
) -> None:
    move_to(pg_dsn, Stage.PG_PRIMARY)
    both(legacy, truth, "behind", 1)
    truth.append_message("behind", message(1))  # the copy to Redis never happened
    judge(config, "behind")

    summary = repair(config, from_parity=True)

    assert summary.from_parity is not None
    assert (summary.from_parity.source, summary.from_parity.target) == ("postgres", "redis")
    assert summary.sessions_repaired == 1
    assert_stores_agree(legacy, truth, "behind")


def test_in_retired_nothing_is_queued_and_the_refusal_says_why(
    config: Settings, pg_dsn: str, legacy: RedisStore, truth: PostgresStore
) -> None:
    move_to(pg_dsn, Stage.RETIRED)
    both(legacy, truth, "old", 1)
    truth.append_message("old", message(1))
    judge(config, "old")

    with pytest.raises(RepairRefused, match="retired: Redis is only a cache"):
        queue_parity_failures(config)
    assert queued(pg_dsn) == []


def test_the_command_reports_what_it_queued_then_drains(
    pg_dsn: str, redis_url: str, redis_prefix: str, config: Settings, legacy: RedisStore,
    truth: PostgresStore,
) -> None:
    move_to(pg_dsn, Stage.DUAL_WRITE)
    both(legacy, truth, "lost", 1)
    legacy.append_message("lost", message(1))
    judge(config, "lost")
    flags = ["--redis-url", redis_url, "--postgres-dsn", pg_dsn, "--prefix", redis_prefix]

    as_json = memshift(*flags, "repair", "--from-parity", "--json")
    again = memshift(*flags, "repair", "--from-parity")

    assert as_json.returncode == 0, as_json.stderr
    summary = json.loads(as_json.stdout)
    assert summary["from_parity"] == {"failing": 1, "queued": 1, "already_queued": 0,
                                      "source": "redis", "target": "postgres"}
    assert summary["sessions_repaired"] == 1 and summary["remaining"] == 0
    # Parity has not run since: the session is queued (and repaired) again, harmlessly.
    assert again.returncode == 0, again.stderr
    assert "queued 1 session(s) whose latest parity result is a failure" in again.stdout
    assert "from redis into postgres" in again.stdout
    assert_stores_agree(legacy, truth, "lost")
