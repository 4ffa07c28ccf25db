"""Live traffic through routers while a drill breaks things: writers and readers.

Each writer thread is an application process of its own (a router of its own)
playing new generated sessions one call after another; each reader thread (a
router of its own too) resumes sessions the writers have written. They count what
a user would notice: calls that failed, the longest call, and **stale reads**: a
read that began after a write of the session returned, yet shows fewer messages
than that write left (DESIGN §4, continuity).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from memshift.generate import generate_sessions
from memshift.model import Message
from memshift.stores.migrating import MigratingStore

RouterFactory = Callable[[int], MigratingStore]


@dataclass
class TrafficStats:
    writes: int = 0
    failed_writes: int = 0
    reads: int = 0
    failed_reads: int = 0
    stale_reads: int = 0
    longest_call: float = 0.0
    errors: list[str] = field(default_factory=list)  # the first few, for the report


class Traffic:
    """``writers`` + ``readers`` threads until :meth:`stop`; sessions under ``namespace``."""

    def __init__(self, routers: RouterFactory, *, writers: int, readers: int, namespace: str,
                 seed: int, pause: float = 0.0) -> None:
        self._routers = routers
        self._namespace = namespace
        self._seed = seed
        self._pause = pause  # between a writer's calls, to spread a small workload in time
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.stats = TrafficStats()
        self.session_ids: list[str] = []
        # Messages each session held when a write of it last returned (read floors).
        self._floors: dict[str, int] = {}
        self._threads = [threading.Thread(target=self._write, args=(i,), daemon=True,
                                          name=f"drill-writer-{i}") for i in range(writers)]
        self._threads += [threading.Thread(target=self._read, args=(writers + i,), daemon=True,
                                           name=f"drill-reader-{i}") for i in range(readers)]
        self._routers_made: list[MigratingStore] = []

    def start(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop and join every thread (each ends its call under way first)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def resume_all(self, router: MigratingStore) -> int:
        """Read every session once more through ``router`` (a new app process, after the
        drill): how many show fewer messages than their last returned write left."""
        stale = 0
        with self._lock:
            floors = dict(self._floors)
        for sid, floor in floors.items():
            state = router.load_session(sid, read_path="resume")
            if state is None or state.message_count < floor:
                stale += 1
                if len(self.stats.errors) < 5:
                    self.stats.errors.append(
                        f"stale resume of {sid!r}: {0 if state is None else state.message_count}"
                        f" messages, a write had left {floor}")
        return stale

    def close(self) -> None:
        """Close the routers (and so their background repair)."""
        for router in self._routers_made:
            router.close()

    def _router(self, index: int) -> MigratingStore:
        router = self._routers(index)
        with self._lock:
            self._routers_made.append(router)
        return router

    def _note(self, failed: str, exc: Exception) -> None:
        with self._lock:
            setattr(self.stats, failed, getattr(self.stats, failed) + 1)
            if len(self.stats.errors) < 5:
                self.stats.errors.append(f"{type(exc).__name__}: {exc}"[:300])

    def _timed(self, started: float) -> None:
        took = time.monotonic() - started
        with self._lock:
            self.stats.longest_call = max(self.stats.longest_call, took)

    def _write(self, index: int) -> None:
        router = self._router(index)
        number = 0
        while not self._stop.is_set():
            (generated,) = generate_sessions(1, seed=self._seed, start=number,
                                             namespace=f"{self._namespace}-w{index}")
            number += 1
            with self._lock:
                self.session_ids.append(generated.session_id)
            for call in generated.calls:
                if self._stop.is_set():
                    return
                started = time.monotonic()
                try:
                    result = getattr(router, call.method)(*call.args)
                except Exception as exc:  # a user's call failed: the figure counts it
                    self._note("failed_writes", exc)
                    continue
                finally:
                    self._timed(started)
                with self._lock:
                    self.stats.writes += 1
                    if isinstance(result, Message) and result.seq is not None:
                        sid = generated.session_id
                        self._floors[sid] = max(self._floors.get(sid, 0), result.seq + 1)
                if self._pause:
                    time.sleep(self._pause)

    def _read(self, index: int) -> None:
        router = self._router(index)
        rng = random.Random(index)
        while not self._stop.is_set():
            with self._lock:
                known = list(self._floors.items())
            if not known:
                time.sleep(0.01)
                continue
            sid, floor = rng.choice(known)
            started = time.monotonic()
            try:
                state = router.load_session(sid, read_path="resume")
            except Exception as exc:  # a user's read failed: the figure counts it
                self._note("failed_reads", exc)
                continue
            finally:
                self._timed(started)
            with self._lock:
                self.stats.reads += 1
                if state is None or state.message_count < floor:
                    self.stats.stale_reads += 1
                    if len(self.stats.errors) < 5:
                        self.stats.errors.append(
                            f"stale read of {sid!r}: {0 if state is None else state.message_count}"
                            f" messages, a write had left {floor}")
            if self._pause:
                time.sleep(self._pause)
