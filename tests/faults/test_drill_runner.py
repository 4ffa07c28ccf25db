"""memshift drill: the runner's sandbox, its verdicts and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis

from memshift.config import Settings
from memshift.drills.context import DrillContext, DrillResult, Figures
from memshift.drills.runner import DRILLS, Drill, run_drill, sandbox

pytestmark = pytest.mark.faults


def quick_context(pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path,
                  seed: int = 0) -> DrillContext:
    """A drill's context on a test's own database and key prefix, quick configuration."""
    settings = Settings(redis_url=redis_url, postgres_dsn=pg_dsn, prefix=redis_prefix)
    return DrillContext(settings, tmp_path, quick=True, seed=seed)


def run_quick(name: str, pg_dsn: str, redis_url: str, redis_prefix: str,
              tmp_path: Path) -> DrillResult:
    """Run drill ``name`` in its quick configuration; it must not have crashed."""
    result = run_drill(DRILLS[name], quick_context(pg_dsn, redis_url, redis_prefix, tmp_path))
    assert result.error is None, result.error
    return result


def _failing(ctx: DrillContext) -> Figures:
    figs = Figures()
    figs.expect("messages lost", 3, 0)
    return figs


def _crashing(ctx: DrillContext) -> Figures:
    raise RuntimeError("the drill itself broke, password=hunter2")


def test_a_figure_off_fails_the_drill_and_a_crash_is_its_result(tmp_path: Path) -> None:
    ctx = DrillContext(Settings(), tmp_path, quick=True)

    off = run_drill(Drill("off", "test", _failing, (5, 5), "fails"), ctx)
    crashed = run_drill(Drill("crash", "test", _crashing, (5, 5), "raises"), ctx)

    assert (off.verdict, off.ok, [f.name for f in off.failed()]) == ("fail", False,
                                                                     ["messages lost"])
    assert crashed.verdict == "fail" and crashed.figures == ()
    assert crashed.error == "RuntimeError: the drill itself broke, password=***"


def test_the_sandbox_is_a_scratch_database_and_prefix_removed_afterwards(
    pg_admin_dsn: str, redis_url: str, tmp_path: Path
) -> None:
    settings = Settings(redis_url=redis_url, postgres_dsn=pg_admin_dsn, prefix="drilltest")
    client = redis.Redis.from_url(redis_url)
    with sandbox(settings) as (inner, workdir):
        name = psycopg.conninfo.conninfo_to_dict(inner.postgres_dsn)["dbname"]
        with psycopg.connect(inner.postgres_dsn) as conn:
            stage = conn.execute("SELECT stage FROM memshift.plan").fetchone()
        client.set(f"{inner.prefix}:session:x", b"1")
        assert workdir.is_dir()
    with psycopg.connect(pg_admin_dsn) as conn:
        left = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s",
                            (name,)).fetchone()
    keys = list(client.scan_iter(match=f"{inner.prefix}:*"))
    client.close()

    assert str(name).startswith("memshift_drill_") and inner.prefix.startswith("drilltest-drill-")
    assert stage == ("redis_only",)
    assert left == (0,) and keys == [] and not workdir.exists()


def memshift(*args: str, dsn: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSHIFT_")}
    env.update(MEMSHIFT_POSTGRES_DSN=dsn, MEMSHIFT_REDIS_URL=redis_url, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "memshift", *args], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_memshift_drill_json_prints_one_object_per_drill_and_exits_0(
    pg_admin_dsn: str, redis_url: str
) -> None:
    done = memshift("drill", "hostile-input", "--quick", "--json", dsn=pg_admin_dsn,
                    redis_url=redis_url)

    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0, done.stdout + done.stderr
    assert [r["drill"] for r in lines] == ["hostile-input"]
    assert lines[0]["verdict"] == "pass" and lines[0]["error"] is None
    figures = {f["figure"]: f for f in lines[0]["figures"]}
    assert figures["backfill exit code (0: no crash)"]["value"] == 0


def test_memshift_drill_table_and_an_unknown_drill(pg_admin_dsn: str, redis_url: str) -> None:
    shown = memshift("drill", "hostile-input", "--quick", dsn=pg_admin_dsn, redis_url=redis_url)
    unknown = memshift("drill", "no-such-drill", dsn=pg_admin_dsn, redis_url=redis_url)

    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "drill hostile-input (hostile): pass" in shown.stdout
    assert "id with quotes and SQL" in shown.stdout and "none failed" in shown.stdout
    assert unknown.returncode == 2
    assert "unknown drill(s) no-such-drill" in unknown.stderr
