"""Outage drills: PostgreSQL refused, hung and cut; Redis killed and restarted; no user error."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.test_drill_runner import run_quick

pytestmark = pytest.mark.faults


def test_postgres_refused_hung_and_cut_under_dual_write_fails_no_user_write(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    result = run_quick("outage-postgres", pg_dsn, redis_url, redis_prefix, tmp_path)

    assert result.figure("outage phases") == ["hung", "refused and cut",
                                              "cut after 300 bytes, and every 0.5 s"]
    assert result.figure("user writes") > 0 and result.figure("user reads") > 0
    assert result.figure("failed user writes") == 0
    assert (result.figure("failed user reads"), result.figure("stale reads")) == (0, 0)
    # The outage really was one: secondary writes failed and waited in the spool/queue.
    assert result.figure("repair queue depth at peak (rows + spool lines)") > 0
    assert result.figure("queue drained after the outage") is True
    assert result.figure("spool left") is False
    assert (result.figure("messages lost"), result.figure("messages duplicated")) == (0, 0)
    sessions = result.figure("sessions")
    assert result.figure("parity after") == f"{sessions}/{sessions} pass"
    assert result.ok, result.failed()


def test_redis_restarted_in_pg_primary_and_retired_fails_no_user_call_and_drains(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    result = run_quick("outage-redis", pg_dsn, redis_url, redis_prefix, tmp_path)

    for stage in ("pg_primary", "retired"):
        label = f"{stage}: "
        assert result.figure(f"{label}failed user writes") == 0
        assert result.figure(f"{label}failed user reads") == 0
        assert result.figure(f"{label}stale reads") == 0
        assert result.figure(f"{label}stale resumes afterwards (every session, a new router)") == 0
        assert result.figure(f"{label}queue drained after the outage") is True
    assert result.figure("pg_primary: repair queue depth at peak (rows + spool lines)") > 0
    assert result.figure("pg_primary: messages lost") == 0
    sessions = result.figure("pg_primary: sessions")
    assert result.figure("pg_primary: parity after") == f"{sessions}/{sessions} pass"
    assert result.figure("retired: stale resumes after the writer's background repair") == 0
    assert result.ok, result.failed()
