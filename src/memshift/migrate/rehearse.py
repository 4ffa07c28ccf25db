"""Rehearsal: would an agent resume the same from PostgreSQL as from Redis?

``rehearse`` takes sample sessions and builds, from each store, what a resuming agent
reads (a :class:`Resumption`): the transcript in order, the latest checkpoint, the
tool runs still to be retried (non-terminal, with their attempts) and the latest
summary. ``compare`` sets the two side by side (pure, no I/O) and gives a
:class:`Rehearsal` per session: ``same``, ``differs`` or ``error``.

Parity asks whether the stores hold the same records; rehearsal asks only whether
they would resume the agent the same way, so it ignores what a resume does not read
(metadata, events, older checkpoints and summaries, finished tool runs).
Differences are :class:`~memshift.migrate.parity.Diff` s, redacted in the same way.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import random
import re
import secrets
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from memshift.config import Settings, require_stores
from memshift.errors import ConfigError, MemshiftError, StoreUnavailable
from memshift.faults.proxy import FaultProxy
from memshift.generate import Call, GeneratedSession, generate_sessions
from memshift.migrate.backfill import connect
from memshift.migrate.parity import Diff, ParityTotals, parity
from memshift.migrate.plan import (
    Plan,
    PlanWatcher,
    Stage,
    check_gates,
    load_plan,
    set_slice,
    set_stage,
)
from memshift.migrate.rule import evaluate_rule
from memshift.model import Checkpoint, MemorySummary, Message, SessionState, ToolRun
from memshift.redact import redact
from memshift.sql.migrations import upgrade
from memshift.sql.queries import query
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore

Verdict = Literal["same", "differs", "error"]
TRANSCRIPT = "transcript"
CHECKPOINT = "latest_checkpoint"
TOOL_RETRIES = "pending_tool_retries"
SUMMARY = "latest_summary"


@dataclass(frozen=True)
class Resumption:
    """What an agent reads to go on with a session."""

    transcript: dict[int, Message]  # by seq, only the messages the store holds
    first_seq: int  # where the transcript this store holds starts
    checkpoint: Checkpoint | None
    pending_tools: dict[str, ToolRun]  # non-terminal tool runs, by tool_call_id
    summary: MemorySummary | None

    @classmethod
    def of(cls, state: SessionState) -> Resumption:
        transcript = {m.seq: m for m in state.messages if m.seq is not None}
        first = min(transcript) if transcript else state.session.messages_trimmed
        return cls(
            transcript=transcript,
            first_seq=first,
            checkpoint=state.latest_checkpoint,
            pending_tools={t.tool_call_id: t for t in state.tool_runs if not t.terminal},
            summary=state.latest_summary,
        )

    def as_json(self) -> dict[str, Any]:
        """The shape of a resume, without values: counts, ids, steps, versions."""
        checkpoint = self.checkpoint
        return {
            "messages": len(self.transcript),
            "checkpoint": None if checkpoint is None
            else {"checkpoint_id": checkpoint.checkpoint_id, "step": checkpoint.step},
            "pending_tool_retries": {k: t.attempts for k, t in sorted(self.pending_tools.items())},
            "summary_version": None if self.summary is None else self.summary.version,
        }


@dataclass(frozen=True)
class Rehearsal:
    session_id: str
    verdict: Verdict
    diffs: tuple[Diff, ...]
    resumes: dict[str, Any] | None  # Redis's resumption (as JSON), when both resumed

    def as_json(self, *, show_values: bool = False) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "verdict": self.verdict,
            "resumes": self.resumes,
            "diffs": [d.as_json(show_values=show_values) for d in self.diffs],
        }


# -- the comparison (pure) -------------------------------------------------------------


def compare(
    session_id: str, redis_state: SessionState | None, pg_state: SessionState | None
) -> Rehearsal:
    """Resume one session from each store and say whether the agent would see the same."""
    if redis_state is None or pg_state is None:
        diff = Diff("session", "session", "absent" if redis_state is None else "present",
                    "absent" if pg_state is None else "present")
        verdict: Verdict = "error" if redis_state is pg_state else "differs"
        return Rehearsal(session_id, verdict, (diff,), None)
    ours, theirs = Resumption.of(redis_state), Resumption.of(pg_state)
    diffs = [*_transcript(ours, theirs), *_checkpoint(ours, theirs),
             *_tool_retries(ours, theirs), *_summary(ours, theirs)]
    return Rehearsal(session_id, "differs" if diffs else "same", tuple(diffs), ours.as_json())


def _transcript(ours: Resumption, theirs: Resumption) -> list[Diff]:
    # PostgreSQL keeps what Redis trimmed; the agent resumes from what Redis holds.
    seqs = sorted(s for s in ours.transcript.keys() | theirs.transcript.keys()
                  if s >= ours.first_seq)
    diffs: list[Diff] = []
    for seq in seqs:
        mine, other = ours.transcript.get(seq), theirs.transcript.get(seq)
        where = f"messages[seq={seq}]"
        if mine is None or other is None:
            diffs.append(Diff(TRANSCRIPT, where, "present" if mine else "absent",
                              "present" if other else "absent"))
            continue
        for attr in ("message_id", "role", "tool_call_id"):
            if getattr(mine, attr) != getattr(other, attr):
                diffs.append(Diff(TRANSCRIPT, f"{where}.{attr}", getattr(mine, attr),
                                  getattr(other, attr)))
        if mine.content != other.content:
            diffs.append(Diff(TRANSCRIPT, f"{where}.content", mine.content, other.content,
                              sensitive=True))
    return diffs


def _checkpoint(ours: Resumption, theirs: Resumption) -> list[Diff]:
    mine, other = ours.checkpoint, theirs.checkpoint
    if mine is None or other is None:
        if mine is other:
            return []
        return [Diff(CHECKPOINT, "checkpoint_id", mine.checkpoint_id if mine else None,
                     other.checkpoint_id if other else None)]
    diffs = [Diff(CHECKPOINT, attr, getattr(mine, attr), getattr(other, attr))
             for attr in ("checkpoint_id", "step") if getattr(mine, attr) != getattr(other, attr)]
    if mine.state != other.state:
        diffs.append(Diff(CHECKPOINT, "state", mine.state, other.state, sensitive=True))
    return diffs


def _tool_retries(ours: Resumption, theirs: Resumption) -> list[Diff]:
    diffs: list[Diff] = []
    for call_id in sorted(ours.pending_tools.keys() | theirs.pending_tools.keys()):
        mine, other = ours.pending_tools.get(call_id), theirs.pending_tools.get(call_id)
        where = f"tool_runs[{call_id}]"
        if mine is None or other is None:
            # Finished (or unknown) on one side: the agent would not retry it there.
            diffs.append(Diff(TOOL_RETRIES, where, "pending" if mine else "not pending",
                              "pending" if other else "not pending"))
            continue
        diffs += [Diff(TOOL_RETRIES, f"{where}.{attr}", getattr(mine, attr), getattr(other, attr))
                  for attr in ("name", "status", "attempts")
                  if getattr(mine, attr) != getattr(other, attr)]
        if mine.args != other.args:
            diffs.append(Diff(TOOL_RETRIES, f"{where}.args", mine.args, other.args,
                              sensitive=True))
    return diffs


def _summary(ours: Resumption, theirs: Resumption) -> list[Diff]:
    mine, other = ours.summary, theirs.summary
    if mine is None or other is None or mine.version != other.version:
        if mine is other:
            return []
        return [Diff(SUMMARY, "version", mine.version if mine else None,
                     other.version if other else None)]
    if mine.text != other.text:
        return [Diff(SUMMARY, "text", mine.text, other.text, sensitive=True)]
    return []


# -- the job ---------------------------------------------------------------------------


def rehearse(
    settings: Settings,
    *,
    sample: int | None = None,
    session_ids: Sequence[str] | None = None,
    batch_size: int = 200,
) -> Iterator[Rehearsal]:
    """Rehearse a random ``sample`` of PostgreSQL's sessions, or the ``session_ids`` given.

    Each batch is read with one Redis pipeline and one PostgreSQL statement, Redis
    first (as parity reads). A store that cannot read a session makes it ``error``.
    """
    if (sample is None) == (session_ids is None):
        raise ConfigError("rehearse needs either --sample N or session ids")
    if sample is not None and sample < 1:
        raise ConfigError(f"--sample must be at least 1, got {sample}")
    redis_url, postgres_dsn = require_stores(settings, "rehearse")
    with connect(postgres_dsn) as conn, \
            PostgresStore(postgres_dsn, max_size=2) as truth, \
            RedisStore(redis_url, layout=settings.layout,
                       prefix=settings.prefix) as legacy:
        if session_ids is None:
            ids = [row[0] for row in conn.execute(query("parity_sample"), {"limit": sample})]
            random.shuffle(ids)
        else:
            ids = list(dict.fromkeys(session_ids))
        for at in range(0, len(ids), batch_size):
            yield from _rehearse_batch(legacy, truth, ids[at : at + batch_size])


def _rehearse_batch(legacy: RedisStore, truth: PostgresStore, ids: list[str]) -> list[Rehearsal]:
    raws = legacy.read_sessions(ids)
    failed: dict[str, str] = {}
    try:
        loaded = truth.load_sessions(ids)
    except MemshiftError:
        # One bad id fails the whole statement: read one by one, each with its reason.
        loaded = {}
        for sid in ids:
            try:
                loaded[sid] = truth.load_session(sid)
            except MemshiftError as exc:
                failed[sid] = str(exc)
    results = []
    for raw in raws:
        sid = raw.session_id
        if raw.error is not None or sid in failed:
            diff = Diff("session", "readable", raw.error, failed.get(sid))
            results.append(Rehearsal(sid, "error", (diff,), None))
        else:
            results.append(compare(sid, raw.state, loaded[sid]))
    return results


# -- the interruption drill ------------------------------------------------------------

DRILLS = ("kill-backfill", "pg-outage")


@dataclass(frozen=True)
class Figure:
    """One line of a drill's table: what was measured, what it should be, and whether it is."""

    name: str
    value: Any
    expected: Any
    ok: bool

    def as_json(self) -> dict[str, Any]:
        return {"figure": self.name, "value": self.value, "expected": self.expected,
                "ok": self.ok}


