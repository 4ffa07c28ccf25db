"""Crash drills: processes killed with SIGKILL at random moments, then restarted.

- ``crash-backfill``: ``memshift backfill`` killed at random points of its progress
  (20 times; a few in the quick configuration), then run to the end.
- ``crash-repair``: ``memshift repair`` killed mid-drain (the spool move included),
  then run to the end, over repairs in both directions.
- ``crash-dual-write``: an application writing through ``MigratingStore`` killed
  exactly between the primary's write and the secondary's (see
  :mod:`memshift.drills.writer`), in ``dual_write`` and in ``pg_primary``, then the
  stores put right the way an operator can: a new backfill and ``memshift repair``
  in dual_write; in pg_primary (where no backfill copies towards Redis) parity
  finds the sessions Redis lacks and they are queued for ``memshift repair``.

Figures: sessions, kills, messages lost and duplicated (both 0), parity after
(every session passes).
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import psycopg

from memshift.drills.children import kill, last_json, memshift_command, run_memshift, start
from memshift.drills.context import DrillContext, Figures
from memshift.drills.tally import add_parity, add_tally, tally
from memshift.drills.workload import interleaved, play_legacy, sessions
from memshift.errors import MemshiftError
from memshift.migrate import spool
from memshift.migrate.backfill import connect, runs
from memshift.migrate.parity import ParityOptions, parity
from memshift.sql.queries import query
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore

FAMILY = "crash"
LEASE_SECONDS = 0.5  # a killed backfill's batch is taken again after this


# -- the backfill ----------------------------------------------------------------------


def batches_done(conn: psycopg.Connection[Any], prefix: str) -> int:
    found = [r for r in runs(conn, limit=20) if r.extra["prefix"] == prefix]
    return found[0].batches_done if found else 0


def _completed(conn: psycopg.Connection[Any], prefix: str) -> bool:
    found = [r for r in runs(conn, limit=20) if r.extra["prefix"] == prefix]
    return bool(found) and found[0].state == "completed"


def drill_crash_backfill(ctx: DrillContext) -> Figures:
    """SIGKILL ``memshift backfill`` at random points of its progress; finish it; count."""
    rng = random.Random(ctx.seed)
    count, kills, batch = ctx.pick((120, 5, 4), (400, 20, 4))
    with RedisStore(ctx.redis_url, prefix=ctx.prefix) as legacy:
        ids = play_legacy(legacy, count, seed=ctx.seed, namespace="crash-backfill")
    # Kill points: a number of batches done (0: while it starts or discovers), then a
    # random pause of up to a batch's time, so kills land anywhere in the work. They
    # fall in the first half, so that the run is never done before its last kill.
    targets = sorted(rng.sample(range(math.ceil(count / batch) // 2), kills))
    args = ("backfill", "--json", "--batch-size", str(batch),
            "--lease-seconds", str(LEASE_SECONDS))
    killed_at: list[int] = []
    with connect(ctx.postgres_dsn) as conn:
        for target in targets:
            child = start(ctx, memshift_command(*args))
            ctx.wait_for(lambda: child.poll() is not None  # noqa: B023
                         or batches_done(conn, ctx.prefix) >= target,  # noqa: B023
                         "waiting for the backfill to reach a kill point")
            time.sleep(rng.uniform(0.0, 0.1))
            if child.poll() is not None or _completed(conn, ctx.prefix):
                break  # it finished first: fewer kills, which the figures show
            killed_at.append(batches_done(conn, ctx.prefix))
            kill(child)
        time.sleep(LEASE_SECONDS + 0.2)  # the last killed run's lease runs out
        final = run_memshift(ctx, *args)
        summary = last_json(final.stdout)
        found = [r for r in runs(conn, limit=20) if r.extra["prefix"] == ctx.prefix]
    figs = Figures()
    figs.info("sessions", count)
    figs.expect("kills (SIGKILL)", len(killed_at), kills)
    figs.info("batches done at each kill", killed_at)
    figs.expect("backfill exit code after the kills", final.returncode, 0)
    figs.expect("backfill runs (one, resumed)", len(found), 1)
    figs.expect("backfill run state", summary.get("state"), "completed")
    figs.expect("sessions counted once by the run",
                summary.get("migrated", 0) + summary.get("unchanged", 0), count)
    with RedisStore(ctx.redis_url, prefix=ctx.prefix) as legacy, \
            PostgresStore(ctx.postgres_dsn, max_size=2) as truth:
        add_tally(figs, tally(legacy, truth, ids))
    add_parity(figs, ctx.settings, ids)
    return figs


# -- the repair worker -----------------------------------------------------------------


def _queue_rows(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """(rows, sessions) in the repair queue."""
    rows = conn.execute(query("repair_counts")).fetchall()
    return sum(r[1] for r in rows), sum(r[2] for r in rows)


def enqueue(conn: psycopg.Connection[Any], rows: list[tuple[str, str, str]], error: str) -> None:
    """Queue repairs as the router does when a secondary write fails: (session, target, op)."""
    at = datetime.now(UTC)
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(query("repair_enqueue"), [
            {"session_id": sid, "target": target, "operation": op, "error": error,
             "enqueued_at": at, "spool_id": None} for sid, target, op in rows])


def drill_crash_repair(ctx: DrillContext) -> Figures:
    """SIGKILL ``memshift repair`` mid-drain, again and again; finish it; count."""
    rng = random.Random(ctx.seed)
    count, kills = ctx.pick((120, 3), (240, 8))
    spool_path = ctx.workdir / "repair.spool"
    with RedisStore(ctx.redis_url, prefix=ctx.prefix) as legacy, \
            PostgresStore(ctx.postgres_dsn, max_size=2) as truth:
        # PostgreSQL missed these (it was down: the router spooled them, a line each)...
        to_pg = play_legacy(legacy, count // 2, seed=ctx.seed, namespace="crash-repair-pg")
        # ...and Redis missed every write of these (queued in PostgreSQL, a row each).
        generated = sessions(count - count // 2, seed=ctx.seed + 1,
                             namespace="crash-repair-redis")
        for one in generated:
            one.play(truth)
    for sid in to_pg:
        spool.append(spool_path, spool.SpoolEntry.new(
            sid, "postgres", "append_message", "drill: PostgreSQL was unreachable",
            datetime.now(UTC)))
    to_redis = [g.session_id for g in generated]
    args = ("repair", "--json", "--spool", str(spool_path))
    killed_at: list[int] = []
    with connect(ctx.postgres_dsn) as conn:
        enqueue(conn, [(g.session_id, "redis", c.method) for g in generated for c in g.calls],
                "drill: Redis was unreachable")
        rows_at_start = _queue_rows(conn)[0] + len(to_pg)
        # Kill points: sessions left to repair; the first at a random time after the
        # start (as it imports, connects or moves the spool).
        # A repair on an idle machine drains this in a second or so: the kill points
        # leave a quarter of the work at least, so the kill lands before it is done.
        targets: list[int | None] = [None, *sorted(rng.sample(range(count // 4, count),
                                                              kills - 1), reverse=True)]
        for left in targets:
            child = start(ctx, memshift_command(*args))
            ctx.wait_for(lambda: child.poll() is not None  # noqa: B023
                         or left is None  # noqa: B023
                         or (not spool.has_entries(spool_path)
                             and _queue_rows(conn)[1] <= left),  # noqa: B023
                         "waiting for the repair to reach a kill point")
            time.sleep(rng.uniform(0.05, 0.4) if left is None else rng.uniform(0.0, 0.01))
            if child.poll() is not None:
                break
            killed_at.append(_queue_rows(conn)[1] + len(to_pg) * spool.has_entries(spool_path))
            kill(child)
        final = run_memshift(ctx, *args)
        summary = last_json(final.stdout)
        rows_left = _queue_rows(conn)[0]
    figs = Figures()
    figs.info("sessions", count)
    figs.info("queued repairs at start (spool lines + queue rows)", rows_at_start)
    figs.expect("kills (SIGKILL)", len(killed_at), kills)
    figs.info("sessions left to repair at each kill", killed_at)
    figs.expect("repair exit code after the kills", final.returncode, 0)
    figs.expect("repairs left in the queue", rows_left, 0)
    figs.expect("spool left", spool.has_entries(spool_path), False)
    figs.info("repaired by the last run", summary.get("sessions_repaired"))
    with RedisStore(ctx.redis_url, prefix=ctx.prefix) as legacy, \
            PostgresStore(ctx.postgres_dsn, max_size=2) as truth:
        add_tally(figs, tally(legacy, truth, to_pg), label="into PostgreSQL: ")
        add_tally(figs, tally(legacy, truth, to_redis, primary="postgres"), label="into Redis: ")
    add_parity(figs, ctx.settings, to_pg + to_redis)
    return figs


# -- the dual-writing application ----------------------------------------------------------


def _writer(stage: str, count: int, seed: int, namespace: str, begin: int,
            stop_before: int | None) -> list[str]:
    command = [sys.executable, "-m", "memshift.drills.writer", "--stage", stage,
               "--sessions", str(count), "--seed", str(seed), "--namespace", namespace,
               "--start", str(begin)]
    if stop_before is not None:
        command += ["--stop-before-secondary-append", str(stop_before)]
    return command


def _read_line(ctx: DrillContext, child: subprocess.Popen[str]) -> dict[str, Any]:
    """The child's next line of JSON; {} when it ended without one."""
    assert child.stdout is not None
    while not select.select([child.stdout], [], [], 0.1)[0]:
        ctx.check_time("waiting for the writer to stop between its writes")
    line = child.stdout.readline()
    return json.loads(line) if line.strip() else {}


