"""Parity throughput against the raw reads of the same sessions from both stores.

Sessions checked per second by ``memshift.migrate.parity.parity`` (as the product
runs it: reports recorded in ``memshift.parity_results``) against reading the same
sessions by hand, in the same run, on the same data, interleaved round by round (the
order flips each round, so drift in the machine's speed cancels out):

- ``parity``: ``parity(settings, session_ids=ids)``: per batch one Redis pipeline,
  one ``load_sessions`` statement, validation into the model, the comparison, the
  invariants, and one INSERT of the reports (PostgreSQL's read of a batch runs in a
  worker thread while the next batch is read from Redis).
- ``parity, not recorded``: the same with ``ParityOptions(record=False)``: for
  information, to show what recording costs.
- ``raw reads + JSON``: per batch the same Redis read commands (the layout's
  ``read_commands``) in one pipeline and the same ``load_sessions`` statement, with
  the JSON they return decoded (``json.loads`` of every JSON value), as any client
  must before it can compare anything. **The baseline of the goal**.
- ``raw reads``: the same reads, decoding nothing beyond what the drivers do.

**Goal: parity / raw reads + JSON >= 0.67x.** See bench/README.md.

    .venv/bin/python bench/parity.py [--sessions 2000] [--batch-size 200] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import redis
from psycopg import sql
from psycopg.conninfo import make_conninfo
from rich.console import Console
from rich.table import Table

from memshift.config import Settings
from memshift.generate import generate_sessions
from memshift.migrate.backfill import BackfillOptions, backfill
from memshift.migrate.parity import ParityOptions, parity
from memshift.sql.migrations import upgrade
from memshift.sql.queries import query
from memshift.stores.redis import RedisStore

GOAL = 0.67
BASELINE = "raw reads + JSON"
VARIANTS = ("parity", "parity, not recorded", BASELINE, "raw reads")


@contextmanager
def scratch_database(admin_dsn: str) -> Iterator[str]:
    name = f"memshift_bench_par_{secrets.token_hex(4)}"
    ident = sql.Identifier(name)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    try:
        dsn = make_conninfo(admin_dsn, dbname=name)
        upgrade(dsn)
        yield dsn
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


@contextmanager
def scratch_prefix(client: redis.Redis) -> Iterator[str]:
    prefix = f"memshift_bench_par_{secrets.token_hex(4)}"
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for at in range(0, len(keys), 1000):
            client.unlink(*keys[at : at + 1000])


def _json_values(command: str, reply: Any) -> Any:
    """Decode the JSON in one reply of the reference layout's read commands."""
    if command == "LRANGE":
        return [json.loads(item) for item in reply]
    if command == "GET":
        return None if reply is None else json.loads(reply)
    if command == "XRANGE":
        return [(entry_id, {**fields, b"data": json.loads(fields[b"data"])})
                for entry_id, fields in reply]
    return reply


class RawReads:
    """The reads parity makes, by hand: one pipeline and one statement per batch."""

    def __init__(self, client: redis.Redis, conn: psycopg.Connection[Any], layout: Any,
                 tool_keys: set[Any]) -> None:
        self.client, self.conn, self.layout, self.tool_keys = client, conn, layout, tool_keys
        self.statement = query("load_sessions")

    def read(self, ids: list[str], decode: bool) -> object:
        pipe = self.client.pipeline(transaction=False)
        commands = [c for sid in ids for c in self.layout.read_commands(sid)]
        for command in commands:
            pipe.execute_command(*command)
        replies = pipe.execute()
        rows = self.conn.execute(self.statement, {"ids": ids}).fetchall()
        if not decode:
            return replies, rows
        redis_side = []
        for command, reply in zip(commands, replies, strict=True):
            if command[0] == "HGETALL" and command[1] in self.tool_keys:
                redis_side.append({k: json.loads(v) for k, v in reply.items()})
            else:
                redis_side.append(_json_values(command[0], reply))
        # The session column is jsonb (psycopg decodes it); the parts are JSON text.
        pg_side = [(row[0], row[1], [json.loads(part) for part in row[2:]]) for row in rows]
        return redis_side, pg_side


def _batches(ids: list[str], size: int) -> Iterator[list[str]]:
    return (ids[i : i + size] for i in range(0, len(ids), size))


