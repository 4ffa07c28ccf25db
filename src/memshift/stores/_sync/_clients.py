"""The sync clients; hand-written twin of ``../_async/_clients.py``."""

from __future__ import annotations

import heapq
import itertools
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
    """

    def __init__(self, seconds: float, ring: Callable[[], None]) -> None:
        self.rang = False
        self.disarmed = False
        self._ring: Callable[[], None] | None = ring
        _WATCHDOG.arm(time.monotonic() + seconds, self)

    def go(self) -> None:
        """Ring, unless disarmed (the watchdog calls it with its lock held)."""
        if not self.disarmed and self._ring is not None:
            self.rang = True
            self._ring()

    def disarm(self) -> None:
        _WATCHDOG.disarm(self)
        self._ring = None  # what it would have rung (a connection) is not kept alive


class _Watchdog:
    """One daemon thread that rings the alarms whose time has come, earliest first.

    Disarmed alarms stay in the heap until they reach its head, or until they are
    most of it (then the heap is rebuilt): arming and disarming cost a lock and a
    heap push, never a thread or a wake-up of this one unless the alarm is the
    earliest.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        self._disarmed = 0
        self._thread: threading.Thread | None = None

    def arm(self, when: float, alarm: Alarm) -> None:
        with self._lock:
            heapq.heappush(self._heap, (when, next(self._order), alarm))
            if self._thread is None or not self._thread.is_alive():  # first, or forked
                self._thread = threading.Thread(target=self._run, name="memshift-alarms",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0][2] is alarm:
                self._lock.notify()

    def disarm(self, alarm: Alarm) -> None:
        with self._lock:
            if alarm.disarmed:
                return
            alarm.disarmed = True
            self._disarmed += 1
            if self._disarmed > 512 and 2 * self._disarmed > len(self._heap):
                self._heap = [entry for entry in self._heap if not entry[2].disarmed]
                heapq.heapify(self._heap)
                self._disarmed = 0

    def _run(self) -> None:
        with self._lock:
            while True:
                while self._heap and self._heap[0][2].disarmed:
                    heapq.heappop(self._heap)
                    self._disarmed = max(0, self._disarmed - 1)
                if not self._heap:
                    self._lock.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._lock.wait(delay)
                    continue
                alarm = heapq.heappop(self._heap)[2]
                alarm.go()
                alarm.disarmed = True


_WATCHDOG = _Watchdog()
