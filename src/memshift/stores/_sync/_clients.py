"""The sync clients; hand-written twin of ``../_async/_clients.py``."""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from redis import Redis
from redis.client import Pipeline
from redis.cluster import ClusterPipeline, RedisCluster
from redis.commands.core import Script as ScriptHandle

T = TypeVar("T")
Lock = threading.Lock  # guards one-time setup shared by concurrent callers

__all__ = ["Alarm", "Background", "Lock", "Redis", "RedisCluster", "ScriptHandle",
           "close_client", "queue_command", "run_blocking"]


def close_client(client: Redis | RedisCluster) -> None:
    client.close()


def queue_command(pipe: Pipeline | ClusterPipeline, command: tuple[Any, ...]) -> None:
    """Add one command to a pipeline (sent on ``execute``)."""
    pipe.execute_command(*command)  # type: ignore[no-untyped-call]


def run_blocking(function: Callable[..., T], *args: Any) -> T:
    """Run a blocking call (the async twin runs it in a thread)."""
    return function(*args)


class Periodic:
    """Call ``job()`` every ``interval`` seconds in a daemon thread (the async twin: a task).

    ``job`` must not raise (it logs its own errors). ``stop()`` waits for a run under
    way to finish, so nothing is left running after it returns.
    """

    def __init__(self, name: str, interval: float, job: Callable[[], None]) -> None:
        self._interval = interval
        self._job = job
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self._job()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


class Background:
    """Run jobs off the caller's path: a bounded queue and one daemon worker thread
    (the async twin: a task).

    ``submit`` never waits: when the queue is full it drops the job and returns False
    (the caller counts drops). ``job`` must not raise (it logs its own errors). The
    worker starts with the first job. ``drain()`` waits for every job submitted so far;
    ``stop()`` drops those queued and waits for the one under way.
    """

    def __init__(self, name: str, maxsize: int) -> None:
        self._name = name
        self._queue: queue.Queue[Callable[[], None]] = queue.Queue(maxsize)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._start = threading.Lock()

    def submit(self, job: Callable[[], None]) -> bool:
        with self._start:
            if self._thread is None:
                self._stopping.clear()
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            return False
        return True

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                if not self._stopping.is_set():
                    job()
            finally:
                self._queue.task_done()

    def drain(self) -> None:
        self._queue.join()

    def stop(self) -> None:
        self._stopping.set()
        with self._start:
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
            self._queue.task_done()


class Alarm:
    """Call ``ring()`` once, ``seconds`` from now, unless ``disarm()`` came first.

    Every alarm of the process shares one watchdog thread (the async twin: a timer of
    the loop). ``ring`` runs under the watchdog's lock, which ``disarm()`` takes too:
    once ``disarm()`` has returned, ``ring`` has either run (``rang``) or never will.
    ``ring`` must not raise, and must be quick (it holds back every other alarm).
    Arming costs an append and a comparison: one is armed for every PostgreSQL
    statement, and almost all are disarmed long before they are due.
    """

    __slots__ = ("rang", "ring", "when")

    def __init__(self, seconds: float, ring: Callable[[], None]) -> None:
        self.rang = False
        self.when = time.monotonic() + seconds
        # What it rings; None once disarmed or rung (a connection is not kept alive).
        self.ring: Callable[[], None] | None = ring
        _WATCHDOG.arm(self)

    def go(self) -> None:
        """Ring, unless disarmed (the watchdog calls it with its lock held)."""
        ring, self.ring = self.ring, None
        if ring is not None:
            self.rang = True
            ring()

    def disarm(self) -> None:
        with _WATCHDOG.lock:
            self.ring = None


class _Watchdog:
    """One daemon thread that rings the alarms whose time has come, earliest first.

    Arming appends the alarm to ``armed`` without a lock, and wakes the thread only
    when the alarm is due before the time it sleeps toward, or when ``armed`` grows
    long. Deadlines mostly grow (every statement's is later than the last one's), so
    the thread wakes about once per timeout, not once per statement: it then moves the
    alarms still armed into its heap and drops the others (most of them), off the
    callers' path.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        """A fresh watchdog: at start, and in a forked child (its thread is gone)."""
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self.armed: collections.deque[Alarm] = collections.deque()
        self._heap: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        # When the thread wakes next (inf: only when woken); -inf while it is awake,
        # as it looks at ``armed`` again before it sleeps.
        self._sleeps_until = math.inf
        self._thread: threading.Thread | None = None

    def arm(self, alarm: Alarm) -> None:
        self.armed.append(alarm)
        # Read after the append: a thread about to sleep either sees the alarm in
        # ``armed`` or has already published the time it sleeps toward.
        if alarm.when < self._sleeps_until or len(self.armed) > _UNSEEN_ALARMS:
            self._nudge()

    def _nudge(self) -> None:
        with self.lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="memshift-alarms",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        with self.lock:
            while True:
                self._sleeps_until = -math.inf
                self._look()
                self._sleeps_until = self._heap[0][0] if self._heap else math.inf
                if self.armed:
                    continue  # armed while it looked: look again before sleeping
                if self._heap:
                    self._wake.wait(self._sleeps_until - time.monotonic())
                else:
                    self._wake.wait()

    def _look(self) -> None:
        """Take in the alarms armed since, then ring those that are due."""
        armed, heap = self.armed, self._heap
        while armed:
            alarm = armed.popleft()
            if alarm.ring is not None:
                heapq.heappush(heap, (alarm.when, next(self._order), alarm))
        now = time.monotonic()
        while heap and (heap[0][2].ring is None or heap[0][0] <= now):
            heapq.heappop(heap)[2].go()  # a disarmed alarm does not ring


# The thread looks at the alarms armed since it last did once this many have piled up.
_UNSEEN_ALARMS = 1024
_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG._reset)
