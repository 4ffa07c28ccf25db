"""The MigratingStore's dual writes against the same two writes done by hand.

In stage ``dual_write`` every write goes to Redis (the primary) and then what Redis
acknowledged goes to PostgreSQL. For append_message, upsert_tool_run, set_status and
save_session this times, in the same run, on the same connections, interleaved round
by round (the order flips each round):

- ``router (StaticPlan)``: ``MigratingStore`` over a ``StaticPlan`` of stage dual_write.
- ``router (PlanWatcher)``: the same router over a live ``PlanWatcher`` (its thread
  runs during every variant, so its cost lands on all of them alike).
- ``by hand``: the same two writes with redis-py and psycopg and no memshift code:
  the same Lua script (``layouts/lua/common.lua`` in front, EVALSHA) with hand-built arguments,
  then the same named statement of ``queries.sql`` with the parameters built from
  the script's reply (the seq, the event_seq and the session hash it returned), as
  the router does: ``append_message_carried``; ``upsert_tool_run``; ``record_event``
  and ``save_session`` (apply_status_change); ``save_session`` when Redis applied it.

Before timing, each variant writes a few operations on a session of its own and the
states of those sessions are compared in both stores: the by-hand variant must leave
them as the router does. Goal: router / by hand <= 1.10x. See bench/README.md.

    .venv/bin/python bench/dual_write.py [--ops 300] [--rounds 9] [--only OP] [--quick]
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
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
from bytecodes import count_variants
from interleaved import Maker, add_server_options, ratio, time_variants
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from store_ops import (
    LEGAL_FROM,
    STATUS_CYCLE,
    TOOL_RANK,
    Op,
    RedisCases,
    _at,
    _dumps,
    _iso,
    content_hash,
    message_input,
    scratch_database,
    scratch_prefix,
    session_input,
    tool_run_input,
)

from memshift.migrate.plan import PlanWatcher, Stage, StaticPlan, set_stage
from memshift.sql.queries import query
from memshift.stores.layouts.reference import ID_CHECK_WINDOW
from memshift.stores.migrating import MigratingStore
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore

GOAL = 1.10
POOL_SIZE = 2
OPERATIONS = ("append_message", "upsert_tool_run", "set_status", "save_session")
VARIANTS = ("router_static", "router_watcher", "by_hand")
LABELS = {
    "router_static": "router (StaticPlan)",
    "router_watcher": "router (PlanWatcher)",
    "by_hand": "by hand",
}
CHECK_OPS = 12  # operations written per variant for the same-state check


class BenchError(RuntimeError):
    """The bench's own assumptions failed: its figures would mean nothing."""


def _utc(conn: psycopg.Connection[Any]) -> None:
    # As PostgresStore does for its own pools: timestamps read back as UTC.
    conn.execute("SET TimeZone TO 'UTC'")


