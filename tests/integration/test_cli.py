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
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
    columns: str | None = "200",
) -> subprocess.CompletedProcess[str]:
    """Run memshift as a user does; ``columns=None`` leaves $COLUMNS unset, as in a pipe."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MEMSHIFT_") and k != "COLUMNS"}
    clean.update(env or {})
    if columns is not None:
        clean["COLUMNS"] = columns
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


def test_help_pages_show_an_example_no_bool_metavar_and_plain_argument_names() -> None:
    for command in (["backfill"], ["stage", "set"], ["slice", "set"], ["parity"], ["demo"],
                    ["generate"], ["rule", "set"], ["quarantine", "retry"], ["config"]):
        shown = memshift(*command, "--help").stdout
        assert "Example: memshift" in shown, command
        assert "<bool>" not in shown, command
        assert "{" not in shown.splitlines()[1], command
    assert "stage set [OPTIONS] STAGE" in memshift("stage", "set", "--help").stdout
    assert "DESIGN" not in memshift("parity", "--help").stdout


def test_a_password_with_an_unencoded_at_sign_is_refused_and_never_shown() -> None:
    """libpq would take what follows its first '@' for the host, and quote it."""
    dsn = "postgresql://app:Secret1@pw@127.0.0.1:1/nowhere"
    failed = memshift("--postgres-dsn", dsn, "db", "upgrade")
    config = memshift("--postgres-dsn", dsn, "config")

    for result in (failed, config):
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "Secret1" not in result.stdout + result.stderr
        assert "pw@" not in result.stdout + result.stderr
        assert "postgresql://app:***@127.0.0.1:1/nowhere" in result.stderr
        assert "unencoded '@'" in result.stderr and "%40" in result.stderr


def test_an_unparseable_dsn_gets_a_template_that_is_not_mangled_by_redaction() -> None:
    result = memshift("--postgres-dsn", "host=x nonsense", "config")

    assert result.returncode == 2
    assert "postgresql://app@db.example:5432/memory" in result.stderr
    assert "[:***" not in result.stderr and "***@" not in result.stderr


def test_config_says_where_each_setting_came_from(tmp_path: Path) -> None:
    (tmp_path / "memshift.toml").write_text('layout = "reference"\n')

    result = memshift("--ttl-seconds", "60", "config", "--json", cwd=tmp_path,
                      env={"MEMSHIFT_PREFIX": "from-env"})
    table = memshift("--ttl-seconds", "60", "config", cwd=tmp_path,
                     env={"MEMSHIFT_PREFIX": "from-env"}, columns=None)

    sources = json.loads(result.stdout)["sources"]
    assert sources["prefix"] == "environment variable MEMSHIFT_PREFIX"
    assert sources["ttl_seconds"] == "flag --ttl-seconds"
    assert sources["layout"] == "key `layout` in memshift.toml"
    assert sources["redis_url"] == "default"
    row = next(line for line in table.stdout.splitlines() if "prefix" in line)
    assert "from-env" in row and "environment variable MEMSHIFT_PREFIX" in row


def test_tables_piped_off_a_terminal_are_not_cut_at_80_columns() -> None:
    dsn = "postgresql://migration-operator@a-rather-long-database-host.internal:5432/agent_memory"

    result = memshift("--postgres-dsn", dsn, "config", columns=None)

    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "postgres_dsn" in line)
    assert dsn in row and len(row) > 80


def test_generate_again_with_the_same_seed_refuses_before_writing_and_counts_trimming(
    redis_url: str, redis_prefix: str
) -> None:
    common = ["--redis-url", redis_url, "--prefix", redis_prefix]
    first = memshift(*common, "generate", "-n", "40", "--json")
    client = redis.Redis.from_url(redis_url)
    keys_before = sorted(client.scan_iter(match=f"{redis_prefix}:*", count=1000))
    again = memshift(*common, "generate", "-n", "40")
    other_seed = memshift(*common, "generate", "-n", "5", "--seed", "1")

    counts = json.loads(first.stdout)
    assert counts["messages_trimmed"] > 0
    with RedisStore(client, prefix=redis_prefix) as store:
        held = sum(len(state.messages) for sid in store.list_sessions()
                   if (state := store.load_session(sid)) is not None and sid.startswith("sess_0"))
    assert held == counts["messages"] - counts["messages_trimmed"]
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "40 of the 40 sessions that --seed 0 generates exist already" in again.stderr
    assert "--seed 1" in again.stderr and "--prefix" in again.stderr
    assert other_seed.returncode == 0, other_seed.stderr
    assert "wrote 5 sessions" in other_seed.stdout
    keys_after = sorted(k for k in client.scan_iter(match=f"{redis_prefix}:*", count=1000)
                        if b"sess_1_" not in k)
    assert keys_after == keys_before


def test_a_mistyped_read_path_is_refused_and_a_slice_can_be_deleted(pg_dsn: str) -> None:
    common = ["--postgres-dsn", pg_dsn]
    typo = memshift(*common, "slice", "set", "resum", "--percent", "5", "--reason", "r")
    version = json.loads(memshift(*common, "stage", "show", "--json").stdout)["version"]
    made = memshift(*common, "slice", "set", "resum", "--percent", "5", "--new-path",
                    "--reason", "typo", "--json")
    known = memshift(*common, "slice", "set", "resum", "--percent", "10", "--reason", "r",
                     "--json")
    default = memshift(*common, "slice", "set", "default", "--percent", "1", "--reason", "r")
    deleted = memshift(*common, "slice", "delete", "resum", "--reason", "typo for resume",
                       "--json")
    missing = memshift(*common, "slice", "delete", "resum", "--reason", "again")
    history = memshift(*common, "plan", "history", columns=None)

    assert typo.returncode == 2 and "'resum'" in typo.stderr and "--new-path" in typo.stderr
    assert "read_path=" in typo.stderr
    assert json.loads(made.stdout)["version"] == version + 1  # the refusal changed nothing
    assert json.loads(known.stdout)["slices"]["resum"]["percent"] == 10
    assert default.returncode == 0, default.stderr
    assert set(json.loads(deleted.stdout)["slices"]) == {"default"}
    assert missing.returncode == 10 and "no slice for read path 'resum'" in missing.stderr
    lines = history.stdout.splitlines()
    assert any("slice resum: 10 % → none" in line and "typo for resume" in line
               for line in lines)
    assert any("slice resum: none → 5 %" in line for line in lines)


def test_setting_the_current_stage_changes_nothing_and_an_empty_rule_set_is_refused(
    pg_dsn: str
) -> None:
    common = ["--postgres-dsn", pg_dsn]
    before = json.loads(memshift(*common, "plan", "history", "--json").stdout)
    same = memshift(*common, "stage", "set", "redis_only", "--reason", "r")
    empty = memshift(*common, "rule", "set", "--reason", "r")
    rule = memshift(*common, "rule", "set", "--window", "800", "--reason", "longer window")
    history = memshift(*common, "plan", "history", columns=None)
    after = json.loads(memshift(*common, "plan", "history", "--json").stdout)

    assert same.returncode == 0 and "at stage redis_only already: nothing changed" in same.stdout
    assert empty.returncode == 2 and "--drift-rate" in empty.stderr
    assert rule.returncode == 0, rule.stderr
    assert len(after) == len(before) + 1 and after[0]["why"] == "longer window"
    assert "rollback.window: 500 → 800" in history.stdout


def test_retrying_a_resolved_quarantine_entry_says_so(
    pg_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    key = f"{redis_prefix}:session:fixable"
    ts = "2026-05-19T09:00:00+00:00"
    client.hset(key, mapping={"tenant_id": "t", "user_id": "u", "status": "active",
                              "version": "1", "created_at": ts, "updated_at": ts,
                              "messages_trimmed": "0", "metadata": "{}"})
    client.rpush(f"{key}:messages", json.dumps({"id": "m0", "content": "hi", "ts": ts}))
    common = ["--postgres-dsn", pg_dsn, "--redis-url", redis_url, "--prefix", redis_prefix]
    memshift(*common, "backfill")
    entry_id = str(json.loads(memshift(*common, "quarantine", "list", "--json").stdout)[0]["id"])
    still = memshift(*common, "quarantine", "retry", entry_id)
    client.lset(f"{key}:messages", 0, json.dumps({"id": "m0", "role": "user", "content": "hi",
                                                  "ts": ts}))
    fixed = memshift(*common, "quarantine", "retry", entry_id)
    again = memshift(*common, "quarantine", "retry", entry_id, "--json")
    again_text = memshift(*common, "quarantine", "retry", entry_id)

    assert "0 migrated, 1 still bad (left in quarantine), 0 vanished" in still.stdout
    assert "1 migrated, 0 still bad" in fixed.stdout
    assert json.loads(again.stdout) == {"migrated": 0, "still_bad": 0, "vanished": 0,
                                        "already_resolved": [int(entry_id)]}
    assert f"quarantine entry {entry_id} is already resolved" in again_text.stdout
    assert "migrated" not in again_text.stdout.replace("was migrated", "")
