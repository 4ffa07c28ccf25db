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

The process that starts a run is one of its workers: it discovers in a thread while
it works on the batches found so far, and ``--workers N`` adds N - 1 processes.
Within a worker, a thread writes one batch into PostgreSQL while the worker reads
and validates the next from Redis.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
from memshift.stores.layouts import Layout, PreparesPostgres, get_layout
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
    conn: psycopg.Connection[Any], store: RedisStore, run: RunRecord, options: BackfillOptions,
    *, stop: Callable[[], bool] = lambda: False,
) -> None:
    """SCAN every node from its saved cursor; turn whole pages into batches. ``stop``
    ends it between pages (a later run goes on from the cursors saved)."""
    layout = store.layout
    cursors = dict(run.scan_cursors)
    for node, server in _nodes(store.client).items():
        cursor = cursors.get(node, 0)
        if cursor == -1:  # this node was scanned to the end already
            continue
        buffered: list[str] = []
        while True:
            if stop():
                return
            cursor, keys = server.scan(
                cursor, match=layout.scan_pattern(), count=options.scan_count,
                _type=layout.scan_type,
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
    dsn: str, store: RedisStore, run: RunRecord, options: BackfillOptions,
    *, name: str | None = None, stop: Callable[[], bool] = lambda: False,
    on_batch: Callable[[], None] = lambda: None,
) -> int:
    """Claim and copy batches until none is left; return how many this worker did.

    Two stages overlap: while a thread writes one batch into PostgreSQL (mostly
    waiting for the server, with the GIL released), this thread claims the next one
    and reads and validates it from Redis. So at most two batches are in memory.
    """
    me = name or worker_name()
    done = 0
    with (
        connect(dsn) as claims,
        connect(dsn) as writes,
        ThreadPoolExecutor(1, thread_name_prefix="memshift-backfill-write") as writer,
        _collecting_between_batches() as collect,
    ):
        writing: Future[bool] | None = None
        while not stop():
            claim = claims.execute(
                query("backfill_claim"),
                {"run_id": run.run_id, "worker": me, "lease": options.lease_seconds},
            ).fetchone()
            if claim is None:
                if writing is not None:  # our own batch in flight still counts as pending
                    done += writing.result()
                    writing = None
                    continue
                state = claims.execute(query("backfill_state"), {"run_id": run.run_id}).fetchone()
                if state is None or (state[0] != "discovering" and not state[1]):
                    break  # discovery over and nothing claimable or leased
                # Batches still to come (soon), or leased by a worker that may die.
                time.sleep(0.05 if state[0] == "discovering" else 0.2)
                continue
            batch = read_batch(store, claim[0], claim[1], options)
            if writing is not None:
                done += writing.result()
                on_batch()
            collect()
            writing = writer.submit(write_batch, writes, run, batch, me)
        if writing is not None:
            done += writing.result()
    return done


@contextmanager
def _collecting_between_batches(every: int = 20) -> Iterator[Callable[[], None]]:
    """Collect cyclic garbage once every ``every`` batches, not every 700 allocations.

    A batch makes some ten objects per message, which all live until it is written;
    triggered by allocations, the collector examined them over and over: a third of
    a worker's CPU time in a profile. Reference counting frees a batch as soon as it
    is written; what it cannot free (the rare cycle, e.g. a traceback) waits for the
    next collection, so memory stays flat. The objects that were there before (the
    modules, the caller's data) are frozen meanwhile, so that those collections only
    look at what the run made.
    """
    enabled = gc.isenabled()
    gc.disable()
    gc.freeze()
    batches = 0

    def collect() -> None:
        nonlocal batches
        batches += 1
        if batches % every == 0:
            gc.collect()

    try:
        yield collect
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


@dataclass
class Batch:
    """One claimed batch as read from Redis: what to merge, quarantine, and count."""

    batch_no: int
    good: list[SessionState]
    bad: list[tuple[RawSession, str]]
    vanished: int


def read_batch(
    store: RedisStore, batch_no: int, session_ids: Sequence[str], options: BackfillOptions
) -> Batch:
    """Read a batch in one pipeline and sort its sessions (no PostgreSQL involved)."""
    good, bad, vanished = sort_reads(store.read_sessions(session_ids), options.max_value_bytes)
    return Batch(batch_no, good, bad, vanished)


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
    if _size(read.replies) <= limit:  # the common case: no value can be over
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