class ByHand:
    """The two writes of every operation, with redis-py and psycopg only."""

    def __init__(self, cases: RedisCases, pool: ConnectionPool) -> None:
        self.cases = cases
        self.pool = pool
        self.legal = {status: ",".join(sources) for status, sources in LEGAL_FROM.items()}

    def _execute(self, statement: bytes, params: dict[str, Any]) -> list[Any]:
        with self.pool.connection() as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description is not None else []

    def append_message(self, sid: str) -> Op:
        keys, script = self.cases.keys(sid), self.cases.scripts["append_message"]
        statement = query("append_message_carried")

        def op(i: int) -> object:
            m = message_input(i)
            body = {
                "id": m["message_id"],
                "role": m["role"],
                "content": m["content"],
                "ts": _iso(m["ts"]),
            }
            reply = script(keys=keys, args=[0, _dumps(body), -1, m["message_id"], ID_CHECK_WINDOW])
            if reply[0] != b"appended":
                raise BenchError(f"Redis did not append: {reply!r}")
            params = {
                **m,
                "session_id": sid,
                "seq": int(reply[1]),
                "tool_call_id": None,
                "metadata": Jsonb({}),
            }
            rows = self._execute(statement, params)
            if not rows or not rows[0][0]:
                raise BenchError(f"PostgreSQL did not insert the message: {rows!r}")
            return rows

        return op

    def upsert_tool_run(self, sid: str) -> Op:
        keys, script = self.cases.keys(sid), self.cases.scripts["upsert_tool_run"]
        statement = query("upsert_tool_run")

        def op(i: int) -> object:
            run = tool_run_input(i)
            updated = _iso(run["updated_at"])
            head = _dumps({"name": run["name"], "args": run["args"], "status": run["status"]})
            tail = _dumps({"last_error": run["last_error"], "updated_at": updated})
            head, tail = f'{head[:-1]},"attempts":', f",{tail[1:]}"
            written = f"{head}{run['attempts']}{tail}".encode()
            args = [
                0,
                run["tool_call_id"],
                head,
                tail,
                run["attempts"],
                0,
                updated,
                TOOL_RANK[run["status"]],
                "",
                "",
            ]
            reply = script(keys=keys, args=args)
            # The bench's runs always win as sent: the secondary gets them unchanged.
            if reply[0] != b"applied" or reply[1] != written:
                raise BenchError(f"Redis did not store the run as sent: {reply!r}")
            params = {
                **run,
                "session_id": sid,
                "args": Jsonb(run["args"]),
                "metadata": Jsonb({}),
                "content_hash": content_hash(run),
            }
            return self._execute(statement, params)

        return op

    def set_status(self, sid: str) -> Op:
        keys, script = self.cases.keys(sid), self.cases.scripts["set_status"]
        record_event, save_session = query("record_event"), query("save_session")

        def op(i: int) -> object:
            status, at = STATUS_CYCLE[i % 2], _at(i)
            reply = script(keys=keys, args=[0, status, _iso(at), "{}", self.legal[status]])
            if reply[0] != b"applied":
                raise BenchError(f"Redis refused the status change: {reply!r}")
            event = {
                "session_id": sid,
                "event_seq": int(reply[2]),
                "type": "status",
                "from_status": reply[3].decode(),
                "to_status": status,
                "at": at,
                "data": Jsonb({}),
            }
            self._execute(record_event, event)
            return self._execute(save_session, session_params(sid, reply[4], reply[5]))

        return op

    def save_session(self, sid: str) -> Op:
        keys, script = self.cases.keys(sid), self.cases.scripts["save_session"]
        statement = query("save_session")

        def op(i: int) -> object:
            data = session_input(i)
            version, updated, created = (
                str(data["version"]),
                _iso(data["updated_at"]),
                _iso(data["created_at"]),
            )
            metadata = _dumps(data["metadata"])
            fields = [
                "tenant_id",
                data["tenant_id"],
                "user_id",
                data["user_id"],
                "status",
                data["status"],
                "version",
                version,
                "created_at",
                created,
                "updated_at",
                updated,
                "metadata",
                metadata,
            ]
            reply = script(
                keys=keys, args=[0, version, updated, created, "0", 7, *fields, "expires_at"]
            )
            if reply[0] != b"applied":
                return reply  # Redis holds something newer: nothing to copy
            params = {
                **data,
                "session_id": sid,
                "metadata": Jsonb(data["metadata"]),
                "messages_trimmed": 0,
                "expires_at": None,
            }
            return self._execute(statement, params)

        return op


def session_params(sid: str, fields: list[bytes], ttl: int) -> dict[str, Any]:
    """save_session's parameters from a session hash as set_status.lua returns it."""
    if ttl > 0:
        raise BenchError("the bench's sessions have no TTL")
    f = {k.decode(): v.decode() for k, v in zip(fields[::2], fields[1::2], strict=True)}
    return {
        "session_id": sid,
        "tenant_id": f.get("tenant_id"),
        "user_id": f.get("user_id"),
        "status": f["status"],
        "version": int(f["version"]),
        "created_at": datetime.fromisoformat(f["created_at"]),
        "updated_at": datetime.fromisoformat(f["updated_at"]),
        "messages_trimmed": int(f.get("messages_trimmed", "0")),
        "metadata": Jsonb(json.loads(f.get("metadata", "{}"))),
        "expires_at": None,
    }


