"""A read through the MigratingStore against a direct read of the same store.

``load_session`` of one session (50 messages, 5 tool runs, a summary, a checkpoint,
10 events, the same in both stores), timed in the same run, on the same store
objects, interleaved every few reads (the order flips each turn):

- ``shadow``: Redis serves; the router vs ``RedisStore.load_session``.
- ``cutover``, a 100 % slice of the read path: PostgreSQL serves; the router vs
  ``PostgresStore.load_session``.
- ``retired``, cached: when the router has the retired stage's cache-aside (a read
  whose ``ReadResult.source`` is ``"cache"``), a cached read vs a Redis-only read
  (``RedisStore.load_session``); otherwise the row says "not available".

The router runs over a ``StaticPlan`` of the Plan row and over a live ``PlanWatcher``
(the Plan row is moved through the stages, with ``--force`` where a gate would refuse in
this scratch database). Every read is checked to come from the store the row
claims. Goals: router / direct <= 1.05x; retired cached / Redis-only <= 1.5x.
See bench/README.md.

    .venv/bin/python bench/read_overhead.py [--ops 300] [--rounds 11] [--quick]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis
from bytecodes import count_variants
from interleaved import Maker, add_server_options, ratio, time_variants
from psycopg_pool import ConnectionPool
from store_ops import fill_session, scratch_database, scratch_prefix

from memshift.migrate.plan import Plan, PlanWatcher, Stage, StaticPlan, set_slice, set_stage
from memshift.stores import routing
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore

GOAL = 1.05
CACHE_GOAL = 1.5
POOL_SIZE = 2
LOAD_SID = "load-fixture"
READ_PATH = "default"
ROUTERS = ("router_static", "router_watcher")
LABELS = {"router_static": "StaticPlan", "router_watcher": "PlanWatcher"}


class BenchError(RuntimeError):
    """The bench's own assumptions failed: its figures would mean nothing."""


@dataclass
class Row:
    name: str  # shadow | cutover | retired
    served_by: str  # the ReadResult.source every router read must have
    baseline: str  # the store read directly
    goal: float
    times: dict[str, list[float]] | None = None  # None: not available
    note: str = ""


