"""The follower: starts the listeners, workers and sweeper, applies what the listeners
collect, writes the position on a heartbeat, and stops cleanly (``follow``)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import psycopg
from redis.exceptions import RedisError

from memshift.config import Settings, require_stores
from memshift.errors import ConfigError, MemshiftError, StoreUnavailable
from memshift.migrate.follow.applier import Applier
from memshift.migrate.follow.notifications import KeyMap, Listener, ensure_notifications, primaries
from memshift.migrate.follow.position import LAG, PENDING, FollowStatus, Pending, Totals
from memshift.migrate.follow.sweeper import Sweeper
from memshift.migrate.plan import Stage, load_plan
from memshift.model import SessionState
from memshift.redact import redact
from memshift.sql.queries import query
from memshift.stores.layouts import PreparesPostgres, get_layout

log = logging.getLogger("memshift.follow")

# Advisory lock space of followers (the second key is the follower id): one process
# follows a given source at a time.
_LOCK_SPACE = 0x6D736677  # "msfw"
# Stages in which Redis is the primary, so there is something to follow.
_FOLLOWED_STAGES = (Stage.REDIS_ONLY, Stage.DUAL_WRITE, Stage.SHADOW, Stage.CUTOVER)


class FollowerBusy(MemshiftError):
    """Another process already follows this source."""


class FollowRefused(MemshiftError):
    """The Plan's stage leaves nothing to follow (PostgreSQL is primary)."""