def router_op(router: MigratingStore, operation: str, sid: str) -> Op:
    if operation == "append_message":
        return lambda i: router.append_message(sid, message_input(i))
    if operation == "upsert_tool_run":
        return lambda i: router.upsert_tool_run(sid, tool_run_input(i))
    if operation == "set_status":
        return lambda i: router.set_status(sid, STATUS_CYCLE[i % 2], at=_at(i))
    return lambda i: router.save_session({"session_id": sid, **session_input(i)})


class Cases:
    """The three variants of every operation, each on a session made in both stores."""

    def __init__(
        self,
        redis_store: RedisStore,
        pg_store: PostgresStore,
        routers: dict[str, MigratingStore],
        by_hand: ByHand,
    ) -> None:
        self.redis_store = redis_store
        self.pg_store = pg_store
        self.routers = routers
        self.by_hand = by_hand

    def _new_session(self, sid: str) -> None:
        record = {"session_id": sid, **session_input(0), "version": 0}
        self.redis_store.save_session(record)
        self.pg_store.save_session(record)

    def makers(self, operation: str) -> dict[str, Maker]:
        def maker(variant: str) -> Maker:
            def make(sid: str) -> Op:
                self._new_session(sid)
                if variant == "by_hand":
                    made: Op = getattr(self.by_hand, operation)(sid)
                    return made
                return router_op(self.routers[variant], operation, sid)

            return make

        return {variant: maker(variant) for variant in VARIANTS}

    def check_same_state(self, operation: str) -> None:
        """Every variant leaves both stores in the same state (but for the session id)."""
        seen: dict[str, tuple[str, str]] = {}
        for variant, make in self.makers(operation).items():
            sid = f"check-{operation}-{variant}"
            op = make(sid)
            for i in range(CHECK_OPS):
                op(i)
            seen[variant] = (_normalised(self.redis_store, sid), _normalised(self.pg_store, sid))
        if len({states for states in seen.values()}) != 1:
            raise BenchError(
                f"{operation}: the variants leave different states: "
                + json.dumps({v: s for v, s in seen.items()}, indent=1)[:4000]
            )


def _normalised(store: RedisStore | PostgresStore, sid: str) -> str:
    state = store.load_session(sid)
    if state is None:
        raise BenchError(f"{store.name} holds no session {sid!r}")
    return json.dumps(state.model_dump(mode="json"), sort_keys=True).replace(sid, "SID")


def profile_router(cases: Cases, operation: str, ops: int) -> None:
    """Where the StaticPlan router's time goes for one operation (cProfile, tottime)."""
    op = cases.makers(operation)["router_static"](f"profile-{operation}")
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(ops):
        op(i)
    profiler.disable()
    print(f"\n-- profile: router (StaticPlan) {operation}, {ops} ops --")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    pstats.Stats(profiler).sort_stats("cumtime").print_stats("memshift", 15)