def _utc(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET TimeZone TO 'UTC'")


def move_watched_plan(dsn: str, watcher: PlanWatcher, stage: Stage) -> Plan:
    """Move the Plan row to ``stage`` (forced: no gates in a scratch database) and wait
    until the watcher holds it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        plan = set_stage(conn, stage, f"bench: read_overhead at {stage}", force=True, who="bench")
        if stage is Stage.CUTOVER:
            plan = set_slice(conn, READ_PATH, 100, "bench: every read from PostgreSQL", who="bench")
    deadline = time.monotonic() + 10
    while watcher.current()[0].version < plan.version:
        if time.monotonic() > deadline:
            raise BenchError(f"the watcher did not see Plan version {plan.version} in 10 s")
        time.sleep(0.01)
    return plan


def check_source(routers: dict[str, MigratingStore], row: Row) -> str | None:
    """Why the routers' reads would not come from ``row.served_by``, or None.

    A cache-aside is filled by the first read, so the second one is what counts.
    """
    for variant, router in routers.items():
        for _ in range(2):
            result = router.read(LOAD_SID, read_path=READ_PATH)
        if result.source != row.served_by or result.state is None:
            return f"{LABELS[variant]} reads came from {result.source} ({result.reason})"
    return None


def makers(
    routers: dict[str, MigratingStore], direct: RedisStore | PostgresStore
) -> dict[str, Maker]:
    def router_maker(router: MigratingStore) -> Maker:
        return lambda sid: lambda i: router.load_session(LOAD_SID, read_path=READ_PATH)

    made: dict[str, Maker] = {v: router_maker(r) for v, r in routers.items()}
    made["direct"] = lambda sid: lambda i: direct.load_session(LOAD_SID)
    return made


def profile_router(router: MigratingStore, row: str, ops: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(ops):
        router.load_session(LOAD_SID, read_path=READ_PATH)
    profiler.disable()
    print(f"\n-- profile: router (StaticPlan) read at {row}, {ops} reads --")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def run(args: argparse.Namespace) -> list[Row]:
    client = redis.Redis.from_url(args.redis_url, decode_responses=False)
    rows = [
        Row("shadow", "redis", "redis", GOAL),
        Row("cutover", "postgres", "postgres", GOAL),
        Row("retired", "cache", "redis", CACHE_GOAL),
    ]
    with (
        scratch_database(args.postgres_dsn) as dsn,
        ConnectionPool(
            dsn,
            min_size=POOL_SIZE,
            max_size=POOL_SIZE,
            kwargs={"autocommit": True},
            configure=_utc,
            open=True,
        ) as pool,
        scratch_prefix(client) as prefix,
        tempfile.TemporaryDirectory() as spool_dir,
        PlanWatcher(dsn) as watcher,
    ):
        pool.wait(timeout=15)
        redis_store = RedisStore(client, prefix=prefix)
        pg_store = PostgresStore(pool)
        fill_session(redis_store, LOAD_SID)
        fill_session(pg_store, LOAD_SID)
        if _dump(redis_store) != _dump(pg_store):
            raise BenchError("the session differs between the stores")
        stores = {"redis": redis_store, "postgres": pg_store}
        spool = Path(spool_dir) / "repair.spool"
        warmup = min(args.ops, 100)
        # The Plan row moves one way, as an operator would: dual_write on the way.
        move_watched_plan(dsn, watcher, Stage.DUAL_WRITE)
        stages = {
            "shadow": [Stage.SHADOW],
            "cutover": [Stage.CUTOVER],
            "retired": [Stage.PG_PRIMARY, Stage.RETIRED],
        }
        for row in rows:
            for stage in stages[row.name]:
                plan = move_watched_plan(dsn, watcher, stage)
            routers = {
                "router_static": MigratingStore(
                    redis_store, pg_store, StaticPlan(plan), spool_path=spool
                ),
                "router_watcher": MigratingStore(redis_store, pg_store, watcher, spool_path=spool),
            }
            why_not = check_source(routers, row)
            if why_not is not None:
                if row.name != "retired":
                    raise BenchError(f"{row.name}: {why_not}")
                mentioned = '"cache"' in Path(routing.__file__).read_text(encoding="utf-8")
                row.note = "not available" + (
                    f" (routing.py names a cache source, but {why_not})"
                    if mentioned
                    else f" (no cache-aside in the router: {why_not})"
                )
                print(f"{row.name:8} {row.note}", file=sys.stderr)
                continue
            before = {v: router.stats.reads.copy() for v, router in routers.items()}
            started = time.perf_counter()
            measure = count_variants if args.bytecodes else time_variants
            row.times = measure(
                makers(routers, stores[row.baseline]), args.ops, args.rounds, warmup
            )
            for variant, router in routers.items():
                timed = router.stats.reads - before[variant]
                sources = {source for source, _, _ in timed}
                if sources != {row.served_by}:
                    raise BenchError(f"{row.name}/{variant}: reads came from {sources}")
            print(
                f"{row.name:8} "
                + " ".join(f"{LABELS[v]} {ratio(row.times, v, 'direct'):5.2f}x" for v in ROUTERS)
                + f" direct ({time.perf_counter() - started:.1f}s)",
                file=sys.stderr,
            )
            if args.profile:
                profile_router(routers["router_static"], row.name, args.ops)
    client.close()
    return rows


def _dump(store: RedisStore | PostgresStore) -> str:
    state = store.load_session(LOAD_SID)
    if state is None:
        raise BenchError(f"{store.name} holds no session {LOAD_SID!r}")
    dumped = state.model_dump(mode="json")
    dumped["session"].pop("expires_at", None)
    return json.dumps(dumped, sort_keys=True)


def render(rows: list[Row], args: argparse.Namespace) -> None:
    unit = "bc" if args.bytecodes else "µs"
    print(
        "\nMigratingStore.load_session vs a direct read of the serving store: "
        + (f"Python bytecodes per read (bc), over {args.ops} reads" if args.bytecodes
           else f"median of {args.rounds} rounds x {args.ops} reads")
    )
    header = (
        f"{'stage (serves)':31} {'StaticPlan ' + unit:>14} {'PlanWatcher ' + unit:>15} "
        f"{'direct ' + unit:>10} {'StaticPlan ratio':>17} {'PlanWatcher ratio':>18} {'goal':>6}"
    )
    print(header)
    print("-" * len(header))
    checks, missed = 0, []
    for row in rows:
        label = f"{row.name} ({row.served_by} vs {row.baseline})"
        if row.times is None:
            print(f"{label:31} {row.note}")
            continue
        med = {v: statistics.median(t) for v, t in row.times.items()}
        ratios = {v: ratio(row.times, v, "direct") for v in ROUTERS}
        print(
            f"{label:31} {med['router_static']:14.1f} {med['router_watcher']:15.1f} "
            f"{med['direct']:10.1f} {ratios['router_static']:16.2f}x "
            f"{ratios['router_watcher']:17.2f}x {row.goal:5.2f}x"
        )
        checks += len(ratios)
        missed += [f"{row.name}/{LABELS[v]} ({r:.2f}x)" for v, r in ratios.items() if r > row.goal]
    if args.bytecodes:
        print("(the goals are on time: bytecode counts leave out C and I/O)")
    else:
        print(
            f"goals met by {checks - len(missed)} of {checks}"
            + (f"; missed by {', '.join(missed)}" if missed else "")
        )
    if args.json:
        print(
            json.dumps(
                {
                    "ops": args.ops,
                    "rounds": args.rounds,
                    "unit": unit,
                    "rows": [
                        {
                            "row": r.name,
                            "goal": r.goal,
                            "note": r.note,
                            "us_per_op_by_round": r.times,
                        }
                        for r in rows
                    ],
                },
                indent=1,
            )
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_options(parser)
    parser.add_argument(
        "--ops", type=int, default=300, help="reads per variant per round (default 300)"
    )
    parser.add_argument("--rounds", type=int, default=11, help="rounds (default 11)")
    parser.add_argument(
        "--quick", action="store_true", help="100 reads x 3 rounds: a smoke run, figures rough"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the StaticPlan router's reads at each stage",
    )
    parser.add_argument(
        "--json", action="store_true", help="also print every round's µs/op as JSON"
    )
    parser.add_argument(
        "--bytecodes",
        action="store_true",
        help="count the Python bytecodes each variant runs per read instead of timing it: "
        "the same on a busy machine (one round)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.ops, args.rounds = 100, 3
    if args.bytecodes:
        args.rounds = 1
    if args.ops < 1 or args.rounds < 1:
        parser.error("--ops and --rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    render(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
