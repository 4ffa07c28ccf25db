"""Follow mode: the write rate the follower keeps up with, against the writers' own.

Writer processes play a legacy application on the reference layout with plain
redis-py commands, one command per write (80 % RPUSH of a message, 20 % HSET of a
tool run with one more attempt), on ``--sessions`` sessions picked at random. In one
run it measures:

- ``raw``: the writers alone, unthrottled, with no follower (notifications on, as
  follow mode needs them): the writes/s Redis takes from them. **The baseline.**
- ``sustained``: the highest rate the follower keeps up with, found by bisection
  between 0 and the raw rate: a rate is kept up with when the writers reach it and
  the p99 lag of the messages is at most ``--lag-bound`` seconds (default 1 s).
- the lag at 50 % and 90 % of the sustained rate: p50, p99 and max.

A message's lag is from its ``ts`` (written just before its RPUSH) to the commit of
the follower's merge that brought it to PostgreSQL, measured in the follower's
``on_applied`` hook (one clock: the same machine). The follower runs in this
process, the writers in ``--writers`` processes of their own. See bench/README.md.

    .venv/bin/python bench/follow.py [--sessions 2000] [--seconds 8] [--writers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from interleaved import add_server_options, percentile
from rich.console import Console
from rich.table import Table
from store_ops import scratch_database, scratch_prefix

from memshift.config import Settings
from memshift.migrate.follow import FollowOptions, follow, required_flags, with_flags
from memshift.model import SessionState
from memshift.stores.layouts import get_layout

SETTING = "notify-keyspace-events"
PREFILL = 20  # messages per session before the bench starts
TEXT = "The quick brown fox asks the agent to book a flight and a hotel, twice. " * 2


def iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def prefill(client: redis.Redis, prefix: str, ids: list[str]) -> None:
    layout = get_layout("reference", prefix)
    for start in range(0, len(ids), 200):
        with client.pipeline(transaction=False) as pipe:
            for sid in ids[start : start + 200]:
                base, messages = layout.session_keys(sid)[:2]
                at = iso()
                pipe.hset(base, mapping={"tenant_id": "t", "status": "active", "version": "1",
                                         "created_at": at, "updated_at": at,
                                         "messages_trimmed": "0"})
                pipe.rpush(messages, *(json.dumps({"id": f"{sid}-p{n}", "role": "user",
                                                   "content": TEXT, "ts": at})
                                       for n in range(PREFILL)))
            pipe.execute()


def writer(redis_url: str, prefix: str, ids: list[str], rate: float | None, seconds: float,
           seed: int, results: Any) -> None:
    """Write for ``seconds`` at ``rate`` writes/s (None: as fast as it can)."""
    client = redis.Redis.from_url(redis_url)
    layout = get_layout("reference", prefix)
    keys = {sid: layout.session_keys(sid) for sid in ids}
    rng = random.Random(seed)
    attempts: dict[str, int] = {}
    writes = messages = 0
    began = time.perf_counter()
    next_at = began
    while (now := time.perf_counter()) - began < seconds:
        if rate is not None:
            if now < next_at:
                time.sleep(next_at - now)
            next_at += 1 / rate
        sid = rng.choice(ids)
        if rng.random() < 0.8:
            client.rpush(keys[sid][1], json.dumps(
                {"id": f"w{seed}-{writes}", "role": "assistant", "content": TEXT, "ts": iso()}))
            messages += 1
        else:
            attempts[sid] = attempts.get(sid, 0) + 1
            client.hset(keys[sid][2], "call", json.dumps(
                {"name": "search", "args": {}, "status": "retrying",
                 "attempts": attempts[sid], "last_error": "429", "updated_at": iso()}))
        writes += 1
    results.put((writes, messages, time.perf_counter() - began))
    client.close()


def write(redis_url: str, prefix: str, ids: list[str], processes: int, rate: float | None,
          seconds: float, seed: int) -> tuple[float, int]:
    """Run the writers; return the writes/s they reached and the messages they wrote."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    share = None if rate is None else rate / processes
    children = [ctx.Process(target=writer, args=(redis_url, prefix, ids[n::processes], share,
                                                 seconds, seed * 100 + n, results))
                for n in range(processes)]
    for child in children:
        child.start()
    done = [results.get(timeout=seconds + 60) for _ in children]
    for child in children:
        child.join()
    writes = sum(d[0] for d in done)
    return writes / max(d[2] for d in done), sum(d[1] for d in done)


