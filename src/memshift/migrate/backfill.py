"""Backfill: copy the sessions Redis holds into PostgreSQL, resumably and in parallel.

A run is a versioned row in ``memshift.backfill_runs``. Discovery SCANs Redis (never
KEYS) and turns what it finds into batches, saving the SCAN cursor in the same
transaction, so a restarted discovery goes on where it stopped. Workers claim
batches with ``FOR UPDATE SKIP LOCKED`` under a lease, read each batch from Redis in
one pipeline, and merge it with the live writes' guarded upserts; the merge and the
batch's "done" mark commit together. So a run killed at any moment and started again
(``memshift backfill`` joins the unfinished run) finishes with nothing lost and
nothing written twice. Sessions that cannot be read are quarantined whole, with
their raw bytes and a reason, and the run goes on.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb

from memshift.config import Settings, require_stores
from memshift.errors import ConfigError, MemshiftError, SchemaError
from memshift.migrate.bulk import merge_states
from memshift.migrate.quarantine import Quarantined, record_quarantine
from memshift.model import SessionState, text_problem
from memshift.redact import redact
from memshift.sql.migrations import latest_version
from memshift.sql.queries import query
from memshift.stores.layouts import Layout, get_layout
from memshift.stores.redis import RawSession, RedisStore

log = logging.getLogger("memshift.backfill")

RUN_FORMAT = 1  # the shape of a backfill_runs row this code reads and writes


@dataclass(frozen=True)
class BackfillOptions:
    """How a backfill runs. Every field says its default."""

    layout: str = "reference"  # Redis layout of the sessions
    prefix: str = "agent"  # Redis key prefix
    workers: int = 1  # worker processes (1: work in this process)
    batch_size: int = 200  # sessions per batch (one Redis pipeline, one PG transaction)
    lease_seconds: float = 30.0  # a claimed batch returns to the pool if not done by then
    scan_count: int = 1000  # SCAN COUNT hint
    max_value_bytes: int = 64 * 1024 * 1024  # a larger Redis value quarantines its session

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if not 1 <= self.batch_size <= 100_000:
            raise ConfigError(f"--batch-size must be from 1 to 100000, got {self.batch_size}")
        if self.lease_seconds <= 0:
            raise ConfigError(f"--lease-seconds must be above 0, got {self.lease_seconds}")


@dataclass
class RunRecord:
    run_id: int
    format: int
    source: str
    layout: str
    prefix: str
    batch_size: int
    state: str
    scan_cursors: dict[str, int]
    sessions_seen: int
    quarantined: int
    batches_total: int
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None


@dataclass
class Summary:
    """What a run did, for people (the CLI) and scripts (``--json``)."""

    run_id: int
    state: str
    sessions_seen: int = 0
    batches_total: int = 0
    batches_done: int = 0
    migrated: int = 0
    unchanged: int = 0
    quarantined: int = 0
    vanished: int = 0
    messages: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sessions_done(self) -> int:
        return self.migrated + self.unchanged + self.quarantined + self.vanished

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        data["sessions_done"] = self.sessions_done
        data["sessions_per_second"] = round(self.sessions_done / max(self.seconds, 1e-9), 1)
        data["messages_per_second"] = round(self.messages / max(self.seconds, 1e-9), 1)
        return data


def connect(dsn: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, autocommit=True)
    row = conn.execute(query("schema_version")).fetchone()
    if not row or row[0] < latest_version():
        conn.close()
        raise SchemaError(
            f"the PostgreSQL schema is at version {row[0] if row else 0} but this memshift "
            f"needs {latest_version()}; run `memshift db upgrade` first"
        )
    conn.execute("SET TimeZone TO 'UTC'")
    return conn


# -- the run record --------------------------------------------------------------------


def start_or_join(
    conn: psycopg.Connection[Any], redis_url: str, options: BackfillOptions
) -> RunRecord:
    """The unfinished run for this source, or a new one."""
    params = {
        "source": redact(redis_url),
        "layout": options.layout,
        "prefix": options.prefix,
        "batch_size": options.batch_size,
        "format": RUN_FORMAT,
    }
    with conn.cursor(row_factory=class_row(RunRecord)) as cur:
        run = cur.execute(query("backfill_start_or_join"), params).fetchone()
        if run is None:  # lost a race to create it: the other one is there now
            run = cur.execute(query("backfill_open_run"), params).fetchone()
    assert run is not None
    if run.format != RUN_FORMAT:
        raise MemshiftError(
            f"backfill run {run.run_id} was written by another memshift version (format "
            f"{run.format}, this one reads {RUN_FORMAT}); finish it with that version or "
            "abandon it"
        )
    return run


def runs(conn: psycopg.Connection[Any], limit: int = 20) -> list[Summary]:
    """The latest runs with their counts, newest first (``memshift backfill --status``)."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query("backfill_runs"), {"limit": limit}).fetchall()
    return [_summary(row) for row in rows]


