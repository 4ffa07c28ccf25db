"""Repair: drain the repair queue by copying each session whole into the store that
missed a write.

A queue row names a session and the store that missed one of its writes (the
*target*). The repair does not replay that write: it reads the session's current
whole state from the other store (the primary when the write failed) and applies it
to the target with the guarded, monotonic writes, so the order and number of repairs
never matter. Into PostgreSQL that is one ``merge_states``; into Redis it is the
RedisStore's own guarded writes (see :func:`copy_to_redis`).

The queue rows of a session are claimed with ``FOR UPDATE SKIP LOCKED`` (so several
workers share the queue) and deleted in the same transaction that claimed them, after
the copy succeeded: a crash mid-drain leaves them queued, and the next run copies the
session again, which changes nothing twice. Only the rows claimed are deleted: a
write that fails again meanwhile adds a row that the next pass picks up.

Parity finds what no failed write recorded (a process killed between its two
writes, say): :func:`queue_parity_failures` (``memshift repair --from-parity``)
queues every session whose latest parity result is ``fail`` for the same
whole-session repair, from the Plan's primary into the other store.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from memshift.config import Settings, require_stores
from memshift.errors import ConfigError, MemshiftError, StoreUnavailable
from memshift.migrate import spool
from memshift.migrate.backfill import connect
from memshift.migrate.bulk import merge_states
from memshift.migrate.plan import Stage, load_plan
from memshift.model import SessionState, StatusChange
from memshift.redact import redact
from memshift.sql.queries import query
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore


@dataclass
class RepairFailure:
    session_id: str
    target: str
    error: str


class RepairRefused(MemshiftError):
    """Parity failures cannot be queued for repair under this Plan (the message says why)."""


@dataclass(frozen=True)
class ParityQueueing:
    """What ``queue_parity_failures`` did."""

    failing: int  # sessions whose latest parity result is a failure
    queued: int  # of them, queued now
    already_queued: int  # of them, queued for the same store before
    source: str  # the Plan's primary: they are copied from it...
    target: str  # ... into this store

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RepairSummary:
    moved_from_spool: int = 0  # spool lines moved into the queue
    sessions_repaired: int = 0  # sessions copied into their target store
    entries_done: int = 0  # queue rows deleted
    vanished: int = 0  # sessions gone from the source (expired): nothing to copy
    failed: list[RepairFailure] = field(default_factory=list)  # left queued, with the error
    remaining: int = 0  # queue rows left at the end
    seconds: float = 0.0
    from_parity: ParityQueueing | None = None  # with --from-parity: what was queued first

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def copy_to_redis(store: RedisStore, state: SessionState) -> None:
    """Apply a session's whole state to Redis through the store's guarded writes.

    The session record first, then what Redis lacks, in order: messages from its
    message count on, with their seqs; events from its event count on, each with the
    session's current record as the snapshot (the guarded save keeps the newest
    record, so only the first applies it); every tool run (merged); the latest
    summary and the latest checkpoint, which is all the reference layout keeps.
    """
    sid = state.session_id
    have = store.load_session(sid)
    store.save_session(state.session)
    next_seq = have.message_count if have else 0
    for message in state.messages:
        if message.seq is not None and message.seq >= next_seq:
            store.append_message(sid, message)
    next_event = len(have.events) if have else 0
    for event in sorted(state.events, key=lambda e: e.event_seq or 0):
        if event.event_seq is not None and event.event_seq >= next_event:
            store.apply_status_change(StatusChange(session=state.session, event=event))
    for run in state.tool_runs:
        store.upsert_tool_run(sid, run)
    if state.latest_summary is not None:
        store.put_summary(sid, state.latest_summary)
    if state.latest_checkpoint is not None:
        store.put_checkpoint(sid, state.latest_checkpoint)


def queue_parity_failures(settings: Settings) -> ParityQueueing:
    """Queue every session whose latest parity result is ``fail`` for a whole-session
    repair from the Plan's primary into the other store; ``repair`` then drains them.

    A session already queued for that store is not queued twice. Refused (RepairRefused)
    in ``retired``, where Redis is a cache that nothing is repaired into.
    """
    if not settings.postgres_dsn:
        raise ConfigError("queueing parity failures needs PostgreSQL: set --postgres-dsn / "
                          "MEMSHIFT_POSTGRES_DSN")
    with connect(settings.postgres_dsn) as conn:
        return _queue_parity_failures(conn)


def _queue_parity_failures(conn: psycopg.Connection[Any]) -> ParityQueueing:
    plan = load_plan(conn)
    if plan.stage is Stage.RETIRED:
        raise RepairRefused(
            "the Plan is at retired: Redis is only a cache there and gets no writes, so "
            "parity failures are expected and nothing is repaired into it; to repair "
            "Redis, move back first (`memshift stage set pg_primary --reason ...`)"
        )
    source = plan.writes()[0]
    target = "postgres" if source == "redis" else "redis"
    row = conn.execute(query("repair_enqueue_parity_failures"),
                       {"target": target, "source": source}).fetchone()
    failing, queued = (int(row[0]), int(row[1])) if row else (0, 0)
    return ParityQueueing(failing, queued, failing - queued, source, target)


def repair(
    settings: Settings, *, limit: int | None = None, spool_path: Path | None = None,
    from_parity: bool = False,
) -> RepairSummary:
    """Move the spool into the queue, then repair up to ``limit`` sessions (all if None).

    With ``from_parity``, first queue the sessions whose latest parity result fails
    (see :func:`queue_parity_failures`).
    """
    redis_url, postgres_dsn = require_stores(settings, "repair")
    started = time.monotonic()
    summary = RepairSummary()
    path = spool_path if spool_path is not None else settings.data_dir / "repair.spool"
    redis_store = RedisStore(redis_url, layout=settings.layout, prefix=settings.prefix,
                             ttl_seconds=settings.ttl_seconds)
    with connect(postgres_dsn) as conn, redis_store, PostgresStore(
        postgres_dsn, min_size=1, max_size=2
    ) as pg_store:
        summary.moved_from_spool = spool.drain(path, lambda entries: _enqueue(conn, entries))
        if from_parity:
            summary.from_parity = _queue_parity_failures(conn)
        row = conn.execute("SELECT clock_timestamp()").fetchone()
        assert row is not None
        since = row[0]  # rows that fail from now on wait for the next run
        while limit is None or summary.sessions_repaired + len(summary.failed) < limit:
            if not _repair_one(conn, redis_store, pg_store, since, summary):
                break
        counted = conn.execute("SELECT count(*) FROM memshift.repair_queue").fetchone()
        summary.remaining = counted[0] if counted else 0
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


def _enqueue(conn: psycopg.Connection[Any], entries: list[spool.SpoolEntry]) -> None:
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(query("repair_enqueue"), [asdict(e) for e in entries])


def _repair_one(
    conn: psycopg.Connection[Any],
    redis_store: RedisStore,
    pg_store: PostgresStore,
    since: Any,
    summary: RepairSummary,
) -> bool:
    """Repair the next session in the queue; False when none is left to claim."""
    with conn.transaction():
        rows = conn.execute(query("repair_claim"), {"since": since}).fetchall()
        if not rows:
            return False
        ids = [r[0] for r in rows]
        sid, target = rows[0][1], rows[0][2]
        error = None
        try:
            with conn.transaction():  # a savepoint: a failed copy undoes only itself
                error = _copy(conn, redis_store, pg_store, sid, target, summary)
        except StoreUnavailable:
            raise  # a store is down: stop, leaving every row queued as it was
        except (MemshiftError, psycopg.DatabaseError) as exc:
            error = f"{type(exc).__name__}: {redact(str(exc))}"
        if error is not None:
            conn.execute(query("repair_failed"), {"ids": ids, "error": error})
            summary.failed.append(RepairFailure(sid, target, error))
            return True
        conn.execute(query("repair_done"), {"ids": ids})
    summary.sessions_repaired += 1
    summary.entries_done += len(ids)
    return True


def _copy(
    conn: psycopg.Connection[Any],
    redis_store: RedisStore,
    pg_store: PostgresStore,
    sid: str,
    target: str,
    summary: RepairSummary,
) -> str | None:
    """Copy the session into ``target`` from the other store; the error, if it cannot."""
    source = pg_store if target == "redis" else redis_store
    state = source.load_session(sid)
    if state is None:
        summary.vanished += 1
        return None
    if target == "postgres":
        merged = merge_states(conn, [state])
        if sid in merged.conflicted:
            # The conflict is recorded in memshift.message_conflicts; the rest merged.
            return (f"session {sid!r}: PostgreSQL holds messages that differ from Redis "
                    "(see memshift.message_conflicts); resolve them, then run repair again")
        return None
    copy_to_redis(redis_store, state)
    return None
