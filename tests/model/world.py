"""The real services the continuity model drives, and the knobs it turns on them.

- ``Services``: one migrated PostgreSQL database and one Redis for the whole test, a
  TCP fault proxy in front of each store for each of the two routers, and a fault
  trigger in PostgreSQL; ``reset()`` empties both between examples.
- ``Faults``: makes the secondary write of one call fail, as it fails in production:
  PostgreSQL raises an error (the repair queue, in the same PostgreSQL, still works),
  or the store cannot be reached at all (the connection is refused and cut);
  ``unreachable()`` cuts one router's store for any block (a read, in the model).
- ``CurrentPlan`` and ``LaggingPlan``: the Plan sources of the two routers. The first
  sees every change at once; the second holds the Plan it last loaded until the model
  refreshes it, and can go stale as a watcher cut off from PostgreSQL does.
- ``ModelClock``: the router's monotonic clock, advanced by the model (one second per
  step), so the router's time-based caches behave the same in every run.
"""

from __future__ import annotations

import contextlib
import time
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
import redis
from psycopg import sql
from redis.backoff import NoBackoff
from redis.retry import Retry

from memshift.drills.runner import forget_prefix
from memshift.faults.proxy import FaultProxy
from memshift.migrate.plan import Plan, load_plan
from memshift.stores.postgres import PostgresStore
from memshift.stores.redis import RedisStore

Fault = Literal["none", "fails", "unreachable"]
StoreName = Literal["redis", "postgres"]
ROUTERS = ("a", "b")

_WRITTEN = ("sessions", "messages", "tool_runs", "summaries", "checkpoints", "events")

_FAULT_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS model_faults;
CREATE TABLE IF NOT EXISTS model_faults.failing (session_id text PRIMARY KEY);
CREATE OR REPLACE FUNCTION model_faults.fail_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM model_faults.failing f WHERE f.session_id = NEW.session_id) THEN
        RAISE EXCEPTION 'continuity model: this write of session % to % fails',
            NEW.session_id, TG_TABLE_NAME;
    END IF;
    RETURN NEW;
