"""Crash drills: SIGKILLed backfills, repair workers and dual-writing apps lose nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.test_drill_runner import run_quick

pytestmark = pytest.mark.faults


def test_a_backfill_killed_at_random_moments_finishes_with_nothing_lost_or_doubled(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    result = run_quick("crash-backfill", pg_dsn, redis_url, redis_prefix, tmp_path)

    assert result.figure("kills (SIGKILL)") == 5
    assert result.figure("backfill exit code after the kills") == 0
    assert result.figure("backfill runs (one, resumed)") == 1
    assert result.figure("sessions counted once by the run") == 120
    assert result.figure("messages copied") == result.figure("messages acknowledged") > 0
    assert (result.figure("messages lost"), result.figure("messages duplicated")) == (0, 0)
    assert result.figure("parity after") == "120/120 pass"
    assert result.ok, result.failed()


def test_a_repair_worker_killed_mid_drain_leaves_both_directions_whole(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    result = run_quick("crash-repair", pg_dsn, redis_url, redis_prefix, tmp_path)

    assert result.figure("kills (SIGKILL)") == 3
    assert result.figure("repair exit code after the kills") == 0
    assert (result.figure("repairs left in the queue"), result.figure("spool left")) == (0, False)
    for into in ("into PostgreSQL: ", "into Redis: "):
        assert result.figure(f"{into}messages acknowledged") > 0
        assert result.figure(f"{into}messages lost") == 0
        assert result.figure(f"{into}messages duplicated") == 0
    assert result.figure("parity after") == "120/120 pass"
    assert result.ok, result.failed()


def test_an_app_killed_between_its_two_writes_loses_nothing_once_recovered(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    result = run_quick("crash-dual-write", pg_dsn, redis_url, redis_prefix, tmp_path)

    for stage in ("dual_write", "pg_primary"):
        label = f"{stage}: "
        kills = result.figure(f"{label}kills between the two writes")
        assert kills == 2
        # Each kill really fell between the writes: the secondary lacked a message.
        assert result.figure(f"{label}messages the secondary lacked before recovery") >= kills
        assert result.figure(f"{label}messages lost") == 0
        assert result.figure(f"{label}messages duplicated") == 0
        assert result.figure(f"{label}parity after") == "10/10 pass"
    assert result.ok, result.failed()
