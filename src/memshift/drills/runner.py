"""Run drills by name, each in a sandbox of its own, within its time limit.

Worked example::

    from memshift.drills.runner import run_drills
    for result in run_drills(settings, ["crash-backfill"], quick=True):
        print(result.drill, result.verdict, [f.as_json() for f in result.failed()])

Each drill gets a **scratch database** (``memshift_drill_<token>``, created on the
PostgreSQL server of ``settings.postgres_dsn`` and migrated, dropped afterwards),
so it may move the Plan, fill the repair queue and the quarantine without touching
the migration in the database you named; a **key prefix** of its own in Redis
(``<prefix>-drill-<token>``, its keys deleted afterwards); and a temporary
directory. The role needs CREATEDB. A drill that raises is a failed drill (its
error is its result); one that runs past its time limit stops at its next step.
"""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
import redis as redis_client
from psycopg import sql

from memshift.config import Settings, require_stores
from memshift.drills import concurrency, crash, hostile, outage, security
from memshift.drills.context import DrillContext, DrillResult, DrillSkipped, Figures
from memshift.errors import ConfigError
from memshift.redact import redact
from memshift.sql.migrations import upgrade


@dataclass(frozen=True)
class Drill:
    name: str
    family: str
    run: Callable[[DrillContext], Figures]
    limits: tuple[float, float]  # seconds: quick, full
    what: str  # one line, for `memshift drill --help` and the docs

    def limit(self, quick: bool) -> float:
        return self.limits[0] if quick else self.limits[1]


DRILLS: dict[str, Drill] = {d.name: d for d in (
    Drill("crash-backfill", crash.FAMILY, crash.drill_crash_backfill, (90, 300),
          "SIGKILL memshift backfill at random moments (20; 5 with --quick), finish it"),
    Drill("crash-repair", crash.FAMILY, crash.drill_crash_repair, (90, 240),
          "SIGKILL memshift repair mid-drain, again and again, finish it"),
    Drill("crash-dual-write", crash.FAMILY, crash.drill_crash_dual_write, (120, 300),
          "kill a dual-writing app between its primary and secondary write; recover"),
    Drill("outage-postgres", outage.FAMILY, outage.drill_outage_postgres, (90, 240),
          "PostgreSQL refused, hung and cut mid-query for 30 s (4 with --quick) under "
          "dual-write traffic"),
    Drill("outage-redis", outage.FAMILY, outage.drill_outage_redis, (90, 240),
          "a private Redis killed and restarted under traffic in pg_primary and retired"),
    Drill("concurrency", concurrency.FAMILY, concurrency.drill_concurrency, (90, 300),
          "8 writers on shared sessions during a backfill; the secondary gets writes "
          "out of order and twice"),
    Drill("hostile-input", hostile.FAMILY, hostile.drill_hostile_input, (90, 240),
          f"{len(hostile.RECORDS)} malformed and hostile records through the backfill"),
    Drill("security", security.FAMILY, security.drill_security, (150, 300),
          "no password in any output, dashboard 401, parameterised SQL, hostile ids"),
)}


def check_names(names: Sequence[str]) -> list[Drill]:
    """The drills named (all when none); ConfigError naming the unknown ones."""
    unknown = [n for n in names if n not in DRILLS]
    if unknown:
        raise ConfigError(f"unknown drill(s) {', '.join(unknown)}; known: {', '.join(DRILLS)}")
    return [DRILLS[n] for n in dict.fromkeys(names)] if names else list(DRILLS.values())


def run_drill(drill: Drill, ctx: DrillContext) -> DrillResult:
    """Run one drill in the context given (its deadline is set here from its limit)."""
    limit = drill.limit(ctx.quick)
    started = time.monotonic()
    ctx = replace(ctx, deadline=started + limit)
    figures: Figures | None = None
    error = skipped = None
    try:
        figures = drill.run(ctx)
    except DrillSkipped as exc:
        skipped = str(exc)
    except Exception as exc:  # a drill that crashes fails, with its error as the result
        error = f"{type(exc).__name__}: {redact(str(exc))}"
    return DrillResult(drill.name, drill.family, tuple(figures.items if figures else ()),
                       time.monotonic() - started, limit, error, skipped)


def run_drills(
    settings: Settings, names: Sequence[str] = (), *, quick: bool = False, seed: int = 0,
) -> Iterator[DrillResult]:
    """Run the drills named (all when none), each in a sandbox of its own; yield results."""
    chosen = check_names(names)
    require_stores(settings, "memshift drill")
    for drill in chosen:
        with sandbox(settings) as (drill_settings, workdir):
            yield run_drill(drill, DrillContext(drill_settings, workdir, quick, seed))


@contextmanager
def sandbox(settings: Settings) -> Iterator[tuple[Settings, Path]]:
    """Settings naming a scratch database and a key prefix of their own, and a directory."""
    token = secrets.token_hex(4)
    prefix = f"{settings.prefix}-drill-{token}"
    workdir = Path(tempfile.mkdtemp(prefix="memshift-drill-"))
    assert settings.postgres_dsn and settings.redis_url
    try:
        with scratch_database(settings.postgres_dsn, f"memshift_drill_{token}") as dsn:
            yield replace(settings, postgres_dsn=dsn, prefix=prefix), workdir
    finally:
        forget_prefix(settings.redis_url, prefix)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def scratch_database(dsn: str, name: str) -> Iterator[str]:
    """Create database ``name`` beside the one ``dsn`` names, migrate it, drop it after."""
    ident = sql.Identifier(name)
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    except psycopg.errors.InsufficientPrivilege:
        raise ConfigError(
            "memshift drill works in a scratch database of its own, and the role of "
            "--postgres-dsn may not create one: grant it CREATEDB, or name a DSN whose "
            "role may"
        ) from None
    scratch = psycopg.conninfo.make_conninfo(dsn, dbname=name)
    try:
        upgrade(scratch)
        yield scratch
    finally:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def forget_prefix(redis_url: str, prefix: str) -> None:
    """Delete every key under ``prefix:`` (SCAN, never KEYS; glob characters escaped)."""
    client = redis_client.Redis.from_url(redis_url)
    try:
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + ":*"
        keys = list(client.scan_iter(match=pattern, count=1000))
        for at in range(0, len(keys), 1000):
            client.delete(*keys[at : at + 1000])
    finally:
        client.close()