def _kill_between_writes(ctx: DrillContext, child: subprocess.Popen[str]) -> int | None:
    """Wait until the writer stops itself between its two writes, then SIGKILL it there.

    Returns the step it was killed in, or None when it finished first.
    """
    said = _read_line(ctx, child)
    if "stopped_at" not in said:
        child.wait(timeout=ctx.left())
        return None
    _, status = os.waitpid(child.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        raise MemshiftError(f"the drill's writer said it stopped but ended ({status})")
    kill(child)
    return int(said["stopped_at"])


def _behind(ctx: DrillContext, ids: list[str]) -> list[str]:
    """Sessions whose stores differ (parity does not pass), checked without recording."""
    return [r.session_id for r in parity(ctx.settings, session_ids=ids,
                                         options=ParityOptions(record=False, settle_seconds=0))
            if r.parity_status != "pass"]


def _dual_write_case(ctx: DrillContext, figs: Figures, stage: str, rng: random.Random) -> None:
    count, kills = ctx.pick((10, 2), (40, 8))
    namespace = f"crash-{stage}"
    generated = sessions(count, seed=ctx.seed, namespace=namespace)
    ids = [g.session_id for g in generated]
    appends = [s.index for s in interleaved(generated, seed=ctx.seed)
               if s.call.method == "append_message"]
    begin, killed_in = 0, []
    for left in range(kills, 0, -1):
        # The K-th message append from here, K at random within a fair share of the rest.
        rest = sum(1 for index in appends if index >= begin)
        stop = rng.randint(1, max(1, rest // (left + 1)))
        child = start(ctx, _writer(stage, count, ctx.seed, namespace, begin, stop),
                      stdout=subprocess.PIPE)
        step = _kill_between_writes(ctx, child)
        if step is None:
            break
        killed_in.append(step)
        begin = step + 1  # the app restarts; the request it died in is not retried
    last = start(ctx, _writer(stage, count, ctx.seed, namespace, begin, None),
                 stdout=subprocess.PIPE)
    done = _read_line(ctx, last)
    last.wait(timeout=ctx.left())
    label = f"{stage}: "
    figs.info(f"{label}sessions", count)
    figs.expect(f"{label}kills between the two writes", len(killed_in), kills)
    figs.expect(f"{label}app finished after the kills", "done" in done, True)
    primary = "redis" if stage == "dual_write" else "postgres"
    with RedisStore(ctx.redis_url, prefix=ctx.prefix) as legacy, \
            PostgresStore(ctx.postgres_dsn, max_size=2) as truth:
        before = tally(legacy, truth, ids, primary=primary)
    # Each kill left one acknowledged message out of the secondary: the kills landed.
    figs.at_least(f"{label}messages the secondary lacked before recovery", before.lost, kills)
    figs.info(f"{label}sessions behind before recovery", len(_behind(ctx, ids)))
    if stage == "dual_write":
        rebackfill = run_memshift(ctx, "backfill", "--json")
        figs.expect(f"{label}recovery: memshift backfill exit code", rebackfill.returncode, 0)
    else:
        with connect(ctx.postgres_dsn) as conn:
            enqueue(conn, [(sid, "redis", "drill") for sid in _behind(ctx, ids)],
                    "drill: found by parity after a crash between the writes")
    repaired = run_memshift(ctx, "repair", "--json", "--spool",
                            str(ctx.workdir / "repair.spool"))
    figs.expect(f"{label}recovery: memshift repair exit code", repaired.returncode, 0)
    with RedisStore(ctx.redis_url, prefix=ctx.prefix) as legacy, \
            PostgresStore(ctx.postgres_dsn, max_size=2) as truth:
        add_tally(figs, tally(legacy, truth, ids, primary=primary), label=label)
    add_parity(figs, ctx.settings, ids, label=label)


def drill_crash_dual_write(ctx: DrillContext) -> Figures:
    """Kill a dual-writing app between its primary and secondary writes; recover; count."""
    rng = random.Random(ctx.seed)
    figs = Figures()
    for stage in ("dual_write", "pg_primary"):
        _dual_write_case(ctx, figs, stage, rng)
    return figs
