"""How long a Plan change takes to reach every process: from set_stage/set_slice to reads.

``--processes`` processes (default 8, started with multiprocessing ``spawn``), each
with its own ``PlanWatcher`` and ``MigratingStore``, read one session in a loop and
report every change of the store that served their reads, with the wall clock
(``time.time()``, one clock for every process of the machine) and the Plan version
their watcher holds. The parent changes the Plan ``--changes`` times (default 20),
cycling through four moves that each flip where the session is read:

    set_stage shadow (Redis serves)        set_stage cutover (PostgreSQL serves: 100 % slice)
    set_slice 0 % (Redis serves)           set_slice 100 % (PostgreSQL serves)

(the forward move to cutover is forced: the scratch database has no backfill). Per
change, a process's latency is the time from just before the parent calls
``set_stage``/``set_slice`` until that process's first read served by the new store
returned; the change's latency is the slowest process's. Goal: p99 of the change
latency <= 1 s. See bench/README.md.

    .venv/bin/python bench/plan_propagation.py [--processes 8] [--changes 20] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import psycopg
import redis
from interleaved import add_server_options, percentile
from store_ops import fill_session, scratch_database, scratch_prefix

from memshift.migrate.plan import Plan, PlanWatcher, Stage, set_slice, set_stage
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore

GOAL_SECONDS = 1.0
READ_PATH = "resume"
SESSION = "propagation-fixture"
START_TIMEOUT = 120.0  # for every process to start and read once
CHANGE_TIMEOUT = 10.0  # for every process to follow one change

Move = Callable[[psycopg.Connection[Any]], Plan]
MOVES: list[tuple[str, str, Move]] = [
    (
        "set_stage shadow",
        "redis",
        lambda c: set_stage(c, Stage.SHADOW, "bench: back to shadow", who="bench"),
    ),
    (
        "set_stage cutover",
        "postgres",
        lambda c: set_stage(c, Stage.CUTOVER, "bench: cutover", force=True, who="bench"),
    ),
    (
        "set_slice 0 %",
        "redis",
        lambda c: set_slice(c, READ_PATH, 0, "bench: slice off", who="bench"),
    ),
    (
        "set_slice 100 %",
        "postgres",
        lambda c: set_slice(c, READ_PATH, 100, "bench: slice on", who="bench"),
    ),
]


class BenchError(RuntimeError):
    """The bench's own assumptions failed: its figures would mean nothing."""


# -- the reading processes --------------------------------------------------------------


def reader(
    index: int,
    dsn: str,
    redis_url: str,
    prefix: str,
    spool: str,
    pause: float,
    reports: Any,
    stop: EventType,
) -> None:
    """Read the session until told to stop; report each change of the serving store."""
    try:
        watcher = PlanWatcher(dsn)
        router = MigratingStore(
            RedisStore(redis_url, prefix=prefix),
            PostgresStore(dsn, min_size=1, max_size=1),
            watcher,
            spool_path=Path(spool),
        )
        last = None
        while not stop.is_set():
            result = router.read(SESSION, read_path=READ_PATH)
            seen = time.time()
            if result.state is None:
                raise BenchError(f"{result.source} holds no session {SESSION!r}")
            if result.source != last:
                last = result.source
                reports.put(("read", index, result.source, watcher.current()[0].version, seen))
            if pause:
                time.sleep(pause)
        router.close()
        watcher.close()
    except Exception as exc:
        reports.put(("error", index, f"{type(exc).__name__}: {exc}", 0, time.time()))


# -- the parent -------------------------------------------------------------------------


@dataclass
class Change:
    move: str
    version: int
    source: str  # where reads go after it
    set_seconds: float  # how long set_stage/set_slice took
    latencies: list[float]  # per process, seconds from just before the call


class Readers:
    """The reading processes and what they reported."""

    def __init__(self, args: argparse.Namespace, dsn: str, prefix: str, spool: str) -> None:
        context = mp.get_context("spawn")
        self.reports: Any = context.Queue()
        self.stop = context.Event()
        self.count = args.processes
        self.processes = [
            context.Process(
                target=reader,
                args=(
                    i,
                    dsn,
                    args.redis_url,
                    prefix,
                    spool,
                    args.pause_ms / 1000,
                    self.reports,
                    self.stop,
                ),
                name=f"bench-reader-{i}",
                daemon=True,
            )
            for i in range(args.processes)
        ]
        for process in self.processes:
            process.start()

    def wait_for(self, source: str, since: float, timeout: float) -> dict[int, float]:
        """When each process first read from ``source`` at or after ``since``."""
        seen: dict[int, float] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < self.count:
            try:
                kind, index, what, _version, at = self.reports.get(
                    timeout=max(0.01, deadline - time.monotonic())
                )
            except queue.Empty:
                missing = sorted(set(range(self.count)) - set(seen))
                raise BenchError(
                    f"processes {missing} did not read from {source} within {timeout:g} s"
                ) from None
            if kind == "error":
                raise BenchError(f"process {index} failed: {what}")
            if what == source and at >= since and index not in seen:
                seen[index] = at
        return seen

    def close(self) -> None:
        self.stop.set()
        for process in self.processes:
            process.join(timeout=15)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


