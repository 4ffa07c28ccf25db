"""Parity: does PostgreSQL hold what Redis holds of each session, and is it sound?

``check_session`` compares one session as both stores hold it (pure, no I/O) and
returns a :class:`ParityReport` in the shape of DESIGN §5. ``parity`` reads sessions
in batches (one Redis pipeline per batch), judges them, re-reads the failing ones
once after a short settle delay (a session written during the check is ``pending``,
never a false ``fail``), and records every report in ``memshift.parity_results`` with
one INSERT per batch.

Only what Redis can hold is compared: its untrimmed tail of messages, its tool runs,
its latest summary and its latest checkpoint. PostgreSQL's own soundness (the
invariants of DESIGN §2) is checked beside it as ``pg_invariants_hold``, and for a
layout that keeps its framework's table from the truth (langchain, openai-agents,
llamaindex), that table against the truth as ``projection_matches``: it is what the
application reads once it switches to the framework's PostgreSQL class.

Check values: ``true`` the stores agree, ``false`` they differ, ``null`` the check
could not run (the session is missing from a store, or a store could not read it).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import random
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from operator import attrgetter
from typing import Any, Literal

import psycopg
from psycopg.types.json import Jsonb

from memshift.config import Settings, require_stores
from memshift.errors import ConfigError, MemshiftError, ValidationError
from memshift.migrate import chunked
from memshift.migrate.backfill import connect
from memshift.model import LEGAL_TRANSITIONS, SessionState, check_session_id, now
from memshift.redact import redact
from memshift.sql.queries import query
from memshift.stores.layouts import Layout
from memshift.stores.layouts.projection import Drift, KeepsProjection, ProjectionError
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RawSession, RedisStore

ParityStatus = Literal["pass", "fail", "pending", "error"]

# The checks of DESIGN §5, in report order, then those memshift adds.
SEED_CHECKS = (
    "message_count_matches",
    "latest_checkpoint_matches",
    "tool_retry_state_matches",
    "memory_summary_version_matches",
    "session_status_matches",
    "message_order_matches",
)
PRESENCE = "presence_matches"
INVARIANTS = "pg_invariants_hold"
READABLE = "stores_readable"
# Only in the reports of a layout whose framework table is kept from the truth.
PROJECTION = "projection_matches"

# What makes two copies of a message, or of a tool run's retry state, the same; compared
# as whole tuples (in C) before any field is looked at one by one.
_MESSAGE_KEY = attrgetter("seq", "message_id", "role", "content", "tool_call_id")
_RETRY_KEY = attrgetter("tool_call_id", "status", "attempts", "last_error")

# Redis drops a session at its TTL; PostgreSQL recorded that expiry from the PTTL it
# read, so the two clocks may disagree by a little.
EXPIRY_SLACK = timedelta(seconds=5)


@dataclass(frozen=True)
class Diff:
    """One difference: which check saw it, in which field, and what each store holds.

    ``sensitive`` values (message content, summary text, checkpoint state, tool
    arguments and errors) are shown as length and hash unless values are asked for.
    """

    check: str
    field: str
    redis: Any
    postgres: Any
    sensitive: bool = False

    def as_json(self, *, show_values: bool = False) -> dict[str, Any]:
        def shown(value: Any) -> Any:
            if show_values or not self.sensitive or value is None:
                return value
            return fingerprint(value)

        return {
            "check": self.check,
            "field": self.field,
            "redis": shown(self.redis),
            "postgres": shown(self.postgres),
        }


def fingerprint(value: Any) -> dict[str, Any]:
    """A value as its length and a short hash: enough to tell two apart, not to read."""
    text = value if isinstance(value, str) else _canonical(value)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return {"length": len(text), "sha256": digest}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


@dataclass(frozen=True)
class ParityReport:
    session_id: str
    checks: dict[str, bool | None]
    parity_status: ParityStatus
    diffs: tuple[Diff, ...]
    checked_at: datetime
    # Neither store holds the session: the stores agree (it passes), but there is no
    # session to speak of. Recorded only to supersede an earlier result of that id.
    in_neither: bool = False

    def as_json(self, *, show_values: bool = False) -> dict[str, Any]:
        """The report in the exact shape of DESIGN §5; values redacted by default."""
        return {
            "session_id": self.session_id,
            "checks": dict(self.checks),
            "parity_status": self.parity_status,
            "diffs": [d.as_json(show_values=show_values) for d in self.diffs],
            "checked_at": iso_z(self.checked_at),
        }

    @property
    def failed_checks(self) -> list[str]:
        return [name for name, ok in self.checks.items() if ok is False]


def iso_z(at: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``, to the second, as in DESIGN §5."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the comparison (pure) -------------------------------------------------------------


def check_session(
    redis_state: SessionState | None, pg_state: SessionState | None, *, checked_at: datetime,
    projection: Sequence[Diff] | None = None,
) -> ParityReport:
    """Compare one session as Redis and PostgreSQL hold it; no I/O.

    A session that Redis no longer holds but PostgreSQL does is not drift when
    PostgreSQL recorded an expiry that has passed (or its status is ``expired``): the
    report passes, with ``presence_matches`` true and one diff saying so.

    ``projection``: the diffs of the framework table against the truth
    (:func:`projection_diffs`), empty when it matches; None when the layout keeps no
    such table (the report then has no ``projection_matches``).
    """
    either = redis_state or pg_state
    sid = either.session_id if either is not None else "?"
    unchecked: dict[str, bool | None] = dict.fromkeys(SEED_CHECKS)
    if redis_state is None or pg_state is None:
        report = _one_side(sid, redis_state, pg_state, unchecked, checked_at)
        return report if pg_state is None else _with_projection(report, projection)
    diffs: list[Diff] = []
    diffs += _message_count(redis_state, pg_state)
    diffs += _latest_checkpoint(redis_state, pg_state)
    diffs += _tool_retry_state(redis_state, pg_state)
    diffs += _summary_version(redis_state, pg_state)
    diffs += _session_status(redis_state, pg_state)
    diffs += _message_order(redis_state, pg_state)
    diffs += invariant_diffs(pg_state)
    failed = {d.check for d in diffs}
    checks: dict[str, bool | None] = {name: name not in failed for name in SEED_CHECKS}
    checks[PRESENCE] = True
    checks[INVARIANTS] = INVARIANTS not in failed
    report = ParityReport(sid, checks, "fail" if diffs else "pass", tuple(diffs), checked_at)
    return _with_projection(report, projection)


def _with_projection(report: ParityReport, projection: Sequence[Diff] | None) -> ParityReport:
    """The report with ``projection_matches`` added (failing it when there are diffs)."""
    if projection is None:
        return report
    checks = report.checks | {PROJECTION: not projection}
    status = "fail" if projection else report.parity_status
    return ParityReport(report.session_id, checks, status, (*report.diffs, *projection),
                        report.checked_at)


def projection_diffs(drift: Drift) -> list[Diff]:
    """A framework table's drift from the truth as diffs: the row counts when they
    differ, and the first row that differs.

    The ``redis`` side is what the table should hold: the truth's message (the other
    checks compare the truth with Redis) as the framework stores it; the
    ``postgres`` side is what the framework table holds (None: no row).
    """
    want, have, at = drift.want, drift.have, drift.first_difference
    diffs: list[Diff] = []
    if len(want) != len(have):
        diffs.append(Diff(PROJECTION, f"{drift.where}.message_count", len(want), len(have)))
    if at < max(len(want), len(have)):
        diffs.append(Diff(PROJECTION, f"{drift.where}[seq={drift.first_seq + at}]",
                          want[at] if at < len(want) else None,
                          have[at] if at < len(have) else None, sensitive=True))
    return diffs


def _one_side(
    sid: str, redis_state: SessionState | None, pg_state: SessionState | None,
    checks: dict[str, bool | None], checked_at: datetime,
) -> ParityReport:
    if redis_state is None and pg_state is None:
        agree: dict[str, bool | None] = dict.fromkeys((*checks, PRESENCE), True)
        return ParityReport(sid, agree | {INVARIANTS: None}, "pass", (), checked_at,
                            in_neither=True)
    if pg_state is None:
        assert redis_state is not None
        diff = Diff(PRESENCE, "session", "present", "absent (not migrated yet?)")
        checks |= {PRESENCE: False, INVARIANTS: None}
        return ParityReport(sid, checks, "fail", (diff,), checked_at)
    session = pg_state.session
    expired = session.status == "expired" or (
        session.expires_at is not None and session.expires_at <= checked_at + EXPIRY_SLACK
    )
    invariants = invariant_diffs(pg_state)
    checks |= {PRESENCE: expired, INVARIANTS: not invariants}
    expiry = "none recorded" if session.expires_at is None else iso_z(session.expires_at)
    if expired:
        presence = Diff(PRESENCE, "session", "absent (expired: not drift)",
                        f"present, status {session.status}, expires_at {expiry}")
    else:
        presence = Diff(PRESENCE, "session", "absent",
                        f"present, status {session.status}, expires_at {expiry}")
    status: ParityStatus = "pass" if expired and not invariants else "fail"
    return ParityReport(sid, checks, status, (presence, *invariants), checked_at)


def error_report(sid: str, reason: str, checked_at: datetime, store: str = "") -> ParityReport:
    """A session that a store could not read: nothing compared, the reason in a diff."""
    checks: dict[str, bool | None] = dict.fromkeys((*SEED_CHECKS, PRESENCE, INVARIANTS))
    checks[READABLE] = False
    diff = Diff(READABLE, store or "session",
                reason if store in ("redis", "") else None,
                reason if store == "postgres" else None)
    return ParityReport(sid, checks, "error", (diff,), checked_at)


def _message_count(redis_state: SessionState, pg_state: SessionState) -> list[Diff]:
    ours, theirs = redis_state.message_count, pg_state.message_count
    if ours == theirs:
        return []
    return [Diff("message_count_matches", "message_count", ours, theirs)]


def _latest_checkpoint(redis_state: SessionState, pg_state: SessionState) -> list[Diff]:
    ours, theirs = redis_state.latest_checkpoint, pg_state.latest_checkpoint
    name = "latest_checkpoint_matches"
    if ours is None or theirs is None:
        if ours is theirs:
            return []
        return [Diff(name, "checkpoint",
                     ours.checkpoint_id if ours else None,
                     theirs.checkpoint_id if theirs else None)]
    diffs = [
        Diff(name, f"checkpoint.{attr}", getattr(ours, attr), getattr(theirs, attr))
        for attr in ("checkpoint_id", "step", "parent_id")
        if getattr(ours, attr) != getattr(theirs, attr)
    ]
    if ours.state != theirs.state:
        diffs.append(Diff(name, "checkpoint.state", ours.state, theirs.state, sensitive=True))
    return diffs


def _tool_retry_state(redis_state: SessionState, pg_state: SessionState) -> list[Diff]:
    name = "tool_retry_state_matches"
    # Tool call ids are unique in each store: equal sets are equal runs, no diff.
    if set(map(_RETRY_KEY, redis_state.tool_runs)) == set(map(_RETRY_KEY, pg_state.tool_runs)):
        return []
    ours = {t.tool_call_id: t for t in redis_state.tool_runs}
    theirs = {t.tool_call_id: t for t in pg_state.tool_runs}
    diffs: list[Diff] = []
    for call_id in sorted(ours.keys() | theirs.keys()):
        mine, other = ours.get(call_id), theirs.get(call_id)
        where = f"tool_runs[{call_id}]"
        if mine is None or other is None:
            diffs.append(Diff(name, where, "present" if mine else "absent",
                              "present" if other else "absent"))
            continue
        for attr in ("status", "attempts"):
            if getattr(mine, attr) != getattr(other, attr):
                diffs.append(Diff(name, f"{where}.{attr}", getattr(mine, attr),
                                  getattr(other, attr)))
        if mine.last_error != other.last_error:
            diffs.append(Diff(name, f"{where}.last_error", mine.last_error, other.last_error,
                              sensitive=True))
    return diffs


def _summary_version(redis_state: SessionState, pg_state: SessionState) -> list[Diff]:
    name = "memory_summary_version_matches"
    ours, theirs = redis_state.latest_summary, pg_state.latest_summary
    if ours is None or theirs is None:
        if ours is theirs:
            return []
        return [Diff(name, "summary.version", ours.version if ours else None,
                     theirs.version if theirs else None)]
    if ours.version != theirs.version:
        return [Diff(name, "summary.version", ours.version, theirs.version)]
    if ours.text != theirs.text:
        return [Diff(name, "summary.text", ours.text, theirs.text, sensitive=True)]
    return []


def _session_status(redis_state: SessionState, pg_state: SessionState) -> list[Diff]:
    ours, theirs = redis_state.session.status, pg_state.session.status
    return [] if ours == theirs else [Diff("session_status_matches", "status", ours, theirs)]


def _message_order(redis_state: SessionState, pg_state: SessionState) -> list[Diff]:
    """Every seq that both stores hold holds the same message (missing ones are counts)."""
    name = "message_order_matches"
    ours, held = redis_state.messages, pg_state.messages
    if not ours:
        return []
    # Both hold messages in seq order, PostgreSQL from an earlier seq (it keeps what
    # Redis trimmed): when its run of messages from Redis's first seq on is Redis's
    # messages, field for field, there is no diff to look for.
    start = (ours[0].seq or 0) - (held[0].seq or 0) if held else -1
    if start >= 0 and list(map(_MESSAGE_KEY, ours)) == list(
            map(_MESSAGE_KEY, held[start : start + len(ours)])):
        return []
    theirs = {m.seq: m for m in held}
    diffs: list[Diff] = []
    for mine in ours:
        other = theirs.get(mine.seq)
        if other is None or mine.same_content(other):
            continue
        where = f"messages[seq={mine.seq}]"
        for attr in ("message_id", "role", "tool_call_id"):
            if getattr(mine, attr) != getattr(other, attr):
                diffs.append(Diff(name, f"{where}.{attr}", getattr(mine, attr),
                                  getattr(other, attr)))
        if mine.content != other.content:
            diffs.append(Diff(name, f"{where}.content", mine.content, other.content,
                              sensitive=True))
    return diffs


def invariant_diffs(state: SessionState) -> list[Diff]:
    """What breaks DESIGN §2's rules in PostgreSQL's copy, one diff per fault.

    No seq gaps (beyond the trimmed messages, which PostgreSQL never received), only
    legal status transitions in the events, summary versions that grow with time, and
    a checkpoint chain without cycles in which a child's step is above its parent's
    (so the latest checkpoint has the highest step).
    """
    found: list[Diff] = []

    def fault(what: str, detail: str) -> None:
        found.append(Diff(INVARIANTS, what, None, detail))

    seqs = [m.seq for m in state.messages if m.seq is not None]
    if seqs and seqs[0] > state.session.messages_trimmed:
        fault("messages.seq", f"seqs {state.session.messages_trimmed}..{seqs[0] - 1} are "
              f"missing (messages_trimmed {state.session.messages_trimmed})")
    if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
        for before, after in pairwise(seqs):
            if after != before + 1:
                fault("messages.seq", f"seq {after} follows seq {before}")
    for event in state.events:
        if event.type != "status" or event.from_status is None or event.to_status is None:
            continue
        if event.to_status not in LEGAL_TRANSITIONS.get(event.from_status, ()):
            fault(f"events[{event.event_seq}]",
                  f"illegal transition {event.from_status} -> {event.to_status}")
    summaries = sorted(state.summaries, key=lambda s: s.version)
    for older, newer in pairwise(summaries):
        if newer.updated_at < older.updated_at:
            fault("summaries.version", f"version {newer.version} is older than version "
                  f"{older.version}")
    steps = {c.checkpoint_id: c.step for c in state.checkpoints}
    step_faults = len(found)
    for checkpoint in state.checkpoints:
        parent = checkpoint.parent_id
        if parent in steps and steps[parent] >= checkpoint.step:
            fault(f"checkpoints[{checkpoint.checkpoint_id}].step",
                  f"step {checkpoint.step} is not above its parent {parent!r}'s step "
                  f"{steps[parent]}")
    # Steps grow along every link, so a cycle needs a link whose step does not: only
    # then is the chain walked for one.
    if len(found) > step_faults:
        for problem in state.problems():
            if problem.startswith("checkpoint chain"):
                fault("checkpoints.parent_id", problem)
    return found


# -- the batch job ---------------------------------------------------------------------


@dataclass(frozen=True)
class ParityOptions:
    """How a parity run reads and judges. Every field says its default."""

    batch_size: int = 200  # sessions per batch (one Redis pipeline, one INSERT)
    settle_seconds: float = 0.2  # wait before re-reading a failing session once
    record: bool = True  # write every report to memshift.parity_results

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 10_000:
            raise ConfigError(f"--batch-size must be from 1 to 10000, got {self.batch_size}")
        if self.settle_seconds < 0:
            raise ConfigError(f"settle_seconds must be 0 or more, got {self.settle_seconds}")


@dataclass
class ParityTotals:
    """Counts of a run, for the summary line."""

    counts: dict[str, int] = field(
        default_factory=lambda: {"pass": 0, "fail": 0, "pending": 0, "error": 0}
    )

    def add(self, report: ParityReport) -> None:
        self.counts[report.parity_status] += 1

    @property
    def checked(self) -> int:
        return sum(self.counts.values())

    @property
    def drift_rate(self) -> float:
        """Failed share of the judged sessions (pending ones are not judged yet)."""
        judged = self.counts["pass"] + self.counts["fail"] + self.counts["error"]
        return self.counts["fail"] / judged if judged else 0.0

    def as_json(self) -> dict[str, Any]:
        return {**self.counts, "checked": self.checked,
                "drift_rate": round(self.drift_rate, 6)}


def parity(
    settings: Settings,
    *,
    session_ids: Sequence[str] | None = None,
    sample: int | None = None,
    options: ParityOptions | None = None,
) -> Iterator[ParityReport]:
    """Check sessions: those named, a random ``sample`` of PostgreSQL's, or all.

    "All" is every session PostgreSQL holds, then every session only Redis holds
    (SCAN), each once. Reports come out batch by batch, after the batch is recorded
    (by a recorder thread, while the next batch is judged).

    Batches overlap: once a batch has been read from Redis, a worker thread reads it
    from PostgreSQL (the query, then the decoding), and another compares its framework
    table with the truth (a layout that keeps one), while this thread reads the next
    batch from Redis and judges the one before. Each session is still read from
    Redis first, then from PostgreSQL (see :func:`_read`).
    """
    options = options or ParityOptions()
    if session_ids is not None and sample is not None:
        raise ConfigError("give either session ids or a sample size, not both")
    if sample is not None and sample < 1:
        raise ConfigError(f"--sample must be at least 1, got {sample}")
    redis_url, postgres_dsn = require_stores(settings, "parity")
    with connect(postgres_dsn) as conn, connect(postgres_dsn) as recorder_conn, \
            PostgresStore(postgres_dsn, max_size=3) as truth, \
            RedisStore(redis_url, layout=settings.layout,
                       prefix=settings.prefix) as legacy, \
            ThreadPoolExecutor(1, thread_name_prefix="memshift-parity") as postgres_reader, \
            ThreadPoolExecutor(1, thread_name_prefix="memshift-parity-table") as table_reader, \
            ThreadPoolExecutor(1, thread_name_prefix="memshift-parity-record") as recorder:
        before: tuple[list[RawSession], Future[_Truth], Future[_FrameworkTable]] | None = None
        recording: tuple[list[ParityReport], Future[None]] | None = None
        for batch in _batches(conn, truth, legacy, session_ids, sample, options.batch_size):
            with _gc_paused():
                redis_reads = legacy.read_sessions(batch)
                loading = postgres_reader.submit(_load_truth, truth, batch)
                comparing = table_reader.submit(_framework_table, truth, batch, legacy.layout)
                judged = [] if before is None else _judge_read_ahead(
                    legacy, truth, *before, options)
            before = (redis_reads, loading, comparing)
            yield from _recorded(recording)
            recording = _record_in_background(recorder, recorder_conn, judged, options)
        if before is not None:
            with _gc_paused():
                judged = _judge_read_ahead(legacy, truth, *before, options)
            yield from _recorded(recording)
            recording = _record_in_background(recorder, recorder_conn, judged, options)
        yield from _recorded(recording)


def _record_in_background(
    recorder: ThreadPoolExecutor, conn: psycopg.Connection[Any],
    reports: list[ParityReport], options: ParityOptions,
) -> tuple[list[ParityReport], Future[None]] | None:
    """Write a batch's reports from the recorder thread, while the next batch is judged.

    The INSERT is PostgreSQL's work, not this process's: overlapping it with the next
    batch's decoding hides it. Each batch's reports are still handed out only once
    they are recorded (:func:`_recorded`), so a caller never acts on a report that a
    crash would lose.
    """
    if not reports:
        return None
    if not options.record:
        done: Future[None] = Future()
        done.set_result(None)
        return reports, done
    return reports, recorder.submit(record, conn, reports)


def _recorded(
    recording: tuple[list[ParityReport], Future[None]] | None,
) -> list[ParityReport]:
    if recording is None:
        return []
    reports, written = recording
    written.result()  # the INSERT's error, if any, surfaces here
    return reports


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a batch is read, decoded and judged.

    A batch allocates some hundred thousand records, dicts and strings, none in a
    reference cycle (reference counting frees them), yet each 700 allocations start a
    collection, and every so often one that walks the whole heap: a quarter to a third
    of parity's CPU time went there. Paused only between the generator's yields, never
    while the caller runs; left alone when something else has paused it already.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _judge_read_ahead(
    legacy: RedisStore, truth: PostgresStore, redis_reads: list[RawSession],
    loading: Future[_Truth], comparing: Future[_FrameworkTable], options: ParityOptions,
) -> list[ParityReport]:
    """Judge a batch read ahead, re-reading the sessions that were still moving."""
    first = _pair(redis_reads, loading.result().beside(comparing.result()))
    return [judged.report for judged in _settle(legacy, truth, first, options.settle_seconds)]


def _batches(
    conn: psycopg.Connection[Any], truth: PostgresStore, legacy: RedisStore,
    session_ids: Sequence[str] | None, sample: int | None, size: int,
) -> Iterator[list[str]]:
    if session_ids is not None:
        ids = list(dict.fromkeys(session_ids))
        yield from (ids[i : i + size] for i in range(0, len(ids), size))
        return
    if sample is not None:
        rows = conn.execute(query("parity_sample"), {"limit": sample}).fetchall()
        ids = [row[0] for row in rows]
        random.shuffle(ids)
        yield from (ids[i : i + size] for i in range(0, len(ids), size))
        return
    # Sessions whose latest result did not pass and that PostgreSQL no longer holds:
    # those Redis does not list either (gone from both) are checked last, so that the
    # gate judges what is there now rather than a failure of a session deleted since.
    unsettled = {row[0] for row in conn.execute(query("parity_unsettled"))}
    yield from chunked(truth.list_sessions(batch_size=size), size)
    for chunk in chunked(legacy.list_sessions(batch_size=size), size):
        known = {row[0] for row in conn.execute(query("parity_known"), {"ids": chunk})}
        only_redis = sorted(set(chunk) - known)
        unsettled.difference_update(only_redis)
        if only_redis:
            yield only_redis
    yield from chunked(iter(sorted(unsettled)), size)




@dataclass(frozen=True)
class _Read:
    redis: RawSession
    postgres: SessionState | None
    postgres_error: str | None
    projection: tuple[Diff, ...] | None = None  # None: no framework table to check


@dataclass(frozen=True)
class _FrameworkTable:
    """A batch's framework table against the truth: the diffs of each session (None:
    the layout keeps no such table), or why it could not be read."""

    diffs: dict[str, tuple[Diff, ...]] | None
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Truth:
    """A batch as PostgreSQL holds it: each session's state, or why it could not be read,
    and the diffs of its framework table (None: the layout keeps none)."""

    states: dict[str, SessionState | None]
    errors: dict[str, str]
    projection: dict[str, tuple[Diff, ...]] | None = None

    def beside(self, table: _FrameworkTable) -> _Truth:
        return _Truth(self.states, table.errors | self.errors, table.diffs)

    def projection_of(self, session_id: str) -> tuple[Diff, ...] | None:
        return None if self.projection is None else self.projection.get(session_id, ())


def _read(legacy: RedisStore, truth: PostgresStore, ids: Sequence[str]) -> list[_Read]:
    # Redis first: while Redis is primary a write lands there first, so PostgreSQL,
    # read after it, is at least as new for writes that were acknowledged.
    raw = legacy.read_sessions(ids)
    loaded = _load_truth(truth, ids)
    return _pair(raw, loaded.beside(_framework_table(truth, ids, legacy.layout)))


def _load_truth(truth: PostgresStore, ids: Sequence[str]) -> _Truth:
    try:
        return _Truth(truth.load_sessions(ids), {})
    except MemshiftError:
        # One bad id (or a lost connection) fails the whole statement: read one by one,
        # so that each session gets its own reason and the others are still judged.
        states: dict[str, SessionState | None] = {}
        errors: dict[str, str] = {}
        for sid in ids:
            try:
                states[sid] = truth.load_session(sid)
            except MemshiftError as exc:
                errors[sid] = str(exc)
        return _Truth(states, errors)


def _framework_table(truth: PostgresStore, ids: Sequence[str], layout: Layout
                     ) -> _FrameworkTable:
    """The batch's framework table compared with the truth, in one statement (for a
    layout that keeps one).

    A table that cannot be compared (dropped, or not the projection's any more) fails
    every session's ``projection_matches`` with the reason; a lost connection makes
    their reports ``error``, as for any PostgreSQL read. Ids that are no session ids
    are left to the truth's read, which names what is wrong with them.
    """
    valid = [sid for sid in ids if _is_session_id(sid)]
    if not valid or not isinstance(layout, KeepsProjection):
        return _FrameworkTable(None)
    try:
        truth.open()
        with truth.pool.connection() as conn:
            drifts = layout.projection_drift(conn, valid)
    except ProjectionError as exc:
        return _FrameworkTable(dict.fromkeys(
            valid, (Diff(PROJECTION, "framework table", None, str(exc)),)))
    except (psycopg.OperationalError, MemshiftError) as exc:
        reason = f"the framework table could not be read: {redact(str(exc)).strip()}"
        return _FrameworkTable(None, dict.fromkeys(valid, reason))
    if drifts is None:
        return _FrameworkTable(None)
    return _FrameworkTable({sid: tuple(projection_diffs(d)) for sid, d in drifts.items()})


def _is_session_id(session_id: str) -> bool:
    try:
        check_session_id(session_id)
    except ValidationError:
        return False
    return True


def _pair(raw: list[RawSession], loaded: _Truth) -> list[_Read]:
    return [_Read(redis_read, loaded.states.get(redis_read.session_id),
                  loaded.errors.get(redis_read.session_id),
                  loaded.projection_of(redis_read.session_id)) for redis_read in raw]


def _judge(read: _Read, checked_at: datetime) -> ParityReport:
    sid = read.redis.session_id
    if read.redis.error is not None:
        return error_report(sid, read.redis.error, checked_at, "redis")
    if read.postgres_error is not None:
        return error_report(sid, read.postgres_error, checked_at, "postgres")
    report = check_session(read.redis.state, read.postgres, checked_at=checked_at,
                           projection=read.projection)
    if report.session_id == "?":
        return dataclasses.replace(report, session_id=sid)
    return report


def check_batch(
    legacy: RedisStore, truth: PostgresStore, ids: Sequence[str], settle_seconds: float,
) -> list[ParityReport]:
    """Judge a batch; re-read failing sessions once after ``settle_seconds``.

    A session that still differs on the second read is ``fail`` when neither store
    changed between the reads, and ``pending`` when one did (writes in flight: judge
    it again later).
    """
    return [judged.report for judged in judge_batch(legacy, truth, ids, settle_seconds)]


@dataclass(frozen=True)
class Judged:
    """A session's report with the reads it was judged on (``memshift inspect`` shows
    both stores side by side)."""

    redis: RawSession
    postgres: SessionState | None
    postgres_error: str | None
    report: ParityReport


def judge_batch(
    legacy: RedisStore, truth: PostgresStore, ids: Sequence[str], settle_seconds: float,
) -> list[Judged]:
    """:func:`check_batch`, keeping each session's last reads beside its report."""
    return _settle(legacy, truth, _read(legacy, truth, ids), settle_seconds)