class LagMeter:
    """The lag of every message the follower applies: from its ts to the merge's commit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[str, int] = {}
        self.lags: list[float] = []
        self.new_messages = 0
        self.recording = False

    def __call__(self, states: list[SessionState]) -> None:
        now = datetime.now(UTC)
        with self.lock:
            for state in states:
                last = self.seen.get(state.session_id, -1)
                fresh = [m for m in state.messages if (m.seq or 0) > last]
                if fresh:
                    self.seen[state.session_id] = max(m.seq or 0 for m in fresh)
                if self.recording:
                    self.new_messages += len(fresh)
                    self.lags.extend((now - m.ts).total_seconds() for m in fresh)

    def start(self) -> None:
        with self.lock:
            self.lags, self.new_messages, self.recording = [], 0, True

    def wait_for(self, messages: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.new_messages >= messages:
                    self.recording = False
                    return True
            time.sleep(0.05)
        return False


def trial(args: argparse.Namespace, prefix: str, ids: list[str], meter: LagMeter,
          rate: float, seed: int) -> dict[str, Any]:
    meter.start()
    reached, messages = write(args.redis_url, prefix, ids, args.writers, rate, args.seconds,
                              seed)
    settled = meter.wait_for(messages, 120)
    lags = meter.lags or [float("inf")]
    kept = settled and reached >= 0.95 * rate and percentile(lags, 99) <= args.lag_bound
    return {"target": round(rate, 1), "reached": round(reached, 1), "messages": messages,
            "p50": round(percentile(lags, 50), 4), "p99": round(percentile(lags, 99), 4),
            "max": round(max(lags), 4), "kept_up": kept}


def run(args: argparse.Namespace, progress: Console) -> dict[str, Any]:
    client = redis.Redis.from_url(args.redis_url)
    before = client.config_get(SETTING)[SETTING]
    before = before.decode() if isinstance(before, bytes) else str(before)
    needed = required_flags(get_layout("reference"))
    client.config_set(SETTING, with_flags(before, needed))
    try:
        with scratch_database(args.postgres_dsn) as dsn, scratch_prefix(client) as prefix:
            ids = [f"s{n:05d}" for n in range(args.sessions)]
            prefill(client, prefix, ids)
            raw, _ = write(args.redis_url, prefix, ids, args.writers, None, args.seconds, 1)
            progress.print(f"raw: {raw:,.0f} writes/s")
            return {"raw": round(raw, 1), **follow_at(args, dsn, prefix, ids, raw, progress)}
    finally:
        client.config_set(SETTING, before)
        client.close()


def follow_at(args: argparse.Namespace, dsn: str, prefix: str, ids: list[str], raw: float,
              progress: Console) -> dict[str, Any]:
    meter = LagMeter()
    stop = threading.Event()
    settings = Settings(redis_url=args.redis_url, postgres_dsn=dsn, prefix=prefix)
    failure: list[BaseException] = []

    def run_follower() -> None:
        try:
            follow(settings, FollowOptions(prefix=prefix, sweep_seconds=3600),
                   stop=stop, on_applied=meter)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run_follower, daemon=True)
    thread.start()
    try:
        while len(meter.seen) < len(ids):  # the first sweep applies the prefill
            if failure:
                raise failure[0]
            time.sleep(0.1)
        trials: list[dict[str, Any]] = []
        seed = 10

        def attempt(rate: float) -> bool:
            nonlocal seed
            seed += 1
            result = trial(args, prefix, ids, meter, rate, seed)
            trials.append(result)
            progress.print(f"  {result}")
            return bool(result["kept_up"])

        low, high = 0.0, raw
        if attempt(raw):
            low = trials[-1]["reached"]
        else:
            for _ in range(args.steps):
                middle = (low + high) / 2
                if attempt(middle):
                    low = middle
                else:
                    high = middle
        sustained = low
        at = {share: trial(args, prefix, ids, meter, sustained * share / 100, 90 + share)
              for share in (50, 90)} if sustained else {}
    finally:
        stop.set()
        thread.join(timeout=60)
    return {"sustained": round(sustained, 1), "ratio": round(sustained / raw, 3),
            "at_50": at.get(50), "at_90": at.get(90), "search": trials}


def show(console: Console, report: dict[str, Any], args: argparse.Namespace) -> None:
    table = Table("rate", "writes/s", "vs raw", "lag p50 s", "lag p99 s", "lag max s",
                  title=f"memshift follow ({args.sessions:,} sessions, {args.writers} writer "
                        f"processes, {args.seconds:g} s per run, lag bound "
                        f"{args.lag_bound:g} s)")
    raw = report["raw"]
    table.add_row("raw (writers alone)", f"{raw:,.0f}", "1.00x", "—", "—", "—")
    table.add_row("sustained (kept up)", f"{report['sustained']:,.0f}",
                  f"{report['ratio']:.2f}x", "—", "—", "—")
    for share in (50, 90):
        row = report.get(f"at_{share}")
        if row:
            table.add_row(f"{share} % of sustained", f"{row['reached']:,.0f}",
                          f"{row['reached'] / raw:.2f}x", f"{row['p50']:.3f}",
                          f"{row['p99']:.3f}", f"{row['max']:.3f}")
    console.print(table)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_options(parser)
    parser.add_argument("--sessions", type=int, default=2000, help="sessions written to")
    parser.add_argument("--writers", type=int, default=2, help="writer processes")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each run")
    parser.add_argument("--lag-bound", type=float, default=1.0,
                        help="p99 lag (s) a kept-up rate must stay under")
    parser.add_argument("--steps", type=int, default=5, help="bisection steps")
    parser.add_argument("--quick", action="store_true", help="500 sessions, 4 s runs, 3 steps")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.seconds, args.steps = 500, 4.0, 3
    progress = Console(stderr=True)
    report = run(args, progress)
    if args.json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        show(Console(), report, args)


if __name__ == "__main__":
    main()