def run_summary(conn: psycopg.Connection[Any], run_id: int) -> Summary:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(query("backfill_run"), {"run_id": run_id}).fetchone()
    assert row is not None, f"backfill run {run_id} vanished"
    return _summary(row)


def _summary(row: dict[str, Any]) -> Summary:
    end = row["finished_at"] or row["now"]
    return Summary(
        run_id=row["run_id"],
        state=row["state"],
        sessions_seen=row["sessions_seen"],
        batches_total=row["batches_total"],
        batches_done=row["batches_done"],
        migrated=row["migrated"],
        unchanged=row["unchanged"],
        quarantined=row["quarantined"],
        vanished=row["vanished"],
        messages=row["messages"],
        seconds=round((end - row["started_at"]).total_seconds(), 3),
        extra={"source": row["source"], "layout": row["layout"], "prefix": row["prefix"],
               "started_at": row["started_at"]},
    )


# -- discovery -------------------------------------------------------------------------


def _nodes(client: Any) -> dict[str, Any]:
    """The Redis servers to SCAN: the one server, or every primary of a cluster."""
    get_primaries = getattr(client, "get_primaries", None)
    if get_primaries is None:
        return {"redis": client}
    return {node.name: node.redis_connection for node in get_primaries()}


def discover(
    conn: psycopg.Connection[Any], store: RedisStore, run: RunRecord, options: BackfillOptions
) -> None:
    """SCAN every node from its saved cursor; turn whole pages into batches."""
    layout = store.layout
    cursors = dict(run.scan_cursors)
    for node, server in _nodes(store.client).items():
        cursor = cursors.get(node, 0)
        if cursor == -1:  # this node was scanned to the end already
            continue
        buffered: list[str] = []
        while True:
            cursor, keys = server.scan(
                cursor, match=layout.scan_pattern(), count=options.scan_count, _type="hash"
            )
            for key in keys:
                sid = layout.session_id_from_key(key if isinstance(key, bytes) else key.encode())
                if sid is not None:
                    buffered.append(sid)
            finished = cursor == 0
            # A page is flushed whole, with the cursor after it: a restart goes on from
            # there and finds no id twice (backfill_seen drops repeats that SCAN gives).
            if len(buffered) >= options.batch_size or finished:
                cursors[node] = -1 if finished else cursor
                _flush(conn, store, run, buffered, cursors, options.batch_size)
                buffered = []
            if finished:
                break
    conn.execute(query("backfill_discovered"), {"run_id": run.run_id})


def _flush(
    conn: psycopg.Connection[Any], store: RedisStore, run: RunRecord, ids: list[str],
    cursors: dict[str, int], batch_size: int,
) -> None:
    # An id PostgreSQL cannot hold as text (invalid UTF-8, NUL) is quarantined here,
    # with the raw bytes of its keys: it could not be batched, let alone migrated.
    unfit = sorted({sid for sid in ids if text_problem(sid)})
    fit = sorted(set(ids).difference(unfit))
    with conn.transaction():
        for read in store.read_sessions(unfit):
            record_quarantine(
                conn, Quarantined.from_read(read, f"{run.layout}:{run.prefix}"), run.run_id
            )
        new = [
            row[0]
            for row in conn.execute(
                query("backfill_mark_seen"), {"run_id": run.run_id, "ids": fit}
            ).fetchall()
        ]
        for start in range(0, len(new), batch_size):
            conn.execute(
                query("backfill_add_batch"),
                {"run_id": run.run_id, "ids": new[start : start + batch_size]},
            )
        conn.execute(
            query("backfill_save_cursor"),
            {"run_id": run.run_id, "cursors": Jsonb(cursors), "seen": len(new) + len(unfit),
             "quarantined": len(unfit)},
        )


