"""`memshift demo` and `memshift generate`: generated sessions, written as an app would.

The demo starts embedded servers when none are given and runs a whole staged
migration on generated agent sessions while traffic keeps flowing: the legacy app
writes to Redis; the app swaps in the MigratingStore; the Plan moves through
dual_write, shadow (after the backfill), cutover (slice by slice) and pg_primary.
Then it shows what each store holds and whether both would resume every session
the same way.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import redis
from rich.console import Console
from rich.table import Table

from memshift import embedded
from memshift.config import Settings
from memshift.errors import ConfigError, MemshiftError
from memshift.generate import GeneratedSession, generate_sessions
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.migrate.parity import ParityTotals, parity
from memshift.migrate.plan import PlanWatcher, Stage, load_plan, set_slice, set_stage
from memshift.migrate.repair import repair
from memshift.model import Message, SessionState, ToolRun, now
from memshift.observe.progress import progress
from memshift.redact import redact
from memshift.sql.migrations import upgrade
from memshift.stores.layouts import get_layout
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore


def legacy_housekeeping(client: redis.Redis, prefix: str, generated: GeneratedSession) -> None:
    """What the legacy app does beside its writes: LTRIM long transcripts, EXPIRE."""
    keys = get_layout("reference", prefix).session_keys(generated.session_id)
    hash_key, messages_key = keys[0], keys[1]
    if generated.keep_last is not None:
        held = int(client.llen(messages_key))
        dropped = held - generated.keep_last
        if dropped > 0:
            pipe = client.pipeline(transaction=True)
            pipe.ltrim(messages_key, dropped, -1)
            pipe.hincrby(hash_key, "messages_trimmed", dropped)
            pipe.execute()
    if generated.ttl_seconds is not None:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.expire(key, generated.ttl_seconds)
        pipe.execute()


def generate_into_redis(
    settings: Settings, count: int, seed: int, *, console: Console, quiet: bool
) -> dict[str, int]:
    """`memshift generate`: legacy sessions into Redis only."""
    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url)
    store = RedisStore(
        client, layout=settings.layout, prefix=settings.prefix, ttl_seconds=settings.ttl_seconds
    )
    messages = 0
    try:
        with progress(console, quiet) as bar:
            task = bar.add_task("generating", total=count, rate="")
            for generated in generate_sessions(count, seed=seed):
                generated.play(store)
                legacy_housekeeping(client, settings.prefix, generated)
                messages += sum(1 for c in generated.calls if c.method == "append_message")
                bar.advance(task)
    finally:
        store.close()
        client.close()
    return {"sessions": count, "messages": messages}


def run_demo(
    settings: Settings, *, sessions: int, seed: int, console: Console, quiet: bool
) -> dict[str, Any]:
    """A whole staged migration on generated sessions while traffic keeps flowing.

    Half of the sessions are written by the legacy app alone (``redis_only``); then
    the app swaps in the MigratingStore and the Plan moves ``dual_write → shadow →
    cutover → pg_primary`` while a traffic thread keeps writing through the router, and
    the backfill copies what Redis held before.
    """
    say = (lambda *a, **k: None) if quiet else console.print
    with embedded.servers(settings) as (postgres_dsn, redis_url, started):
        for server in started:
            say(f"[dim]started embedded {server.kind} at {redact(server.url)}[/]")
        applied = upgrade(postgres_dsn)
        say(f"schema memshift: {len(applied)} migration(s) applied")
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            stage = load_plan(conn).stage
            if stage is not Stage.REDIS_ONLY and any(s.kind == "postgres" for s in started):
                # The embedded servers are the demo's own: a second run starts over.
                set_stage(conn, Stage.REDIS_ONLY, "the demo starts over", force=True,
                          who="memshift demo")
            elif stage is not Stage.REDIS_ONLY:
                raise ConfigError(
                    "the demo moves the Plan from redis_only to pg_primary, but this "
                    f"database's Plan is at {stage}; run the demo on a scratch database, "
                    "or with no --postgres-dsn (embedded servers)"
                )
            demo = _Demo(settings, postgres_dsn, redis_url, conn, console, quiet)
            try:
                report = demo.run(sessions, seed)
            finally:
                demo.close()
    if not quiet:
        _show(console, report)
    return report


class _Demo:
    def __init__(
        self, settings: Settings, postgres_dsn: str, redis_url: str,
        conn: psycopg.Connection[Any], console: Console, quiet: bool,
    ) -> None:
        self.settings = replace(settings, postgres_dsn=postgres_dsn, redis_url=redis_url)
        self.conn = conn
        self.console = console
        self.quiet = quiet
        self.client = redis.Redis.from_url(redis_url)
        self.legacy = RedisStore(self.client, layout=settings.layout, prefix=settings.prefix,
                                 ttl_seconds=settings.ttl_seconds)
        self.truth = PostgresStore(postgres_dsn)
        self.watcher = PlanWatcher(postgres_dsn, poll_seconds=1.0)
        self.router = MigratingStore(
            RedisStore(redis_url, layout=settings.layout, prefix=settings.prefix),
            PostgresStore(postgres_dsn),
            self.watcher,
            spool_path=Path(settings.data_dir) / "repair.spool",
        )
        self.started = time.perf_counter()

    def close(self) -> None:
        self.router.close()
        self.watcher.close()
        self.legacy.close()
        self.truth.close()
        self.client.close()

    def say(self, text: str) -> None:
        if not self.quiet:
            elapsed = time.perf_counter() - self.started
            self.console.print(f"[dim]{elapsed:6.1f}s[/] {text}")

    def stage(self, target: Stage, why: str) -> None:
        plan = set_stage(self.conn, target, why, who="memshift demo")
        primary, secondary = plan.writes()
        self.say(f"stage [bold]{plan.stage}[/]: writes to {primary}"
                 + (f" then {secondary}" if secondary else "") + f" — {why}")

    def run(self, count: int, seed: int) -> dict[str, Any]:
        # Ids of this run's own, so a second demo on the same servers starts afresh.
        generated = list(generate_sessions(count, seed=seed, namespace=f"demo{int(time.time())}"))
        split = max(count // 2, 1)
        legacy_half, live_half = generated[:split], generated[split:]
        with progress(self.console, self.quiet) as bar:
            task = bar.add_task("legacy app writes to Redis", total=len(legacy_half), rate="")
            for item in legacy_half:
                item.play(self.legacy)
                legacy_housekeeping(self.client, self.settings.prefix, item)
                bar.advance(task)
        self.say(f"redis_only: the legacy app wrote {len(legacy_half)} sessions "
                 "(long transcripts trimmed, some with a TTL)")

        self.stage(Stage.DUAL_WRITE, "the app now writes through MigratingStore")
        traffic = _Traffic(self.router, [g.session_id for g in legacy_half])
        traffic.start()
        try:
            for item in live_half:
                item.play(self.router)
            self.say(f"dual_write: {len(live_half)} new sessions written through the router")
            summary = backfill(self.settings, BackfillOptions(layout=self.settings.layout,
                                                              prefix=self.settings.prefix))
            self.say(f"backfill run {summary.run_id}: {summary.migrated} migrated, "
                     f"{summary.unchanged} unchanged, {summary.quarantined} quarantined, "
                     f"{summary.messages:,} messages in {summary.seconds:.1f} s")
            self.stage(Stage.SHADOW, "backfill complete")
            checked = self.parity()
            self.stage(Stage.CUTOVER, "start reading from PostgreSQL, slice by slice")
            for percent in (10, 50, 100):
                set_slice(self.conn, "resume", percent, f"resume {percent} %",
                          who="memshift demo")
                traffic.sources()
                time.sleep(0.4)
                served = traffic.sources()
                self.say(f"slice resume at {percent} %: reads served by "
                         + ", ".join(f"{k} {v}" for k, v in sorted(served.items())))
            self.stage(Stage.PG_PRIMARY, "PostgreSQL is the truth; Redis follows")
            time.sleep(0.5)
        finally:
            traffic.stop()
        repaired = repair(self.settings, spool_path=self.router.spool_path)
        self.say(f"traffic: {traffic.writes:,} writes and {traffic.reads:,} reads during the "
                 f"migration, {traffic.failures} failed; "
                 f"{repaired.sessions_repaired} session(s) repaired")
        report = _compare(self.legacy, self.truth, [g.session_id for g in generated])
        report.update(
            seconds=round(time.perf_counter() - self.started, 2),
            stage=str(load_plan(self.conn).stage),
            traffic={"writes": traffic.writes, "reads": traffic.reads,
                     "failed": traffic.failures},
            backfill=summary.as_json(),
            parity=checked.as_json(),
        )
        return report

    def parity(self) -> ParityTotals:
        """`memshift parity --all` while traffic flows: the gate to cutover reads it."""
        totals = ParityTotals()
        for report in parity(self.settings):
            totals.add(report)
        counts = totals.counts
        self.say(f"parity of {totals.checked} sessions under live traffic: {counts['pass']} "
                 f"pass, {counts['fail']} fail, {counts['pending']} pending (written during "
                 f"the check), {counts['error']} error; drift rate {totals.drift_rate:.2%}")
        return totals


class _Traffic(threading.Thread):
    """The live app: keeps resuming, appending and retrying tools through the router."""

    def __init__(self, router: MigratingStore, ids: list[str]) -> None:
        super().__init__(name="memshift-demo-traffic", daemon=True)
        self.router = router
        self.ids = ids
        self.halt = threading.Event()
        self.writes = self.reads = self.failures = 0
        self.served: dict[str, int] = {}
        self.lock = threading.Lock()

    def sources(self) -> dict[str, int]:
        with self.lock:
            seen, self.served = self.served, {}
        return seen

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)

    def run(self) -> None:
        rng = random.Random(1)
        n = 0
        while not self.halt.is_set():
            sid = rng.choice(self.ids)
            n += 1
            try:
                read = self.router.read(sid, read_path="resume")
                with self.lock:
                    self.reads += 1
                    self.served[read.source] = self.served.get(read.source, 0) + 1
                if read.state is None:
                    continue  # expired in Redis before the migration: nothing to resume
                if n % 3:
                    self.router.append_message(sid, Message(
                        message_id=f"{sid}-live-{n}", role="user", content=f"still here ({n})"))
                else:
                    run = read.state.tool_runs[0] if read.state.tool_runs else ToolRun(
                        tool_call_id=f"{sid}-live", name="probe")
                    self.router.upsert_tool_run(sid, run.model_copy(
                        update={"attempts": run.attempts + 1, "updated_at": now()}))
                self.writes += 1
            except MemshiftError:
                self.failures += 1
            time.sleep(0.002)


def _resume_view(state: SessionState) -> dict[str, Any]:
    """What an agent needs to resume: compared across the two stores."""
    summary = state.latest_summary
    checkpoint = state.latest_checkpoint
    return {
        "status": state.session.status,
        "message_count": state.message_count,
        "tail": [(m.seq, m.message_id, m.content) for m in state.messages[-5:]],
        "tools": sorted((t.tool_call_id, t.status, t.attempts) for t in state.tool_runs),
        "summary_version": summary.version if summary else None,
        "checkpoint": (checkpoint.checkpoint_id, checkpoint.step) if checkpoint else None,
    }


def _compare(legacy: RedisStore, truth: PostgresStore, ids: list[str]) -> dict[str, Any]:
    totals: dict[str, dict[str, int]] = {
        store: dict.fromkeys(
            ("sessions", "messages held", "messages trimmed", "tool runs", "tool runs mid-retry",
             "summary versions", "checkpoints", "status events", "with TTL"),
            0,
        )
        for store in ("redis", "postgres")
    }
    agree = 0
    differing: list[str] = []
    for sid in ids:
        states = {"redis": legacy.load_session(sid), "postgres": truth.load_session(sid)}
        for name, state in states.items():
            if state is None:
                continue
            row = totals[name]
            row["sessions"] += 1
            row["messages held"] += len(state.messages)
            row["messages trimmed"] += state.session.messages_trimmed if name == "redis" else 0
            row["tool runs"] += len(state.tool_runs)
            row["tool runs mid-retry"] += sum(1 for t in state.tool_runs if not t.terminal)
            row["summary versions"] += len(state.summaries)
            row["checkpoints"] += len(state.checkpoints)
            row["status events"] += len(state.events)
            row["with TTL"] += state.session.expires_at is not None
        redis_state, pg_state = states["redis"], states["postgres"]
        if redis_state and pg_state and _resume_view(redis_state) == _resume_view(pg_state):
            agree += 1
        else:
            differing.append(sid)
    return {"sessions": len(ids), "stores": totals, "resume_state_agrees": agree,
            "differing": differing[:20]}


def _show(console: Console, report: dict[str, Any]) -> None:
    table = Table("", "Redis (legacy)", "PostgreSQL (truth)", title="What is where")
    redis_row, pg_row = report["stores"]["redis"], report["stores"]["postgres"]
    for key in redis_row:
        table.add_row(key, f"{redis_row[key]:,}", f"{pg_row[key]:,}")
    console.print(table)
    console.print(
        "Redis keeps the latest summary and checkpoint and the untrimmed tail; "
        "PostgreSQL keeps every version, the whole checkpoint chain and every message."
    )
    agree, total = report["resume_state_agrees"], report["sessions"]
    colour = "green" if agree == total else "red"
    console.print(
        f"[{colour}]{agree}/{total} sessions resume the same from both stores[/] "
        "(status, message count and tail, tool retry state, summary version, checkpoint) "
        f"— {report['seconds']} s"
    )