END
$$;
"""


def _host_port(dsn: str) -> tuple[str, int]:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    return str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)


def _redis_host_port(url: str) -> tuple[str, int]:
    client = redis.Redis.from_url(url)
    kwargs = client.get_connection_kwargs()
    client.close()
    return str(kwargs.get("host", "127.0.0.1")), int(kwargs.get("port", 6379))


class Services:
    """PostgreSQL, Redis and four fault proxies (router a/b x postgres/redis)."""

    def __init__(self, pg_dsn: str, redis_url: str, prefix: str) -> None:
        self.pg_dsn = pg_dsn
        self.redis_url = redis_url
        self.base_prefix = prefix
        self.examples = 0
        self.admin = psycopg.connect(pg_dsn, autocommit=True)
        self._emptied = self._empty_tables()
        self._install_fault_trigger()
        self.proxies: dict[tuple[str, StoreName], FaultProxy] = {}
        with contextlib.ExitStack() as stack:
            for router in ROUTERS:
                self.proxies[(router, "postgres")] = stack.enter_context(
                    FaultProxy(*_host_port(pg_dsn)))
                self.proxies[(router, "redis")] = stack.enter_context(
                    FaultProxy(*_redis_host_port(redis_url)))
            self._proxies = stack.pop_all()

    def close(self) -> None:
        self._proxies.close()
        self.admin.close()

    def _install_fault_trigger(self) -> None:
        self.admin.execute(_FAULT_SCHEMA)
        for table in _WRITTEN:
            self.admin.execute(sql.SQL(
                "CREATE OR REPLACE TRIGGER model_fail BEFORE INSERT OR UPDATE ON {} "
                "FOR EACH ROW EXECUTE FUNCTION model_faults.fail_write()"
            ).format(sql.Identifier("memshift", table)))

    def _empty_tables(self) -> list[str]:
        """The tables a freshly migrated database holds no rows in (the others, such
        as the Plan's, are seeded by the migrations and kept)."""
        tables = [row[0] for row in self.admin.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'memshift' ORDER BY 1")]
        return [t for t in tables if self.admin.execute(sql.SQL(
            "SELECT NOT EXISTS (SELECT 1 FROM {})").format(
                sql.Identifier("memshift", t))).fetchone() == (True,)]

    def reset(self) -> str:
        """Empty PostgreSQL, put the Plan back at redis_only; a fresh Redis prefix."""
        # DELETE, not TRUNCATE: the tables hold a few rows, and DELETE takes no
        # exclusive locks and rewrites no files.
        with self.admin.transaction():
            for table in self._emptied:
                self.admin.execute(sql.SQL("DELETE FROM {}").format(
                    sql.Identifier("memshift", table)))
            self.admin.execute("DELETE FROM model_faults.failing")
        # The live shadow compare is off: it runs in a thread of its own, and the
        # model's steps must happen in one order only.
        self.admin.execute(
            "UPDATE memshift.plan SET version = version + 1, stage = 'redis_only',"
            " slices = '{}', rules = '{\"shadow_sample_rate\": 0}', changed_at = now(),"
            " changed_by = 'continuity model'")
        for proxy in self.proxies.values():
            proxy.heal()
        self.examples += 1
        return f"{self.base_prefix}x{self.examples}"

    def empty_redis(self, prefix: str) -> None:
        """Delete every key under ``prefix``: what a Redis restarted without persistence
        holds of the model's sessions (and the end of an example). Never FLUSHALL: the
        server is shared with other tests."""
        forget_prefix(self.redis_url, prefix)

    # -- the stores each router uses: through its own proxies ---------------------------

    def router_stores(self, router: str, prefix: str) -> tuple[RedisStore, PostgresStore]:
        redis_proxy = self.proxies[(router, "redis")]
        # No retries and short timeouts: a cut connection fails the call at once, as
        # an unreachable Redis does, instead of backing off for seconds.
        client = redis.Redis.from_url(
            redis_proxy.redis_url_for(self.redis_url), retry=Retry(NoBackoff(), 0),
            socket_timeout=2, socket_connect_timeout=1)
        legacy = RedisStore(client, prefix=prefix)
        truth = PostgresStore(self.proxies[(router, "postgres")].dsn_for(self.pg_dsn),
                              min_size=1, max_size=2, timeout=1.0)
        return legacy, truth


class Faults:
    """The secondary write of one call fails: an error, or the store is unreachable."""

    def __init__(self, services: Services) -> None:
        self._services = services

    @contextlib.contextmanager
    def during(
        self, router: str, secondary: StoreName | None, fault: Fault, session_id: str,
        truth: PostgresStore, legacy: RedisStore,
    ) -> Iterator[None]:
        if fault == "none" or secondary is None:
            yield
            return
        if fault == "fails" and secondary == "postgres":
            self._services.admin.execute(
                "INSERT INTO model_faults.failing VALUES (%s)", [session_id])
            try:
                yield
            finally:
                self._services.admin.execute(
                    "DELETE FROM model_faults.failing WHERE session_id = %s", [session_id])
            return
        # Unreachable (and a Redis that "fails": a dropped connection is how it fails).
        with self.unreachable(router, secondary, truth, legacy):
            yield

    @contextlib.contextmanager
    def unreachable(
        self, router: str, store: StoreName, truth: PostgresStore, legacy: RedisStore,
    ) -> Iterator[None]:
        """``store`` refuses and cuts router's connections for the block, then is back."""
        proxy = self._services.proxies[(router, store)]
        proxy.refuse()
        proxy.cut()
        try:
            yield
        finally:
            proxy.heal()
            if store == "postgres":
                # Drop the pooled connections the cut killed and wait for a good one:
                # the fault lasts for this block only, not for the pool's reconnection.
                truth.pool.check()
                with truth.pool.connection(timeout=10) as conn:
                    conn.execute("SELECT 1")
            else:
                legacy.client.connection_pool.disconnect()


class QueueView:
    """The stores some repair is pending for, looked up when asked; ``hold()`` keeps
    one answer while nothing can change it (the model's reads after a step)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._held: frozenset[str] | None = None

    def targets(self) -> frozenset[str]:
        if self._held is not None:
            return self._held
        rows = self._conn.execute("SELECT DISTINCT target FROM memshift.repair_queue").fetchall()
        return frozenset(row[0] for row in rows)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self._held = self.targets()
        try:
            yield
        finally:
            self._held = None


class CurrentPlan:
    """Router a's Plan source: it sees every change at once (an ideal watcher).

    The repair queue's targets are looked up on every call, as a watcher's one-second
    poll would see them if the model's steps are a second apart (they are: see
    ``ModelClock``).
    """

    def __init__(self, conn: psycopg.Connection[Any], queue: QueueView) -> None:
        self._queue = queue
        self.plan = load_plan(conn)

    def current(self) -> tuple[Plan, bool]:
        return self.plan, True

    def repair_targets(self) -> frozenset[str] | None:
        return self._queue.targets()


class LaggingPlan:
    """Router b's Plan source: the Plan as it last loaded it; stale when cut off.

    ``refresh()`` is the watcher's next successful reload. While ``fresh`` is False
    the watcher is past its ``max_staleness``: ``current()`` says so and, like the
    real watcher, it no longer vouches for the repair targets (None).
    """

    def __init__(self, conn: psycopg.Connection[Any], queue: QueueView) -> None:
        self._conn = conn
        self._queue = queue
        self.plan = load_plan(conn)
        self.fresh = True

    def refresh(self) -> None:
        self.plan = load_plan(self._conn)
        self.fresh = True

    def current(self) -> tuple[Plan, bool]:
        return self.plan, self.fresh

    def repair_targets(self) -> frozenset[str] | None:
        return self._queue.targets() if self.fresh else None


@dataclass
class ModelClock:
    """A monotonic clock that moves only when the model says so."""

    now: float = 1_000.0

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def as_time_module(self) -> _ClockedTime:
        """What the router's module sees as ``time``: this clock for ``monotonic()``,
        the real module for the rest (``sleep``, ``perf_counter`` for latencies)."""
        return _ClockedTime(self)


class _ClockedTime(types.ModuleType):
    def __init__(self, clock: ModelClock) -> None:
        super().__init__("time")
        self._clock = clock

    def monotonic(self) -> float:
        return self._clock.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def new_prefix() -> str:
    return f"mdl{uuid.uuid4().hex[:8]}"