@dataclass(frozen=True)
class DrillReport:
    """What a drill did and whether the stores, parity and the Plan still tell the truth."""

    drill: str
    prefix: str  # the drill's own Redis key prefix (its keys are deleted afterwards)
    session_ids: tuple[str, ...]
    figures: tuple[Figure, ...]
    notes: tuple[str, ...] = ()  # what the figures alone do not say (e.g. writes stalled)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.figures)

    @property
    def verdict(self) -> Literal["pass", "fail"]:
        return "pass" if self.ok else "fail"

    def figure(self, name: str) -> Any:
        return next(f.value for f in self.figures if f.name == name)

    def as_json(self) -> dict[str, Any]:
        return {"drill": self.drill, "prefix": self.prefix, "verdict": self.verdict,
                "sessions": len(self.session_ids),
                "figures": [f.as_json() for f in self.figures], "notes": list(self.notes)}


def drill_kill_backfill(
    settings: Settings,
    *,
    sessions: int = 300,
    kills: int = 3,
    batch_size: int = 5,
    lease_seconds: float = 0.5,
    seed: int | None = None,
    timeout: float = 300.0,
) -> DrillReport:
    """SIGKILL ``memshift backfill`` ``kills`` times, let it finish, and check the truth.

    On a fresh key prefix of its own (``{prefix}-drill-{token}``), it writes
    ``sessions`` generated sessions into Redis, runs ``memshift backfill --prefix THAT
    --json`` as a child process and kills its process group with SIGKILL each time the
    run has copied at least one more batch, after a random pause; then it waits for
    the killed run's lease and runs the backfill to completion. It then compares the
    messages each store holds for exactly those sessions, runs parity over them (not
    recorded in ``parity_results``, so the drill does not feed the Plan's gate) and
    reads the Plan back. At the end the drill's sessions are deleted from both stores
    (they are synthetic: left in PostgreSQL they would read as drift later); its
    backfill run row stays as the record.
    """
    import os
    import signal
    import subprocess
    import sys

    from memshift.migrate.backfill import runs
    from memshift.migrate.parity import ParityOptions

    if sessions < 1:
        raise ConfigError(f"--sessions must be at least 1, got {sessions}")
    if kills < 0:
        raise ConfigError(f"--kills must be 0 or more, got {kills}")
    redis_url, postgres_dsn = require_stores(settings, "the drill")
    token = secrets.token_hex(4)
    prefix = f"{settings.prefix}-drill-{token}"
    drill_settings = dataclasses.replace(settings, prefix=prefix)
    rng = random.Random(seed)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSHIFT_")}
    env.update(MEMSHIFT_POSTGRES_DSN=postgres_dsn, MEMSHIFT_REDIS_URL=redis_url,
               MEMSHIFT_LAYOUT=settings.layout, MEMSHIFT_PREFIX=prefix)
    command = [sys.executable, "-m", "memshift", "backfill", "--prefix", prefix,
               "--layout", settings.layout, "--batch-size", str(batch_size),
               "--lease-seconds", str(lease_seconds), "--json"]

    def run_of(conn: Any) -> Any:
        found = [r for r in runs(conn, limit=100) if r.extra["prefix"] == prefix]
        return found, (found[0].batches_done if found else 0)

    figures: list[Figure] = []
    ids: list[str] = []
    try:
        with connect(postgres_dsn) as conn:
            plan_before = load_plan(conn)
            with RedisStore(redis_url, layout=settings.layout, prefix=prefix) as legacy:
                for generated in generate_sessions(sessions, seed=rng.randrange(10**6),
                                                   namespace=f"drill{token}"):
                    generated.play(legacy)
                    ids.append(generated.session_id)

            killed = 0
            batches = -(-sessions // batch_size)
            for _ in range(kills):
                _, done_before = run_of(conn)
                # Kill once it has copied a random number of batches, at most half of
                # those left, at once: a fast backfill must not finish in the meantime.
                target = done_before + rng.randint(1, max(1, (batches - done_before) // 2))
                child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
                deadline = time.monotonic() + timeout
                while child.poll() is None and time.monotonic() < deadline:
                    if run_of(conn)[1] >= target:
                        break
                    time.sleep(0.002)
                if child.poll() is not None:
                    break  # it finished before it could be killed
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                killed += 1
            time.sleep(lease_seconds + 0.2)  # the killed runs' leases run out
            final = subprocess.run(command, env=env, capture_output=True, text=True,
                                   timeout=timeout)
            try:
                report: dict[str, Any] = json.loads(final.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                report = {}
            found, _ = run_of(conn)
            plan_after = load_plan(conn)

        with PostgresStore(postgres_dsn, max_size=2) as truth, \
                RedisStore(redis_url, layout=settings.layout, prefix=prefix) as legacy:
            redis_messages = pg_messages = pg_sessions = 0
            for at in range(0, len(ids), 200):
                chunk = ids[at : at + 200]
                redis_messages += sum(len(r.state.messages) for r in legacy.read_sessions(chunk)
                                      if r.state is not None)
                held = [s for s in truth.load_sessions(chunk).values() if s is not None]
                pg_sessions += len(held)
                pg_messages += sum(len(s.messages) for s in held)
        totals = ParityTotals()
        for parity_report in parity(drill_settings, session_ids=ids,
                                    options=ParityOptions(record=False)):
            totals.add(parity_report)
    finally:
        # The drill's sessions are synthetic: once judged they are removed from both
        # stores, or a later `memshift parity --all` would read them as drift (and the
        # rollback rule could act on that). Its backfill run row stays as the record.
        with connect(postgres_dsn) as conn:
            conn.execute(query("drill_forget"), {"ids": ids})
        _forget_keys(redis_url, prefix)

    def add(name: str, value: Any, expected: Any, ok: bool | None = None) -> None:
        figures.append(Figure(name, value, expected, value == expected if ok is None else ok))

    add("sessions", sessions, sessions)
    add("kills", killed, kills)
    add("sessions in PostgreSQL", pg_sessions, sessions)
    add("messages in Redis", redis_messages, pg_messages, ok=redis_messages > 0)
    add("messages in PostgreSQL", pg_messages, redis_messages)
    for status in ("pass", "fail", "pending", "error"):
        add(f"parity {status}", totals.counts[status], sessions if status == "pass" else 0)
    add("backfill exit code", final.returncode, 0)
    add("backfill runs", len(found), 1)
    add("backfill run state", report.get("state"), "completed")
    for count in ("sessions_seen", "sessions_done", "migrated"):
        add(f"backfill {count.replace('_', ' ')}", report.get(count), sessions)
    for count in ("quarantined", "vanished"):
        add(f"backfill {count}", report.get(count), 0)
    add("plan stage", str(plan_after.stage), str(plan_before.stage))
    add("plan version", plan_after.version, plan_before.version)
    return DrillReport("kill-backfill", prefix, tuple(ids), tuple(figures))


# -- the drill: PostgreSQL unreachable while the application writes -------------------

# A server that stops answering, then one that is down, then a flaky link. The hang
# comes first so that it catches connections in use (a refusal resets them all).
OUTAGE_FAULTS = ("hang", "refuse", "cut")
OUTAGE_STAGES = ("dual_write", "cutover")
RESUME_PATH = "resume"  # the read path the drill's agents read through (cut over in cutover)
DRILL_WHO = "memshift rehearse --drill pg-outage"
# A router's PostgreSQL pool: how long a write waits for a connection, and how long a
# new connection may take, before the write counts as failed (and is queued for repair).
_POOL_TIMEOUT = 0.5
_CONNECT_TIMEOUT = 2
_SAMPLE_EVERY = 0.05  # seconds between samples of the repair backlog
_STUCK_PASSES = 5  # repair passes in a row that drain nothing: repair is stuck


@dataclass
class _Acked:
    """What the router acknowledged for one session: no later read may show less."""

    messages: int = 0
    step: int | None = None
    summary: int | None = None
    attempts: dict[str, int] = field(default_factory=dict)

    def note(self, method: str, args: tuple[Any, ...], result: Any) -> None:
        # An acknowledged put means the store holds that step or version, or a newer one.
        if method == "append_message" and result.seq is not None:
            self.messages = max(self.messages, result.seq + 1)
        elif method == "put_checkpoint":
            self.step = max(self.step or 0, args[1].step)
        elif method == "put_summary":
            self.summary = max(self.summary or 0, args[1].version)
        elif method == "upsert_tool_run":
            self.attempts[result.tool_call_id] = max(
                self.attempts.get(result.tool_call_id, 0), result.attempts)

    def behind(self, state: SessionState | None) -> str | None:
        """How ``state`` is older than what was acknowledged; None when it is not."""
        if state is None:
            return "the session is missing"
        if state.message_count < self.messages:
            return f"{state.message_count} messages, {self.messages} acknowledged"
        checkpoint, summary = state.latest_checkpoint, state.latest_summary
        if self.step is not None and (checkpoint is None or checkpoint.step < self.step):
            return (f"checkpoint step {checkpoint.step if checkpoint else None}, step "
                    f"{self.step} acknowledged")
        if self.summary is not None and (summary is None or summary.version < self.summary):
            return (f"summary version {summary.version if summary else None}, version "
                    f"{self.summary} acknowledged")
        for call_id, attempts in self.attempts.items():
            run = state.tool_run(call_id)
            if run is None or run.attempts < attempts:
                return (f"tool run {call_id} at {run.attempts if run else None} attempts, "
                        f"{attempts} acknowledged")
        return None


@dataclass
class _Agents:
    """One worker's synthetic agents: their calls through a router, and what they saw."""

    writes: int = 0
    failed_writes: int = 0
    slowest_write: float = 0.0
    reads: int = 0
    failed_reads: int = 0
    stale_reads: int = 0
    served: Counter[str] = field(default_factory=Counter)  # "source/reason" -> reads
    acked: dict[str, _Acked] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # the first few, for the notes

    def play(self, router: MigratingStore, calls: Sequence[tuple[str, Call]], start: float,
             span: float) -> None:
        """Make ``calls`` spread evenly over ``span`` seconds from ``start`` (no pause
        when late), reading the session back after each acknowledged write."""
        try:
            for index, (sid, call) in enumerate(calls):
                pause = start + span * index / len(calls) - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                if self._write(router, sid, call):
                    self._read(router, sid)
        except Exception as exc:  # a bug of the drill's own: report it, not a thread trace
            self.problems.insert(0, f"the traffic stopped: {type(exc).__name__}: {exc}")

    def _write(self, router: MigratingStore, sid: str, call: Call) -> bool:
        self.writes += 1
        began = time.monotonic()
        try:
            result = getattr(router, call.method)(*call.args)
        except Exception as exc:  # whatever it is, the application would have seen it
            self.failed_writes += 1
            self._problem(f"{call.method} of {sid} failed: {type(exc).__name__}: {exc}")
            return False
        finally:
            self.slowest_write = max(self.slowest_write, time.monotonic() - began)
        self.acked.setdefault(sid, _Acked()).note(call.method, call.args, result)
        return True

    def _read(self, router: MigratingStore, sid: str) -> None:
        self.reads += 1
        try:
            result = router.read(sid, RESUME_PATH)
        except Exception as exc:
            self.failed_reads += 1
            self._problem(f"a read of {sid} failed: {type(exc).__name__}: {exc}")
            return
        self.served[f"{result.source}/{result.reason}"] += 1
        behind = self.acked[sid].behind(result.state)
        if behind is not None:
            self.stale_reads += 1
            self._problem(f"a read of {sid} from {result.source} ({result.reason}) was older "
                          f"than acknowledged: {behind}")

    def _problem(self, text: str) -> None:
        if len(self.problems) < 5:
            self.problems.append(text)


class _Backlog:
    """The repair backlog (spool lines + queue rows), sampled by a thread; keeps the peak.

    The spool is counted under its lock, which ``memshift repair`` holds while it moves
    lines into the queue, so no line is counted twice.
    """

    def __init__(self, dsn: str, spool_path: Path) -> None:
        self._conn = connect(dsn)
        self._spool = spool_path
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, name="memshift-drill-backlog",
                                        daemon=True)
        self._thread.start()

    def depth(self) -> int:
        with self._lock, self._spool.open("a+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                handle.seek(0)
                spooled = handle.read().count("\n")
                queued = sum(int(row[1]) for row in self._conn.execute(query("repair_counts")))
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        self.peak = max(self.peak, spooled + queued)
        return spooled + queued

    def _run(self) -> None:
        while not self._stop.wait(_SAMPLE_EVERY):
            self.depth()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._conn.close()


@dataclass
class _Drain:
    """How the repair backlog grew and drained."""

    passes: int = 0
    repaired: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float | None = None  # from the heal until the backlog was empty for good
    peak: int = 0  # the backlog's depth at its peak
    left: int = 0  # the backlog's depth at the end
    failed_after: int = 0  # secondary writes that failed after the heal


def _cut_off(proxy: FaultProxy, faults: Sequence[str], seconds: float,
             rng: random.Random) -> None:
    """PostgreSQL unreachable through ``proxy``: each fault for an equal share of ``seconds``."""
    share = seconds / len(faults)
    for fault in faults:
        until = time.monotonic() + share
        if fault == "refuse":
            proxy.refuse()
            proxy.cut()  # the connections already open die too: the server is gone
        elif fault == "hang":
            proxy.hang()  # the server accepts, then answers nothing (no reset, no error)
        while fault == "cut" and time.monotonic() < until:
            # Queries under way die now; new connections die after a random number of
            # bytes: in their handshake, or in the middle of a query's reply.
            proxy.cut_after(rng.randrange(0, 4096))
            proxy.cut()
            time.sleep(max(0.0, min(rng.uniform(0.05, 0.2), until - time.monotonic())))
        if fault == "cut":
            proxy.cut()  # the proxy would go on cutting links made meanwhile: end them
        time.sleep(max(0.0, until - time.monotonic()))
    proxy.heal()


def _drain(settings: Settings, spool_path: Path, backlog: _Backlog,
           traffic: list[threading.Thread], deadline: float) -> _Drain:
    """``memshift repair`` passes from the heal on, while the traffic goes on, until the
    backlog is empty and the traffic has stopped; or until, the traffic stopped, passes
    in a row leave the backlog as it was (stuck); or the deadline."""
    from memshift.migrate.repair import repair

    healed = time.monotonic()
    drain = _Drain()
    left, stuck = 0, 0
    while time.monotonic() < deadline and stuck < _STUCK_PASSES:
        try:
            summary = repair(settings, spool_path=spool_path)
        except MemshiftError as exc:
            drain.failures.append(f"repair pass {drain.passes + 1}: {exc}")
        else:
            drain.repaired += summary.sessions_repaired
            drain.failures += [f"{f.session_id} into {f.target}: {f.error}"
                               for f in summary.failed]
        drain.passes += 1
        depth, flowing = backlog.depth(), any(t.is_alive() for t in traffic)
        if depth > 0:
            drain.seconds = None  # more failed after the heal: not drained yet
        elif drain.seconds is None:
            drain.seconds = round(time.monotonic() - healed, 3)
        if drain.seconds is not None and not flowing:
            return drain
        stuck = stuck + 1 if not flowing and depth >= left else 0
        left = depth
        time.sleep(0.1)
    drain.seconds = None
    return drain


@contextmanager
def _scratch_database(dsn: str, token: str) -> Iterator[str]:
    """A fresh, migrated database on the server ``dsn`` names, dropped afterwards."""
    name = sql.Identifier(f"memshift_drill_{token}")
    try:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(name))
    except psycopg.errors.InsufficientPrivilege:
        raise ConfigError(
            "the pg-outage drill runs in a scratch database of its own (its repair queue "
            "and Plan must not touch the migration's), and this PostgreSQL user may not "
            "create one: grant it CREATEDB, or give a DSN of a user that has it"
        ) from None
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"PostgreSQL cannot be reached: {redact(str(exc)).strip()}"
                               ) from None
    try:
        scratch = make_conninfo(dsn, dbname=f"memshift_drill_{token}")
        upgrade(scratch)
        yield scratch
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))


