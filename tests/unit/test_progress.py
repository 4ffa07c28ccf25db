"""The backfill's progress: whole counts on an 80-column terminal, one final line in logs."""

from __future__ import annotations

import io

from rich.console import Console

from memshift.migrate.backfill import Summary
from memshift.observe.progress import BackfillProgress, bar


def test_an_80_column_terminal_shows_the_counts_whole() -> None:
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    shown = bar(console)
    task = shown.add_task("backfill run 12 (discovering + copying)", total=2_000_000,
                          rate="12,345 sessions/s · 234,567 msg/s")
    shown.update(task, completed=1_234_567)

    console.print(shown.make_tasks_table(shown.tasks))

    line = console.file.getvalue()  # type: ignore[attr-defined]
    assert len(line.splitlines()) == 1
    assert "1234567/2000000" in line and "62%" in line


def test_off_a_terminal_the_completed_run_is_logged_once() -> None:
    console = Console(file=io.StringIO(), width=200)
    done = Summary(run_id=7, state="completed", sessions_seen=10, migrated=10, messages=90,
                   seconds=1.0)

    with BackfillProgress(console) as progress:
        progress.update(Summary(run_id=7, state="running", sessions_seen=10, migrated=4))
        progress.update(done)  # the backfill reports its last summary twice
        progress.update(done)

    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert [line.split(",")[0] for line in lines] == [
        "backfill run 7: running", "backfill run 7: completed"]
