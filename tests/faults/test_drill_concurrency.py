"""Concurrency drill: 8 writers, a backfill, a disorderly secondary; exact messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.test_drill_runner import run_quick

pytestmark = pytest.mark.faults


def test_eight_writers_during_a_backfill_with_shuffled_repeated_delivery_converge_exactly(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    result = run_quick("concurrency", pg_dsn, redis_url, redis_prefix, tmp_path)

    assert result.figure("writers") == 8
    assert result.figure("failed user writes") == 0
    # The disorder happened: without it the drill would prove nothing.
    assert result.figure("delivered out of order") > 0
    assert result.figure("delivered twice") > 0
    started, ended = result.figure("backfill batches done when the writers started, and ended")
    assert ended > started  # the writers wrote while the backfill copied
    assert result.figure("sessions whose message sets or order mismatch") == 0
    assert (result.figure("messages lost"), result.figure("messages duplicated")) == (0, 0)
    assert result.figure("parity after") == "66/66 pass"
    assert result.ok, result.failed()
