"""Concurrency: 8 writers on shared sessions, during a backfill, with a disorderly secondary.

The legacy app has left sessions in Redis. ``dual_write`` begins: 8 writer threads
(a router each, as 8 application processes) append messages to a few shared
sessions, bump a shared tool run's attempts and put summaries, while ``memshift
backfill`` runs beside them. Every write the routers give the secondary
(PostgreSQL) goes through a **courier** (:class:`Courier`) that delivers it later,
in random order, and a share of them twice; a delivery that fails is queued for
repair, as the router does. At the end the courier is drained and ``repair`` run.

Figures: per shared session, the exact message set and order: Redis, PostgreSQL and
what the writers were acknowledged must be the same messages at the same seqs, and
each writer's messages in the order it wrote them (mismatches 0); deliveries made
out of order and twice (both above 0, or the drill proved nothing); parity.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from memshift.drills.children import kill, memshift_command, start
from memshift.drills.context import DrillContext, Figures
from memshift.drills.crash import batches_done, enqueue
from memshift.drills.logs import captured_logs
from memshift.drills.tally import add_parity, add_tally, read_both, tally
from memshift.drills.workload import play_legacy
from memshift.drills.writer import plan_at
from memshift.generate import EPOCH
from memshift.migrate.backfill import connect
from memshift.migrate.plan import Stage, StaticPlan
from memshift.migrate.repair import repair
from memshift.model import MemorySummary, Message, SessionState, ToolRun
from memshift.stores.base import Outcome
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore

FAMILY = "concurrency"
WRITERS = 8
PAUSE = 0.01  # seconds between a writer's calls


@dataclass
class Parcel:
    number: int  # the order in which the routers sent it
    session_id: str
    method: str
    args: tuple[Any, ...]


@dataclass
class Courier:
    """Delivers the secondary's writes late, shuffled, some twice; failures go to repair."""

    store: PostgresStore
    dsn: str
    seed: int
    duplicate_share: float = 0.3
    sent: int = 0
    delivered: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    queued: int = 0
    _parcels: list[Parcel] = field(default_factory=list)
    _latest: dict[str, int] = field(default_factory=dict)  # newest number delivered, by session

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(self.seed)
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"courier-{i}")
                         for i in range(2)]
        for thread in self._threads:
            thread.start()

    def send(self, session_id: str, method: str, *args: Any) -> None:
        with self._lock:
            self._parcels.append(Parcel(self.sent, session_id, method, args))
            self.sent += 1

    def _take(self) -> Parcel | None:
        with self._lock:
            # Hold a few back while the writers run, so there is something to reorder.
            if len(self._parcels) < (1 if self._done.is_set() else 8):
                return None
            parcel = self._parcels.pop(self._rng.randrange(len(self._parcels)))
            if self._rng.random() < self.duplicate_share and parcel.number >= 0:
                # Delivered again later, as a retrying transport would.
                self._parcels.append(Parcel(-1 - parcel.number, parcel.session_id,
                                            parcel.method, parcel.args))
            number = parcel.number if parcel.number >= 0 else -1 - parcel.number
            if parcel.number >= 0 and number < self._latest.get(parcel.session_id, -1):
                self.out_of_order += 1  # a write sent later was delivered before it
            self._latest[parcel.session_id] = max(self._latest.get(parcel.session_id, -1),
                                                  number)
            if parcel.number < 0:
                self.duplicates += 1
            return parcel

    def _run(self) -> None:
        while True:
            parcel = self._take()
            if parcel is None:
                if self._done.is_set() and not self._parcels:
                    return
                time.sleep(0.002)
                continue
            try:
                getattr(self.store, parcel.method)(*parcel.args)
            except Exception as exc:  # as the router: the write goes to the repair queue
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    enqueue(conn, [(parcel.session_id, "postgres", parcel.method)],
                            f"{type(exc).__name__}: delivered by the drill's courier")
                with self._lock:
                    self.queued += 1
            with self._lock:
                self.delivered += 1

    def drain(self, timeout: float) -> None:
        """Deliver everything still held (duplicates included), then stop."""
        self._done.set()
        for thread in self._threads:
            thread.join(timeout)


