"""What the framework layouts' tests share: settings for a layout, a long text,
concurrent writers, and parity of a framework table changed by hand (the ``pg``
fixture is in conftest.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from memshift.config import Settings
from memshift.migrate.parity import PROJECTION, parity

LONG = "Lorem ipsum dolor sit amet, ünïcödé ✓ " * 6000  # ~230 kB


def layout_settings(layout: str, pg_dsn: str, redis_url: str, prefix: str) -> Settings:
    return Settings(redis_url=redis_url, postgres_dsn=pg_dsn, layout=layout, prefix=prefix)


def run_in_threads(work: Callable[[list[Any]], Any], items: list[Any], threads: int) -> None:
    """``work`` on ``threads`` interleaved parts of ``items``, each in its own thread."""
    workers = [threading.Thread(target=work, args=(items[i::threads],)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def projection_drift(config: Settings, ids: list[str], drifted: str) -> list[dict[str, Any]]:
    """Parity of ``ids`` after the framework table of ``drifted`` was changed by hand:
    that session fails ``projection_matches`` alone, every other one passes it. Returns
    the drifted session's diffs, with values (they are redacted by default)."""
    reports = list(parity(config, session_ids=ids))
    by_id = {r.session_id: r for r in reports}
    assert sorted(by_id) == sorted(ids)
    for sid, report in by_id.items():
        if sid != drifted:
            assert report.parity_status == "pass", (sid, report.as_json())
            assert report.checks[PROJECTION] is True
    report = by_id[drifted]
    assert report.parity_status == "fail"
    assert report.failed_checks == [PROJECTION]
    redacted = report.as_json()["diffs"]
    for diff in redacted:
        assert diff["check"] == PROJECTION
        for side in (diff["redis"], diff["postgres"]):
            assert side is None or isinstance(side, int) or set(side) == {"length", "sha256"}
    return report.as_json(show_values=True)["diffs"]


def diffs_of_a_deleted_row(table: str, rows: list[Any], seq: int) -> list[dict[str, Any]]:
    """What parity shows once the row of ``seq`` (rows listed from seq 0) is deleted from
    ``table``: one row fewer, and at that seq the row that followed it."""
    return [
        {"check": PROJECTION, "field": f"{table}.message_count",
         "redis": len(rows), "postgres": len(rows) - 1},
        {"check": PROJECTION, "field": f"{table}[seq={seq}]",
         "redis": rows[seq], "postgres": rows[seq + 1]},
    ]
