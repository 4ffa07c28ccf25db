"""memshift inspect: one session in both stores side by side, its diffs, where its reads
go under the Plan, and its repair and quarantine entries."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import redis

from memshift.config import Settings
from memshift.faults.proxy import FaultProxy
from memshift.generate import generate_sessions
from memshift.inspect import NotInEitherStore, inspect_session
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.migrate.parity import parity
from memshift.migrate.plan import StaticPlan, in_cohort, set_slice, set_stage
from memshift.model import Message, SessionState
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from tests.integration.test_cli import memshift
from tests.integration.test_router import T0, plan_at, session

SECRET = "the-launch-code-is-0000"


@pytest.fixture
def config(pg_dsn: str, redis_url: str, redis_prefix: str) -> Settings:
    return Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix)


@pytest.fixture
def legacy(redis_url: str, redis_prefix: str) -> Iterator[RedisStore]:
    with RedisStore(redis_url, prefix=redis_prefix) as store:
        yield store


def cli(config: Settings, *args: str) -> tuple[int, str, str]:
    assert config.redis_url and config.postgres_dsn
    done = memshift("--redis-url", config.redis_url, "--postgres-dsn", config.postgres_dsn,
                    "--prefix", config.prefix, *args)
    return done.returncode, done.stdout, done.stderr


def migrated(config: Settings, legacy: RedisStore, count: int = 6) -> list[SessionState]:
    """Sessions the legacy app wrote to Redis, backfilled: identical in both stores."""
    ids = []
    for generated in generate_sessions(count, seed=5):
        generated.play(legacy)
        ids.append(generated.session_id)
    backfill(config, BackfillOptions(prefix=config.prefix))
    states = [legacy.load_session(sid) for sid in ids]
    return [s for s in states if s is not None]


def with_parts(states: list[SessionState]) -> SessionState:
    for state in states:
        if state.messages and state.tool_runs and any(t.attempts for t in state.tool_runs):
            return state
    raise AssertionError("no generated session has messages and a retried tool run")


def redis_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        pytest.skip(f"Redis is not reached over TCP here ({url!r}); no fault proxy")
    return parts.hostname, parts.port or 6379


def sql(pg_dsn: str, statement: str, *params: object) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(statement, params)


def test_a_message_altered_in_postgres_shows_in_the_diffs_redacted(
    config: Settings, legacy: RedisStore, pg_dsn: str
) -> None:
    state = with_parts(migrated(config, legacy))
    sid, last = state.session_id, state.messages[-1]
    sql(pg_dsn, "UPDATE memshift.messages SET content = %s WHERE session_id = %s AND seq = %s",
        SECRET, sid, last.seq)

    found = inspect_session(config, sid)
    code, text, _ = cli(config, "inspect", sid)
    shown_code, shown, _ = cli(config, "inspect", sid, "--show-values")

    assert found.report.parity_status == "fail"
    assert found.report.failed_checks == ["message_order_matches"]
    (diff,) = found.as_json()["comparison"]["diffs"]
    assert diff["field"] == f"messages[seq={last.seq}].content"
    assert diff["postgres"] == {"length": len(SECRET), "sha256": diff["postgres"]["sha256"]}
    differing = [r for r in found.side_by_side() if r.differs]
    assert [(r.section, r.field) for r in differing] == [("transcript", f"seq {last.seq}")]
    assert code == 0 and "message_order_matches" in text and f"seq={last.seq}" in text
    assert SECRET not in text and SECRET not in json.dumps(found.as_json())
    assert shown_code == 0 and SECRET in shown


def test_tool_attempts_reset_in_postgres_show_as_retry_drift_in_json(
    config: Settings, legacy: RedisStore, pg_dsn: str
) -> None:
    state = with_parts(migrated(config, legacy))
    run = next(t for t in state.tool_runs if t.attempts)
    sql(pg_dsn, "UPDATE memshift.tool_runs SET attempts = 0 "
                "WHERE session_id = %s AND tool_call_id = %s", state.session_id, run.tool_call_id)

    code, out, _ = cli(config, "inspect", state.session_id, "--json")

    assert code == 0
    shown = json.loads(out)
    assert shown["comparison"]["parity_status"] == "fail"
    assert shown["comparison"]["diffs"] == [{
        "check": "tool_retry_state_matches", "field": f"tool_runs[{run.tool_call_id}].attempts",
        "redis": run.attempts, "postgres": 0}]
    by_store = {s: {t["tool_call_id"]: t["attempts"] for t in shown["stores"][s]["tool_runs"]}
                for s in ("redis", "postgres")}
    assert by_store["redis"][run.tool_call_id] == run.attempts
    assert by_store["postgres"][run.tool_call_id] == 0
    assert shown["stores"]["redis"]["message_count"] == state.message_count
    assert shown["plan"]["stage"] == "redis_only"


def test_recorded_parity_results_are_listed_newest_first(
    config: Settings, legacy: RedisStore, pg_dsn: str
) -> None:
    state = with_parts(migrated(config, legacy))
    list(parity(config, session_ids=[state.session_id]))
    sql(pg_dsn, "UPDATE memshift.sessions SET status = 'failed' WHERE session_id = %s",
        state.session_id)
    list(parity(config, session_ids=[state.session_id]))

    found = inspect_session(config, state.session_id)

    assert [r.status for r in found.parity_results] == ["fail", "pass"]
    assert found.parity_results[0].failed_checks == ["session_status_matches"]


def test_read_paths_are_served_as_the_plan_says(
    config: Settings, legacy: RedisStore, pg_dsn: str
) -> None:
    states = migrated(config, legacy, count=12)
    inside = next(s for s in states if in_cohort(s.session_id, 50))
    outside = next(s for s in states if not in_cohort(s.session_id, 50))
    tenant = inside.session.tenant_id
    assert tenant is not None
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for stage in ("dual_write", "shadow", "cutover"):
            set_stage(conn, stage, "test", force=True)
        set_slice(conn, "resume", 50, "half")
        set_slice(conn, "search", 100, "all but one tenant", tenant_deny=(tenant,))

    def routes(sid: str) -> dict[str, tuple[str, str]]:
        return {r.read_path: (r.store, r.reason) for r in inspect_session(config, sid).routes}

    in_cutover, out_cutover = routes(inside.session_id), routes(outside.session_id)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        set_stage(conn, "pg_primary", "test", force=True)
    in_pg_primary = routes(inside.session_id)

    assert in_cutover == {"default": ("redis", "stage"), "resume": ("postgres", "slice"),
                          "search": ("redis", "stage")}
    assert out_cutover["resume"] == ("redis", "stage")
    assert in_pg_primary == {path: ("postgres", "stage") for path in in_cutover}


def test_a_failed_secondary_write_shows_in_the_repair_queue_and_keeps_reads_off_redis(
    config: Settings, pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for stage in ("dual_write", "shadow", "cutover", "pg_primary"):
            set_stage(conn, stage, "test", force=True)
    with FaultProxy(*redis_address(redis_url)) as proxy:
        store = MigratingStore(RedisStore(proxy.redis_url_for(redis_url), prefix=redis_prefix),
                               PostgresStore(pg_dsn), StaticPlan(plan_at("pg_primary")),
                               spool_path=tmp_path / "spool")
        store.save_session(session("s1"))
        proxy.refuse()
        proxy.cut()
        store.append_message("s1", Message(message_id="m1", role="user", content="hi", ts=T0))
        store.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        set_stage(conn, "cutover", "rolled back while a repair is queued")

    found = inspect_session(config, "s1")
    code, text, _ = cli(config, "inspect", "s1")

    ((entry_target, operation),) = [(r.target, r.operation) for r in found.repairs]
    assert (entry_target, operation) == ("redis", "append_message")
    assert found.report.failed_checks == ["message_count_matches"]
    assert {r.read_path: (r.store, r.reason) for r in found.routes} == {
        "default": ("postgres", "repair_pending")}
    assert code == 0 and "repair queue" in text and "append_message" in text


def test_a_session_only_postgres_holds_is_shown_with_the_presence_diff(
    config: Settings, pg_dsn: str
) -> None:
    with PostgresStore(pg_dsn) as truth:
        truth.save_session(session("only-pg"))

    found = inspect_session(config, "only-pg")

    assert (found.redis, found.redis_error) == (None, None)
    assert found.postgres is not None
    assert found.report.failed_checks == ["presence_matches"]
    assert found.side_by_side()[0].redis == "no" and found.side_by_side()[0].postgres == "yes"


def test_a_quarantined_session_shows_its_entry_and_why_redis_cannot_read_it(
    config: Settings, legacy: RedisStore, redis_url: str
) -> None:
    legacy.save_session(session("broken"))
    client = redis.Redis.from_url(redis_url)
    client.rpush(legacy.layout.session_keys("broken")[1], b"{not json")
    client.close()
    backfill(config, BackfillOptions(prefix=config.prefix))

    found = inspect_session(config, "broken")

    assert [q.state for q in found.quarantine] == ["open"]
    assert found.redis_error is not None and "broken" in found.redis_error
    assert found.report.parity_status == "error"


def test_a_quarantined_records_text_is_shown_as_length_and_hash_unless_values_are_asked(
    config: Settings, legacy: RedisStore, redis_url: str
) -> None:
    legacy.save_session(session("leaky"))
    client = redis.Redis.from_url(redis_url)
    client.rpush(legacy.layout.session_keys("leaky")[1],
                 json.dumps({"id": "m0", "role": "user", "content": SECRET}).encode()[:-2])
    client.close()
    backfill(config, BackfillOptions(prefix=config.prefix))

    listed = cli(config, "quarantine", "list", "--json")
    (entry,) = json.loads(listed[1])
    hidden = {
        "list": listed, "list table": cli(config, "quarantine", "list"),
        "show": cli(config, "quarantine", "show", str(entry["id"]), "--json"),
        "show text": cli(config, "quarantine", "show", str(entry["id"])),
        "inspect": cli(config, "inspect", "leaky", "--json"),
        "inspect text": cli(config, "inspect", "leaky"),
    }
    shown = {
        "list": cli(config, "quarantine", "list", "--json", "--show-values"),
        "show": cli(config, "quarantine", "show", str(entry["id"]), "--show-values"),
        "inspect": cli(config, "inspect", "leaky", "--json", "--show-values"),
        "inspect text": cli(config, "inspect", "leaky", "--show-values"),
    }

    assert entry["session_id"] == "leaky"
    assert "key" in entry["reason"] and "is not valid JSON" in entry["reason"]
    assert f"{config.prefix}:session:leaky:messages" in entry["reason"]
    for name, (code, out, _) in hidden.items():
        assert code == 0 and "leaky" in out and SECRET not in out, name
    for name, (code, out, _) in shown.items():
        assert code == 0 and SECRET in out, name


def test_a_session_in_neither_store_is_not_found(config: Settings) -> None:
    with pytest.raises(NotInEitherStore, match="neither Redis"):
        inspect_session(config, "nobody")
    code, _, err = cli(config, "inspect", "nobody")
    assert code == 4 and "nobody" in err and "Traceback" not in err
