"""Outage drills: a store unreachable under live traffic, then back.

- ``outage-postgres``: during ``dual_write`` PostgreSQL (the secondary) goes away
  for 30 s (a few seconds with ``--quick``) behind a TCP fault proxy
  (:class:`~memshift.faults.proxy.FaultProxy`): first every connection is cut and
  new ones refused, then everything hangs (queries in flight stall), then each
  new connection is cut after a few hundred bytes, mid-handshake or mid-query.
  The application (writer and reader threads, a router each, the Plan watched
  through the same proxy, the stores' default time limits) keeps going; failed
  secondary writes go to the spool, and the routers' background repair drains it
  once PostgreSQL is back. No user call waits longer than a few times the
  router's ``secondary_timeout`` (the setting ``secondary_timeout_seconds``).
- ``outage-redis``: a private Redis (durable: append-only, fsync always) is killed
  with SIGKILL and restarted under traffic, in ``pg_primary`` (Redis the
  secondary) and in ``retired`` (Redis the cache in front of PostgreSQL: no process
  may serve an entry that a write while Redis was down could not invalidate).

Figures: failed user writes and reads (0: the primary was up), stale reads (0),
repair queue depth at peak, time to drain, messages lost and duplicated, parity.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg

from memshift.drills.context import DrillContext, DrillSkipped, Figures
from memshift.drills.logs import captured_logs
from memshift.drills.private_redis import PrivateRedis
from memshift.drills.tally import add_parity, add_tally, tally
from memshift.drills.traffic import Traffic, TrafficStats
from memshift.faults.proxy import FaultProxy
from memshift.migrate import spool
from memshift.migrate.backfill import connect
from memshift.migrate.plan import PlanWatcher, Stage, load_plan, set_stage
from memshift.model import Message, Session
from memshift.sql.queries import query
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore

FAMILY = "outage"
WRITERS, READERS = 4, 2
REPAIR_INTERVAL = 0.5  # the routers' background repair, seconds between passes
# The longest user call may be held by a bounded secondary write, and by one bounded
# look-up of the repair queue before it (a stale watcher's router asks it itself).
CALL_BOUND_TIMES_SECONDARY_TIMEOUT = 3


def move_to(dsn: str, stage: Stage) -> None:
    """Move the (scratch) Plan to ``stage``, forced, one stage at a time."""
    with connect(dsn) as conn:
        current = load_plan(conn).stage
        for step in list(Stage)[current.order + 1 : stage.order + 1]:
            set_stage(conn, step, "memshift drill", force=True, who="memshift drill")


@dataclass
class QueueWatch:
    """Samples the repair queue and the spool: its depth at peak, and when it drained.

    Drained means empty from some moment on, once the traffic has stopped: the time
    to drain runs from the store's return to that moment.
    """

    dsn: str
    spool_path: Path
    peak: int = 0
    healed_at: float | None = None
    empty_since: float | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="drill-queue-watch")

    def depth(self, conn: psycopg.Connection[Any]) -> int:
        rows = sum(int(r[1]) for r in conn.execute(query("repair_counts")).fetchall())
        try:
            lines = len(self.spool_path.read_text(encoding="utf-8").splitlines())
        except FileNotFoundError:
            lines = 0
        return rows + lines

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                depth = self.depth(conn)
                self.peak = max(self.peak, depth)
                if depth:
                    self.empty_since = None
                elif self.empty_since is None:
                    self.empty_since = time.monotonic()
                time.sleep(0.05)

    def start(self) -> QueueWatch:
        self._thread.start()
        return self

    def wait_drained(self, ctx: DrillContext, doing: str) -> None:
        """Wait (after the traffic stopped) until the queue has been empty for a while."""
        ctx.wait_for(lambda: self.empty_since is not None
                     and time.monotonic() - self.empty_since > 3 * REPAIR_INTERVAL,
                     doing, poll=0.05)
        self._stop.set()
        self._thread.join(5)

    @property
    def drained(self) -> bool:
        return self.empty_since is not None

    @property
    def seconds_to_drain(self) -> float | None:
        if self.healed_at is None or self.empty_since is None:
            return None
        return round(max(0.0, self.empty_since - self.healed_at), 2)


def _traffic_figures(figs: Figures, stats: TrafficStats, *, label: str = "",
                     call_bound: float | None = None) -> None:
    figs.info(f"{label}user writes", stats.writes)
    figs.expect(f"{label}failed user writes", stats.failed_writes, 0)
    figs.info(f"{label}user reads", stats.reads)
    figs.expect(f"{label}failed user reads", stats.failed_reads, 0)
    figs.expect(f"{label}stale reads", stats.stale_reads, 0)
    if call_bound is None:
        figs.info(f"{label}longest user call (s)", round(stats.longest_call, 2))
    else:
        figs.at_most(f"{label}longest user call (s)", round(stats.longest_call, 2), call_bound)
    if stats.errors:
        figs.info(f"{label}first errors", stats.errors)


def _watch_figures(figs: Figures, watch: QueueWatch, *, label: str = "") -> None:
    figs.info(f"{label}repair queue depth at peak (rows + spool lines)", watch.peak)
    figs.expect(f"{label}queue drained after the outage", watch.drained, True)
    figs.info(f"{label}time to drain (s)", watch.seconds_to_drain)


# -- PostgreSQL unreachable during dual_write ----------------------------------------------


def _pg_target(dsn: str) -> tuple[str, int]:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    host = str(params.get("hostaddr") or params.get("host") or "")
    if not host or host.startswith("/") or "," in host:
        raise DrillSkipped("PostgreSQL is not reached over one TCP host, so the fault proxy "
                           "cannot stand in front of it")
    return host, int(str(params.get("port") or 5432))


def _outage(proxy: FaultProxy, seconds: float, ctx: DrillContext) -> list[str]:
    """Hang, then refuse and cut, then cut mid-conversation: a third of the time each.

    The hang comes first, so that it catches queries in flight on healthy connections.
    """
    third = seconds / 3
    phases = []
    proxy.hang()
    phases.append("hung")
    _hold(ctx, third, lambda: None)
    proxy.refuse()
    proxy.cut()
    phases.append("refused and cut")
    _hold(ctx, third, lambda: None)
    proxy.cut_after(300)  # past the handshake's first reply, before a query's answer
    proxy.cut()
    phases.append("cut after 300 bytes, and every 0.5 s")
    _hold(ctx, third, proxy.cut, every=0.5)
    proxy.heal()
    return phases


def _hold(ctx: DrillContext, seconds: float, act: Any, every: float | None = None) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ctx.check_time("holding the outage")
        time.sleep(min(every or 0.1, max(0.0, end - time.monotonic())))
        if every is not None:
            act()


def drill_outage_postgres(ctx: DrillContext) -> Figures:
    """PostgreSQL refused, hung and cut under dual-write traffic; nothing lost, no user error."""
    seconds = ctx.pick(4.0, 30.0)
    move_to(ctx.postgres_dsn, Stage.DUAL_WRITE)
    spool_path = ctx.workdir / "repair.spool"
    figs = Figures()
    with FaultProxy(*_pg_target(ctx.postgres_dsn)) as proxy, captured_logs() as logs:
        behind = proxy.dsn_for(ctx.postgres_dsn)
        watcher = PlanWatcher(behind, poll_seconds=0.2, max_staleness=1.0)

        def router(index: int) -> MigratingStore:
            return MigratingStore(
                RedisStore(ctx.redis_url, prefix=ctx.prefix),
                PostgresStore(behind, max_size=2), watcher, spool_path=spool_path,
                secondary_timeout=ctx.settings.secondary_timeout_seconds,
                repair_interval=REPAIR_INTERVAL if index == 0 else None)

        watch = QueueWatch(ctx.postgres_dsn, spool_path).start()
        traffic = Traffic(router, writers=WRITERS, readers=READERS, namespace="outage-pg",
                          seed=ctx.seed, pause=0.005).start()
        try:
            time.sleep(1.0)  # traffic before the outage
            phases = _outage(proxy, seconds, ctx)
            watch.healed_at = time.monotonic()
            time.sleep(1.0)  # traffic after it
        finally:
            traffic.stop()
        try:
            watch.wait_drained(ctx, "waiting for the repair queue to drain")
        finally:
            traffic.close()
            watcher.close()
        stats = proxy.stats
    figs.info("outage (s)", seconds)
    figs.info("outage phases", phases)
    figs.info("connections refused / cut by the proxy", f"{stats.refused} / {stats.cut}")
    figs.info("secondary timeout (s)", ctx.settings.secondary_timeout_seconds)
    _traffic_figures(figs, traffic.stats, call_bound=CALL_BOUND_TIMES_SECONDARY_TIMEOUT
                     * ctx.settings.secondary_timeout_seconds)
    _watch_figures(figs, watch)
    figs.info("warnings logged (failed secondary writes, repairs)", logs.levels["WARNING"])
    figs.expect("spool left", spool.has_entries(spool_path), False)
    ids = list(traffic.session_ids)
    figs.info("sessions", len(ids))
    with RedisStore(ctx.redis_url, prefix=ctx.prefix) as legacy, \
            PostgresStore(ctx.postgres_dsn, max_size=2) as truth:
        add_tally(figs, tally(legacy, truth, ids))
    add_parity(figs, ctx.settings, ids)
    return figs


# -- Redis restarted during pg_primary and retired -------------------------------------------


def _redis_case(ctx: DrillContext, figs: Figures, server: PrivateRedis, stage: Stage) -> None:
    label = f"{stage}: "
    down = ctx.pick(1.0, 5.0)
    move_to(ctx.postgres_dsn, stage)
    spool_path = ctx.workdir / f"{stage}.spool"
    namespace = f"outage-redis-{stage}"
    watcher = PlanWatcher(ctx.postgres_dsn, poll_seconds=0.2)

    def router(index: int) -> MigratingStore:
        return MigratingStore(
            RedisStore(server.url, prefix=ctx.prefix), PostgresStore(ctx.postgres_dsn,
                                                                      max_size=2), watcher,
            spool_path=spool_path, repair_interval=REPAIR_INTERVAL if index <= 0 else None)

    watch = QueueWatch(ctx.postgres_dsn, spool_path).start()
    traffic = Traffic(router, writers=WRITERS, readers=READERS, namespace=namespace,
                      seed=ctx.seed, pause=0.005).start()
    probe = CacheProbe(router(-1), router(-2), namespace) if stage is Stage.RETIRED else None
    try:
        time.sleep(1.0)
        if probe is not None:
            probe.cache()
        server.kill()
        if probe is not None:
            probe.write_during_outage()
        _hold(ctx, down, lambda: None)
        server.start()
        watch.healed_at = time.monotonic()
        if probe is not None:
            probe.resume_after_restart(ctx, router)
        time.sleep(1.0)
    finally:
        traffic.stop()
        if probe is not None:
            probe.close()
    try:
        watch.wait_drained(ctx, f"waiting for the repair queue to drain in {stage}")
        resumer = router(-1)
        try:
            stale_resumes = traffic.resume_all(resumer)
        finally:
            resumer.close()
    finally:
        traffic.close()
        watcher.close()
    figs.info(f"{label}Redis down (s)", down)
    _traffic_figures(figs, traffic.stats, label=label)
    figs.expect(f"{label}stale resumes afterwards (every session, a new router)",
                stale_resumes, 0)
    if probe is not None:
        probe.figures(figs, label)
    _watch_figures(figs, watch, label=label)
    ids = list(traffic.session_ids)
    figs.info(f"{label}sessions", len(ids))
    if stage is Stage.PG_PRIMARY:
        # Redis is the secondary here: it must hold every acknowledged write again.
        with RedisStore(server.url, prefix=ctx.prefix) as legacy, \
                PostgresStore(ctx.postgres_dsn, max_size=2) as truth:
            add_tally(figs, tally(legacy, truth, ids, primary="postgres"), label=label)
        add_parity(figs, replace(ctx.settings, redis_url=server.url), ids, label=label)


class CacheProbe:
    """Sessions cached before Redis dies and written while it is down, then resumed.

    In ``retired`` a write invalidates the session's cache entry before and after it;
    with Redis down both fail, and a Redis that comes back from its append-only file
    brings the old entry back. The writer's router then bumps the cache epoch in
    PostgreSQL before the write returns, so no router may serve the entry. The probe
    counts the stale resumes right after the restart, through a new router and
    through the router that had cached them, and after the writer's next background
    repair pass: none, each time.
    """

    SESSIONS = 8

    def __init__(self, writer: MigratingStore, reader: MigratingStore, namespace: str) -> None:
        self.writer = writer
        self.reader = reader
        self.ids = [f"{namespace}-probe-{i}" for i in range(self.SESSIONS)]
        self.stale_in_window = 0
        self.stale_cached_by_reader = 0
        self.stale_after_retry: int | None = None

    def cache(self) -> None:
        for sid in self.ids:
            self.writer.save_session(Session(session_id=sid, tenant_id="drill"))
            self.writer.append_message(sid, Message(message_id="m0", role="user",
                                                    content="before the outage"))
            self.reader.load_session(sid)  # fills the cache
            self.reader.load_session(sid)  # served from it

    def write_during_outage(self) -> None:
        for sid in self.ids:
            self.writer.append_message(sid, Message(message_id="m1", role="user",
                                                    content="while Redis was down"))

    def _stale(self, router: MigratingStore) -> int:
        return sum(1 for sid in self.ids
                   if (state := router.load_session(sid)) is None or state.message_count < 2)

    def resume_after_restart(self, ctx: DrillContext, routers: Any) -> None:
        fresh = routers(-3)
        try:
            self.stale_in_window = self._stale(fresh)
            self.stale_cached_by_reader = self._stale(self.reader)
            passes = self.writer.stats.background_repair["runs"]
            ctx.wait_for(lambda: self.writer.stats.background_repair["runs"] >= passes + 2,
                         "waiting for the writer's background repair", poll=0.05)
            self.stale_after_retry = self._stale(fresh)
        finally:
            fresh.close()

    def figures(self, figs: Figures, label: str) -> None:
        figs.info(f"{label}probe sessions (cached, then written while Redis was down)",
                  len(self.ids))
        figs.expect(f"{label}stale resumes right after the restart (a new router)",
                    self.stale_in_window, 0)
        figs.expect(f"{label}stale resumes right after the restart (the router that "
                    "had cached them)", self.stale_cached_by_reader, 0)
        figs.expect(f"{label}stale resumes after the writer's background repair",
                    self.stale_after_retry, 0)

    def close(self) -> None:
        self.writer.close()
        self.reader.close()


def drill_outage_redis(ctx: DrillContext) -> Figures:
    """A private Redis killed and restarted under traffic in pg_primary, then in retired."""
    figs = Figures()
    with PrivateRedis(ctx.workdir / "redis") as server, captured_logs() as logs:
        for stage in (Stage.PG_PRIMARY, Stage.RETIRED):
            _redis_case(ctx, figs, server, stage)
    figs.info("warnings logged (failed secondary writes, invalidations)", logs.levels["WARNING"])
    return figs