# -- workers ---------------------------------------------------------------------------


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def work(
    conn: psycopg.Connection[Any], store: RedisStore, run: RunRecord, options: BackfillOptions,
    *, name: str | None = None, stop: Callable[[], bool] = lambda: False,
) -> int:
    """Claim and copy batches until none is left; return how many this worker did."""
    me = name or worker_name()
    done = 0
    while not stop():
        claim = conn.execute(
            query("backfill_claim"),
            {"run_id": run.run_id, "worker": me, "lease": options.lease_seconds},
        ).fetchone()
        if claim is None:
            state = conn.execute(query("backfill_state"), {"run_id": run.run_id}).fetchone()
            if state is None or (state[0] != "discovering" and not state[1]):
                return done  # discovery over and nothing claimable or leased
            time.sleep(0.2)  # batches still to come, or leased by a worker that may die
            continue
        batch_no, session_ids = claim
        if copy_batch(conn, store, run, batch_no, session_ids, me, options):
            done += 1
    return done


def sort_reads(
    reads: Sequence[RawSession], max_value_bytes: int
) -> tuple[list[SessionState], list[tuple[RawSession, str]], int]:
    """The sessions fit to merge, those to quarantine (with why), and how many vanished."""
    good: list[SessionState] = []
    bad: list[tuple[RawSession, str]] = []
    vanished = 0
    for read in reads:
        reason = read.error or _oversize(read, max_value_bytes)
        if reason is None and read.state is not None:
            problems = read.state.problems()
            if problems:
                reason = f"session {read.session_id!r}: " + "; ".join(problems)
        if reason is not None:
            bad.append((read, reason))
        elif read.state is None:
            vanished += 1  # expired or deleted since discovery: not an error
        else:
            good.append(read.state)
    return good, bad, vanished


def _oversize(read: RawSession, limit: int) -> str | None:
    if sum(_sizes(read.replies)) <= limit:  # the common case: no value can be over
        return None
    for command, reply in zip(read.commands, read.replies, strict=True):
        for value in _values(reply):
            if len(value) > limit:
                return (
                    f"session {read.session_id!r}, key {command[1]!r}: a value of "
                    f"{len(value):,} bytes is over the limit of {limit:,} "
                    "(--max-value-bytes)"
                )
    return None


def _sizes(replies: list[Any]) -> Iterator[int]:
    for reply in replies:
        if isinstance(reply, bytes):
            yield len(reply)
        elif isinstance(reply, list):
            yield sum(len(item) for item in reply if isinstance(item, bytes))
            yield from _sizes([item for item in reply if not isinstance(item, bytes)])
        elif isinstance(reply, dict | tuple):
            yield from _sizes(list(reply.values() if isinstance(reply, dict) else reply))


def _values(reply: Any) -> Iterator[bytes]:
    if isinstance(reply, bytes):
        yield reply
    elif isinstance(reply, dict):
        for item in reply.values():
            yield from _values(item)
    elif isinstance(reply, list | tuple):
        for item in reply:
            yield from _values(item)


def copy_batch(
    conn: psycopg.Connection[Any], store: RedisStore, run: RunRecord, batch_no: int,
    session_ids: Sequence[str], worker: str, options: BackfillOptions,
) -> bool:
    """Read one batch from Redis and merge it; False when another worker finished it."""
    good, bad, vanished = sort_reads(store.read_sessions(session_ids), options.max_value_bytes)
    source = f"{run.layout}:{run.prefix}"
    with conn.transaction() as tx:
        result = merge_states(conn, good)
        for read, reason in bad:
            record_quarantine(conn, Quarantined.from_read(read, source, reason), run.run_id)
        unchanged = result.unchanged(good)
        finished = conn.execute(
            query("backfill_finish_batch"),
            {
                "run_id": run.run_id,
                "batch_no": batch_no,
                "worker": worker,
                "migrated": len(good) - unchanged,
                "unchanged": unchanged,
                "quarantined": len(bad),
                "vanished": vanished,
                "messages": result.messages,
            },
        ).fetchone()
        if finished is None:
            # Our lease ran out and another worker did this batch: keep its result.
            raise psycopg.Rollback(tx)
    return finished is not None


