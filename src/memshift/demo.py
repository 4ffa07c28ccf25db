"""`memshift demo` and `memshift generate`: generated sessions, written as an app would.

The demo starts embedded servers when none are given, upgrades the schema, plays
generated agent sessions into Redis (the primary) and replicates each acknowledged
write to PostgreSQL with the values Redis assigned, the way the dual-write stage
does. Then the legacy app trims long transcripts and sets TTLs in Redis, and the
demo shows what each store holds and whether the two agree on what a resume needs.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from memshift import embedded
from memshift.config import Settings
from memshift.generate import Call, GeneratedSession, generate_sessions
from memshift.model import SessionState, StatusChange
from memshift.observe.progress import progress
from memshift.redact import redact
from memshift.sql.migrations import upgrade
from memshift.stores.base import Store
from memshift.stores.layouts import get_layout
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


def replicate(primary: Store, secondary: Store, call: Call) -> None:
    """Apply ``call`` to the primary, then its acknowledged result to the secondary."""
    result = getattr(primary, call.method)(*call.args)
    if call.method == "append_message":
        secondary.append_message(call.args[0], result)  # carries the seq Redis gave
    elif call.method == "set_status":
        assert isinstance(result, StatusChange)
        secondary.apply_status_change(result)
    else:
        getattr(secondary, call.method)(*call.args)


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
    say = (lambda *a, **k: None) if quiet else console.print
    with embedded.servers(settings) as (postgres_dsn, redis_url, started):
        for server in started:
            say(f"[dim]started embedded {server.kind} at {redact(server.url)}[/]")
        applied = upgrade(postgres_dsn)
        say(f"schema memshift: {len(applied)} migration(s) applied")
        client = redis.Redis.from_url(redis_url)
        legacy = RedisStore(
        client, layout=settings.layout, prefix=settings.prefix, ttl_seconds=settings.ttl_seconds
    )
        truth = PostgresStore(postgres_dsn)
        try:
            ids, elapsed = _play(legacy, truth, client, settings.prefix, sessions, seed, console,
                                 quiet)
            report = _compare(legacy, truth, ids)
        finally:
            legacy.close()
            truth.close()
            client.close()
    report["seconds"] = round(elapsed, 2)
    if not quiet:
        _show(console, report)
    return report


def _play(
    legacy: RedisStore,
    truth: PostgresStore,
    client: redis.Redis,
    prefix: str,
    count: int,
    seed: int,
    console: Console,
    quiet: bool,
) -> tuple[list[str], float]:
    ids = []
    writes = 0
    started = time.perf_counter()
    with progress(console, quiet) as bar:
        task = bar.add_task("dual-writing sessions", total=count, rate="")
        # Ids of this run's own, so a second demo on the same servers starts afresh.
        namespace = f"demo{int(time.time())}"
        for generated in generate_sessions(count, seed=seed, namespace=namespace):
            for call in generated.calls:
                replicate(legacy, truth, call)
                writes += 1
            legacy_housekeeping(client, prefix, generated)
            ids.append(generated.session_id)
            rate = writes / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=1, rate=f"{rate:,.0f} writes/s")
    return ids, time.perf_counter() - started


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