class CourierPostgres(PostgresStore):
    """The router's secondary: hands each write to the courier and returns at once.

    The router uses what a secondary returns for nothing but success, so each
    method returns what the call was given. Reads are PostgreSQL's own.
    """

    def __init__(self, dsn: str, courier: Courier) -> None:
        super().__init__(dsn, max_size=2)
        self._courier = courier

    def _send(self, session_id: str, method: str, *args: Any) -> None:
        self._courier.send(session_id, method, *args)

    def save_session(self, session: Any) -> Outcome:
        self._send(session.session_id, "save_session", session)
        return Outcome.APPLIED

    def append_message(self, session_id: str, message: Any) -> Message:
        self._send(session_id, "append_message", session_id, message)
        return message  # type: ignore[no-any-return]

    def upsert_tool_run(self, session_id: str, run: Any) -> ToolRun:
        self._send(session_id, "upsert_tool_run", session_id, run)
        return run  # type: ignore[no-any-return]

    def put_summary(self, session_id: str, summary: Any) -> Outcome:
        self._send(session_id, "put_summary", session_id, summary)
        return Outcome.APPLIED

    def put_checkpoint(self, session_id: str, checkpoint: Any) -> Outcome:
        self._send(session_id, "put_checkpoint", session_id, checkpoint)
        return Outcome.APPLIED

    def apply_status_change(self, change: Any) -> Outcome:
        self._send(change.session.session_id, "apply_status_change", change)
        return Outcome.APPLIED


@dataclass
class Acks:
    """What the writers were acknowledged: (seq, message id) per session, and each
    writer's own messages per session in the order it wrote them."""

    by_session: dict[str, list[tuple[int, str]]] = field(
        default_factory=lambda: defaultdict(list))
    by_writer: dict[tuple[int, str], list[int]] = field(
        default_factory=lambda: defaultdict(list))
    failed: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, writer: int, sid: str, seq: int, message_id: str) -> None:
        with self._lock:
            self.by_session[sid].append((seq, message_id))
            self.by_writer[(writer, sid)].append(seq)

    def fail(self) -> None:
        with self._lock:
            self.failed += 1


def _writer(index: int, router: MigratingStore, shared: list[str], ops: int, seed: int,
            acks: Acks, t0: datetime) -> None:
    rng = random.Random(f"{seed}:{index}")
    for k in range(ops):
        sid = rng.choice(shared)
        time.sleep(PAUSE)  # spread the writes over the backfill's run
        try:
            if k % 10 == 9:
                router.upsert_tool_run(sid, ToolRun(
                    tool_call_id="shared-call", name="search", status="retrying",
                    attempts=k + 1, updated_at=t0 + timedelta(seconds=k)))
            elif k % 15 == 14:
                # Versions and times grow together across writers, as the invariant
                # "summary versions grow with time" wants of any one session.
                version = 1 + k * WRITERS + index
                router.put_summary(sid, MemorySummary(
                    version=version, text=f"writer {index} at {k}",
                    updated_at=t0 + timedelta(milliseconds=version)))
            message_id = f"w{index}-{k}"
            stored = router.append_message(sid, Message(
                message_id=message_id, role="user", content=f"writer {index} says {k}",
                ts=t0 + timedelta(seconds=k)))
        except Exception:  # a user's call failed: counted, and a mismatch later
            acks.fail()
            continue
        assert stored.seq is not None
        acks.add(index, sid, stored.seq, message_id)


def _mismatches(acks: Acks, shared: list[str], in_redis: dict[str, SessionState | None],
                in_pg: dict[str, SessionState | None]) -> tuple[int, list[str]]:
    """Sessions whose messages differ between the acks, Redis and PostgreSQL."""
    bad: list[str] = []
    for sid in shared:
        redis_state, pg_state = in_redis.get(sid), in_pg.get(sid)
        if redis_state is None or pg_state is None:
            bad.append(f"{sid}: missing")
            continue
        held = [(m.seq, m.message_id) for m in redis_state.messages]
        copied = [(m.seq, m.message_id) for m in pg_state.messages]
        acked = dict(acks.by_session[sid])  # seq -> message id
        ours = {(seq, mid) for seq, mid in held if mid.startswith("w")}
        if held != copied:
            bad.append(f"{sid}: Redis and PostgreSQL differ")
        elif ours != set(acked.items()):
            bad.append(f"{sid}: the stores differ from what the writers were acknowledged")
    for (writer, sid), seqs in acks.by_writer.items():
        if seqs != sorted(seqs) or len(set(seqs)) != len(seqs):
            bad.append(f"{sid}: writer {writer}'s messages out of its order")
    return len(bad), bad[:5]