def retry_quarantine(settings: Settings, entry_ids: Sequence[int] | None = None) -> dict[str, int]:
    """Read quarantined sessions from Redis again; migrate those that are now valid."""
    from memshift.migrate.quarantine import entries, entry, resolve

    redis_url, postgres_dsn = require_stores(settings, "quarantine retry")
    outcome = {"migrated": 0, "still_bad": 0, "vanished": 0}
    options = BackfillOptions(layout=settings.layout, prefix=settings.prefix)
    source = f"{options.layout}:{options.prefix}"
    layout = get_layout(options.layout, options.prefix)
    with connect(postgres_dsn) as conn, _redis(redis_url, layout) as store:
        ids = list(entry_ids) if entry_ids else [e.id for e in entries(conn, limit=10**9)]
        for entry_id in ids:
            row = entry(conn, entry_id)
            if row["source"] != source:
                raise ConfigError(
                    f"quarantine entry {entry_id} came from {row['source']}; retry it with "
                    f"--layout and --prefix set to match (now {source})"
                )
            key = row["session_key"]
            sid = key.decode("utf-8", "surrogateescape")
            good, bad, vanished = sort_reads(store.read_sessions([sid]), options.max_value_bytes)
            with conn.transaction():
                if bad:
                    read, reason = bad[0]
                    record_quarantine(conn, Quarantined.from_read(read, source, reason), None)
                    outcome["still_bad"] += 1
                    continue
                merge_states(conn, good)
                resolve(conn, source, key)
                outcome["vanished" if vanished else "migrated"] += 1
    return outcome


# -- the whole run ---------------------------------------------------------------------


def backfill(
    settings: Settings,
    options: BackfillOptions | None = None,
    *,
    on_progress: Callable[[Summary], None] | None = None,
) -> Summary:
    """Copy every session of ``settings.redis_url`` into ``settings.postgres_dsn``.

    Joins the unfinished run for the same source if there is one. Returns the run's
    summary once every batch is done.
    """
    options = options or BackfillOptions(layout=settings.layout, prefix=settings.prefix)
    redis_url, postgres_dsn = require_stores(settings, "backfill")
    layout = get_layout(options.layout, options.prefix)
    with connect(postgres_dsn) as conn, _redis(redis_url, layout) as store:
        run = start_or_join(conn, redis_url, options)
        log.info("backfill run %s (%s)", run.run_id, run.state)
        children = _spawn(settings, options, run) if options.workers > 1 else []
        try:
            if run.state == "discovering":
                discover(conn, store, run, options)
            if not children:
                work(conn, store, run, options)
            while not _complete(conn, run, children, on_progress):
                time.sleep(0.25)
        finally:
            for child in children:
                child.join(timeout=5)
                if child.is_alive():
                    child.terminate()
        summary = run_summary(conn, run.run_id)
    if on_progress:
        on_progress(summary)
    return summary


def _complete(
    conn: psycopg.Connection[Any], run: RunRecord, children: list[Any],
    on_progress: Callable[[Summary], None] | None,
) -> bool:
    conn.execute(query("backfill_complete"), {"run_id": run.run_id})
    summary = run_summary(conn, run.run_id)
    if on_progress:
        on_progress(summary)
    if summary.state == "completed":
        return True
    if children and not any(c.is_alive() for c in children):
        raise MemshiftError(
            f"every backfill worker of run {run.run_id} stopped before the run completed; "
            "run `memshift backfill` again to finish it"
        )
    return False


@contextmanager
def _redis(url: str, layout: Layout) -> Iterator[RedisStore]:
    store = RedisStore(url, layout=layout)  # a cluster client for redis+cluster:// URLs
    try:
        yield store
    finally:
        store.close()


def _spawn(settings: Settings, options: BackfillOptions, run: RunRecord) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    children = [
        ctx.Process(
            target=_worker_main, args=(settings, options, run), name=f"memshift-backfill-{i}",
            daemon=True,
        )
        for i in range(options.workers)
    ]
    for child in children:
        child.start()
    return children


def _worker_main(settings: Settings, options: BackfillOptions, run: RunRecord) -> None:
    assert settings.postgres_dsn and settings.redis_url
    layout = get_layout(options.layout, options.prefix)
    with connect(settings.postgres_dsn) as conn, _redis(settings.redis_url, layout) as store:
        work(conn, store, run, options)