def run(args: argparse.Namespace) -> list[Change]:
    client = redis.Redis.from_url(args.redis_url, decode_responses=False)
    changes: list[Change] = []
    with (
        scratch_database(args.postgres_dsn) as dsn,
        scratch_prefix(client) as prefix,
        tempfile.TemporaryDirectory() as spool_dir,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        with PostgresStore(dsn) as pg_store:
            fill_session(pg_store, SESSION)
        with RedisStore(args.redis_url, prefix=prefix) as redis_store:
            fill_session(redis_store, SESSION)
        set_stage(conn, Stage.DUAL_WRITE, "bench: dual_write", who="bench")
        set_stage(conn, Stage.SHADOW, "bench: shadow", force=True, who="bench")
        set_slice(conn, READ_PATH, 100, "bench: slice on (read at cutover)", who="bench")
        started = time.monotonic()
        readers = Readers(args, dsn, prefix, str(Path(spool_dir) / "repair.spool"))
        try:
            readers.wait_for("redis", 0.0, START_TIMEOUT)
            print(
                f"{args.processes} processes reading after {time.monotonic() - started:.1f}s",
                file=sys.stderr,
            )
            rng = random.Random(5)
            for k in range(args.changes):
                name, source, move = MOVES[(k + 1) % len(MOVES)]
                # A random moment relative to the watchers' 0.25 s LISTEN slices.
                time.sleep(rng.uniform(0.2, 0.45))
                before = time.time()
                plan = move(conn)
                set_seconds = time.time() - before
                seen = readers.wait_for(source, before, CHANGE_TIMEOUT)
                latencies = [seen[i] - before for i in range(args.processes)]
                changes.append(Change(name, plan.version, source, set_seconds, latencies))
                print(
                    f"change {k + 1:2} {name:18} v{plan.version:<3} all {args.processes} in "
                    f"{max(latencies) * 1000:6.1f} ms",
                    file=sys.stderr,
                )
        finally:
            readers.close()
    client.close()
    return changes


def render(changes: list[Change], args: argparse.Namespace) -> None:
    every = [lat for change in changes for lat in change.latencies]
    slowest = [max(change.latencies) for change in changes]
    setting = [change.set_seconds for change in changes]
    print(
        f"\nPlan propagation: {len(changes)} changes, {args.processes} processes reading "
        f"in a loop (pause {args.pause_ms:g} ms); ms from the set_stage/set_slice call"
    )
    header = f"{'':34} {'p50':>8} {'p99':>8} {'max':>8}"
    print(header)
    print("-" * len(header))
    for label, values in (
        ("every process, every change", every),
        (f"all {args.processes} processes (per change)", slowest),
        ("the set_stage/set_slice call", setting),
    ):
        print(
            f"{label:34} {percentile(values, 50) * 1000:8.1f} {percentile(values, 99) * 1000:8.1f} "
            f"{max(values) * 1000:8.1f}"
        )
    p99 = percentile(slowest, 99)
    verdict = "met" if p99 <= GOAL_SECONDS else "missed"
    print(
        f"goal p99 (all processes) <= {GOAL_SECONDS * 1000:.0f} ms: {verdict} "
        f"({p99 * 1000:.1f} ms; mean {statistics.mean(slowest) * 1000:.1f} ms)"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "goal_seconds": GOAL_SECONDS,
                    "processes": args.processes,
                    "changes": [change.__dict__ for change in changes],
                },
                indent=1,
            )
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_options(parser)
    parser.add_argument("--processes", type=int, default=8, help="reading processes (default 8)")
    parser.add_argument("--changes", type=int, default=20, help="Plan changes to time (default 20)")
    parser.add_argument(
        "--pause-ms",
        type=float,
        default=0.0,
        help="pause between a process's reads (default 0: back to back)",
    )
    parser.add_argument("--quick", action="store_true", help="4 processes, 8 changes")
    parser.add_argument(
        "--json", action="store_true", help="also print every change's latencies as JSON"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.processes, args.changes = 4, 8
    if args.processes < 1 or args.changes < 1 or args.pause_ms < 0:
        parser.error("--processes and --changes must be at least 1, --pause-ms at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    render(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