def drill_concurrency(ctx: DrillContext) -> Figures:
    """8 writers on shared sessions during a backfill; shuffled, repeated secondary writes."""
    shared_count, filler, ops = ctx.pick((6, 60, 40), (16, 300, 200))
    with RedisStore(ctx.redis_url, prefix=ctx.prefix) as legacy:
        shared = play_legacy(legacy, shared_count, seed=ctx.seed, namespace="shared")
        fillers = play_legacy(legacy, filler, seed=ctx.seed, namespace="filler")
    truth = PostgresStore(ctx.postgres_dsn, max_size=4)
    courier = Courier(truth, ctx.postgres_dsn, ctx.seed)
    acks = Acks()
    spool_path = ctx.workdir / "repair.spool"

    def router() -> MigratingStore:
        return MigratingStore(RedisStore(ctx.redis_url, prefix=ctx.prefix),
                              CourierPostgres(ctx.postgres_dsn, courier),
                              StaticPlan(plan_at(Stage.DUAL_WRITE)), spool_path=spool_path)

    routers = [router() for _ in range(WRITERS)]
    # The writers' clock starts after everything the legacy app wrote (generated sessions
    # are dated within 30 days of generate.EPOCH), so that their records are the newest.
    t0 = max(datetime.now(UTC), EPOCH + timedelta(days=60))
    threads = [threading.Thread(target=_writer,
                                args=(i, routers[i], shared, ops, ctx.seed, acks, t0),
                                daemon=True, name=f"drill-writer-{i}") for i in range(WRITERS)]
    progress: list[int] = []
    with captured_logs(), connect(ctx.postgres_dsn) as conn:
        backfill = start(ctx, memshift_command("backfill", "--json", "--batch-size", "4"))
        try:
            # The writers start once the backfill copies, and write while it does.
            ctx.wait_for(lambda: backfill.poll() is not None
                         or batches_done(conn, ctx.prefix) >= 1, "waiting for the backfill")
            progress.append(batches_done(conn, ctx.prefix))
            for thread in threads:
                thread.start()
            _join(threads, ctx)
            progress.append(batches_done(conn, ctx.prefix))
            courier.drain(ctx.left())
            ctx.wait_for(lambda: backfill.poll() is not None, "waiting for the backfill")
        finally:
            if backfill.poll() is None:
                kill(backfill)
            for each in routers:
                each.close()
        repaired = repair(ctx.settings, spool_path=spool_path)
    figs = Figures()
    figs.info("writers", WRITERS)
    figs.info("shared sessions", shared_count)
    figs.expect("failed user writes", acks.failed, 0)
    figs.info("messages acknowledged to the writers",
              sum(len(v) for v in acks.by_session.values()))
    figs.info("secondary writes sent", courier.sent)
    figs.at_least("delivered out of order", courier.out_of_order, 1)
    figs.at_least("delivered twice", courier.duplicates, 1)
    figs.info("deliveries that failed (queued for repair)", courier.queued)
    figs.info("backfill batches done when the writers started, and ended", progress)
    figs.expect("backfill exit code", backfill.returncode, 0)
    figs.expect("repairs that failed", len(repaired.failed), 0)
    figs.expect("repairs left", repaired.remaining, 0)
    with RedisStore(ctx.redis_url, prefix=ctx.prefix) as legacy:
        in_redis, in_pg = read_both(legacy, truth, shared)
        count, examples = _mismatches(acks, shared, in_redis, in_pg)
        figs.expect("sessions whose message sets or order mismatch", count, 0)
        if examples:
            figs.info("mismatches", examples)
        add_tally(figs, tally(legacy, truth, shared + fillers))
    truth.close()
    add_parity(figs, ctx.settings, shared + fillers)
    return figs


def _join(threads: list[threading.Thread], ctx: DrillContext) -> None:
    for thread in threads:
        thread.join(ctx.left())
        ctx.check_time("waiting for the writers")