def run(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    client = redis.Redis.from_url(args.redis_url, decode_responses=False)
    results: dict[str, dict[str, list[float]]] = {}
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
    ):
        pool.wait(timeout=15)
        with psycopg.connect(dsn, autocommit=True) as conn:
            plan = set_stage(conn, Stage.DUAL_WRITE, "bench: dual_write", who="bench")
        redis_store = RedisStore(client, prefix=prefix)
        pg_store = PostgresStore(pool)
        spool = Path(spool_dir) / "repair.spool"
        with PlanWatcher(dsn) as watcher:
            if watcher.current()[0].stage is not Stage.DUAL_WRITE:
                raise BenchError("the watcher does not see stage dual_write")
            routers = {
                "router_static": MigratingStore(
                    redis_store, pg_store, StaticPlan(plan), spool_path=spool
                ),
                "router_watcher": MigratingStore(redis_store, pg_store, watcher, spool_path=spool),
            }
            cases = Cases(
                redis_store,
                pg_store,
                routers,
                ByHand(RedisCases(client, redis_store, prefix, "unused"), pool),
            )
            warmup = min(args.ops, 100)
            for operation in args.operations:
                started = time.perf_counter()
                cases.check_same_state(operation)
                measure = count_variants if args.bytecodes else time_variants
                times = measure(cases.makers(operation), args.ops, args.rounds, warmup)
                results[operation] = times
                print(
                    f"{operation:16} static {ratio(times, 'router_static', 'by_hand'):5.2f}x "
                    f"watcher {ratio(times, 'router_watcher', 'by_hand'):5.2f}x by hand "
                    f"({time.perf_counter() - started:.1f}s)",
                    file=sys.stderr,
                )
            for router in routers.values():
                troubles = {k: n for k, n in router.stats.writes.items() if k[1] != "ok"}
                if troubles or router.stats.repairs_enqueued or router.stats.spool_writes:
                    raise BenchError(f"writes that were not plain successes: {troubles}")
            if args.profile:
                for operation in args.operations:
                    profile_router(cases, operation, args.ops)
    client.close()
    return results


def render(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    unit = "bc/op" if args.bytecodes else "µs/op"
    print(
        "\nMigratingStore dual_write vs the same two writes by hand: "
        + (f"Python bytecodes per op (bc), over {args.ops} ops" if args.bytecodes
           else f"median of {args.rounds} rounds x {args.ops} ops")
    )
    header = (
        f"{'operation':16} {'static ' + unit:>13} {'watcher ' + unit:>14} "
        f"{'by hand ' + unit:>14} {'static ratio':>13} {'watcher ratio':>14}"
    )
    print(header)
    print("-" * len(header))
    missed = []
    for operation, times in results.items():
        med = {v: statistics.median(times[v]) for v in VARIANTS}
        ratios = {v: ratio(times, v, "by_hand") for v in ("router_static", "router_watcher")}
        print(
            f"{operation:16} {med['router_static']:13.1f} {med['router_watcher']:14.1f} "
            f"{med['by_hand']:14.1f} {ratios['router_static']:12.2f}x "
            f"{ratios['router_watcher']:13.2f}x"
        )
        missed += [f"{operation}/{LABELS[v]} ({r:.2f}x)" for v, r in ratios.items() if r > GOAL]
    checks = 2 * len(results)
    if args.bytecodes:
        print(f"(the goal, <= {GOAL:.2f}x, is on time: bytecode counts leave out C and I/O)")
    else:
        print(
            f"goal <= {GOAL:.2f}x vs by hand: met by {checks - len(missed)} of {checks}"
            + (f"; missed by {', '.join(missed)}" if missed else "")
        )
    if args.json:
        print(
            json.dumps(
                {
                    "goal": GOAL,
                    "ops": args.ops,
                    "rounds": args.rounds,
                    "unit": unit,
                    "us_per_op_by_round": results,
                },
                indent=1,
            )
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_options(parser)
    parser.add_argument(
        "--ops", type=int, default=300, help="operations per variant per round (default 300)"
    )
    parser.add_argument("--rounds", type=int, default=9, help="rounds (default 9)")
    parser.add_argument(
        "--only",
        dest="operations",
        action="append",
        choices=OPERATIONS,
        help="run only this operation (repeatable; default: all)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="100 ops x 3 rounds: a smoke run, figures rough"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the StaticPlan router on each operation",
    )
    parser.add_argument(
        "--json", action="store_true", help="also print every round's µs/op as JSON"
    )
    parser.add_argument(
        "--bytecodes",
        action="store_true",
        help="count the Python bytecodes each variant runs per op instead of timing it: "
        "the same on a busy machine (one round)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.ops, args.rounds = 100, 3
    if args.bytecodes:
        args.rounds = 1
    if args.ops < 1 or args.rounds < 1:
        parser.error("--ops and --rounds must be at least 1")
    args.operations = args.operations or list(OPERATIONS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    render(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
