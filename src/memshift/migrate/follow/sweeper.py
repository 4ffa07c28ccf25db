"""The sweeper: reads every session on a schedule (and at once when notifications may
have been lost) and applies those that changed, so that lost notifications cost
time, never changes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from prometheus_client import Counter
from redis.exceptions import RedisError

from memshift.errors import MemshiftError
from memshift.migrate import chunked
from memshift.migrate.follow.applier import Applier, session_key
from memshift.observe.metrics import REGISTRY
from memshift.redact import redact
from memshift.sql.queries import query

if TYPE_CHECKING:
    from memshift.migrate.follow.follower import Follower

log = logging.getLogger("memshift.follow")

SWEEPS = Counter("memshift_follow_sweeps", "Sweeps the follower finished.", registry=REGISTRY)


class Sweeper(threading.Thread):
    """Reads every session on a schedule and applies those that changed.

    A sweep asked for because notifications may have been lost (at start, after a
    reconnect) holds the position back to the moment they may have been lost from,
    until a sweep that started after the request has finished.
    """

    def __init__(self, follower: Follower) -> None:
        super().__init__(name="memshift-follow-sweeper", daemon=True)
        self.f = follower
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._requests: list[float] = []  # floors of sweeps asked for, not begun
        self._covering: list[float] = []  # floors the running sweep will clear

    def request(self, floor: float) -> None:
        with self._lock:
            self._requests.append(floor)
        self._wanted.set()

    def floor(self) -> float | None:
        with self._lock:
            return min(self._requests + self._covering, default=None)

    def wake(self) -> None:
        """Stop waiting for the next sweep (the follower is stopping)."""
        self._wanted.set()

    def run(self) -> None:
        applier: Applier | None = None
        next_at = time.monotonic()
        while not self.f.stopping.is_set():
            self._wanted.wait(max(0.0, next_at - time.monotonic()))
            if self.f.stopping.is_set():
                break
            self._wanted.clear()
            with self._lock:
                self._covering += self._requests
                self._requests = []
            try:
                applier = applier or Applier(self.f)
                applier.reconnect()
                if not self.sweep(applier):
                    break  # stopping
                with self._lock:
                    self._covering = []
                next_at = time.monotonic() + self.f.options.sweep_seconds
            except (MemshiftError, psycopg.Error, RedisError) as exc:
                log.warning("sweep failed (%s); trying again in 5 s", redact(str(exc)))
                with self._lock:
                    self._requests += self._covering
                    self._covering = []
                next_at = time.monotonic() + 5.0
            except BaseException as exc:  # a bug: stop the follower, do not sweep wrongly
                self.f.crashed(exc)
                raise
        if applier is not None:
            applier.close()

    def sweep(self, applier: Applier) -> bool:
        """One sweep; False when the follower stopped before it finished."""
        conn, options = applier.conn, self.f.options
        (since,) = conn.execute(query("follow_sweep_started"),
                                {"follower_id": self.f.follower_id}).fetchone() or (None,)
        conn.execute(query("follow_seen_reset"))
        scanned = applied = 0
        vanished: list[str] = []
        for chunk in chunked(applier.store.list_sessions(batch_size=options.scan_count),
                             options.batch_size):
            if self.f.stopping.is_set():
                return False
            conn.execute(query("follow_seen_add"), {"keys": [session_key(sid) for sid in chunk]})
            done = applier.apply(chunk, "sweep")
            scanned += len(chunk)
            applied += len(done.merged) + done.quarantined
            vanished += done.gone
        for batch in self._unseen(conn, since, options.batch_size):
            if self.f.stopping.is_set():
                return False
            applier.confirm_gone(batch, "sweep")
        for start in range(0, len(vanished), options.batch_size):
            applier.confirm_gone(vanished[start : start + options.batch_size], "sweep")
        conn.execute(query("follow_sweep_finished"), {
            "follower_id": self.f.follower_id, "scanned": scanned, "applied": applied})
        SWEEPS.inc()
        log.info("sweep done: %d sessions read, %d changed", scanned, applied)
        return True

    def _unseen(self, conn: psycopg.Connection[Any], since: datetime | None,
                size: int) -> Iterator[list[str]]:
        """Sessions applied before the sweep began that it did not find: gone, maybe."""
        after = b""
        while True:
            rows = conn.execute(query("follow_unseen"), {
                "follower_id": self.f.follower_id, "since": since, "after": after,
                "limit": size}).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            yield [bytes(row[0]).decode("utf-8", "surrogateescape") for row in rows]


