"""The memshift command line, run as a user runs it: a process, its output, its exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from memshift.sql.migrations import migrations
from memshift.stores.redis import RedisStore


def memshift(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMSHIFT_")}
    clean.update(env or {})
    clean["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "memshift", *args],
        capture_output=True, text=True, env=clean, cwd=cwd, timeout=300, check=False,
    )


def test_help_lists_the_commands() -> None:
    result = memshift("--help")
    assert result.returncode == 0
    for command in ("demo", "generate", "db", "config"):
        assert command in result.stdout


@pytest.mark.parametrize("command", [["demo"], ["generate"], ["db", "upgrade"], ["db", "status"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = memshift(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_db_upgrade_then_status_reports_current_as_json(empty_pg_dsn: str) -> None:
    before = memshift("--postgres-dsn", empty_pg_dsn, "db", "status", "--json")
    upgraded = memshift("--postgres-dsn", empty_pg_dsn, "db", "upgrade", "--json")
    again = memshift("--postgres-dsn", empty_pg_dsn, "db", "upgrade", "--json")
    after = memshift("--postgres-dsn", empty_pg_dsn, "db", "status", "--json")

    shipped = [f"{m.version:04d}_{m.name}" for m in migrations()]
    assert before.returncode == 1 and json.loads(before.stdout)["pending"] == shipped
    assert upgraded.returncode == 0 and json.loads(upgraded.stdout)["applied"] == shipped
    assert json.loads(again.stdout)["applied"] == []
    assert after.returncode == 0 and json.loads(after.stdout)["up_to_date"] is True


def test_a_command_without_postgres_says_what_to_set() -> None:
    result = memshift("db", "status")
    assert result.returncode == 2
    assert "MEMSHIFT_POSTGRES_DSN" in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_postgres_is_named_without_its_password() -> None:
    dsn = "postgresql://app:s3cr3t-pw@127.0.0.1:1/nowhere"
    result = memshift("--postgres-dsn", dsn, "db", "upgrade")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "127.0.0.1" in result.stderr
    assert "s3cr3t-pw" not in result.stderr + result.stdout


def test_config_shows_settings_with_the_password_hidden(tmp_path: Path) -> None:
    (tmp_path / "memshift.toml").write_text('prefix = "from-toml"\nlayout = "reference"\n')
    result = memshift(
        "config", "--json",
        env={"MEMSHIFT_POSTGRES_DSN": "postgresql://app:s3cr3t-pw@db:5432/app"},
        cwd=tmp_path,
    )
    shown = json.loads(result.stdout)
    assert shown["prefix"] == "from-toml"
    assert "s3cr3t-pw" not in result.stdout and "db:5432" in shown["postgres_dsn"]


def test_generate_writes_the_sessions_it_reports(redis_url: str, redis_prefix: str) -> None:
    result = memshift(
        "--redis-url", redis_url, "--prefix", redis_prefix, "generate", "-n", "12", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sessions"] == 12
    with RedisStore(redis.Redis.from_url(redis_url), prefix=redis_prefix) as store:
        ids = list(store.list_sessions())
        assert len(ids) == 12
        assert all(store.load_session(sid) is not None for sid in ids)


def test_demo_runs_a_staged_migration_under_traffic_and_every_session_agrees(
    pg_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    result = memshift(
        "--postgres-dsn", pg_dsn, "--redis-url", redis_url, "--prefix", redis_prefix,
        "demo", "-n", "16", "--step-seconds", "0.3", "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["resume_state_agrees"] == report["sessions"] == 16
    assert report["stage"] == "retired"
    # The final table: every stage walked, each step passed, one rollback by the rule.
    steps = report["steps"]
    assert [s["stage"] for s in steps] == [
        "redis_only", "dual_write", "shadow", "cutover", "cutover", "cutover", "cutover",
        "pg_primary", "retired"]
    assert [s["name"] for s in steps if s["stage"] == "cutover"] == [
        "cutover 10 %", "cutover 50 %", "cutover 50 %: drift → rollback → repair",
        "cutover 100 %"]
    assert all(s["passed"] for s in steps), [s for s in steps if not s["passed"]]
    assert report["passed"] is True
    assert report["rollbacks"] == {"by_rule": 1, "read_paths": ["resume"]}
    assert [s["rollbacks"] for s in steps] == [0, 0, 0, 0, 0, 1, 0, 0, 0]
    drift = steps[5]
    assert drift["parity"] == {"pass": 1, "fail": 1, "pending": 0, "error": 0}
    assert all(s["parity"].get("fail", 0) == 0 for s in steps if s is not drift)
    # Sessions written during a check are pending (judged again later), never failed.
    assert all(s["parity"]["pass"] + s["parity"].get("pending", 0) == 16
               for s in steps[1:] if s is not drift)
    assert report["traffic"]["writes"] > 0 and report["traffic"]["failed"] == 0
    assert report["backfill"]["state"] == "completed"
    stores = report["stores"]
    assert stores["postgres"]["summary versions"] >= stores["redis"]["summary versions"]
    assert stores["postgres"]["checkpoints"] >= stores["redis"]["checkpoints"]


def test_the_demo_refuses_to_move_a_plan_that_is_not_its_own(
    pg_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    common = ["--postgres-dsn", pg_dsn, "--redis-url", redis_url, "--prefix", redis_prefix]
    memshift(*common, "stage", "set", "dual_write", "--reason", "real migration")
    result = memshift(*common, "demo", "-n", "4")
    assert result.returncode == 2 and "scratch database" in result.stderr


def test_demo_with_no_servers_given_runs_on_embedded_ones(tmp_path: Path) -> None:
    result = memshift("demo", "-n", "5", "--step-seconds", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "5/5 sessions resume the same from both stores" in result.stdout
    table = result.stdout[result.stdout.index("The migration, step by step"):]
    for stage in ("redis_only", "dual_write", "shadow", "cutover 10 %", "cutover 50 %",
                  "drift → rollback → repair", "cutover 100 %", "pg_primary", "retired"):
        row = next(line for line in table.splitlines() if stage in line)
        assert "passed" in row and "FAILED" not in row, row
    assert "every step passed; 1 rollback(s) by the rollback rule" in result.stdout
    assert (tmp_path / ".memshift" / "pgdata").is_dir()


def test_backfill_off_a_terminal_logs_plain_progress_lines(
    pg_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    common = ["--postgres-dsn", pg_dsn, "--redis-url", redis_url, "--prefix", redis_prefix]
    memshift(*common, "generate", "-n", "10")
    result = memshift(*common, "backfill")
    assert result.returncode == 0, result.stderr
    assert "completed, 10/10 sessions" in result.stderr
    assert "10 migrated" in result.stdout