def _settle(
    legacy: RedisStore, truth: PostgresStore, first: list[_Read], settle_seconds: float,
) -> list[Judged]:
    """Judge the first reads; re-read the failing sessions once after ``settle_seconds``."""
    ids = [read.redis.session_id for read in first]
    checked_at = now()
    judged = [_judged(read, _judge(read, checked_at)) for read in first]
    failing = [i for i, j in enumerate(judged) if j.report.parity_status == "fail"]
    if not failing:
        return judged
    time.sleep(settle_seconds)
    second = _read(legacy, truth, [ids[i] for i in failing])
    checked_at = now()
    for index, again in zip(failing, second, strict=True):
        report = _judge(again, checked_at)
        if report.parity_status == "fail" and _moved(first[index], again):
            report = ParityReport(report.session_id, report.checks, "pending", report.diffs,
                                  checked_at)
        judged[index] = _judged(again, report)
    return judged


def _judged(read: _Read, report: ParityReport) -> Judged:
    return Judged(read.redis, read.postgres, read.postgres_error, report)


def _moved(before: _Read, after: _Read) -> bool:
    return (_state_key(before.redis.state), _state_key(before.postgres)) != (
        _state_key(after.redis.state), _state_key(after.postgres))


def _state_key(state: SessionState | None) -> str | None:
    if state is None:
        return None
    # Redis's expires_at is now + PTTL, different at every read: not a change.
    data = state.model_dump(mode="json")
    data["session"].pop("expires_at", None)
    return _canonical(data)


def record(conn: psycopg.Connection[Any], reports: Sequence[ParityReport]) -> None:
    """Keep the reports in ``memshift.parity_results`` (redacted), in one statement.

    A session neither store holds is recorded only when it has earlier results (a
    failure of a session since deleted from both must not hold the gate for ever);
    an id that never existed (a typo) leaves no trace.
    """
    absent = [r.session_id for r in reports if r.in_neither]
    if absent:
        seen = {row[0] for row in conn.execute(query("parity_seen"), {"ids": absent})}
        reports = [r for r in reports if not r.in_neither or r.session_id in seen]
    if not reports:
        return
    conn.execute(
        query("parity_record"),
        {
            "session_ids": [r.session_id for r in reports],
            "statuses": [r.parity_status for r in reports],
            "checks": [Jsonb(r.checks) for r in reports],
            "diffs": [Jsonb([d.as_json() for d in r.diffs]) for r in reports],
            "checked_at": [r.checked_at for r in reports],
        },
    )
