"""Prometheus metrics: the router's instruments and the state collector, scraped for real."""

from __future__ import annotations

import json
import logging
import re
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.types.json import Jsonb

from memshift.config import Settings
from memshift.errors import ConfigError
from memshift.faults.proxy import FaultProxy
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.migrate.parity import ParityReport, record
from memshift.migrate.plan import StaticPlan, load_plan, rollback, set_slice, set_stage
from memshift.migrate.rule import WATCHER, enforce_rule, set_rule, slice_drift
from memshift.model import now
from memshift.observe import metrics
from memshift.sql.queries import query
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore
from tests.integration.test_router import message, plan_at, session

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
Labels = dict[str, str]


def scrape() -> dict[str, list[tuple[Labels, float]]]:
    """Every sample of the registry by sample name (``_total``, ``_bucket`` included)."""
    text = generate_latest(metrics.REGISTRY).decode()
    samples: dict[str, list[tuple[Labels, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def value(samples: dict[str, list[tuple[Labels, float]]], name: str, **labels: str) -> float:
    """The sample with these labels (0 when absent: a counter not moved yet)."""
    for have, number in samples.get(name, []):
        if all(have.get(k) == v for k, v in labels.items()):
            return number
    return 0.0


def moved(before: dict[str, Any], after: dict[str, Any], name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture
def conn(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
def state(pg_dsn: str) -> str:
    """The state collector, reading this test's database."""
    metrics.install_state_collector(pg_dsn)
    return pg_dsn


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[FaultProxy]:
    client = redis.Redis.from_url(redis_url)
    params = client.connection_pool.connection_kwargs
    client.close()
    with FaultProxy(str(params.get("host", "127.0.0.1")), int(params.get("port", 6379))) as made:
        yield made


def router(redis_url: str, redis_prefix: str, pg_dsn: str, plan: Any, tmp_path: Path,
           ) -> MigratingStore:
    return MigratingStore(RedisStore(redis_url, prefix=redis_prefix), PostgresStore(pg_dsn),
                          plan, spool_path=tmp_path / "repair.spool")


# -- the router's instruments ---------------------------------------------------------------


def test_dual_write_counts_each_write_in_both_stores_and_times_it(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    before = scrape()
    with router(redis_url, redis_prefix, pg_dsn, StaticPlan(plan_at("dual_write")),
                tmp_path) as store:
        store.save_session(session("s1"))
        for n in range(3):
            store.append_message("s1", message(n))
        store.read("s1", "metrics-dual")
    after = scrape()

    for name in ("redis", "postgres"):
        assert moved(before, after, "memshift_store_ops_total",
                     store=name, op="append_message", result="ok") == 3
        assert moved(before, after, "memshift_store_op_seconds_count",
                     store=name, op="append_message") == 3
        assert moved(before, after, "memshift_store_ops_total",
                     store=name, op="save_session", result="ok") == 1
    assert moved(before, after, "memshift_reads_total",
                 path="metrics-dual", source="redis", reason="stage") == 1
    assert moved(before, after, "memshift_store_ops_total",
                 store="redis", op="load_session", result="ok") == 1


def test_cutover_reads_count_where_each_read_path_was_served(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    plan = StaticPlan(plan_at("cutover", **{"metrics-cut": 100}))
    with router(redis_url, redis_prefix, pg_dsn, plan, tmp_path) as store:
        store.save_session(session("s1"))
        store.append_message("s1", message(0))
        before = scrape()
        store.read("s1", "metrics-cut")
        store.read("s1", "metrics-cut")
        store.read("s1", "metrics-other")
        after = scrape()

    assert moved(before, after, "memshift_reads_total",
                 path="metrics-cut", source="postgres", reason="slice") == 2
    assert moved(before, after, "memshift_reads_total",
                 path="metrics-cut", source="redis") == 0
    assert moved(before, after, "memshift_reads_total",
                 path="metrics-other", source="redis", reason="stage") == 1
    assert moved(before, after, "memshift_store_ops_total",
                 store="postgres", op="load_session", result="ok") == 2


def test_live_shadow_compares_are_counted_by_outcome(
    conn: psycopg.Connection[Any], pg_dsn: str, redis_url: str, redis_prefix: str,
    tmp_path: Path,
) -> None:
    set_stage(conn, "dual_write", "go")
    set_stage(conn, "shadow", "go", force=True)
    plan = set_rule(conn, "compare every read", shadow_sample_rate=1.0)
    with router(redis_url, redis_prefix, pg_dsn, StaticPlan(plan), tmp_path) as store:
        store.save_session(session("s1"))
        before = scrape()
        store.read("s1", "metrics-shadow")
        store.drain_compares()
        after = scrape()

    assert moved(before, after, "memshift_shadow_compares_total", outcome="sampled") == 1
    assert moved(before, after, "memshift_shadow_compares_total", outcome="pass") == 1


# -- the state collector --------------------------------------------------------------------


def test_the_state_collector_reports_the_stage_and_version_after_a_change(
    conn: psycopg.Connection[Any], state: str
) -> None:
    plan = set_stage(conn, "dual_write", "go")
    samples = scrape()

    assert value(samples, "memshift_state_up") == 1
    assert value(samples, "memshift_plan_stage", stage="dual_write") == 1
    assert value(samples, "memshift_plan_stage", stage="redis_only") == 0
    assert value(samples, "memshift_plan_version") == plan.version
    # The gates of the next stage (shadow): no backfill has completed.
    assert value(samples, "memshift_next_stage_gate_passed",
                 stage="shadow", gate="backfill complete") == 0


def test_a_failed_secondary_write_shows_in_the_repair_queue_depth_and_age(
    conn: psycopg.Connection[Any], state: str, redis_url: str, redis_prefix: str,
    redis_proxy: FaultProxy, tmp_path: Path,
) -> None:
    behind = RedisStore(redis_proxy.redis_url_for(redis_url), prefix=redis_prefix)
    with MigratingStore(behind, PostgresStore(state), StaticPlan(plan_at("pg_primary")),
                        spool_path=tmp_path / "spool") as store:
        store.save_session(session("s1"))
        before = scrape()
        redis_proxy.refuse()
        redis_proxy.cut()
        store.append_message("s1", message(0))  # PostgreSQL takes it; Redis misses it
        redis_proxy.heal()
        after = scrape()

    assert value(after, "memshift_repair_queue_depth", target="redis") == 1
    assert value(after, "memshift_repair_queue_sessions", target="redis") == 1
    assert value(after, "memshift_repair_queue_depth", target="postgres") == 0
    assert value(after, "memshift_repair_oldest_age_seconds", target="redis") >= 0
    assert moved(before, after, "memshift_store_ops_total",
                 store="redis", op="append_message", result="failed") == 1
    assert moved(before, after, "memshift_repair_enqueues_total",
                 target="redis", via="queue") == 1


def test_a_backfill_with_a_malformed_session_shows_its_progress_and_the_quarantine(
    state: str, redis_url: str, redis_prefix: str
) -> None:
    settings = Settings(redis_url=redis_url, postgres_dsn=state, prefix=redis_prefix)
    with RedisStore(redis_url, prefix=redis_prefix) as legacy:
        for sid in ("good-1", "good-2"):
            legacy.save_session(session(sid))
            legacy.append_message(sid, message(0))
    client = redis.Redis.from_url(redis_url)
    client.hset(f"{redis_prefix}:session:broken", mapping={
        "tenant_id": "t", "user_id": "u", "status": "active", "version": "1",
        "created_at": "2026-05-19T10:00:00Z", "updated_at": "2026-05-19T10:00:00Z",
        "messages_trimmed": "0", "metadata": "{}"})
    client.rpush(f"{redis_prefix}:session:broken:messages",
                 b'{"id":"m0","role":"user","content":"\xff\xfe","ts":"2026-05-19T10:00:00Z"}')
    client.close()

    summary = backfill(settings, BackfillOptions(prefix=redis_prefix))
    samples = scrape()

    run = str(summary.run_id)
    assert value(samples, "memshift_quarantine_sessions", reason_class="invalid_utf8") == 1
    assert sum(v for _, v in samples["memshift_quarantine_sessions"]) == 1
    assert value(samples, "memshift_backfill_sessions_quarantined_total", run_id=run) == 1
    assert value(samples, "memshift_backfill_sessions_migrated_total", run_id=run) == 2
    assert value(samples, "memshift_backfill_messages_migrated_total", run_id=run) == 2
    assert value(samples, "memshift_backfill_run_state", run_id=run, state="completed") == 1
    batches = value(samples, "memshift_backfill_batches", run_id=run)
    assert batches >= 1
    assert value(samples, "memshift_backfill_batches_done_total", run_id=run) == batches


def cutover_with_half_of_resume(conn: psycopg.Connection[Any]) -> None:
    set_stage(conn, "dual_write", "go")
    set_stage(conn, "shadow", "go", force=True)
    set_stage(conn, "cutover", "go", force=True)
    set_slice(conn, "resume", 50, "half")


def record_one_failed_one_passed(conn: psycopg.Connection[Any]) -> None:
    """Two batch parity results (they count for every read path): one fails."""
    record(conn, [ParityReport("s1", {"latest_checkpoint_matches": False}, "fail", (), now()),
                  ParityReport("s2", {"latest_checkpoint_matches": True}, "pass", (), now())])


def test_rollbacks_are_counted_by_who_made_them_and_drift_is_shown_per_slice(
    conn: psycopg.Connection[Any], state: str
) -> None:
    cutover_with_half_of_resume(conn)
    set_slice(conn, "inspect", 10, "a tenth")
    rollback(conn, "a person saw something odd", read_path="inspect")
    set_slice(conn, "inspect", 10, "again")
    record_one_failed_one_passed(conn)
    judged = scrape()
    fired = enforce_rule(conn)
    after = scrape()

    assert value(judged, "memshift_slice_percent", read_path="resume") == 50
    assert value(judged, "memshift_slice_drift_rate", read_path="resume") == 50
    assert value(judged, "memshift_slice_failed_checks", read_path="resume") == 1
    assert value(judged, "memshift_parity_window_checks", status="fail") == 1
    assert value(judged, "memshift_parity_pass_rate") == 50
    assert value(judged, "memshift_rollbacks_total", by="person") == 1
    assert value(judged, "memshift_rollbacks_total", by="rule") == 0
    assert {f.read_path for f in fired} == {"resume", "inspect"}
    assert value(after, "memshift_rollbacks_total", by="rule") == 2
    assert value(after, "memshift_rollbacks_total", by="person") == 1
    assert value(after, "memshift_slice_percent", read_path="resume") == 0
    assert value(after, "memshift_plan_version") == load_plan(conn).version
    assert value(after, "memshift_last_rollback_timestamp_seconds", by="rule") > 0
    assert WATCHER == metrics.RULE_WHO


def test_the_drift_gauges_show_what_rule_show_shows_for_every_read_path(
    conn: psycopg.Connection[Any], state: str
) -> None:
    cutover_with_half_of_resume(conn)
    record_one_failed_one_passed(conn)
    # A live compare of a read path with no slice: rule show lists it, so must the gauges.
    conn.execute(query("parity_record_live"), {
        "session_id": "s3", "status": "fail", "checks": Jsonb({"messages_match": False}),
        "diffs": Jsonb([]), "checked_at": now(), "read_path": "inspect"})
    samples = scrape()
    shown = {d.read_path: d for d in slice_drift(conn)}  # what `memshift rule show` prints

    assert set(shown) == {"resume", "inspect"}
    for name in ("memshift_slice_judged_checks", "memshift_slice_failed_checks",
                 "memshift_slice_drift_rate"):
        assert {labels["read_path"] for labels, _ in samples[name]} == set(shown)
    for path, drift in shown.items():
        assert value(samples, "memshift_slice_judged_checks", read_path=path) == drift.judged
        assert value(samples, "memshift_slice_failed_checks", read_path=path) == drift.failed
        assert value(samples, "memshift_slice_drift_rate", read_path=path) == drift.drift_rate
    assert (shown["inspect"].judged, shown["inspect"].failed) == (3, 2)  # batch ones count too
    assert shown["resume"].drift_rate == 50


def test_with_postgres_down_a_scrape_says_state_up_0_and_hides_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="memshift.metrics")
    metrics.install_state_collector("postgresql://app:s3cr3t-pw@127.0.0.1:1/nowhere")
    samples = scrape()

    assert value(samples, "memshift_state_up") == 0
    assert "memshift_plan_stage" not in samples
    assert "memshift_store_ops_total" in generate_latest(metrics.REGISTRY).decode()
    assert "127.0.0.1" in caplog.text and "s3cr3t-pw" not in caplog.text


def test_a_part_of_the_state_that_cannot_be_read_is_left_out_and_state_up_says_so(
    conn: psycopg.Connection[Any], state: str
) -> None:
    set_stage(conn, "dual_write", "go")
    conn.execute("DROP TABLE memshift.quarantine")  # this part of the state is gone
    samples = scrape()

    assert value(samples, "memshift_state_up") == 0
    assert value(samples, "memshift_plan_stage", stage="dual_write") == 1
    assert "memshift_repair_queue_depth" in samples
    assert "memshift_quarantine_sessions" not in samples


# -- serving --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_serve_exposes_the_registry_on_loopback_and_refuses_other_hosts() -> None:
    port = free_port()
    metrics.serve(port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        body = reply.read().decode()

    assert "# TYPE memshift_store_ops_total counter" in body
    with pytest.raises(ConfigError, match="not a loopback"):
        metrics.serve(free_port(), "0.0.0.0")


# -- the Grafana dashboard ------------------------------------------------------------------


def queried_names(dashboard: dict[str, Any]) -> set[str]:
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, item in node.items():
                if key in ("expr", "query") and isinstance(item, str):
                    exprs.append(item)
                else:
                    walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    return {name for expr in exprs for name in re.findall(r"\bmemshift_[a-z0-9_]+", expr)}


def test_the_grafana_dashboard_imports_and_queries_only_metrics_that_exist(
    conn: psycopg.Connection[Any], state: str, redis_url: str, redis_prefix: str,
    redis_proxy: FaultProxy, tmp_path: Path,
) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["panels"] and dashboard["title"]
    datasources = {json.dumps(p.get("datasource")) for p in dashboard["panels"]
                   if p.get("type") != "row"}
    assert datasources == {json.dumps({"type": "prometheus", "uid": "${DS_PROMETHEUS}"})}

    # Every kind of operation, so every metric has samples.
    with RedisStore(redis_url, prefix=redis_prefix) as legacy:
        legacy.save_session(session("old"))
    backfill(Settings(redis_url=redis_url, postgres_dsn=state, prefix=redis_prefix),
             BackfillOptions(prefix=redis_prefix))
    set_stage(conn, "dual_write", "go")
    set_stage(conn, "shadow", "go")
    set_stage(conn, "cutover", "go", force=True)
    set_slice(conn, "resume", 100, "all")
    plan = set_rule(conn, "compare every read", shadow_sample_rate=1.0)
    source = StaticPlan(plan)
    behind = RedisStore(redis_proxy.redis_url_for(redis_url), prefix=redis_prefix)
    with MigratingStore(behind, PostgresStore(state), source,
                        spool_path=tmp_path / "spool") as store:
        store.save_session(session("s1"))
        store.read("s1", "resume")
        store.drain_compares()
        record(conn, [ParityReport("s1", {"latest_checkpoint_matches": False}, "fail", (),
                                   now())])
        enforce_rule(conn)
        source.plan = plan_at("pg_primary")  # this process moves on: Redis is secondary
        redis_proxy.refuse()
        redis_proxy.cut()
        store.append_message("s1", message(0))
        redis_proxy.heal()
        rollback(conn, "a person rolls back")
        samples = scrape()

    names = set(samples)
    missing = {name for name in queried_names(dashboard)
               if not names & {name, f"{name}_total", f"{name}_bucket", f"{name}_count"}}
    assert not missing, f"the dashboard queries metrics the registry lacks: {sorted(missing)}"
    assert len(queried_names(dashboard)) >= 20