def _size(reply: Any) -> int:
    """The bytes of the values in a reply: of dicts, the values (not the field names)."""
    kind = type(reply)
    if kind is bytes:
        return len(reply)
    if kind is dict:
        reply = reply.values()
    elif kind is not list and kind is not tuple:
        return 0
    total = 0
    for item in reply:
        total += len(item) if type(item) is bytes else _size(item)
    return total


def _values(reply: Any) -> Iterator[bytes]:
    if isinstance(reply, bytes):
        yield reply
    elif isinstance(reply, dict):
        for item in reply.values():
            yield from _values(item)
    elif isinstance(reply, list | tuple):
        for item in reply:
            yield from _values(item)


def write_batch(conn: psycopg.Connection[Any], run: RunRecord, batch: Batch, worker: str) -> bool:
    """Merge a batch and mark it done, in one transaction; False when another worker
    finished it (our lease ran out), and then nothing of ours is kept."""
    source = f"{run.layout}:{run.prefix}"
    with conn.transaction() as tx:
        result = merge_states(conn, batch.good)
        for read, reason in batch.bad:
            record_quarantine(conn, Quarantined.from_read(read, source, reason), run.run_id)
        unchanged = result.unchanged(batch.good)
        finished = conn.execute(
            query("backfill_finish_batch"),
            {
                "run_id": run.run_id,
                "batch_no": batch.batch_no,
                "worker": worker,
                "migrated": len(batch.good) - unchanged,
                "unchanged": unchanged,
                "quarantined": len(batch.bad),
                "vanished": batch.vanished,
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
        if isinstance(layout, PreparesPostgres):  # e.g. a framework's table beside the truth
            layout.prepare_postgres(conn)
        run = start_or_join(conn, redis_url, options)
        log.info("backfill run %s (%s)", run.run_id, run.state)
        # This process is one of the workers: it starts at once (a spawned child
        # first imports memshift) and works beside its children once discovery is done.
        children = _spawn(settings, options, run, options.workers - 1)
        try:
            def report() -> None:
                if on_progress:
                    on_progress(run_summary(conn, run.run_id))

            with _discovering(postgres_dsn, store, run, options) as failed:
                work(postgres_dsn, store, run, options, stop=failed, on_batch=_throttled(report))
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


@contextmanager
def _discovering(
    dsn: str, store: RedisStore, run: RunRecord, options: BackfillOptions
) -> Iterator[Callable[[], bool]]:
    """Discover in a thread, if the run still needs it, while this one works on the
    batches found so far; yield a test that is true once discovery has failed (its
    error is raised when the block ends)."""
    if run.state != "discovering":
        yield lambda: False
        return
    stopping = threading.Event()

    def scan() -> None:
        with connect(dsn) as conn:
            discover(conn, store, run, options, stop=stopping.is_set)

    with ThreadPoolExecutor(1, thread_name_prefix="memshift-backfill-scan") as pool:
        found = pool.submit(scan)
        try:
            yield lambda: found.done() and found.exception() is not None
        except BaseException:
            stopping.set()
            raise
        found.result()


def _throttled(report: Callable[[], None], seconds: float = 0.5) -> Callable[[], None]:
    """``report``, called at most once every ``seconds``."""
    last = time.monotonic()

    def maybe() -> None:
        nonlocal last
        if time.monotonic() - last >= seconds:
            last = time.monotonic()
            report()

    return maybe


def _spawn(
    settings: Settings, options: BackfillOptions, run: RunRecord, count: int
) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    children = [
        ctx.Process(
            target=_worker_main, args=(settings, options, run), name=f"memshift-backfill-{i}",
            daemon=True,
        )
        for i in range(count)
    ]
    for child in children:
        child.start()
    return children


def _worker_main(settings: Settings, options: BackfillOptions, run: RunRecord) -> None:
    assert settings.postgres_dsn and settings.redis_url
    layout = get_layout(options.layout, options.prefix)
    with _redis(settings.redis_url, layout) as store:
        work(settings.postgres_dsn, store, run, options)