# What the routers, their pools and the Plan watcher log about the failures the drill
# causes on purpose: counted in its figures, not logged line by line.
_EXPECTED_NOISE = ("memshift.router", "memshift.plan", "psycopg.pool")


@contextmanager
def _quiet(names: Sequence[str]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _proxy_for(dsn: str) -> FaultProxy:
    params = conninfo_to_dict(dsn)
    host = str(params.get("hostaddr") or params.get("host") or "127.0.0.1")
    port = int(params.get("port") or 5432)
    try:
        return FaultProxy("127.0.0.1" if host.startswith("/") else host, port)
    except (ValueError, OSError):
        raise ConfigError(
            f"the pg-outage drill cuts PostgreSQL off through a TCP proxy on this machine, "
            f"which only forwards to loopback addresses, and PostgreSQL is at {host!r}: run "
            "the drill on the database's host, or through an SSH tunnel to it"
        ) from None


def _forget_keys(redis_url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (SCAN, never KEYS)."""
    import redis as redis_client

    raw = redis_client.Redis.from_url(redis_url)
    try:
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + ":*"
        keys = list(raw.scan_iter(match=pattern, count=1000))
        for at in range(0, len(keys), 1000):
            raw.delete(*keys[at : at + 1000])
    finally:
        raw.close()


def _stage_plan(conn: psycopg.Connection[Any], stage: str) -> Plan:
    why = "rehearse --drill pg-outage, in its scratch database"
    plan = set_stage(conn, "dual_write", why, who=DRILL_WHO)
    if stage == "cutover":  # no backfill ran here: the gates are forced, with this reason
        set_stage(conn, "shadow", why, force=True, who=DRILL_WHO)
        set_stage(conn, "cutover", why, force=True, who=DRILL_WHO)
        plan = set_slice(conn, RESUME_PATH, 100, why, who=DRILL_WHO)
    return plan


def _interleave(generated: Sequence[GeneratedSession]) -> list[tuple[str, Call]]:
    """The sessions' calls, one of each session in turn, as concurrent agents make them."""
    queues = [(g.session_id, list(reversed(g.calls))) for g in generated]
    calls = []
    while any(pending for _, pending in queues):
        calls += [(sid, pending.pop()) for sid, pending in queues if pending]
    return calls


def drill_pg_outage(
    settings: Settings,
    *,
    sessions: int = 40,
    outage: float = 6.0,
    faults: Sequence[str] = OUTAGE_FAULTS,
    stage: str = "dual_write",
    workers: int = 4,
    seed: int | None = None,
    timeout: float = 300.0,
) -> DrillReport:
    """Cut PostgreSQL off under live dual writes, heal it, drain repair, check the truth.

    In a scratch database of its own (``memshift_drill_{token}``, dropped at the end:
    the drill's repair queue and Plan must not mix with the migration's) and on a Redis
    key prefix of its own, it sets the Plan to ``stage`` (``dual_write``, or
    ``cutover`` with the read path ``resume`` cut over for every session) and runs
    ``sessions`` generated agent sessions through ``workers`` MigratingStores, each
    reading the Plan through a PlanWatcher, whose PostgreSQL connections go through a
    :class:`~memshift.faults.FaultProxy`. The calls are spread over a warm-up second,
    the outage and two seconds after it; every acknowledged write is read back
    (``resume``). For ``outage`` seconds PostgreSQL is unreachable: each of ``faults``
    in turn (``refuse``: connections reset; ``hang``: accepted, never answered;
    ``cut``: connections die mid-query). Then it heals, ``memshift repair`` drains the
    spool and the queue while the traffic goes on, and the drill compares the stores
    session by session, runs parity (recorded in the scratch database) and rehearsal
    over them, and reads the Plan, its watcher, the rollback rule and the gates.
    """
    if stage not in OUTAGE_STAGES:
        raise ConfigError(f"--stage must be one of {', '.join(OUTAGE_STAGES)}, got {stage!r}")
    unknown = [f for f in faults if f not in OUTAGE_FAULTS]
    if unknown or not faults:
        raise ConfigError(f"--faults takes some of {', '.join(OUTAGE_FAULTS)}, got "
                          f"{', '.join(faults) or 'none'}")
    if sessions < 1 or workers < 1 or outage <= 0:
        raise ConfigError(f"--sessions and --workers must be at least 1 and --outage above 0 "
                          f"seconds; got {sessions}, {workers}, {outage}")
    redis_url, postgres_dsn = require_stores(settings, "the drill")
    token = secrets.token_hex(4)
    prefix = f"{settings.prefix}-drill-{token}"
    rng = random.Random(seed)
    generated = list(generate_sessions(sessions, seed=rng.randrange(10**6),
                                       namespace=f"drill{token}"))
    try:
        with _scratch_database(postgres_dsn, token) as dsn, \
                tempfile.TemporaryDirectory(prefix="memshift-drill-") as workdir:
            run = _OutageRun(dataclasses.replace(settings, postgres_dsn=dsn, prefix=prefix),
                             Path(workdir) / "repair.spool", stage, rng,
                             time.monotonic() + timeout)
            figures, notes = run.go(generated, workers, outage, faults)
    finally:
        _forget_keys(redis_url, prefix)
    return DrillReport("pg-outage", prefix, tuple(g.session_id for g in generated),
                       tuple(figures), tuple(notes))


class _OutageRun:
    """One pg-outage drill in its scratch database: traffic, outage, drain, judgement."""

    WARM_UP = 1.0  # seconds of traffic before the outage
    AFTER = 2.0  # seconds of traffic after the heal

    def __init__(self, settings: Settings, spool_path: Path, stage: str, rng: random.Random,
                 deadline: float) -> None:
        self.settings, self.spool_path, self.stage = settings, spool_path, stage
        self.rng, self.deadline = rng, deadline
        assert settings.postgres_dsn is not None and settings.redis_url is not None
        self.dsn, self.redis_url = settings.postgres_dsn, settings.redis_url
        self.figures: list[Figure] = []
        self.notes: list[str] = []

    def add(self, name: str, value: Any, expected: Any = None, ok: bool | None = None) -> None:
        """A figure; with no ``expected`` it is a measurement, always ok."""
        if ok is None:
            ok = True if expected is None else value == expected
        self.figures.append(Figure(name, value, expected, ok))

    def go(self, generated: list[GeneratedSession], workers: int, outage: float,
           faults: Sequence[str]) -> tuple[list[Figure], list[str]]:
        with connect(self.dsn) as conn:
            plan = _stage_plan(conn, self.stage)
        with _proxy_for(self.dsn) as proxy:
            through = make_conninfo(proxy.dsn_for(self.dsn), connect_timeout=_CONNECT_TIMEOUT)
            watcher = PlanWatcher(through, poll_seconds=0.2, max_staleness=1.0)
            routers = [self.router(through, watcher) for _ in range(workers)]
            try:
                with _quiet(_EXPECTED_NOISE):
                    agents, drain = self._outage(generated, routers, proxy, outage, faults)
                fresh = self._fresh_again(watcher, plan.version)
            finally:
                for router in routers:
                    router.close()
                watcher.close()
            refused, cut = proxy.stats.refused, proxy.stats.cut
        self.add("stage", self.stage)
        self.add("outage", ", ".join(f"{f} {outage / len(faults):g} s" for f in faults))
        self.add("PostgreSQL connections refused / cut", f"{refused} / {cut}")
        self._traffic(agents, routers)
        self._repair_figures(drain)
        self._stores(generated, agents)
        self._plan(plan, fresh)
        return self.figures, self.notes

    def router(self, dsn: str, watcher: PlanWatcher) -> MigratingStore:
        """One agent's router, to PostgreSQL at ``dsn`` (through the fault proxy), with
        the settings' secondary timeout, as the application's routers have it."""
        return MigratingStore(
            RedisStore(self.redis_url, layout=self.settings.layout, prefix=self.settings.prefix),
            PostgresStore(dsn, max_size=2, timeout=_POOL_TIMEOUT),
            watcher, spool_path=self.spool_path,
            secondary_timeout=self.settings.secondary_timeout_seconds)

    def _outage(self, generated: list[GeneratedSession], routers: list[MigratingStore],
                proxy: FaultProxy, outage: float, faults: Sequence[str],
                ) -> tuple[list[_Agents], _Drain]:
        agents = [_Agents() for _ in routers]
        span = self.WARM_UP + outage + self.AFTER
        start = time.monotonic()
        threads = [threading.Thread(
            target=mine.play, name=f"memshift-drill-agents-{n}",
            args=(router, _interleave(generated[n :: len(routers)]), start, span), daemon=True)
            for n, (mine, router) in enumerate(zip(agents, routers, strict=True))]
        backlog = _Backlog(self.dsn, self.spool_path)
        try:
            for thread in threads:
                thread.start()
            time.sleep(self.WARM_UP)
            _cut_off(proxy, faults, outage, self.rng)
            failed_at_heal = sum(r.stats.writes[("postgres", "failed")] for r in routers)
            drain = _drain(self.settings, self.spool_path, backlog, threads, self.deadline)
            for thread in threads:
                thread.join(max(0.1, self.deadline - time.monotonic()))
            drain.failed_after = (sum(r.stats.writes[("postgres", "failed")] for r in routers)
                                  - failed_at_heal)
            drain.left = backlog.depth()
        finally:
            backlog.close()
        drain.peak = backlog.peak
        if any(t.is_alive() for t in threads):
            self.notes.append("the traffic did not finish before the drill's time limit")
        return agents, drain

    def _repair_figures(self, drain: _Drain) -> None:
        peak, left, failed_after = drain.peak, drain.left, drain.failed_after
        self.add("repair queue depth at peak (spool + queue)", peak, "> 0", ok=peak > 0)
        if failed_after:
            self.notes.append(
                f"{failed_after} write(s) to PostgreSQL failed after the heal, before the "
                "routers' connection pools had reconnected; they were queued for repair too")
        self.add("time to drain after the heal (s)",
                 "not drained" if drain.seconds is None else drain.seconds,
                 ok=drain.seconds is not None)
        self.add("PostgreSQL writes failed after the heal", failed_after)
        self.add("repair passes / sessions repaired", f"{drain.passes} / {drain.repaired}")
        self.add("repair failures", len(drain.failures), 0)
        self.add("left in the repair queue and spool", left, 0)
        self.notes += drain.failures[:5]

    def _fresh_again(self, watcher: PlanWatcher, version: int) -> bool:
        limit = min(self.deadline, time.monotonic() + 10)
        while time.monotonic() < limit:
            plan, fresh = watcher.current()
            if fresh and plan.version == version:
                return True
            time.sleep(0.05)
        return False

    def _traffic(self, agents: list[_Agents], routers: list[MigratingStore]) -> None:
        def total(name: str) -> int:
            return sum(getattr(a, name) for a in agents)

        secondary = sum(r.stats.writes[("postgres", "failed")] for r in routers)
        spooled = sum(r.stats.spool_writes for r in routers)
        queued = sum(r.stats.repairs_enqueued for r in routers)
        served: Counter[str] = Counter()
        for mine in agents:
            served.update(mine.served)
        slowest = round(max(a.slowest_write for a in agents), 3)
        self.add("writes attempted", total("writes"))
        self.add("failed user writes", total("failed_writes"), 0)
        self.add("PostgreSQL writes failed (secondary)", secondary, "> 0", ok=secondary > 0)
        self.add("repairs spooled / queued", f"{spooled} / {queued}")
        self.add("slowest user write (s)", slowest)
        self.add("reads", total("reads"))
        self.add("reads served by (store/reason)",
                 ", ".join(f"{k} {n}" for k, n in sorted(served.items())))
        self.add("failed reads", total("failed_reads"), 0)
        self.add("reads older than an acknowledged write", total("stale_reads"), 0)
        if self.stage == "cutover":  # the routers compared a sampled share of reads live
            shadow: Counter[str] = Counter()
            for router in routers:
                shadow.update(router.stats.shadow)
            self.add("live compares sampled / pass / pending / error",
                     f"{shadow['sampled']} / {shadow['pass']} / {shadow['pending']} / "
                     f"{shadow['error']}")
            self.add("live compares failed", shadow["fail"], 0)
        for mine in agents:
            self.notes += mine.problems
        if slowest > 2 * _POOL_TIMEOUT:
            self.notes.append(
                f"a user write took {slowest:g} s: while PostgreSQL hung (accepting, never "
                "answering), dual writes on connections already open waited for it, since "
                "the router gives the secondary write no deadline of its own (only waiting "
                "for a connection times out); the write succeeded once it healed")

    def _stores(self, generated: list[GeneratedSession], agents: list[_Agents]) -> None:
        ids = [g.session_id for g in generated]
        acked = sum(a.messages for mine in agents for a in mine.acked.values())
        with PostgresStore(self.dsn, max_size=2) as truth, \
                RedisStore(self.redis_url, layout=self.settings.layout,
                           prefix=self.settings.prefix) as legacy:
            in_redis = sum(len(r.state.messages) for r in legacy.read_sessions(ids)
                           if r.state is not None)
            held = [s for s in truth.load_sessions(ids).values() if s is not None]
        self.add("sessions", len(ids))
        self.add("sessions in PostgreSQL", len(held), len(ids))
        self.add("messages acknowledged", acked)
        self.add("messages in Redis", in_redis, acked)
        self.add("messages in PostgreSQL", sum(len(s.messages) for s in held), acked)
        totals = ParityTotals()
        differ = []
        for report in parity(self.settings, session_ids=ids):
            totals.add(report)
            if report.parity_status != "pass":
                differ.append(f"{report.session_id} {report.parity_status}: "
                              f"{', '.join(report.failed_checks) or 'unreadable'}")
        for status in ("pass", "fail", "pending", "error"):
            self.add(f"parity {status}", totals.counts[status],
                     len(ids) if status == "pass" else 0)
        same = sum(r.verdict == "same" for r in rehearse(self.settings, session_ids=ids))
        self.add("sessions that resume the same from both stores", same, len(ids))
        self.notes += differ[:5]

    def _plan(self, before: Plan, fresh: bool) -> None:
        with connect(self.dsn) as conn:
            after = load_plan(conn)
            fired = evaluate_rule(conn)
            gates = {g.name: g for g in check_gates(conn, Stage.PG_PRIMARY)}
        self.add("plan stage", str(after.stage), self.stage)
        self.add("plan version", after.version, before.version)
        self.add("plan watcher fresh again, at that version", fresh, True)
        self.add("rollback rule firings", len(fired), 0)
        for name, gate in sorted(gates.items()):
            if name == "repair queue empty" or name.startswith("parity"):
                self.add(f"gate: {name}", gate.passed, True)
