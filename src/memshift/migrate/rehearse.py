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

import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from memshift.config import Settings, require_stores
from memshift.errors import ConfigError, MemshiftError
from memshift.migrate.backfill import connect
from memshift.migrate.parity import Diff
from memshift.model import Checkpoint, MemorySummary, Message, SessionState, ToolRun
from memshift.sql.queries import query
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

DRILLS = ("kill-backfill",)


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
                "figures": [f.as_json() for f in self.figures]}


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
    import dataclasses
    import os
    import secrets
    import signal
    import subprocess
    import sys
    import time

    import redis as redis_client

    from memshift.generate import generate_sessions
    from memshift.migrate.backfill import runs
    from memshift.migrate.parity import ParityOptions, ParityTotals, parity
    from memshift.migrate.plan import load_plan

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
    raw = redis_client.Redis.from_url(redis_url)
    try:
        with connect(postgres_dsn) as conn:
            plan_before = load_plan(conn)
            with RedisStore(redis_url, layout=settings.layout, prefix=prefix) as legacy:
                for generated in generate_sessions(sessions, seed=rng.randrange(10**6),
                                                   namespace=f"drill{token}"):
                    generated.play(legacy)
                    ids.append(generated.session_id)

            killed = 0
            for _ in range(kills):
                _, done_before = run_of(conn)
                child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
                deadline = time.monotonic() + timeout
                while child.poll() is None and time.monotonic() < deadline:
                    if run_of(conn)[1] > done_before:
                        break  # it has copied at least one batch: kill it soon
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.05))
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
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + ":*"
        keys = list(raw.scan_iter(match=pattern, count=1000))
        for at in range(0, len(keys), 1000):
            raw.delete(*keys[at : at + 1000])
        raw.close()

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