def run(args: argparse.Namespace, progress: Console) -> dict[str, Any]:
    client = redis.Redis.from_url(args.redis_url, decode_responses=False)
    with scratch_database(args.postgres_dsn) as dsn, scratch_prefix(client) as prefix, \
            psycopg.connect(dsn, autocommit=True) as conn:
        settings = Settings(redis_url=args.redis_url, postgres_dsn=dsn, prefix=prefix)
        progress.print(f"writing {args.sessions:,} generated sessions to Redis, backfilling")
        with RedisStore(args.redis_url, prefix=prefix) as legacy:
            ids = []
            for generated in generate_sessions(args.sessions, seed=5):
                generated.play(legacy)
                ids.append(generated.session_id)
            layout = legacy.layout
        backfill(settings, BackfillOptions(prefix=prefix))
        conn.execute("SET TimeZone TO 'UTC'")
        tool_keys = {layout.session_keys(sid)[2] for sid in ids}
        raw = RawReads(client, conn, layout, tool_keys)
        checked = {"pass": 0}

        def run_parity(record: bool) -> Callable[[], object]:
            options = ParityOptions(batch_size=args.batch_size, record=record)

            def go() -> object:
                reports = list(parity(settings, session_ids=ids, options=options))
                checked["pass"] = sum(r.parity_status == "pass" for r in reports)
                return reports
            return go

        def run_raw(decode: bool) -> Callable[[], object]:
            return lambda: [raw.read(batch, decode) for batch in _batches(ids, args.batch_size)]

        variants: dict[str, Callable[[], object]] = {
            "parity": run_parity(True),
            "parity, not recorded": run_parity(False),
            BASELINE: run_raw(True),
            "raw reads": run_raw(False),
        }
        for go in variants.values():  # warm up: prepared plans, connections, caches
            go()
        if checked["pass"] != len(ids):
            raise SystemExit(f"parity passed {checked['pass']} of {len(ids)} sessions: "
                             "the bench needs identical twins")
        seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for round_no in range(args.rounds):
            order = VARIANTS if round_no % 2 == 0 else tuple(reversed(VARIANTS))
            for name in order:
                started = time.perf_counter()
                variants[name]()
                seconds[name].append(time.perf_counter() - started)
            progress.print(f"round {round_no + 1}/{args.rounds} done")
        conn.execute("SELECT 1")
    client.close()
    rate = {name: len(ids) / statistics.median(times) for name, times in seconds.items()}
    def ratio(variant: str, base: str) -> float:
        return statistics.median(b / v for b, v in zip(seconds[base], seconds[variant],
                                                         strict=True))

    ratios = {
        "parity": ratio("parity", BASELINE),
        "parity, not recorded": ratio("parity, not recorded", BASELINE),
        "parity vs raw reads": ratio("parity", "raw reads"),
    }
    return {"sessions": len(ids), "batch_size": args.batch_size, "rounds": args.rounds,
            "goal": GOAL, "sessions_per_second": {k: round(v) for k, v in rate.items()},
            "seconds": seconds, "ratios": ratios}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--postgres-dsn", default=os.environ.get(
        "MEMSHIFT_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--redis-url", default=os.environ.get(
        "MEMSHIFT_REDIS_URL", "redis://127.0.0.1:6379/15"))
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args, Console(stderr=True))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rates = result["sessions_per_second"]
    ratios = result["ratios"]
    table = Table("variant", "sessions/s", f"÷ {BASELINE}",
                  title=f"parity of {result['sessions']:,} sessions, batches of "
                        f"{result['batch_size']}, median of {result['rounds']} rounds")
    for name in VARIANTS:
        ratio = ratios.get(name)
        shown = "1.00x" if name == BASELINE else f"{ratio:.2f}x" if ratio else "—"
        if name == "parity" and ratio is not None:
            shown += " ✓" if ratio >= GOAL else " ✗"
        table.add_row(name, f"{rates[name]:,}", shown)
    console = Console()
    console.print(table)
    console.print(f"goal: parity / {BASELINE} ≥ {GOAL}x; parity / raw reads (no decode) "
                  f"= {ratios['parity vs raw reads']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
