"""The routers that `memshift demo` and the pg-outage rehearsal build take the
settings' secondary timeout, as the application's routers do."""

from __future__ import annotations

import random
from pathlib import Path

import psycopg
from rich.console import Console

from memshift.config import Settings
from memshift.demo import _Demo
from memshift.migrate.plan import PlanWatcher
from memshift.migrate.rehearse import _OutageRun

# Not the default (2 s): a router built without the setting would not have it.
CHOSEN = 0.75


def test_the_demos_router_has_the_settings_secondary_timeout(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    settings = Settings(prefix=redis_prefix, data_dir=tmp_path,
                        secondary_timeout_seconds=CHOSEN)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        demo = _Demo(settings, pg_dsn, redis_url, conn, Console(quiet=True), True, 0.0)
        try:
            assert demo.router._secondary_timeout == CHOSEN
        finally:
            demo.close()


def test_the_outage_rehearsals_routers_have_the_settings_secondary_timeout(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    settings = Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix,
                        secondary_timeout_seconds=CHOSEN)
    run = _OutageRun(settings, tmp_path / "repair.spool", "dual_write",
                     random.Random(1), deadline=0.0)
    watcher = PlanWatcher(pg_dsn, poll_seconds=1.0)
    router = run.router(pg_dsn, watcher)
    try:
        assert router._secondary_timeout == CHOSEN
    finally:
        router.close()
        watcher.close()