@dataclass(frozen=True)
class FollowOptions:
    """How a follower runs. Every field says its default."""

    layout: str = "reference"  # Redis layout of the sessions
    prefix: str = "agent"  # Redis key prefix
    configure_redis: bool = False  # set notify-keyspace-events when it lacks flags
    collapse_seconds: float = 0.05  # a session's events this close make one re-read
    batch_size: int = 200  # sessions per re-read pipeline and PostgreSQL transaction
    workers: int = 4  # threads that re-read and merge, each with its own connections
    sweep_seconds: float = 300.0  # between sweeps (one also runs at start)
    settle_seconds: float = 0.5  # a session read as gone is read again after this
    heartbeat_seconds: float = 1.0  # how often the position is written to PostgreSQL
    scan_count: int = 1000  # SCAN COUNT hint of the sweeper
    max_value_bytes: int = 64 * 1024 * 1024  # a larger Redis value quarantines its session

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 10_000:
            raise ConfigError(f"--batch-size must be from 1 to 10000, got {self.batch_size}")
        if not 1 <= self.workers <= 32:
            raise ConfigError(f"--workers must be from 1 to 32, got {self.workers}")
        for name in ("collapse_seconds", "settle_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("sweep_seconds", "heartbeat_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be above 0, got {getattr(self, name)}")


_TRANSIENT = (MemshiftError, psycopg.Error, RedisError)


class Follower:
    """The orchestration: listeners feed ``pending``; this thread applies it; a sweeper
    catches up; the heartbeat writes the position."""

    main: Applier

    def __init__(self, settings: Settings, options: FollowOptions,
                 on_applied: Callable[[list[SessionState]], None] | None) -> None:
        self.redis_url, self.postgres_dsn = require_stores(settings, "follow")
        self.options = options
        self.layout = get_layout(options.layout, options.prefix)
        self.keymap = KeyMap(self.layout)
        self.source = f"{options.layout}:{options.prefix}"  # as quarantine entries name it
        self.on_applied = on_applied
        self.pending = Pending()
        self.totals = Totals()
        self.stopping = threading.Event()
        self.follower_id = 0
        self.error: BaseException | None = None  # why a thread of it failed
        self.sweeper = Sweeper(self)
        self.listeners: list[Listener] = []
        self.workers: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards _gone and _inflight, shared by the workers
        self._gone: dict[str, tuple[float, float]] = {}  # sid -> (first change, seen gone)
        self._inflight: dict[int, float] = {}  # worker -> its batch's oldest change
        self._written = {"events": 0, "applied": 0, "expired": 0, "quarantined": 0}
        self._beat_at = time.monotonic()
        self.status = FollowStatus()

    # -- start -------------------------------------------------------------------------

    def start(self, stack: ExitStack) -> None:
        self.main = Applier(self)
        stack.callback(self.main.close)
        ensure_notifications(self.main.store.client, self.layout,
                             configure=self.options.configure_redis)
        self._check_stage()
        conn = self.main.conn
        if isinstance(self.layout, PreparesPostgres):  # as backfill: its tables first
            self.layout.prepare_postgres(conn)
        params = {"source": redact(self.redis_url), "layout": self.options.layout,
                  "prefix": self.options.prefix}
        row = conn.execute(query("follow_register"), params).fetchone()
        assert row is not None
        self.follower_id = row[0]
        self._take_lock()
        row = conn.execute(query("follow_start"), {
            "follower_id": self.follower_id,
            "worker": f"{socket.gethostname()}:{os.getpid()}"}).fetchone()
        assert row is not None
        # Notifications from the last position on were lost (or this is the first
        # start): subscribe first, then sweep, so that nothing falls between the two.
        self.sweeper.request(time.monotonic() - max(0.0, float(row[0])))
        self.listeners = [Listener(self, name, node)
                          for name, node in primaries(self.main.store.client).items()]
        for listener in self.listeners:
            listener.start()
        for listener in self.listeners:
            if not listener.subscribed.wait(10.0):
                raise StoreUnavailable(
                    f"could not subscribe to keyspace notifications on {listener.node} "
                    "within 10 s; check that Redis runs and accepts PSUBSCRIBE"
                )
        self.sweeper.start()
        for n in range(self.options.workers):
            applier = Applier(self)
            stack.callback(applier.close)
            worker = threading.Thread(target=self._work, args=(n, applier), daemon=True,
                                      name=f"memshift-follow-apply-{n}")
            self.workers.append(worker)
            worker.start()
        log.info("following %s (%s) as follower %d", redact(self.redis_url), self.source,
                 self.follower_id)

    def _take_lock(self) -> None:
        row = self.main.conn.execute(query("follow_lock"), {
            "space": _LOCK_SPACE, "follower_id": self.follower_id}).fetchone()
        if not row or not row[0]:
            self.follower_id = 0  # not ours: leave the row to the process that holds it
            raise FollowerBusy(
                f"another memshift follow already follows {redact(self.redis_url)} "
                f"({self.source}); stop it first (see `memshift follow --status`), or "
                "follow another --prefix"
            )

    def _check_stage(self) -> None:
        stage = load_plan(self.main.conn).stage
        if stage not in _FOLLOWED_STAGES:
            raise FollowRefused(
                f"the Plan is at stage {stage}: PostgreSQL is the primary, so there is "
                "nothing to follow in Redis; follow mode is for the stages before pg_primary"
            )

    def crashed(self, exc: BaseException) -> None:
        """A thread failed in a way retrying cannot mend: stop everything, keep why."""
        self.error = self.error or exc
        self.stopping.set()
        self.pending.wake()

    def lost(self, node: str, since: float) -> None:
        log.warning("notifications from %s may have been lost while its connection was "
                    "down: a sweep catches up", node)
        self.sweeper.request(since)

    # -- the loop ----------------------------------------------------------------------

    def run(self, stop: threading.Event, report: Callable[[FollowStatus], None] | None,
            report_seconds: float) -> None:
        """Housekeeping until stopped: gone sessions, the heartbeat, reports, the stage."""
        options = self.options
        next_beat = next_report = next_stage = time.monotonic()
        while not stop.is_set() and not self.stopping.is_set():
            stop.wait(min(0.1, options.settle_seconds or 0.1))
            now = time.monotonic()
            self._recheck_gone(now)
            if now >= next_beat:
                self._heartbeat()
                next_beat = now + options.heartbeat_seconds
            if report is not None and now >= next_report:
                report(self.status)
                next_report = now + report_seconds
            if now >= next_stage:
                try:
                    self._check_stage()
                except _TRANSIENT[1:] as exc:
                    self._recover(exc)
                next_stage = now + 5.0

    def _work(self, n: int, applier: Applier) -> None:
        """A worker: take the sessions whose changes are due, re-read and merge them."""
        collapse, size = self.options.collapse_seconds, self.options.batch_size
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                oldest = self.pending.oldest()
                if oldest is None or oldest + collapse > now:
                    self.pending.wait(0.5 if oldest is None else oldest + collapse - now)
                    continue
                batch = self.pending.take(now - collapse, size)
                if batch:
                    self._apply(n, applier, batch)
        except BaseException as exc:  # a bug: stop, rather than leave changes unapplied
            self.crashed(exc)
            raise

    def _apply(self, n: int, applier: Applier, batch: dict[str, float]) -> None:
        with self._lock:
            self._inflight[n] = min(batch.values())
        try:
            done = applier.apply(list(batch), "notify")
        except _TRANSIENT as exc:
            self.pending.put_back(batch)
            log.warning("applying changes failed (%s); retrying in 1 s", redact(str(exc)))
            self.stopping.wait(1.0)
            try:
                applier.reconnect()
            except (psycopg.Error, MemshiftError) as again:
                log.warning("PostgreSQL is still unreachable (%s)", redact(str(again)))
            return
        finally:
            with self._lock:
                self._inflight.pop(n, None)
        now = time.monotonic()
        with self._lock:
            for sid in done.gone:
                self._gone.setdefault(sid, (batch[sid], now))
            for state in done.merged:
                self._gone.pop(state.session_id, None)

    def _recheck_gone(self, now: float) -> None:
        with self._lock:
            due = [sid for sid, (_, seen) in self._gone.items()
                   if seen + self.options.settle_seconds <= now][: self.options.batch_size]
        if not due:
            return
        try:
            self.main.confirm_gone(due, "notify")
        except _TRANSIENT as exc:
            self._recover(exc)
            return
        with self._lock:
            for sid in due:
                self._gone.pop(sid, None)

    def _recover(self, exc: BaseException) -> None:
        log.warning("applying changes failed (%s); retrying in 1 s", redact(str(exc)))
        self.stopping.wait(1.0)
        try:
            if self.main.conn.closed:
                self.main.reconnect()
                self._take_lock()
        except (psycopg.Error, StoreUnavailable) as again:
            log.warning("PostgreSQL is still unreachable (%s)", redact(str(again)))

    # -- position ----------------------------------------------------------------------

    def lag(self, now: float) -> float:
        """Seconds since the oldest change that may not be in PostgreSQL yet."""
        with self._lock:
            marks = [self.pending.oldest(), self.sweeper.floor(), *self._inflight.values(),
                     *(first for first, _ in self._gone.values())]
        oldest = min((m for m in marks if m is not None), default=now)
        return max(0.0, now - oldest)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        lag = self.lag(now)
        counts = self.totals.snapshot() | {"events": self.pending.events}
        delta = {name: counts[name] - self._written[name] for name in counts}
        seconds = max(now - self._beat_at, 1e-9)
        rates = {"eps": delta["events"] / seconds, "sps": delta["applied"] / seconds}
        try:
            self.main.conn.execute(query("follow_heartbeat"), {
                "follower_id": self.follower_id, "lag": lag, **delta, **rates})
        except psycopg.Error as exc:
            self._recover(exc)  # the counts go with the next beat that gets through
            return
        self._written, self._beat_at = counts, now
        LAG.set(lag)
        PENDING.set(len(self.pending))
        self.status = FollowStatus(
            self.follower_id, round(lag, 3), len(self.pending), counts["events"],
            round(rates["eps"], 1), counts["applied"], round(rates["sps"], 1),
            counts["expired"], counts["quarantined"], self.sweeper.floor() is None)

    def stop(self, *, cleanly: bool) -> None:
        self.stopping.set()
        self.pending.wake()
        self.sweeper.wake()
        # Joined before the clients they read from are closed.
        for thread in (self.sweeper, *self.listeners, *self.workers):
            if thread.is_alive():
                thread.join(timeout=30)
        if cleanly and self.follower_id and not self.main.conn.closed:
            self._heartbeat()
            self.main.conn.execute(query("follow_stop"), {"follower_id": self.follower_id})


def follow(
    settings: Settings,
    options: FollowOptions | None = None,
    *,
    stop: threading.Event | None = None,
    on_status: Callable[[FollowStatus], None] | None = None,
    report_seconds: float = 10.0,
    on_applied: Callable[[list[SessionState]], None] | None = None,
) -> FollowStatus:
    """Follow ``settings.redis_url`` into ``settings.postgres_dsn`` until ``stop`` is set.

    Raises NotificationsOff when Redis lacks the keyspace notifications the layout
    needs (unless ``options.configure_redis``), FollowerBusy when another process
    follows the same source, FollowRefused when the Plan is at ``pg_primary`` or later.
    Stops by itself, cleanly, when the Plan reaches ``pg_primary``. ``on_status`` gets
    the status every ``report_seconds``; ``on_applied`` each batch of sessions merged
    (from the follower's threads: it must be thread-safe). A follower stopped through
    ``stop`` (or Ctrl-C) is recorded as stopped, so the Plan's gates no longer wait
    for it; one that dies keeps its position, and its lag grows until a new one has
    caught up.
    """
    options = options or FollowOptions(layout=settings.layout, prefix=settings.prefix)
    stop = stop or threading.Event()
    follower = Follower(settings, options, on_applied)
    cleanly = False
    with ExitStack() as stack:
        try:
            follower.start(stack)
            try:
                follower.run(stop, on_status, report_seconds)
            except FollowRefused as exc:
                log.warning("%s: stopping", exc)
            cleanly = follower.error is None
        except KeyboardInterrupt:
            cleanly = True
            raise
        finally:
            follower.stop(cleanly=cleanly)
    if follower.error is not None:
        raise MemshiftError(
            f"memshift follow stopped: one of its threads failed ({follower.error!r}); "
            "its position is kept, so a restarted follower catches up"
        ) from follower.error
    return follower.status
